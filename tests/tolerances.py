"""Absolute and relative tolerances per dtype, shared by every test that compares numbers."""

import torch

# (atol, rtol) for an elementwise comparison against a float64 or float32 reference whose
# reduction length is small (tens of terms). Tests with long reductions scale atol by
# sqrt(reduction length) through `tolerance`.
TOLERANCES = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-5, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def tolerance(dtype, reduction_length=1):
    """Return ``dict(atol=..., rtol=...)`` for ``dtype``, with atol grown as sqrt(reduction_length)."""
    atol, rtol = TOLERANCES[dtype]
    return {"atol": atol * max(1.0, reduction_length) ** 0.5, "rtol": rtol}

# Statistical tests of sampled filters fail when a statistic lies more than this many standard
# errors from its expectation. By the normal approximation, the max over the d(d+1)/2 entries of a
# covariance with d <= 25 exceeds it with probability below 1e-6. The tests use fixed seeds.
SAMPLE_Z_BOUND = 6.0
