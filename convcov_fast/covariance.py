"""Covariances over the taps of depthwise convolution filters.

A kh x kw filter is flattened row-major into a vector of d = kh * kw taps, so tap (i, j) has index
``i * kw + j`` and a covariance is a (d, d) matrix. A bank is a (L, d, d) stack, one covariance per
layer of a network. Everything here returns float64 tensors: sampling factors them in float64.

The closed-form family follows Trockman, Willmott and Kolter, "Understanding the Covariance
Structure of Convolutional Filters" (ICLR 2023): the covariance of tap (i, j) with tap (p, q)
decays as a Gaussian of their distance, and the width grows with depth.
"""

import json
import math
import numbers
import os
import pickle
import zipfile

import torch

from . import _checks

BANK_FORMAT = "convcov_fast.bank"
BANK_VERSION = 1

# Defaults of the closed-form bank, in taps: nearly independent taps in the first layer, wider
# filters in the last, and no constant correlation between taps (see ``gaussian``).
# `convcov-fast study --full` chose them by validation accuracy with frozen filters (ConvMixer-32/4,
# kernels 5, 9 and 15, 10,000 Fashion-MNIST images). NOTE: sigma_first 0.25 led 0.5 by only 0.43
# points of validation accuracy. Our estimate of the standard error of that difference is 0.7
# points, and docs/results.md has the numbers.
SIGMA_FIRST = 0.25
SIGMA_LAST = 1.5
CONSTANT = 0.0


def default_variance(kernel_size):
    """Return 1 / (3 kh kw), the per-weight variance of ``torch.nn.Conv2d``'s default depthwise init.

    That init is U(-b, b) with b = 1 / sqrt(fan_in) and fan_in = kh * kw, whose variance is b^2 / 3.
    """
    kh, kw = _checks.kernel_size_pair(kernel_size)
    return 1.0 / (3.0 * kh * kw)


def tap_coordinates(kernel_size):
    """Return the (d, 2) float64 (row, column) coordinates of the taps of a kh x kw filter."""
    kh, kw = kernel_size
    rows, cols = torch.meshgrid(
        torch.arange(kh, dtype=torch.float64), torch.arange(kw, dtype=torch.float64), indexing="ij"
    )
    return torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=1)


def gaussian(kernel_size, sigma, *, variance=None, constant=0.0):
    """Build the closed-form covariance of a kh x kw filter.

    ``S = v * ((1 - c) * G + c * 1 1^T)`` with ``G[(i, j), (p, q)] = exp(-((i - p)^2 + (j - q)^2)
    / (2 sigma^2))``. Viewed as a kh x kw grid of kh x kw blocks, the block of tap (i, j) is a
    Gaussian bump of width ``sigma`` centred on (i, j), raised by the constant ``c``. That
    constant is the correlation that every pair of taps shares. G is positive semidefinite for every sigma > 0
    because the Gaussian is a positive-definite kernel on the plane, and ``1 1^T`` is a rank-one
    PSD matrix, so S is PSD for every c in [0, 1). Both terms have a unit diagonal, so every
    diagonal entry of S is v. As sigma goes to 0, G tends to the identity.

    Args:
        kernel_size: int or (kh, kw).
        sigma: width of the bump, in taps; > 0.
        variance: the mean diagonal v, the per-weight variance of sampled filters. Defaults to
            ``default_variance(kernel_size)``.
        constant: the constant correlation c of every pair of taps, in [0, 1). At 0 the matrix is
            the pure Gaussian; near 1 every filter is close to a constant times the all-ones filter.

    Returns:
        (d, d) float64 covariance, d = kh * kw.

    Example:
        >>> cov = gaussian(9, sigma=1.5)
        >>> cov.shape
        torch.Size([81, 81])
    """
    kernel_size = _checks.kernel_size_pair(kernel_size)
    sigma = _checks.positive_number(sigma, "sigma")
    constant = constant_fraction(constant)
    if variance is None:
        variance = default_variance(kernel_size)
    variance = _checks.positive_number(variance, "variance")
    taps = tap_coordinates(kernel_size)
    squared_distance = (taps[:, None, :] - taps[None, :, :]).pow(2).sum(-1)
    correlation = torch.exp(-squared_distance / (2.0 * sigma**2))
    return variance * ((1.0 - constant) * correlation + constant)


def constant_fraction(constant, name="constant"):
    """Return ``constant`` as a float, raising unless it is a finite number in [0, 1)."""
    if isinstance(constant, bool) or not isinstance(constant, numbers.Real):
        raise TypeError(f"{name} must be a number in [0, 1), got {constant!r}")
    if not math.isfinite(constant) or not 0.0 <= constant < 1.0:
        raise ValueError(
            f"{name} must be in [0, 1), got {constant!r}; it is the correlation shared by every "
            "pair of taps, and 1 would make every filter constant"
        )
    return float(constant)


