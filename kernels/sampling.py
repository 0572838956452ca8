"""Triton kernels that sample filters from a bank of covariance factors.

``sample_from_factors`` computes ``out[b, j, :] = L_b @ z[b, j, :]`` for a bank of factors L of
shape (B, d, d), where z is standard normal noise that the kernel draws with Philox
(``tl.randn``) inside the matrix-product loop, so the noise never goes to memory. The normal
z[b, j, t] depends only on the seed and the logical element index ``(b * n + j) * d + t``. The
samples are therefore the same for every block size and grid shape, up to float32 summation
order, and ``standard_normals`` writes exactly that z for tests.

Float32 matrix-product precision: ``input_precision="ieee"`` (the default) multiplies in full
float32 with float32 accumulation. ``"tf32"`` runs the product on tensor cores with both operands
reduced to TF32, whose 10-bit mantissa gives a relative error of about 1e-3 per product. The
warning in ``tl.dot``'s docstring (triton 3.9) states that the operands may be truncated rather
than rounded. By our estimate, truncation shrinks each operand by 2**-11 relative on average, so
the samples shrink by about 2**-10 and their covariance by about 2**-9 (2e-3). That bias equals one
standard error of a diagonal covariance entry, sqrt(2 / n), near n = 5e5 filters, so it shows only
in large samples. The interpreter always multiplies in float32 with numpy and ignores the choice.
"""

import torch
import triton
import triton.language as tl

# triton.jit picks the interpreter when the module is imported, from TRITON_INTERPRET=1, so the
# launch configuration is chosen from the same flag, read at the same time.
_INTERPRET = bool(triton.knobs.runtime.interpret)

INPUT_PRECISIONS = ("ieee", "tf32")
OUTPUT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
MAX_SEED = 2**63 - 1
# tl.dot needs every tile dimension >= 16. The upper bound rejects tiles far past the largest d
# this package samples (31 x 31 = 961). A large explicit tile can still exceed a GPU's shared
# memory, which Triton reports when it compiles the kernel.
MIN_BLOCK = 16
MAX_BLOCK = 1024
# CUDA limits grid axes 1 and 2 to 65535 programs, and the bank index runs along axis 2.
MAX_FACTORS = 65535
# Elements per program of the noise kernel. On a GPU it only writes and is memory bound, and 1024
# elements give each of 4 warps 8 elements per thread. Under the interpreter every program costs a
# fixed Python overhead of milliseconds, so fewer, larger programs are faster.
NORMALS_BLOCK = 16384 if _INTERPRET else 1024


@triton.jit
def _flat_rows(b, j, n):
    """Return the int64 rows ``b * n + j`` of the (B * n, d) view of z and of the output."""
    return b.to(tl.int64) * n + j


@triton.jit
def _noise_offsets(rows, cols, d):
    """Return the Philox offsets (block of int64) of z[row, col] for flat rows ``b * n + j``.

    ``rows`` must be int64: for B * n * d up to 32 * 1e6 * 961 (about 3.1e10) the offset exceeds
    int32. ``tl.randint4x`` in triton 3.9 puts the low and high 32 bits of an int64 offset into
    the first two Philox counter words, so every offset below 2**64 gets its own counter.
    """
    return rows[:, None] * d + cols[None, :]


@triton.jit
def _load_seed(seed, SEED_IN_MEMORY: tl.constexpr):
    """Return the Philox seed: ``seed`` itself, or the int64 it points to."""
    if SEED_IN_MEMORY:
        return tl.load(seed)
    return seed


