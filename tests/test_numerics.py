"""Numerical limits: half-precision overflow, extreme covariance scales, chunked sampling memory,
and covariances at the edge of positive semidefiniteness."""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import convcov_fast
from convcov_fast import _checks, reference
from tolerances import TOLERANCES

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRITON_DEPTHWISE = importlib.util.find_spec("convcov_fast.kernels.depthwise") is not None
TRITON_SAMPLING = DEVICE.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"

# ---------------------------------------------------------------------------------------------
# Half-precision inputs whose partial sums overflow float16

KERNEL = 31
FLOAT32_EPS = torch.finfo(torch.float32).eps


def overflowing_case(dtype, size, seed=0):
    """Return x, w in ``dtype`` whose row-by-row partial sums exceed the float16 range.

    x is uniform in [2e4, 3e4). The filter is +1/31 on the rows above its centre, 0 on the centre
    row and -1/31 below it, so one half of the taps sums to about 15 * 31 * 2.5e4 / 31 = 3.8e5,
    beyond float16's 65504, while the two halves cancel to a few thousand where the window lies
    inside the image.
    """
    generator = torch.Generator().manual_seed(seed)
    x = 2e4 + 1e4 * torch.rand(1, 2, size, size, generator=generator, dtype=torch.float64)
    weight = torch.full((2, 1, KERNEL, KERNEL), 1.0 / KERNEL, dtype=torch.float64)
    weight[:, :, KERNEL // 2] = 0.0
    weight[:, :, KERNEL // 2 + 1 :] *= -1.0
    return x.to(DEVICE, dtype), weight.to(DEVICE, dtype)


def assert_float32_accumulation(actual, x, weight, padding4, dtype):
    """Check ``actual`` against float64 wherever the true result fits in ``dtype``.

    The allowed error is the final rounding to ``dtype`` (the table's rtol) plus a float32
    accumulator's error, 8 * sqrt(taps) * eps32 * sum |x w|. A float16 accumulator overflows to
    inf here, and a bfloat16 one is off by about 2**-8 * 3.8e5, far more than that bound.
    """
    expected = reference.depthwise_conv2d(x.double(), weight.double(), None, padding4)
    magnitude = reference.depthwise_conv2d(x.double().abs(), weight.double().abs(), None, padding4)
    representable = expected.abs() <= torch.finfo(dtype).max
    assert representable.float().mean() > 0.2
    actual = actual.double()[representable]
    expected = expected[representable]
    assert torch.isfinite(actual).all()
    bound = TOLERANCES[dtype][1] * expected.abs() + 8 * KERNEL * FLOAT32_EPS * magnitude[representable]
    error = (actual - expected).abs()
    assert (error <= bound).all(), f"max error {error.max():.4g}, max excess {(error - bound).max():.4g}"


def check_large_half_inputs(dtype_name, backend="auto"):
    """Check the forward pass and the input gradient on ``overflowing_case``, raising on failure."""
    dtype = getattr(torch, dtype_name)
    padding4 = _checks.padding4("same", (KERNEL, KERNEL))
    x, weight = overflowing_case(dtype, 40)
    y = convcov_fast.depthwise_conv2d(x, weight, padding="same", backend=backend)
    assert_float32_accumulation(y, x, weight, padding4, dtype)

    # The input gradient correlates grad_output with the filters rotated by 180 degrees, and
    # "same" padding of an odd kernel is symmetric, so the padding stays the same.
    grad_output, _ = overflowing_case(dtype, 40, seed=1)
    x = torch.zeros_like(grad_output).requires_grad_()
    y = convcov_fast.depthwise_conv2d(x, weight, padding="same", backend=backend)
    y.backward(grad_output)
    assert_float32_accumulation(x.grad, grad_output, weight.flip(-2, -1), padding4, dtype)


# One check takes a few seconds, most of it starting Python and tuning the CPU route.
ISOLATED_TIMEOUT_SECONDS = 60


def run_isolated(function_name, *args):
    """Run ``function_name(*args)`` of this module in a new Python process, failing on a timeout.

    A convolution that hangs inside a native library cannot be interrupted from Python, so the
    check runs in a process that the test can kill.
    """
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    code = (
        f"import sys; sys.path.insert(0, {tests_dir!r}); import test_numerics; "
        f"test_numerics.{function_name}(*{args!r})"
    )
    try:
        result = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=ISOLATED_TIMEOUT_SECONDS,
        )
    except subprocess.TimeoutExpired:
        result = None
    if result is None:
        pytest.fail(f"{function_name}{args} timed out after {ISOLATED_TIMEOUT_SECONDS} s")
    if result.returncode != 0:
        pytest.fail(f"{function_name}{args} failed:\n{result.stderr[-3000:]}")


@pytest.mark.parametrize("dtype", ("float16", "bfloat16"))
def test_large_half_inputs_finite(dtype):
    run_isolated("check_large_half_inputs", dtype)


@pytest.mark.skipif(
    not TRITON_DEPTHWISE, reason="the Triton depthwise kernels (kernels/depthwise.py) are missing"
)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_large_half_inputs_triton_finite(dtype):
    # Under the Triton interpreter a 31 x 31 kernel over a 16 x 16 image takes several seconds, so
    # the CPU run is small. The input gradient runs the same kernel on rotated filters.
    size = 16 if DEVICE.type == "cpu" else 64
    x, weight = overflowing_case(dtype, size)
    padding4 = _checks.padding4("same", (KERNEL, KERNEL))

    y = convcov_fast.depthwise_conv2d(x, weight, padding="same", backend="triton")

    assert_float32_accumulation(y, x, weight, padding4, dtype)


# ---------------------------------------------------------------------------------------------
# Covariances of extreme scale

SAMPLES = 20000
# Each sample-covariance entry may deviate by this many of its standard errors. With 45 distinct
# entries, a false alarm at 6 standard errors has a probability of about 1e-7.
STANDARD_ERRORS = 6.0


def correlation_matrix(d, seed):
    """Return a random well-conditioned (d, d) float64 correlation matrix."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, dtype=torch.float64, generator=generator)
    cov = a @ a.T / d + 0.5 * torch.eye(d, dtype=torch.float64)
    scale = cov.diagonal().rsqrt()
    cov = scale[:, None] * cov * scale[None, :]
    return 0.5 * (cov + cov.T)


def assert_sample_covariance(samples, cov):
    """Check the zero-mean sample covariance entry by entry, relative to each entry's standard error.

    For n zero-mean Gaussian samples, mean_k x_ki x_kj estimates cov[i, j] with standard error
    sqrt((cov_ii cov_jj + cov_ij^2) / n), which scales with cov, so the test is relative.
    """
    flat = samples.double().reshape(samples.shape[0], -1)
    n = flat.shape[0]
    estimate = flat.T @ flat / n
    variances = cov.diagonal()
    standard_error = ((variances[:, None] * variances[None, :] + cov**2) / n).sqrt()
    z = (estimate - cov).abs() / standard_error
    assert z.max() <= STANDARD_ERRORS, f"max z {z.max():.3g} at scale {cov.abs().max():.3g}"


SAMPLING_BACKENDS = ("torch", "triton") if TRITON_SAMPLING else ("torch",)


@pytest.mark.parametrize("backend", SAMPLING_BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
@pytest.mark.parametrize("scale", (1e6, 1e-8))
def test_extreme_scale_sample_covariance(scale, dtype, backend):
    cov = scale * correlation_matrix(9, seed=3)
    generator = torch.Generator(device=DEVICE).manual_seed(4)

    samples = convcov_fast.sample(
        cov.to(DEVICE), SAMPLES, generator=generator, dtype=dtype, backend=backend
    )

    assert samples.shape == (SAMPLES, 3, 3)
    assert samples.dtype == dtype
    assert torch.isfinite(samples).all()
    assert_sample_covariance(samples.cpu(), cov)


def test_extreme_scale_wrong_factor_detected():
    # The tolerance is tight enough to see samples 5 % too large, whose covariance is 10 % off.
    cov = 1e-8 * correlation_matrix(9, seed=3)
    samples = 1.05 * convcov_fast.sample(cov, SAMPLES, generator=torch.Generator().manual_seed(4))

    with pytest.raises(AssertionError):
        assert_sample_covariance(samples, cov)


# ---------------------------------------------------------------------------------------------
# Peak memory of sampling many filters

# The child reads VmHWM, the peak resident size of its own address space. Its ru_maxrss would not
# do: Linux keeps the maximum across execve, so it starts at the resident size of the pytest
# process that forked it.
CHUNKED_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from convcov_fast import covariance, sampling

    def status_kib(field):
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise RuntimeError(f"{field} is missing from /proc/self/status")

    def reset_peak():
        # Writing 5 to clear_refs sets VmHWM to the current resident size (Linux 4.0 and later).
        # Without it the peak may include the start-up, which only makes the test stricter.
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")
        except OSError:
            pass

    torch.set_num_threads(1)
    sampling.MAX_NORMALS_PER_CHUNK = int(sys.argv[1])
    n = int(sys.argv[2])
    factors = sampling.factorize(covariance.gaussian(3, 1.0))
    sampling.sample_from_factors(factors, 1000, backend="torch")
    reset_peak()
    baseline_kib = status_kib("VmRSS")
    generator = torch.Generator().manual_seed(0)
    samples = sampling.sample_from_factors(factors, n, generator=generator, backend="torch")
    peak_kib = status_kib("VmHWM")
    chunk = max(1, sampling.MAX_NORMALS_PER_CHUNK // 9)
    flat = samples[0]
    second_moment = (flat.double().T @ flat.double()) / n
    print(json.dumps({
        "growth_bytes": (peak_kib - baseline_kib) * 1024,
        "output_bytes": samples.numel() * samples.element_size(),
        "finite": bool(torch.isfinite(samples).all()),
        "last_row_nonzero": bool(flat[-1].abs().sum() > 0),
        "chunks_differ": bool(n <= chunk or not torch.equal(flat[:chunk], flat[chunk : 2 * chunk])),
        "max_covariance_error": float((second_moment - factors[0] @ factors[0].T).abs().max()),
    }))
    """
)
LARGE_N = 2_000_000
# Memory the chunked run may use beyond its output: the noise of one chunk (256 KiB here),
# allocator slack and page tables.
CHUNK_SLACK_BYTES = 16 * 2**20