def depth_sigmas(depth, sigma_first, sigma_last):
    """Return the ``depth`` widths spaced linearly from ``sigma_first`` to ``sigma_last``."""
    if depth == 1:
        return [sigma_first]
    step = (sigma_last - sigma_first) / (depth - 1)
    return [sigma_first + step * layer for layer in range(depth)]


def closed_form(
    depth,
    kernel_size,
    *,
    sigma_first=SIGMA_FIRST,
    sigma_last=SIGMA_LAST,
    constant=CONSTANT,
    variance=None,
):
    """Build a (depth, d, d) bank of Gaussian covariances whose width grows linearly with depth.

    Layer ``l`` gets ``gaussian(kernel_size, sigma_l, constant=constant)`` with sigma_l spaced
    linearly from ``sigma_first`` (layer 0) to ``sigma_last`` (layer depth - 1). A bank of depth 1
    uses ``sigma_first``. The defaults are those of ``SIGMA_FIRST``, ``SIGMA_LAST`` and ``CONSTANT``.

    Example:
        >>> closed_form(8, 9).shape
        torch.Size([8, 81, 81])
    """
    depth = _checks.positive_int(depth, "depth")
    kernel_size = _checks.kernel_size_pair(kernel_size)
    sigma_first = _checks.positive_number(sigma_first, "sigma_first")
    sigma_last = _checks.positive_number(sigma_last, "sigma_last")
    constant = constant_fraction(constant)
    sigmas = depth_sigmas(depth, sigma_first, sigma_last)
    return torch.stack(
        [gaussian(kernel_size, s, variance=variance, constant=constant) for s in sigmas]
    )


def empirical(filters):
    """Compute the covariance of learned filters, centred and unbiased like ``torch.cov``.

    Args:
        filters: (C, 1, kh, kw) or (C, kh, kw), C >= 2 filters.

    Returns:
        (d, d) float64 covariance of the C filters viewed as samples of d taps.
    """
    if not isinstance(filters, torch.Tensor):
        raise TypeError(f"filters must be a torch.Tensor, got {type(filters).__name__}")
    if filters.dim() == 4 and filters.shape[1] == 1:
        filters = filters[:, 0]
    if filters.dim() != 3:
        raise ValueError(
            f"filters must have shape (C, 1, kh, kw) or (C, kh, kw), got {tuple(filters.shape)}"
        )
    if filters.shape[0] < 2:
        raise ValueError(
            f"filters contains {filters.shape[0]} filter(s), but an unbiased covariance needs at least 2; pass more filters"
        )
    samples = filters.detach().reshape(filters.shape[0], -1).to(torch.float64)
    if not torch.isfinite(samples).all():
        raise ValueError("filters contain NaN or Inf")
    return torch.cov(samples.T)


def depthwise_weight_of(module):
    """Return the (C, 1, kh, kw) filters of a depthwise convolution module, or None.

    A ``torch.nn.Conv2d`` is depthwise when groups == in_channels == out_channels. Modules of this
    package mark themselves with ``is_depthwise_conv = True``.
    """
    if getattr(module, "is_depthwise_conv", False):
        return module.weight
    if isinstance(module, torch.nn.Conv2d):
        if module.groups == module.in_channels == module.out_channels:
            return module.weight
    return None


def from_model(model):
    """Build a bank with the empirical covariance of each depthwise convolution of ``model``.

    Layers come in ``model.modules()`` order. All of them must share one kernel size, since a
    bank is one (L, d, d) tensor; resize the covariances yourself for mixed models.
    """
    names, weights = [], []
    for name, module in model.named_modules():
        weight = depthwise_weight_of(module)
        if weight is not None:
            names.append(name)
            weights.append(weight)
    if not weights:
        raise ValueError(
            f"{type(model).__name__} has no depthwise convolution "
            "(an nn.Conv2d with groups == in_channels == out_channels)"
        )
    sizes = {tuple(w.shape[-2:]) for w in weights}
    if len(sizes) > 1:
        listing = ", ".join(f"{n or '<root>'}: {tuple(w.shape[-2:])}" for n, w in zip(names, weights))
        raise ValueError(
            f"depthwise kernel sizes differ ({listing}); a bank needs one kernel size, so call "
            "empirical() per layer and resize() the results to a common size"
        )
    return torch.stack([empirical(w) for w in weights])


def linear_resampling_matrix(source, target):
    """Return the (target, source) matrix of 1-D linear resampling with aligned end points.

    Output tap ``i`` reads the source at position ``i * (source - 1) / (target - 1)``, so the first
    and last taps of both grids coincide. A target of 1 tap reads the source's centre.
    """
    matrix = torch.zeros(target, source, dtype=torch.float64)
    for i in range(target):
        if target == 1:
            position = (source - 1) / 2.0
        else:
            position = i * (source - 1) / (target - 1)
        low = min(int(position), source - 1)
        high = min(low + 1, source - 1)
        frac = position - low
        matrix[i, low] += 1.0 - frac
        matrix[i, high] += frac
    return matrix


