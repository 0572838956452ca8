"""Property-based tests of covariances, sampling and the depthwise op over random cases.

Each test draws shapes, kernel sizes (odd, even, rectangular), paddings, dtypes and memory layouts
with hypothesis, and compares against float64 computations built without the code under test.
The example count comes from a profile chosen by the environment variable CONVCOV_FUZZ_PROFILE:
"ci" (the default, 30 examples a test, which ran in under a minute on a 2-core CPU) or "deep"
(1000 examples a test). The number of examples run is printed in the terminal summary.
"""

import collections
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import convcov_fast
from convcov_fast import covariance, reference, sampling
from tolerances import TOLERANCES, tolerance

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# The example database is off, so runs store no examples under .hypothesis/ and a failure is
# reproduced from the @reproduce_failure line that print_blob prints. Hypothesis still caches
# constants in .hypothesis/, with a .gitignore of its own.
PROFILES = {
    "ci": settings(
        max_examples=30,
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow],
    ),
    "deep": settings(
        max_examples=1000,
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow],
    ),
}
PROFILE_NAME = os.environ.get("CONVCOV_FUZZ_PROFILE", "ci")
if PROFILE_NAME not in PROFILES:
    raise ValueError(
        f"CONVCOV_FUZZ_PROFILE must be one of {sorted(PROFILES)}, got {PROFILE_NAME!r}"
    )
FUZZ = PROFILES[PROFILE_NAME]
# Under the Triton interpreter one case (forward and gradients) takes 1 to 5 s on a CPU core, so
# the Triton test draws fewer cases.
TRITON_FUZZ = settings(FUZZ, max_examples=6 if PROFILE_NAME == "ci" else 200)

TRITON_SAMPLING = DEVICE.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
TRITON_DEPTHWISE = importlib.util.find_spec("convcov_fast.kernels.depthwise") is not None
# NOTE: the Triton depthwise kernels load and accumulate in float32, so float64 inputs would be
# compared at float32 accuracy. They are left out here.
TRITON_DEPTHWISE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SAMPLING_BACKENDS = ("torch", "triton") if TRITON_SAMPLING else ("torch",)

EXAMPLES = collections.Counter()


class ExampleCountSummary:
    """Pytest plugin that prints the hypothesis examples each test of this module ran."""

    def pytest_terminal_summary(self, terminalreporter):
        total = sum(EXAMPLES.values())
        terminalreporter.section("convcov_fast fuzzing")
        terminalreporter.write_line(
            f"profile {PROFILE_NAME!r}: {total} examples in {len(EXAMPLES)} tests"
        )
        for name, count in sorted(EXAMPLES.items()):
            terminalreporter.write_line(f"  {name}: {count}")


@pytest.fixture(scope="module", autouse=True)
def example_count_summary(pytestconfig):
    name = "convcov-fuzz-example-count"
    if not pytestconfig.pluginmanager.has_plugin(name):
        pytestconfig.pluginmanager.register(ExampleCountSummary(), name)


def random_psd(d, rank, seed, batch=None):
    """Return A A^T / rank in float64, of shape (d, d) or (batch, d, d), rank-deficient if rank < d."""
    generator = torch.Generator().manual_seed(seed)
    shape = (d, rank) if batch is None else (batch, d, rank)
    a = torch.randn(shape, dtype=torch.float64, generator=generator)
    product = a @ a.transpose(-1, -2) / rank
    # A matmul result can differ from its transpose in the last bit. The symmetric average is
    # what the package makes of it, so the tests compare with that.
    return 0.5 * (product + product.transpose(-1, -2))


def min_relative_eigenvalue(matrices):
    """Return the smallest eigenvalue of each symmetric matrix over its largest |eigenvalue|."""
    eigenvalues = torch.linalg.eigvalsh(matrices)
    scale = eigenvalues.abs().amax(dim=-1).clamp(min=torch.finfo(torch.float64).tiny)
    return eigenvalues[..., 0] / scale


kernel_sides = st.integers(1, 7)
seeds = st.integers(0, 2**31 - 1)