@triton.jit(do_not_specialize=["seed"])
def _sample_kernel(
    factors_ptr,
    out_ptr,
    seed,
    n,
    d,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    SEED_IN_MEMORY: tl.constexpr,
):
    """Write one (BLOCK_N, BLOCK_D) tile of ``out[b] = z[b] @ L_b^T`` with z drawn in-register.

    Pointers:
        factors_ptr: (B, d, d) float32, contiguous (row-major), loaded as float32.
        out_ptr: (B, n, d) contiguous, float32, float64, float16 or bfloat16. The float32
            accumulator is cast to it once, at the store.
        seed: the Philox seed, or with SEED_IN_MEMORY a pointer to it (one int64).

    Grid:
        axis 0: blocks of BLOCK_N filters j of one factor, cdiv(n, BLOCK_N) programs.
        axis 1: blocks of BLOCK_D output coordinates r, cdiv(d, BLOCK_D) programs.
        axis 2: the factor index b, B programs.

    The reduction over t runs in chunks of BLOCK_K. Each chunk draws the (BLOCK_N, BLOCK_K) noise
    tile z[b, j, t] from Philox at its logical offset and multiplies it by the (BLOCK_K, BLOCK_D)
    tile L_b[r, t]^T with ``tl.dot``, accumulating in float32. Programs along axis 1 draw the same
    noise again, so z is drawn cdiv(d, BLOCK_D) times in total. Padding entries (t >= d) load
    L = 0 and contribute nothing; rows j >= n are never stored.
    """
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2)

    j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    r = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    rows = _flat_rows(b, j, n)
    factor_ptr = factors_ptr + b.to(tl.int64) * d * d
    seed = _load_seed(seed, SEED_IN_MEMORY)

    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        t = k0 + tl.arange(0, BLOCK_K)
        z = tl.randn(seed, _noise_offsets(rows, t, d))
        factor_t = tl.load(
            factor_ptr + r[None, :] * d + t[:, None],
            mask=(t[:, None] < d) & (r[None, :] < d),
            other=0.0,
        )
        acc = tl.dot(z, factor_t, acc, input_precision=INPUT_PRECISION)

    out_mask = (j[:, None] < n) & (r[None, :] < d)
    tl.store(
        out_ptr + rows[:, None] * d + r[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=out_mask,
    )


@triton.jit(do_not_specialize=["seed"])
def _standard_normal_kernel(out_ptr, seed, numel, BLOCK: tl.constexpr,
                            SEED_IN_MEMORY: tl.constexpr):
    """Write the noise of ``_sample_kernel``: ``out.flatten()[i] = randn(seed, i)``.

    Pointers:
        out_ptr: (B, n, d) float32, contiguous, so the flat index i is ``(b * n + j) * d + t``,
            the offset ``_sample_kernel`` draws z[b, j, t] at.

    Grid:
        axis 0: blocks of BLOCK flat elements, cdiv(B * n * d, BLOCK) programs.
    """
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    noise = tl.randn(_load_seed(seed, SEED_IN_MEMORY), offsets)
    tl.store(out_ptr + offsets, noise, mask=offsets < numel)


def _gpu_configs():
    """Return the autotune search space of ``_sample_kernel`` on GPUs.

    BLOCK_D = 16 fits d <= 16 (3x3, 4x4) with little padding. Wide BLOCK_D tiles (128, 256) cut
    how often large d (31x31 = 961) draws the same noise again, at the price of larger
    accumulators, hence 8 warps. BLOCK_K = 32 halves the loop trips against 16 for d >= 32.
    """
    shapes = [
        # (BLOCK_N, BLOCK_D, BLOCK_K, num_warps)
        (64, 16, 16, 4),
        (128, 16, 16, 4),
        (64, 32, 16, 4),
        (128, 32, 32, 4),
        (64, 64, 16, 4),
        (64, 64, 32, 4),
        (128, 64, 32, 8),
        (64, 128, 32, 8),
        (128, 128, 32, 8),
        (32, 256, 32, 8),
        (64, 256, 32, 8),
    ]
    return [
        triton.Config(
            {"BLOCK_N": block_n, "BLOCK_D": block_d, "BLOCK_K": block_k},
            num_warps=num_warps,
            num_stages=num_stages,
        )
        for block_n, block_d, block_k, num_warps in shapes
        for num_stages in (2, 3)
    ]


def _prune_configs(configs, named_args, **kwargs):
    """Drop configs whose BLOCK_D or BLOCK_K exceeds d padded to a power of two (at least 16).

    Such a tile is all padding past d, so it only costs time. The (64, 16, 16) config always
    survives, so the list is never empty.
    """
    padded = max(MIN_BLOCK, triton.next_power_of_2(named_args["d"]))
    return [
        config
        for config in configs
        if config.kwargs["BLOCK_D"] <= padded and config.kwargs["BLOCK_K"] <= padded
    ]


# Keyed on d only: d sets the padding and how often noise is drawn again, while n only sets how
# many row blocks there are.
_sample_kernel_autotuned = triton.autotune(
    configs=_gpu_configs(),
    key=["d"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_sample_kernel)


def default_blocks(d):
    """Return the fixed (block_n, block_d, block_k) used when autotuning is off.

    Under the interpreter each program costs a fixed Python overhead of milliseconds, so tall row
    blocks of 512 filters are faster, and d up to 64 fits one column block. On a GPU this is the
    configuration for an explicit but partial block choice, a mid-sized entry of the autotune space.
    """
    padded = max(MIN_BLOCK, triton.next_power_of_2(d))
    if _INTERPRET:
        return 512, min(padded, 64), min(padded, 64)
    return 64, min(padded, 128), min(padded, 32)


def _check_int(value, name, minimum, maximum=None):
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if not isinstance(value, int):
        try:
            value = value.__index__()
        except (AttributeError, TypeError):
            raise TypeError(f"{name} must be an int, got {value!r}") from None
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return int(value)


def _check_seed(seed, device):
    """Return (seed, in_memory) for an int seed or a one-element int64 tensor on ``device``.

    A tensor seed stays on the device and the kernel loads it, so that a seed drawn there, for
    example from a CUDA ``torch.Generator``, needs no copy to the host.
    """
    if not isinstance(seed, torch.Tensor):
        return _check_int(seed, "seed", 0, MAX_SEED), False
    if seed.dtype != torch.int64:
        raise TypeError(
            f"a tensor seed must be int64, got {seed.dtype}; pass "
            "torch.randint(0, 2**31 - 1, (1,), device=...)"
        )
    if seed.numel() != 1:
        raise ValueError(
            f"a tensor seed must hold one value, got shape {tuple(seed.shape)}; pass "
            "torch.randint(0, 2**31 - 1, (1,), device=...)"
        )
    # torch.device("cuda") names the current GPU, so a seed on any index of that type matches it.
    if seed.device.type != device.type or device.index not in (None, seed.device.index):
        raise ValueError(f"seed is on {seed.device} but the output is on {device}; use one device")
    # Its value is not range-checked, since reading it would wait for the device. Philox takes
    # its 64 bits as they are, so every value gives a valid stream.
    return seed.reshape(1).contiguous(), True


def _check_block(value, name):
    if value is None:
        return None
    value = _check_int(value, name, MIN_BLOCK, MAX_BLOCK)
    if value & (value - 1):
        raise ValueError(
            f"{name} must be a power of two in [{MIN_BLOCK}, {MAX_BLOCK}], got {value}; "
            f"try {triton.next_power_of_2(value)}"
        )
    return value


def _check_device(device, name):
    if device.type == "cuda":
        return
    if device.type == "cpu" and _INTERPRET:
        return
    raise ValueError(
        f"{name} is on {device}, but the Triton kernels run on CUDA devices, or on the CPU only "
        "under the Triton interpreter; move it to a CUDA device, or set TRITON_INTERPRET=1 "
        "before triton is imported"
    )


def _check_factors(factors):
    if not isinstance(factors, torch.Tensor):
        raise TypeError(f"factors must be a torch.Tensor, got {type(factors).__name__}")
    if factors.dim() != 3 or factors.shape[1] != factors.shape[2]:
        raise ValueError(
            f"factors must have shape (B, d, d), got {tuple(factors.shape)}; "
            "pass one factor as factors[None]"
        )
    if factors.shape[1] < 1:
        raise ValueError(f"factors must have d >= 1, got shape {tuple(factors.shape)}")
    if factors.shape[0] > MAX_FACTORS:
        raise ValueError(
            f"factors has {factors.shape[0]} matrices, more than the {MAX_FACTORS} one launch "
            "covers; split the bank into chunks"
        )
    if factors.dtype != torch.float32:
        raise TypeError(
            f"factors must be float32, got {factors.dtype}; pass factors.to(torch.float32)"
        )
    if not factors.is_contiguous():
        raise ValueError("factors must be contiguous; pass factors.contiguous()")
    _check_device(factors.device, "factors")


def _check_out(out, shape, dtype, device):
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
    if tuple(out.shape) != shape:
        raise ValueError(f"out must have shape {shape}, got {tuple(out.shape)}")
    if out.dtype != dtype:
        raise TypeError(f"out has dtype {out.dtype} but dtype is {dtype}; pass dtype={out.dtype}")
    if out.device != device:
        raise ValueError(f"out is on {out.device} but factors are on {device}; use one device")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous; pass a buffer from torch.empty")


def sample_from_factors(
    factors,
    n,
    seed,
    *,
    out=None,
    dtype=torch.float32,
    block_n=None,
    block_d=None,
    block_k=None,
    input_precision="ieee",
):
    """Sample ``n`` filters per factor: ``out[b, j, :] = factors[b] @ z[b, j, :]``.

    The standard normals z are drawn inside the kernel from the seed and the logical index of
    z[b, j, t] (``standard_normals`` returns the same z), and are never stored.

    Args:
        factors: (B, d, d) float32 contiguous factors L, on a CUDA device (or on the CPU under
            TRITON_INTERPRET=1). Samples have covariance L @ L.T.
        n: filters per factor, >= 0.
        seed: Philox seed, an int in [0, 2**63 - 1], or a one-element int64 tensor on the
            device of ``factors`` that holds it (read by the kernel, never copied to the host).
        out: optional contiguous (B, n, d) buffer of dtype ``dtype`` to write into.
        dtype: output dtype, one of float32, float64, float16, bfloat16. The product is computed
            in float32 whatever the output dtype.
        block_n, block_d, block_k: tile sizes, powers of two in [16, 1024] over filters, output
            coordinates and the reduction. Any given one turns autotuning off, and the others take
            ``default_blocks(d)``. Under the interpreter the default is always ``default_blocks``.
        input_precision: "ieee" (full float32 products) or "tf32" (tensor cores, relative error
            about 1e-3 per product, see the module docstring).

    Returns:
        ``out``, or a new (B, n, d) tensor, on the device of ``factors``.

    Raises:
        TypeError: a wrong type or dtype of ``factors``, ``out`` or an int argument.
        ValueError: a wrong shape, device, layout, range or block size.
    """
    _check_factors(factors)
    n = _check_int(n, "n", 0)
    seed, seed_in_memory = _check_seed(seed, factors.device)
    if dtype not in OUTPUT_DTYPES:
        raise TypeError(f"dtype must be one of {OUTPUT_DTYPES}, got {dtype!r}")
    if input_precision not in INPUT_PRECISIONS:
        raise ValueError(
            f"input_precision must be one of {INPUT_PRECISIONS}, got {input_precision!r}"
        )
    blocks = [_check_block(block_n, "block_n"), _check_block(block_d, "block_d")]
    blocks.append(_check_block(block_k, "block_k"))

    batch, d, _ = factors.shape
    if out is None:
        out = torch.empty(batch, n, d, dtype=dtype, device=factors.device)
    else:
        _check_out(out, (batch, n, d), dtype, factors.device)
    if n == 0 or batch == 0:
        return out

    autotune = not _INTERPRET and all(block is None for block in blocks)
    if autotune:
        grid = lambda meta: (
            triton.cdiv(n, meta["BLOCK_N"]),
            triton.cdiv(d, meta["BLOCK_D"]),
            batch,
        )
        _sample_kernel_autotuned[grid](
            factors, out, seed, n, d, INPUT_PRECISION=input_precision,
            SEED_IN_MEMORY=seed_in_memory,
        )
        return out

    defaults = default_blocks(d)
    block_n, block_d, block_k = (
        default if block is None else block for block, default in zip(blocks, defaults)
    )
    grid = (triton.cdiv(n, block_n), triton.cdiv(d, block_d), batch)
    _sample_kernel[grid](
        factors,
        out,
        seed,
        n,
        d,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        BLOCK_K=block_k,
        INPUT_PRECISION=input_precision,
        SEED_IN_MEMORY=seed_in_memory,
    )
    return out


def standard_normals(B, n, d, seed, *, device):
    """Return the (B, n, d) float32 standard normals z that ``sample_from_factors`` draws.

    For the same seed, ``sample_from_factors(L, n, seed)[b, j]`` equals ``L[b] @ z[b, j]`` up to
    float32 rounding. ``seed`` is an int or a one-element int64 tensor, as in
    ``sample_from_factors``. This materializes z, so it is meant for tests and small sizes.
    """
    B = _check_int(B, "B", 0)
    n = _check_int(n, "n", 0)
    d = _check_int(d, "d", 1)
    device = torch.device(device)
    _check_device(device, "device")
    seed, seed_in_memory = _check_seed(seed, device)
    out = torch.empty(B, n, d, dtype=torch.float32, device=device)
    numel = out.numel()
    if numel == 0:
        return out
    grid = (triton.cdiv(numel, NORMALS_BLOCK),)
    _standard_normal_kernel[grid](out, seed, numel, BLOCK=NORMALS_BLOCK,
                                  SEED_IN_MEMORY=seed_in_memory)
    return out