def resize(cov, kernel_size, *, source_kernel_size=None):
    """Transfer covariances to another kernel size as the covariance of resampled filters.

    With R the bilinear resampling matrix from the source to the target grid, the result is
    ``R @ cov @ R.T``: the exact covariance of bilinearly resampled filters, so it stays PSD. The
    per-tap variance is that of the resampled filters and is not rescaled.

    Args:
        cov: (d, d) covariance or (L, d, d) bank.
        kernel_size: target int or (kh, kw).
        source_kernel_size: kernel size of ``cov``; inferred as square when omitted.

    Returns:
        float64 tensor of shape (d', d') or (L, d', d').
    """
    stack = _checks.covariance_stack(cov)
    source = _checks.kernel_size_from_dim(stack.shape[-1], source_kernel_size)
    target = _checks.kernel_size_pair(kernel_size)
    rows = linear_resampling_matrix(source[0], target[0])
    cols = linear_resampling_matrix(source[1], target[1])
    resampling = torch.kron(rows, cols)
    resized = resampling @ stack @ resampling.T
    return resized[0] if cov.dim() == 2 else resized


def interpolate_depth(bank, depth):
    """Map a bank of L covariances to ``depth`` layers by linear interpolation along the layer axis.

    Layer ``l`` of the result sits at position ``l * (L - 1) / (depth - 1)`` of the source, so the
    first and last covariances are kept. Each result is a convex combination of two PSD matrices
    and so PSD. A result of depth 1 is the first covariance.
    """
    stack = _checks.covariance_stack(bank, "bank")
    depth = _checks.positive_int(depth, "depth")
    layers = stack.shape[0]
    out = []
    for layer in range(depth):
        position = 0.0 if depth == 1 else layer * (layers - 1) / (depth - 1)
        low = min(int(position), layers - 1)
        high = min(low + 1, layers - 1)
        frac = position - low
        out.append((1.0 - frac) * stack[low] + frac * stack[high])
    return torch.stack(out)


def save_bank(path, bank, *, kernel_size=None, **metadata):
    """Save a (L, d, d) bank with its kernel size and JSON-serializable provenance metadata.

    The file is a ``torch.save`` archive of tensors, strings and numbers only, which
    ``load_bank`` reads with ``weights_only=True``.
    """
    stack = _checks.covariance_stack(bank, "bank")
    kh, kw = _checks.kernel_size_from_dim(stack.shape[-1], kernel_size, "bank")
    try:
        metadata_json = json.dumps(metadata)
    except TypeError as error:
        raise TypeError(f"bank metadata must be JSON-serializable: {error}") from None
    payload = {
        "format": BANK_FORMAT,
        "version": BANK_VERSION,
        "bank": stack.cpu().contiguous(),
        "kernel_size": [kh, kw],
        "metadata": metadata_json,
    }
    torch.save(payload, os.fspath(path))


def load_bank(path):
    """Load a bank written by ``save_bank`` without unpickling code.

    Returns:
        (bank, metadata): the (L, d, d) float64 bank, and the saved metadata dict with
        ``metadata["kernel_size"] == (kh, kw)``.
    """
    payload = load_tensors(path, "bank file")
    if not isinstance(payload, dict) or payload.get("format") != BANK_FORMAT:
        raise ValueError(f"{path} is not a convcov_fast bank file (missing format tag {BANK_FORMAT!r})")
    try:
        bank = payload["bank"]
        kh, kw = (int(k) for k in payload["kernel_size"])
        metadata = json.loads(payload["metadata"])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path} is a corrupt bank file: {error!r}") from None
    if not isinstance(bank, torch.Tensor) or bank.dim() != 3 or bank.shape[-1] != kh * kw:
        raise ValueError(f"{path} is a corrupt bank file: bank does not have shape (L, {kh * kw}, {kh * kw})")
    bank = _checks.covariance_stack(bank, f"bank in {path}")
    metadata["kernel_size"] = (kh, kw)
    return bank, metadata


def load_tensors(path, what):
    """Load a ``torch.save`` file with ``weights_only=True``, turning failures into clear errors."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    # torch.save writes a zip archive. Anything else would reach the legacy unpickler, whose errors
    # on garbage bytes read like the rejection of pickled code below.
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a readable {what} (truncated or corrupt): not a torch.save zip archive")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} was rejected: it needs code to be unpickled, which is unsafe "
            f"(loaded with weights_only=True): {str(error).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as error:
        raise ValueError(f"{path} is not a readable {what} (truncated or corrupt): {error}") from None
