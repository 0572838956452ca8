"""Sampling filters from N(0, cov): factorization, backend choice, and the in-place initializer."""

import os

import torch

from . import _checks

# Jitter added to the diagonal of a matrix whose Cholesky failed, relative to its mean diagonal,
# tried in order before the eigendecomposition fallback. 1e-10 makes a rank-deficient PSD matrix
# factorizable in float64 in most cases and changes the samples by far less than float32 rounding.
JITTER_STEPS = (1e-10, 1e-8)

# The torch path draws the normals of at most this many filters at once, which bounds its peak
# memory at about (chunk * d) * 4 bytes of noise on top of the output.
MAX_NORMALS_PER_CHUNK = 1 << 24


def factorize(cov):
    """Factor one covariance or a bank into float64 L with ``L @ L.T == cov``.

    Args:
        cov: (d, d) or (B, d, d) symmetric PSD matrices.

    Returns:
        (B, d, d) float64 factors, B = 1 for a single matrix. Matrices that Cholesky factors are
        returned as their lower-triangular Cholesky factor. The others get the jitter of
        ``JITTER_STEPS`` and, if that fails too, a symmetric square root from an eigendecomposition
        with rounding-level negative eigenvalues clamped to zero. Such factors are not triangular.

    Raises:
        ValueError: a matrix is not square, not finite, not symmetric, or clearly indefinite.
    """
    if not isinstance(cov, torch.Tensor) or cov.device.type == "cpu":
        return factorize_stack(_checks.covariance_stack(cov))
    return factorize_deferred(cov)


def factorize_deferred(cov):
    """Factor like ``factorize`` on devices where reading a flag on the host waits, such as CUDA.

    The value checks and the Cholesky failures become one flag, so the common case waits once.
    Identical matrices are not merged, since finding them would wait too.
    """
    stack, invalid = _checks.covariance_stack_deferred(cov)
    factors, info = torch.linalg.cholesky_ex(stack)
    # The one wait for the device in the common case: a single flag, set when any matrix is not
    # finite, not symmetric or not factored. An error can only be raised from the host, so one
    # wait is the minimum.
    if not bool((invalid | (info != 0)).any()):
        return factors
    _checks.covariance_stack(cov)  # raises for a matrix that is not finite or not symmetric
    return repair_failed(stack, factors, info)


def factorize_stack(stack, indices=None):
    """Factor a validated, symmetric float64 (B, d, d) stack (see ``factorize``).

    On the CPU, identical matrices in the stack, such as one covariance shared by many layers, are
    factored once. On other devices the whole stack goes to one batched Cholesky, because finding
    duplicates there would wait for the device. ``indices`` gives each matrix's index in the
    caller's bank, for error messages.
    """
    if stack.shape[0] > 1 and stack.device.type == "cpu":
        distinct, inverse = torch.unique(stack.reshape(stack.shape[0], -1), dim=0, return_inverse=True)
        if distinct.shape[0] < stack.shape[0]:
            positions = torch.arange(stack.shape[0], device=inverse.device)
            first = torch.full((distinct.shape[0],), stack.shape[0], device=inverse.device)
            first = first.scatter_reduce(0, inverse, positions, reduce="amin")
            factors = factorize_stack(distinct.reshape(-1, *stack.shape[1:]), first.tolist())
            return factors[inverse]
    factors, info = torch.linalg.cholesky_ex(stack)
    if not bool((info != 0).any()):
        return factors
    return repair_failed(stack, factors, info, indices)


def repair_failed(stack, factors, info, indices=None):
    """Return ``factors`` with each matrix whose Cholesky failed (``info != 0``) factored again."""
    factors = factors.clone()
    for index in (info != 0).nonzero().flatten().tolist():
        label = index if indices is None else indices[index]
        factors[index] = factorize_failing(stack[index], label)
    return factors


def factorize_failing(matrix, index):
    """Factor one matrix whose plain Cholesky failed, or raise if it is not a covariance."""
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    largest = float(eigenvalues[-1].clamp(min=0.0))
    most_negative = float(eigenvalues[0])
    if most_negative < -_checks.NEGATIVE_EIGENVALUE_RTOL * max(largest, torch.finfo(torch.float64).tiny):
        raise ValueError(
            f"cov[{index}] is not positive semidefinite: its most negative eigenvalue is "
            f"{most_negative:.6g} against a largest eigenvalue of {largest:.6g}; pass a covariance "
            "matrix (for example A @ A.T, or torch.cov of samples)"
        )
    mean_diagonal = float(matrix.diagonal().mean())
    identity = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    for step in JITTER_STEPS:
        factor, info = torch.linalg.cholesky_ex(matrix + step * mean_diagonal * identity)
        if int(info) == 0:
            return factor
    roots = eigenvalues.clamp(min=0.0).sqrt()
    return eigenvectors * roots


def seed_from(generator, device):
    """Draw a 31-bit kernel seed from ``generator`` or, without one, from torch's default generator.

    Returns an int when the seed is drawn on the CPU. Otherwise it returns a one-element int64
    tensor on ``device``, which the kernel reads, so that drawing the seed does not wait for the
    device. A generator on another GPU costs a device-to-device copy.
    """
    seed_device = generator.device if generator is not None else device
    seed = torch.randint(0, 2**31 - 1, (1,), generator=generator, device=seed_device)
    return int(seed) if seed.device.type == "cpu" else seed.to(device)


