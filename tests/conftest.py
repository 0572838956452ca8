"""Shared test set-up.

The Triton interpreter must be chosen before triton is first imported, so this runs at collection
time. On a machine without CUDA every Triton kernel then runs on the CPU under the interpreter.
"""

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def max_covariance_z(samples, cov):
    """Return the largest |z| of the second moments of zero-mean ``samples`` against ``cov``.

    ``samples`` is (n, d) and ``cov`` is (d, d). For Gaussian samples with mean zero, the estimate
    ``mean_k x_ki x_kj`` of ``cov[i, j]`` has standard error ``sqrt((cov_ii cov_jj + cov_ij^2) / n)``,
    so each entry's z is its error divided by that standard error.
    """
    samples = samples.detach().to(torch.float64)
    cov = cov.to(torch.float64)
    n = samples.shape[0]
    estimate = samples.T @ samples / n
    variances = cov.diagonal()
    standard_error = ((variances[:, None] * variances[None, :] + cov**2) / n).sqrt()
    return float(((estimate - cov).abs() / standard_error).max())


@pytest.fixture
def covariance_z():
    """The function ``max_covariance_z``, for statistical tests of sampled filters."""
    return max_covariance_z


def mean_square_z(weight, cov):
    """Return the |z| of the mean squared weight of filters sampled from N(0, ``cov``).

    ``weight`` contains C filters of d taps in its first dimension. The mean of the C * d squared
    weights has mean tr(cov) / d and variance 2 tr(cov^2) / (C d^2).
    """
    channels = weight.shape[0]
    cov = cov.to(torch.float64)
    d = cov.shape[0]
    mean_square = weight.detach().to(torch.float64).pow(2).mean()
    expected = cov.diagonal().mean()
    standard_error = math.sqrt(2.0 * float((cov**2).sum()) / channels) / d
    return float((mean_square - expected).abs()) / standard_error


@pytest.fixture
def scale_z():
    """The function ``mean_square_z``, for tests of the scale of sampled filters."""
    return mean_square_z