# ---------------------------------------------------------------------------------------------
# Covariances


@FUZZ
@given(
    kh=kernel_sides,
    kw=kernel_sides,
    sigma=st.floats(0.05, 10.0),
    variance=st.one_of(st.none(), st.floats(1e-6, 1e3)),
)
def test_gaussian_psd_with_requested_variance(kh, kw, sigma, variance):
    EXAMPLES["test_gaussian_psd_with_requested_variance"] += 1
    cov = covariance.gaussian((kh, kw), sigma, variance=variance)
    expected_variance = 1.0 / (3.0 * kh * kw) if variance is None else variance

    assert cov.shape == (kh * kw, kh * kw)
    assert cov.dtype == torch.float64
    assert torch.equal(cov, cov.T)
    assert min_relative_eigenvalue(cov) >= -1e-12
    assert cov.diagonal().mean().item() == pytest.approx(expected_variance, rel=1e-12)


def bilinear_resampling_matrix(source, target):
    """Build the resampling matrix R of ``covariance.resize`` from ``F.interpolate``.

    Column k of R is the resampled k-th one-hot source filter. Each axis is resampled with aligned
    end points (``align_corners=True``), except that an axis of 1 target tap reads the source's
    centre, which is what ``align_corners=False`` gives for an output of size 1.
    """
    (sh, sw), (th, tw) = source, target
    basis = torch.eye(sh * sw, dtype=torch.float64).reshape(sh * sw, 1, sh, sw)
    rows = F.interpolate(basis, size=(th, sw), mode="bilinear", align_corners=th > 1)
    both = F.interpolate(rows, size=(th, tw), mode="bilinear", align_corners=tw > 1)
    return both.reshape(sh * sw, th * tw).T


@FUZZ
@given(
    source=st.tuples(kernel_sides, kernel_sides),
    target=st.tuples(kernel_sides, kernel_sides),
    batch=st.one_of(st.none(), st.integers(1, 3)),
    rank_fraction=st.floats(0.1, 1.0),
    seed=seeds,
)
def test_resize_equals_resampled_covariance(source, target, batch, rank_fraction, seed):
    EXAMPLES["test_resize_equals_resampled_covariance"] += 1
    d = source[0] * source[1]
    rank = max(1, round(rank_fraction * d))
    cov = random_psd(d, rank, seed, batch)
    resized = covariance.resize(cov, target, source_kernel_size=source)

    resampling = bilinear_resampling_matrix(source, target)
    expected = resampling @ cov @ resampling.T
    d_target = target[0] * target[1]
    expected_shape = (d_target, d_target) if batch is None else (batch, d_target, d_target)
    assert resized.shape == expected_shape
    assert resized.dtype == torch.float64
    torch.testing.assert_close(resized, expected, **tolerance(torch.float64, d))
    assert (min_relative_eigenvalue(resized) >= -1e-10).all()