def triton_available(device):
    """Return whether the Triton sampling kernel can run on ``device``."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def sample_from_factors(factors, n, *, generator=None, dtype=torch.float32, backend="auto"):
    """Draw ``n`` samples per factor: ``out[b, j] = factors[b] @ z[b, j]`` with z standard normal.

    This is the step after ``factorize``. Call it directly to sample many times from factors
    computed once.

    Args:
        factors: (B, d, d) factors, as ``factorize`` returns them.
        n: samples per factor, >= 0.
        generator: ``torch.Generator`` for the normals. On the Triton path it seeds the kernel's
            Philox stream, so the two backends give different samples from the same generator.
        dtype: output dtype.
        backend: "auto" (Triton on CUDA, torch elsewhere), "torch" or "triton".

    Returns:
        (B, n, d) samples on the device of ``factors``.
    """
    backend = _checks.backend_name(backend)
    dtype = _checks.float_dtype(dtype)
    n = _checks.non_negative_int(n, "n")
    device = factors.device
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    if backend == "triton":
        if not triton_available(device):
            raise ValueError(
                "backend='triton' needs a CUDA tensor, or TRITON_INTERPRET=1 set before triton is "
                "imported to run the kernel on the CPU under the Triton interpreter"
            )
        from .kernels import sampling as sampling_kernels

        seed = seed_from(generator, device)
        return sampling_kernels.sample_from_factors(
            factors.to(torch.float32).contiguous(), n, seed, dtype=dtype
        )
    return sample_from_factors_torch(factors, n, generator, dtype)


def sample_from_factors_torch(factors, n, generator, dtype):
    """Sample with ``torch.randn`` and a batched matmul, in chunks of bounded size."""
    batch, d, _ = factors.shape
    compute_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    factors_t = factors.to(compute_dtype).transpose(-1, -2)
    out = torch.empty(batch, n, d, dtype=dtype, device=factors.device)
    chunk = max(1, MAX_NORMALS_PER_CHUNK // max(1, batch * d))
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        normals = torch.randn(
            batch, stop - start, d, generator=generator, dtype=compute_dtype, device=factors.device
        )
        out[:, start:stop] = torch.bmm(normals, factors_t)
    return out


def sample(cov, n, *, generator=None, kernel_size=None, dtype=torch.float32, backend="auto"):
    """Sample filters from N(0, cov).

    Args:
        cov: (d, d) covariance, or a (B, d, d) bank of them.
        n: filters per covariance, >= 0.
        generator: optional ``torch.Generator`` on the device of ``cov``.
        kernel_size: (kh, kw) with kh * kw == d; inferred as square when omitted.
        dtype: output dtype, float32 by default.
        backend: "auto", "torch" or "triton" (see ``sample_from_factors``).

    Returns:
        (n, kh, kw) for a single matrix, (B, n, kh, kw) for a bank, on the device of ``cov``.

    Example:
        >>> from convcov_fast import covariance
        >>> filters = sample(covariance.gaussian(7, sigma=1.0), 96)
        >>> filters.shape
        torch.Size([96, 7, 7])
    """
    factors = factorize(cov)
    kh, kw = _checks.kernel_size_from_dim(factors.shape[-1], kernel_size)
    n = _checks.non_negative_int(n, "n")
    samples = sample_from_factors(factors, n, generator=generator, dtype=dtype, backend=backend)
    samples = samples.reshape(factors.shape[0], n, kh, kw)
    return samples[0] if cov.dim() == 2 else samples


def init_(weight, cov, *, generator=None, backend="auto"):
    """Fill a depthwise weight in place with filters sampled from N(0, cov).

    Args:
        weight: (C, 1, kh, kw) tensor, for example ``conv.weight`` of a depthwise ``nn.Conv2d``.
        cov: (d, d) covariance with d = kh * kw.
        generator: optional ``torch.Generator``. Sampling runs on its device, and on the weight's
            device without one.
        backend: "auto", "torch" or "triton".

    Returns:
        ``weight``.

    Example:
        >>> import torch
        >>> from convcov_fast import covariance
        >>> conv = torch.nn.Conv2d(64, 64, 9, padding="same", groups=64)
        >>> _ = init_(conv.weight, covariance.gaussian(9, sigma=1.0))
    """
    channels, kh, kw = _checks.depthwise_weight(weight)
    _checks.float_dtype(weight.dtype, "weight.dtype")
    if isinstance(cov, torch.Tensor) and cov.dim() == 3 and cov.shape[0] == 1:
        cov = cov[0]
    if isinstance(cov, torch.Tensor) and cov.dim() != 2:
        raise ValueError(
            f"cov for init_ must be one (d, d) matrix, got shape {tuple(cov.shape)}; "
            "initialize each layer with its own matrix of a bank"
        )
    device = generator.device if generator is not None else weight.device
    if isinstance(cov, torch.Tensor):
        cov = cov.to(device)
    factors = factorize(cov)
    _checks.kernel_size_from_dim(factors.shape[-1], (kh, kw))
    return fill_from_factors(weight, factors, generator=generator, backend=backend)


def fill_from_factors(weight, factors, *, generator=None, backend="auto"):
    """Fill a validated (C, 1, kh, kw) weight in place from (1, d, d) factors; returns ``weight``."""
    channels, _, kh, kw = weight.shape
    filters = sample_from_factors(factors, channels, generator=generator, backend=backend)
    with torch.no_grad():
        weight.copy_(filters.reshape(channels, 1, kh, kw))
    return weight
