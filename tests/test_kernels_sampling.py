"""Tests of the Triton sampling kernels in ``convcov_fast.kernels.sampling``.

Without CUDA they run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
so the sizes are small. Factors are Cholesky factors of random SPD matrices computed in float64.
"""

import math

import pytest
import torch
import triton
import triton.language as tl

from convcov_fast import reference
from convcov_fast.kernels import sampling as sampling_kernels
from tolerances import tolerance

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# (kh, kw): odd, even and rectangular kernels.
KERNEL_SIZES = [(3, 3), (4, 4), (3, 5), (5, 2)]

# Statistical checks allow errors of up to MAX_Z standard errors, a false alarm rate of about
# 2e-9 per checked value under a normal approximation.
MAX_Z = 6.0

# TF32 keeps 10 mantissa bits, so each product is off by up to about 2**-10 relative. The test
# allows twice that, plus an absolute error that grows as sqrt(d) because each output sums d
# such errors.
TF32_RTOL = 2.0**-9


def spd_factors(batch, d, seed):
    """Return (B, d, d) float64 Cholesky factors of random SPD matrices A A^T / d + 0.1 I."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, d, d, dtype=torch.float64, generator=generator)
    cov = a @ a.mT / d + 0.1 * torch.eye(d, dtype=torch.float64)
    return torch.linalg.cholesky(cov)


def float32_factors(factors64):
    """Return the float32 contiguous copy of float64 factors that the kernel takes, on DEVICE."""
    return factors64.to(device=DEVICE, dtype=torch.float32).contiguous()


def expected_samples(factors32, n, seed):
    """Return L @ z in float64, with z from ``standard_normals`` for the same seed."""
    batch, d, _ = factors32.shape
    normals = sampling_kernels.standard_normals(batch, n, d, seed, device=DEVICE)
    return reference.sample_from_factors(factors32.double(), normals.double())


def poisoned(batch, n, d, dtype=torch.float32):
    return torch.full((batch, n, d), float("nan"), dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("kernel_size", KERNEL_SIZES, ids=lambda k: f"{k[0]}x{k[1]}")
@pytest.mark.parametrize("batch", [1, 3])
def test_samples_match_float64_reference(kernel_size, batch):
    d = kernel_size[0] * kernel_size[1]
    # 100 filters leave the last row block partial for every default block size.
    n = 100
    factors = float32_factors(spd_factors(batch, d, seed=d + batch))
    out = poisoned(batch, n, d)

    result = sampling_kernels.sample_from_factors(factors, n, seed=11, out=out)

    assert result is out
    assert not torch.isnan(out).any()
    expected = expected_samples(factors, n, seed=11)
    torch.testing.assert_close(out.double(), expected, **tolerance(torch.float32, d))


@pytest.mark.parametrize("n", [1, 17, 65])
def test_partial_row_blocks_are_written(n):
    d = 9
    factors = float32_factors(spd_factors(2, d, seed=n))
    out = poisoned(2, n, d)

    sampling_kernels.sample_from_factors(factors, n, seed=3, out=out, block_n=16)

    assert not torch.isnan(out).any()
    expected = expected_samples(factors, n, seed=3)
    torch.testing.assert_close(out.double(), expected, **tolerance(torch.float32, d))


def test_column_tiles_cover_large_d():
    # d = 49 with 16-wide tiles: four column blocks and four reduction chunks, the last partial.
    d, n = 49, 40
    factors = float32_factors(spd_factors(2, d, seed=49))
    out = poisoned(2, n, d)

    sampling_kernels.sample_from_factors(
        factors, n, seed=5, out=out, block_n=16, block_d=16, block_k=16
    )

    assert not torch.isnan(out).any()
    expected = expected_samples(factors, n, seed=5)
    torch.testing.assert_close(out.double(), expected, **tolerance(torch.float32, d))


@pytest.mark.parametrize("kernel_size", [(3, 3), (3, 5)], ids=lambda k: f"{k[0]}x{k[1]}")
def test_sample_covariance_matches_factor(kernel_size, covariance_z):
    d = kernel_size[0] * kernel_size[1]
    batch, n = 2, 12000
    factors64 = spd_factors(batch, d, seed=100 + d)
    factors = float32_factors(factors64)
    covs = factors.double().cpu() @ factors.double().cpu().mT

    samples = sampling_kernels.sample_from_factors(factors, n, seed=2024)
    transposed = sampling_kernels.sample_from_factors(factors.mT.contiguous(), n, seed=2024)
    scaled = sampling_kernels.sample_from_factors(1.1 * factors, n, seed=2024)

    for b in range(batch):
        assert covariance_z(samples[b].cpu(), covs[b]) < MAX_Z
        # The check must be sharp enough to reject samples from a wrong factor.
        assert covariance_z(transposed[b].cpu(), covs[b]) > MAX_Z
        assert covariance_z(scaled[b].cpu(), covs[b]) > MAX_Z


def test_standard_normals_are_standard():
    batch, n, d = 2, 500, 25
    z = sampling_kernels.standard_normals(batch, n, d, seed=9, device=DEVICE).double().cpu()
    count = z.numel()

    # Mean 0 and variance 1 within six standard errors (the variance of z^2 is 2).
    assert abs(float(z.mean())) < MAX_Z / math.sqrt(count)
    assert abs(float(z.pow(2).mean()) - 1.0) < MAX_Z * math.sqrt(2.0 / count)
    # Neighbors along each axis are uncorrelated, so no offset is reused across t, j or b.
    for neighbors in (
        z[:, :, 1:] * z[:, :, :-1],
        z[:, 1:, :] * z[:, :-1, :],
        z[1:] * z[:-1],
    ):
        assert abs(float(neighbors.mean())) < MAX_Z / math.sqrt(neighbors.numel())


def test_same_seed_same_samples_other_seed_differs():
    d, n = 16, 50
    factors = float32_factors(spd_factors(2, d, seed=1))

    first = sampling_kernels.sample_from_factors(factors, n, seed=77)
    again = sampling_kernels.sample_from_factors(factors, n, seed=77)
    other = sampling_kernels.sample_from_factors(factors, n, seed=78)

    assert torch.equal(first, again)
    assert float((first != other).double().mean()) > 0.99


def test_standard_normals_same_seed_same_values():
    first = sampling_kernels.standard_normals(1, 30, 9, seed=2**40, device=DEVICE)
    again = sampling_kernels.standard_normals(1, 30, 9, seed=2**40, device=DEVICE)
    other = sampling_kernels.standard_normals(1, 30, 9, seed=2**40 + 1, device=DEVICE)

    assert torch.equal(first, again)
    assert float((first != other).double().mean()) > 0.99


@pytest.mark.parametrize("seed", [5, 2**40 + 3])
def test_tensor_seed_equals_int_seed(seed):
    # 2**40 + 3 sets bits above 32, which an int32 load of the seed would lose.
    factors = float32_factors(spd_factors(2, 9, seed=6))
    seed_tensor = torch.tensor([seed], dtype=torch.int64, device=DEVICE)

    from_int = sampling_kernels.sample_from_factors(factors, 40, seed)
    from_tensor = sampling_kernels.sample_from_factors(factors, 40, seed_tensor)
    normals_int = sampling_kernels.standard_normals(2, 40, 9, seed, device=DEVICE)
    normals_tensor = sampling_kernels.standard_normals(2, 40, 9, seed_tensor, device=DEVICE)

    assert torch.equal(from_int, from_tensor)
    assert torch.equal(normals_int, normals_tensor)
    other = sampling_kernels.standard_normals(2, 40, 9, seed + 1, device=DEVICE)
    assert float((normals_tensor != other).double().mean()) > 0.99


def test_invalid_tensor_seed_raises():
    factors = float32_factors(spd_factors(1, 9, seed=0))
    cases = [
        (TypeError, "must be int64", torch.tensor([3], dtype=torch.int32, device=DEVICE)),
        (TypeError, "must be int64", torch.tensor([1.0], device=DEVICE)),
        (TypeError, "must be int64", torch.tensor([True], device=DEVICE)),
        (ValueError, "one value", torch.tensor([1, 2], device=DEVICE)),
        (ValueError, "one value", torch.zeros(0, dtype=torch.int64, device=DEVICE)),
        (ValueError, "use one device", torch.tensor([1], device="meta")),
        (TypeError, "seed must be an int", True),
    ]
    for error, message, seed in cases:
        with pytest.raises(error, match=message):
            sampling_kernels.sample_from_factors(factors, 4, seed)


@pytest.mark.parametrize("d", [15, 25])
def test_block_sizes_do_not_change_samples(d):
    n = 70
    factors = float32_factors(spd_factors(2, d, seed=d))

    small = sampling_kernels.sample_from_factors(
        factors, n, seed=31, block_n=16, block_d=16, block_k=16
    )
    large = sampling_kernels.sample_from_factors(
        factors, n, seed=31, block_n=64, block_d=32, block_k=32
    )

    # Only the float32 summation order differs between the two tilings.
    torch.testing.assert_close(small, large, **tolerance(torch.float32, d))
    expected = expected_samples(factors, n, seed=31)
    torch.testing.assert_close(large.double(), expected, **tolerance(torch.float32, d))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_output_dtype_is_one_cast_of_float32(dtype):
    d, n = 9, 40
    factors = float32_factors(spd_factors(2, d, seed=4))
    out = poisoned(2, n, d, dtype)

    sampling_kernels.sample_from_factors(factors, n, seed=8, out=out, dtype=dtype)
    as_float32 = sampling_kernels.sample_from_factors(factors, n, seed=8)

    assert not torch.isnan(out).any()
    if dtype == torch.bfloat16 and DEVICE.type == "cpu":
        # NOTE: the triton 3.9 interpreter truncates float32 to bfloat16 where GPUs round to
        # nearest even, so its result may be one bfloat16 step off torch's cast.
        torch.testing.assert_close(out, as_float32.to(dtype), **tolerance(torch.bfloat16))
    else:
        torch.testing.assert_close(out, as_float32.to(dtype), atol=0.0, rtol=0.0)


def test_tf32_precision_stays_close():
    d, n = 25, 64
    factors = float32_factors(spd_factors(2, d, seed=6))

    out = sampling_kernels.sample_from_factors(factors, n, seed=12, input_precision="tf32")

    expected = expected_samples(factors, n, seed=12)
    atol = TF32_RTOL * math.sqrt(d) * float(expected.abs().max())
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=TF32_RTOL)


def test_zero_filters_returns_empty_without_launch(monkeypatch):
    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("the kernel was launched for n = 0")

    monkeypatch.setattr(sampling_kernels, "_sample_kernel", NoLaunch())
    monkeypatch.setattr(sampling_kernels, "_sample_kernel_autotuned", NoLaunch())
    factors = float32_factors(spd_factors(3, 9, seed=0))

    empty = sampling_kernels.sample_from_factors(factors, 0, seed=1)
    out = torch.empty(3, 0, 9, device=DEVICE)
    returned = sampling_kernels.sample_from_factors(factors, 0, seed=1, out=out)

    assert empty.shape == (3, 0, 9)
    assert empty.dtype == torch.float32
    assert returned is out
    assert sampling_kernels.standard_normals(3, 0, 9, seed=1, device=DEVICE).shape == (3, 0, 9)


@triton.jit
def _offsets_probe_kernel(out_ptr, b, n, d, j0, t0, BLOCK: tl.constexpr):
    """Store the offsets of z[b, j0 + i, t0 + k] for i, k < BLOCK, formed as the kernel does."""
    j = j0 + tl.arange(0, BLOCK)
    t = t0 + tl.arange(0, BLOCK)
    rows = sampling_kernels._flat_rows(b, j, n)
    offsets = sampling_kernels._noise_offsets(rows, t, d)
    index = tl.arange(0, BLOCK)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    tl.store(out_ptr + index, offsets)


@triton.jit
def _normals_probe_kernel(out_ptr, seed, start, BLOCK: tl.constexpr):
    """Store tl.randn at the int64 offsets start + i and (start + i) mod 2**32."""
    offsets = start + tl.arange(0, BLOCK).to(tl.int64)
    tl.store(out_ptr + tl.arange(0, BLOCK), tl.randn(seed, offsets))
    tl.store(out_ptr + BLOCK + tl.arange(0, BLOCK), tl.randn(seed, offsets & 0xFFFFFFFF))


def test_noise_offsets_do_not_overflow_int32():
    # The last element of a 32-factor bank of 1e6 filters of size 31 x 31 is at about 3.1e10.
    batch, n, d, block = 32, 1_000_000, 961, 16
    b, j0, t0 = batch - 1, n - block, d - block
    out = torch.empty(block, block, dtype=torch.int64, device=DEVICE)

    _offsets_probe_kernel[(1,)](out, b, n, d, j0, t0, BLOCK=block)

    j = torch.arange(j0, j0 + block, dtype=torch.int64)
    t = torch.arange(t0, t0 + block, dtype=torch.int64)
    expected = (b * n + j)[:, None] * d + t[None, :]
    assert int(expected.max()) == batch * n * d - 1
    assert torch.equal(out.cpu(), expected)


def test_normals_differ_past_two_to_the_32():
    block = 64
    out = torch.empty(2 * block, dtype=torch.float32, device=DEVICE)

    _normals_probe_kernel[(1,)](out, 5, 3 * 2**32 + 1000, BLOCK=block)

    high, low = out[:block], out[block:]
    assert bool(torch.isfinite(high).all())
    assert bool((high != low).all())


def test_prune_keeps_tiles_within_padded_d():
    configs = sampling_kernels._gpu_configs()
    for d in (9, 16, 25, 49, 155, 961):
        kept_configs = sampling_kernels._prune_configs(configs, {"d": d})
        padded = max(16, triton.next_power_of_2(d))
        assert kept_configs
        assert all(config.kwargs["BLOCK_D"] <= padded for config in kept_configs)
        assert all(config.kwargs["BLOCK_K"] <= padded for config in kept_configs)
    assert len(sampling_kernels._prune_configs(configs, {"d": 961})) == len(configs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the autotuned launch")
@pytest.mark.parametrize("kernel_size", [(3, 3), (7, 7), (31, 5), (31, 31)])
def test_autotuned_launch_matches_reference(kernel_size):
    d = kernel_size[0] * kernel_size[1]
    n = 1000
    factors = float32_factors(spd_factors(2, d, seed=d))
    out = poisoned(2, n, d)

    sampling_kernels.sample_from_factors(factors, n, seed=21, out=out)

    assert not torch.isnan(out).any()
    expected = expected_samples(factors, n, seed=21)
    torch.testing.assert_close(out.double(), expected, **tolerance(torch.float32, d))


def test_invalid_arguments_raise():
    factors = float32_factors(spd_factors(1, 9, seed=0))
    cases = [
        (TypeError, "float32", dict(factors=factors.double())),
        (ValueError, r"\(B, d, d\)", dict(factors=factors[0])),
        (ValueError, r"\(B, d, d\)", dict(factors=factors[:, :, :4])),
        (ValueError, "contiguous", dict(factors=factors.mT)),
        (ValueError, "n must be >= 0", dict(n=-1)),
        (TypeError, "n must be an int", dict(n=2.5)),
        (ValueError, "seed must be in", dict(seed=-1)),
        (ValueError, "seed must be in", dict(seed=2**63)),
        (TypeError, "dtype must be one of", dict(dtype=torch.int32)),
        (ValueError, "input_precision", dict(input_precision="tf32x3")),
        (ValueError, "power of two", dict(block_n=24)),
        (ValueError, "block_k must be", dict(block_k=8)),
        (ValueError, "out must have shape", dict(out=torch.empty(1, 4, 8, device=DEVICE))),
        (TypeError, "out has dtype", dict(out=torch.empty(1, 4, 9, device=DEVICE).half())),
    ]
    for error, message, changes in cases:
        arguments = dict(factors=factors, n=4, seed=0) | changes
        factors_arg = arguments.pop("factors")
        n_arg = arguments.pop("n")
        seed_arg = arguments.pop("seed")
        with pytest.raises(error, match=message):
            sampling_kernels.sample_from_factors(factors_arg, n_arg, seed_arg, **arguments)


def test_standard_normals_invalid_arguments_raise():
    with pytest.raises(ValueError, match="d must be >= 1"):
        sampling_kernels.standard_normals(1, 4, 0, seed=0, device=DEVICE)
    with pytest.raises(ValueError, match="B must be >= 0"):
        sampling_kernels.standard_normals(-1, 4, 9, seed=0, device=DEVICE)
    with pytest.raises(ValueError, match="meta"):
        sampling_kernels.standard_normals(1, 4, 9, seed=0, device="meta")