def run_chunked_sampling(max_normals):
    result = subprocess.run(
        [sys.executable, "-c", CHUNKED_SCRIPT, str(max_normals), str(LARGE_N)],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads the peak resident set size from /proc/self/status"
)
def test_chunked_sampling_bounded_peak_memory():
    chunked = run_chunked_sampling(1 << 16)
    unchunked = run_chunked_sampling(1 << 40)

    assert chunked["output_bytes"] == LARGE_N * 9 * 4
    assert chunked["finite"]
    assert chunked["last_row_nonzero"]
    assert chunked["chunks_differ"]
    # Entries of the closed-form covariance are at most 1/27; 2e6 samples estimate them to
    # about 3e-5, so 3e-4 is ten standard errors.
    assert chunked["max_covariance_error"] < 3e-4
    assert chunked["growth_bytes"] < chunked["output_bytes"] + CHUNK_SLACK_BYTES
    # The control: one chunk contains the noise and the product next to the output, so the
    # measurement sees memory beyond the output.
    assert unchunked["growth_bytes"] > unchunked["output_bytes"] + 4 * CHUNK_SLACK_BYTES


# ---------------------------------------------------------------------------------------------
# Positive semidefinite up to rounding, and clearly indefinite


def rotated(eigenvalues, seed):
    """Return Q diag(eigenvalues) Q^T for a random orthogonal Q, symmetrized, in float64."""
    generator = torch.Generator().manual_seed(seed)
    d = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=generator))
    cov = q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T
    return 0.5 * (cov + cov.T)