@FUZZ
@given(
    layers=st.integers(1, 5),
    depth=st.integers(1, 8),
    d=st.integers(1, 16),
    seed=seeds,
)
def test_interpolate_depth_keeps_endpoints(layers, depth, d, seed):
    EXAMPLES["test_interpolate_depth_keeps_endpoints"] += 1
    bank = random_psd(d, max(1, d // 2), seed, batch=layers)
    result = covariance.interpolate_depth(bank, depth)

    assert result.shape == (depth, d, d)
    assert torch.equal(result[0], bank[0])
    if depth > 1:
        assert torch.equal(result[-1], bank[-1])
    if depth == layers:
        assert torch.equal(result, bank)
    # Linear interpolation along the layer axis with aligned end points is what F.interpolate
    # computes with align_corners=True, which also reads the first layer for depth 1.
    series = bank.reshape(layers, d * d).T.unsqueeze(0)
    expected = F.interpolate(series, size=depth, mode="linear", align_corners=True)
    expected = expected[0].T.reshape(depth, d, d)
    torch.testing.assert_close(result, expected, **tolerance(torch.float64))
    assert (min_relative_eigenvalue(result) >= -1e-10).all()


# ---------------------------------------------------------------------------------------------
# Sampling


@FUZZ
@given(
    kh=kernel_sides,
    kw=kernel_sides,
    batch=st.one_of(st.none(), st.integers(1, 3)),
    n=st.integers(0, 40),
    rank_fraction=st.floats(0.1, 1.0),
    dtype=st.sampled_from(DTYPES),
    backend=st.sampled_from(SAMPLING_BACKENDS),
    infer_kernel_size=st.booleans(),
    seed=seeds,
)
def test_sample_shape_dtype_determinism(
    kh, kw, batch, n, rank_fraction, dtype, backend, infer_kernel_size, seed
):
    EXAMPLES["test_sample_shape_dtype_determinism"] += 1
    d = kh * kw
    rank = max(1, round(rank_fraction * d))
    cov = random_psd(d, rank, seed, batch).to(DEVICE)
    kernel_size = None if infer_kernel_size and kh == kw else (kh, kw)

    def draw(generator_seed):
        generator = torch.Generator(device=DEVICE).manual_seed(generator_seed)
        return convcov_fast.sample(
            cov, n, generator=generator, kernel_size=kernel_size, dtype=dtype, backend=backend
        )

    samples = draw(seed)
    expected_shape = (n, kh, kw) if batch is None else (batch, n, kh, kw)
    assert samples.shape == expected_shape
    assert samples.dtype == dtype
    assert samples.device.type == DEVICE.type
    assert torch.isfinite(samples).all()
    assert torch.equal(draw(seed), samples)
    if n > 0:
        assert not torch.equal(draw(seed + 1), samples)

    # Every sample L z lies in the column space of cov, up to the output dtype's rounding and
    # the factor's error. Jitter on the diagonal gives the factor a part of size
    # sqrt(jitter * mean variance) outside that space, and the float32 factors of the Triton
    # path add float32 rounding of ||L||_F = sqrt(trace). Both act on z, whose norm exceeds
    # sqrt(d) + 6 with a probability below exp(-6**2 / 2) = 2e-8 (Gaussian concentration).
    _, eigenvectors = torch.linalg.eigh(cov.double())
    null_space = eigenvectors[..., : d - rank]
    flat = samples.double().reshape(*cov.shape[:-2], n, d).cpu()
    outside = (flat @ null_space.cpu()).norm(dim=-1)
    trace = cov.double().diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=batch is not None).cpu()
    normal_norm = d**0.5 + 6
    jitter_part = (sampling.JITTER_STEPS[-1] * trace / d) ** 0.5
    float32_part = d * torch.finfo(torch.float32).eps * trace**0.5
    factor_error = 4 * (jitter_part + float32_part) * normal_norm
    bound = 4 * TOLERANCES[dtype][1] * flat.norm(dim=-1) + factor_error
    assert (outside <= bound).all()


@FUZZ
@given(
    channels=st.integers(1, 8),
    kh=kernel_sides,
    kw=kernel_sides,
    dtype=st.sampled_from(DTYPES),
    backend=st.sampled_from(SAMPLING_BACKENDS),
    seed=seeds,
)
def test_init_fills_every_filter_like_sample(channels, kh, kw, dtype, backend, seed):
    EXAMPLES["test_init_fills_every_filter_like_sample"] += 1
    cov = random_psd(kh * kw, kh * kw, seed).to(DEVICE)
    weight = torch.full((channels, 1, kh, kw), float("nan"), dtype=dtype, device=DEVICE)

    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    returned = convcov_fast.init_(weight, cov, generator=generator, backend=backend)

    assert returned is weight
    assert weight.dtype == dtype
    assert torch.isfinite(weight).all()
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    filters = convcov_fast.sample(
        cov, channels, generator=generator, kernel_size=(kh, kw), backend=backend
    )
    assert torch.equal(weight, filters.reshape(channels, 1, kh, kw).to(dtype))


# ---------------------------------------------------------------------------------------------
# Depthwise convolution

# Each layout maps an (N, C, H, W) shape to the shape of a base tensor and a view of the base
# with that (N, C, H, W) shape.
LAYOUTS = {
    "contiguous": (lambda n, c, h, w: (n, c, h, w), lambda base: base),
    "channels_last": (lambda n, c, h, w: (n, h, w, c), lambda base: base.permute(0, 3, 1, 2)),
    "sliced": (lambda n, c, h, w: (n, c, h + 1, 2 * w), lambda base: base[:, :, 1:, ::2]),
    "permuted": (lambda n, c, h, w: (w, c, n, h), lambda base: base.permute(2, 1, 3, 0)),
    "expanded": (lambda n, c, h, w: (n, 1, h, 1), None),
}


def layout_view(layout, base, shape):
    """Return the (N, C, H, W) view of ``base`` for ``layout``."""
    if layout == "expanded":
        return base.expand(shape)
    return LAYOUTS[layout][1](base)


@st.composite
def conv_cases(draw, dtypes=DTYPES):
    """Draw a depthwise convolution case whose output has at least one element."""
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    kh, kw = draw(kernel_sides), draw(kernel_sides)
    if draw(st.booleans()):
        padding = "same"
    else:
        smallest = max(0, -(-(kh - h) // 2), -(-(kw - w) // 2))
        padding = draw(st.integers(smallest, smallest + 2))
    return {
        "shape": (n, c, h, w),
        "kernel_size": (kh, kw),
        "padding": padding,
        "dtype": draw(st.sampled_from(dtypes)),
        "layout": draw(st.sampled_from(sorted(LAYOUTS))),
        "bias": draw(st.booleans()),
        "weight_grad": draw(st.booleans()),
        "seed": draw(seeds),
    }


def padding4_of(padding, kernel_size):
    """Return (top, bottom, left, right) as torch.nn.Conv2d pads for "same" or an int."""
    kh, kw = kernel_size
    if padding == "same":
        return (kh - 1) // 2, kh // 2, (kw - 1) // 2, kw // 2
    return padding, padding, padding, padding


def check_depthwise_case(case, backend):
    """Compare the op's output and gradients on ``case`` with float64 autograd of F.conv2d."""
    n, c, h, w = case["shape"]
    kh, kw = case["kernel_size"]
    dtype, layout = case["dtype"], case["layout"]
    generator = torch.Generator().manual_seed(case["seed"])

    def random(*shape):
        values = torch.randn(shape, dtype=torch.float64, generator=generator)
        return values.to(device=DEVICE, dtype=dtype)

    base = random(*LAYOUTS[layout][0](n, c, h, w)).requires_grad_()
    weight = random(c, 1, kh, kw).requires_grad_(case["weight_grad"])
    bias = random(c).requires_grad_() if case["bias"] else None
    x = layout_view(layout, base, (n, c, h, w))

    y = convcov_fast.depthwise_conv2d(x, weight, bias, case["padding"], backend=backend)
    pad = padding4_of(case["padding"], (kh, kw))
    out_h, out_w = h + pad[0] + pad[1] - kh + 1, w + pad[2] + pad[3] - kw + 1
    assert y.shape == (n, c, out_h, out_w)
    assert y.dtype == dtype
    channels_last = torch.channels_last
    if x.is_contiguous(memory_format=channels_last) and not x.is_contiguous():
        assert y.is_contiguous(memory_format=channels_last)

    base64 = base.detach().double().requires_grad_()
    weight64 = weight.detach().double().requires_grad_(case["weight_grad"])
    bias64 = None if bias is None else bias.detach().double().requires_grad_()
    x64 = layout_view(layout, base64, (n, c, h, w))
    y64 = reference.depthwise_conv2d(x64, weight64, bias64, pad)
    torch.testing.assert_close(y.double(), y64, **tolerance(dtype, kh * kw))

    # Each entry is (tensor, its float64 copy, terms summed per gradient element). The input
    # gradient sums kh * kw taps, times the copies of a base element that the view makes (C * W
    # for the expanded layout). Weight and bias gradients sum over N and the output plane.
    copies = max(1, x.numel() // base.numel())
    checked = [(base, base64, kh * kw * copies)]
    if case["weight_grad"]:
        checked.append((weight, weight64, n * out_h * out_w))
    if bias is not None:
        checked.append((bias, bias64, n * out_h * out_w))
    grad_output = random(*y.shape)
    grads = torch.autograd.grad(y, [entry[0] for entry in checked], grad_output)
    grads64 = torch.autograd.grad(y64, [entry[1] for entry in checked], grad_output.double())
    for grad, grad64, (_, _, length) in zip(grads, grads64, checked):
        assert grad.dtype == dtype
        torch.testing.assert_close(grad.double(), grad64, **tolerance(dtype, length))


@FUZZ
@given(case=conv_cases(), backend=st.sampled_from(("auto", "torch")))
def test_depthwise_matches_float64(case, backend):
    EXAMPLES["test_depthwise_matches_float64"] += 1
    check_depthwise_case(case, backend)


@pytest.mark.skipif(
    not TRITON_DEPTHWISE, reason="the Triton depthwise kernels (kernels/depthwise.py) are missing"
)
@TRITON_FUZZ
@given(case=conv_cases(dtypes=TRITON_DEPTHWISE_DTYPES))
def test_depthwise_triton_matches_float64(case):
    EXAMPLES["test_depthwise_triton_matches_float64"] += 1
    check_depthwise_case(case, "triton")


@FUZZ
@given(case=conv_cases(), sigma=st.floats(0.3, 3.0), with_cov=st.booleans())
def test_frozen_layer_matches_float64(case, sigma, with_cov):
    EXAMPLES["test_frozen_layer_matches_float64"] += 1
    n, c, h, w = case["shape"]
    kh, kw = case["kernel_size"]
    dtype = case["dtype"]
    cov = covariance.gaussian((kh, kw), sigma, variance=1.0) if with_cov else None

    def build():
        generator = torch.Generator().manual_seed(case["seed"])
        return convcov_fast.FrozenCovDepthwiseConv2d(
            c,
            (kh, kw),
            cov,
            bias=case["bias"],
            padding=case["padding"],
            generator=generator,
            device=DEVICE,
            dtype=dtype,
        )

    layer = build()
    assert layer.weight.shape == (c, 1, kh, kw)
    assert layer.weight.dtype == dtype
    assert not layer.weight.requires_grad
    assert all(p is not layer.weight for p in layer.parameters())
    again = build()
    assert torch.equal(again.weight, layer.weight)
    if case["bias"]:
        assert torch.equal(again.bias, layer.bias)

    generator = torch.Generator().manual_seed(case["seed"] + 1)
    x = torch.randn(case["shape"], dtype=torch.float64, generator=generator).to(DEVICE, dtype)
    if case["layout"] == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    y = layer(x)

    pad = padding4_of(case["padding"], (kh, kw))
    x64 = x.detach().double().requires_grad_()
    bias64 = None if layer.bias is None else layer.bias.detach().double().requires_grad_()
    y64 = F.conv2d(F.pad(x64, (pad[2], pad[3], pad[0], pad[1])), layer.weight.double(), bias64, groups=c)
    torch.testing.assert_close(y.double(), y64, **tolerance(dtype, kh * kw))

    grad_output = torch.randn(y.shape, dtype=torch.float64, generator=generator).to(DEVICE, dtype)
    y.backward(grad_output)
    inputs64 = [x64] + ([bias64] if bias64 is not None else [])
    grads64 = torch.autograd.grad(y64, inputs64, grad_output.double())
    assert layer.weight.grad is None
    torch.testing.assert_close(x.grad.double(), grads64[0], **tolerance(dtype, kh * kw))
    if layer.bias is not None:
        reduction = y.shape[0] * y.shape[2] * y.shape[3]
        torch.testing.assert_close(layer.bias.grad.double(), grads64[1], **tolerance(dtype, reduction))