def test_rank_deficient_rounding_accepted():
    cov = rotated([1.0, 0.5, 0.2] + [0.0] * 6, seed=5)
    eigenvalues = torch.linalg.eigvalsh(cov)
    assert eigenvalues[0] < 0, "the case needs a negative rounding eigenvalue"
    assert torch.linalg.cholesky_ex(cov).info != 0, "the case needs a failing Cholesky"

    factors = convcov_fast.factorize(cov)
    samples = convcov_fast.sample(cov, 4000, generator=torch.Generator().manual_seed(6))

    torch.testing.assert_close(factors[0] @ factors[0].T, cov, atol=1e-6, rtol=0)
    assert samples.shape == (4000, 3, 3)
    assert torch.isfinite(samples).all()
    # The samples lie in the span of the three nonzero eigenvectors, up to the factor's jitter.
    _, eigenvectors = torch.linalg.eigh(cov)
    null_part = samples.double().reshape(4000, 9) @ eigenvectors[:, :6]
    assert null_part.abs().max() < 1e-3


def test_float32_empirical_covariance_accepted():
    # Four filters of 25 taps give a rank-3 covariance. Computed in float32 and widened, its
    # zero eigenvalues come out as float32 rounding, some of them negative.
    generator = torch.Generator().manual_seed(7)
    filters = torch.randn(4, 25, generator=generator)
    cov = torch.cov(filters.T).double()
    cov = 0.5 * (cov + cov.T)
    assert torch.linalg.eigvalsh(cov)[0] < 0, "the case needs a negative rounding eigenvalue"

    samples = convcov_fast.sample(cov, 100, generator=torch.Generator().manual_seed(8))

    assert samples.shape == (100, 5, 5)
    assert torch.isfinite(samples).all()


def numbers_in(message):
    return [float(text) for text in re.findall(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?", message)]


def test_indefinite_rejected_with_eigenvalue():
    bank = torch.stack(
        [
            rotated([1.0] * 9, seed=9),
            rotated([1.0, 0.3] + [0.1] * 7, seed=10),
            rotated([1.0, 0.5, -0.1] + [0.2] * 6, seed=11),
        ]
    )
    most_negative = float(torch.linalg.eigvalsh(bank[2])[0])

    with pytest.raises(ValueError) as error:
        convcov_fast.sample(bank, 10)

    message = str(error.value)
    assert "cov[2]" in message
    assert any(math.isclose(value, most_negative, rel_tol=1e-4) for value in numbers_in(message)), message


@pytest.mark.parametrize("ratio, accepted", [(0.1, True), (10.0, False)])
def test_negative_eigenvalue_threshold(ratio, accepted):
    # A negative eigenvalue of `ratio` times NEGATIVE_EIGENVALUE_RTOL, relative to the largest,
    # is rounding below the threshold and a real indefiniteness above it.
    negative = -ratio * _checks.NEGATIVE_EIGENVALUE_RTOL
    cov = rotated([1.0, 0.5, negative] + [0.0] * 6, seed=12)

    if accepted:
        samples = convcov_fast.sample(cov, 10, generator=torch.Generator().manual_seed(13))
        assert torch.isfinite(samples).all()
    else:
        with pytest.raises(ValueError, match="not positive semidefinite"):
            convcov_fast.sample(cov, 10)
