"""Tests of the Triton depthwise convolution kernels in ``convcov_fast.kernels.depthwise``.

Every result is compared with ``convcov_fast.reference`` evaluated in float64 on the same inputs,
within the tolerance of tests/tolerances.py for the input dtype. Inputs are fresh random normals on
each run, and every numerical comparison reports the seed, which CONVCOV_TEST_SEED replays.
Outputs are written into NaN-filled tensors, and the partial-sum buffers of the reductions are
NaN-filled too, so an element that a kernel never writes fails the comparison.

Without CUDA the kernels run under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so the images are about 10 x 10 pixels with 3 channels. The interpreter uses
16 x 16 tiles with 4 channels per channels_last tile, so ``test_tile_seams`` uses larger images and
more channels to cover several tiles per direction.

bfloat16 runs under the interpreter as well: numpy has no bfloat16, but the interpreter loads
bfloat16 exactly and converts float32 to bfloat16 by truncating the low 16 bits, where GPUs round
to nearest. That is an error of up to one bfloat16 ulp (2**-7 relative), inside the bfloat16
tolerance of 1.6e-2.
"""

import os
import secrets
import time

import pytest
import torch
import torch.nn.functional as F

from convcov_fast import reference
from convcov_fast.kernels import depthwise
from tolerances import tolerance

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (kernel size, input shape): odd, even and rectangular filters. The 13 x 13 filter runs on one
# image of two channels to keep the interpreter fast.
KERNEL_CASES = [
    ((3, 3), (2, 3, 9, 11)),
    ((4, 4), (2, 3, 9, 11)),
    ((7, 7), (2, 3, 9, 11)),
    ((3, 5), (2, 3, 9, 11)),
    ((5, 3), (2, 3, 9, 11)),
    ((13, 13), (1, 2, 5, 6)),
]


def kernel_case_id(case):
    (kh, kw), shape = case
    return f"{kh}x{kw}-on-" + "x".join(map(str, shape))


@pytest.fixture
def seed():
    """Return a fresh seed, or CONVCOV_TEST_SEED when set, to replay a failure."""
    return int(os.environ.get("CONVCOV_TEST_SEED", secrets.randbits(31)))


@pytest.fixture(autouse=True)
def poisoned_partials(monkeypatch):
    """Fill the reduction kernels' partial-sum buffers with NaN, so an unwritten partial shows."""

    def alloc_nan(shape, device):
        return torch.full(shape, float("nan"), dtype=torch.float32, device=device)

    monkeypatch.setattr(depthwise, "_alloc_partials", alloc_nan)


def same_padding(kernel_size):
    """Return the (top, bottom, left, right) padding that keeps the size, as PyTorch pads."""
    kh, kw = kernel_size
    return ((kh - 1) // 2, kh - 1 - (kh - 1) // 2, (kw - 1) // 2, kw - 1 - (kw - 1) // 2)


def random_tensor(shape, generator, dtype, memory_format=torch.contiguous_format):
    values = torch.randn(shape, generator=generator, dtype=torch.float64)
    return values.to(device=DEVICE, dtype=dtype).contiguous(memory_format=memory_format)


def nan_tensor(shape, dtype, memory_format=torch.contiguous_format):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE).contiguous(memory_format=memory_format)


def assert_matches(actual, expected, dtype, reduction_length, quantity, seed):
    """Compare a kernel result with its float64 truth within the tolerance for ``dtype``."""
    torch.testing.assert_close(
        actual.double().cpu(),
        expected.double().cpu(),
        **tolerance(dtype, reduction_length),
        msg=lambda message: f"{quantity} (seed {seed}): {message}",
    )


def output_shape(shape, kernel_size, padding4):
    batch, channels, height, width = shape
    top, bottom, left, right = padding4
    return (
        batch,
        channels,
        height + top + bottom - kernel_size[0] + 1,
        width + left + right - kernel_size[1] + 1,
    )


def random_inputs(shape, kernel_size, padding4, dtype, memory_format, seed):
    """Return fresh N(0, 1) x, weight, bias and output gradient for one convolution case."""
    generator = torch.Generator().manual_seed(seed)
    channels = shape[1]
    x = random_tensor(shape, generator, dtype, memory_format)
    weight = random_tensor((channels, 1, *kernel_size), generator, dtype)
    bias = random_tensor((channels,), generator, dtype)
    out_shape = output_shape(shape, kernel_size, padding4)
    grad_output = random_tensor(out_shape, generator, dtype, memory_format)
    return x, weight, bias, grad_output


def check_all_kernels(shape, kernel_size, padding4, dtype, memory_format, seed):
    """Run forward, input, bias and weight gradient kernels and compare each with float64 truth."""
    x, weight, bias, grad_output = random_inputs(shape, kernel_size, padding4, dtype, memory_format, seed)
    out_shape = grad_output.shape
    x64, weight64, bias64, grad64 = (t.double() for t in (x, weight, bias, grad_output))
    taps = kernel_size[0] * kernel_size[1]
    batch_and_space = out_shape[0] * out_shape[2] * out_shape[3]

    y = depthwise.depthwise_forward(
        x, weight, bias, padding4, out=nan_tensor(out_shape, dtype, memory_format)
    )
    expected_y = reference.depthwise_conv2d(x64, weight64, bias64, padding4)
    assert_matches(y, expected_y, dtype, taps, "forward", seed)
    assert y.is_contiguous(memory_format=memory_format), f"forward output strides {y.stride()}"

    grad_x = depthwise.depthwise_input_grad(
        grad_output, weight, padding4, shape[-2:], out=nan_tensor(shape, dtype, memory_format)
    )
    expected_grad_x = reference.depthwise_conv2d_input_grad(grad64, weight64, padding4, shape[-2:])
    assert_matches(grad_x, expected_grad_x, dtype, taps, "input gradient", seed)
    assert grad_x.is_contiguous(memory_format=memory_format), f"input gradient strides {grad_x.stride()}"

    grad_bias = depthwise.depthwise_bias_grad(grad_output)
    assert_matches(grad_bias, grad64.sum(dim=(0, 2, 3)), dtype, batch_and_space, "bias gradient", seed)

    grad_weight = depthwise.depthwise_weight_grad(x, grad_output, kernel_size, padding4)
    expected_grad_weight = reference.depthwise_conv2d_weight_grad(x64, grad64, kernel_size, padding4)
    assert_matches(grad_weight, expected_grad_weight, dtype, batch_and_space, "weight gradient", seed)
    assert grad_weight.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", KERNEL_CASES, ids=kernel_case_id)
def test_kernels_match_reference(case, layout, dtype, seed):
    kernel_size, shape = case
    check_all_kernels(shape, kernel_size, same_padding(kernel_size), dtype, LAYOUTS[layout], seed)


@pytest.mark.parametrize("padding", [0, 2, (0, 2, 1, 0)], ids=["pad0", "pad2", "pad0-2-1-0"])
@pytest.mark.parametrize("kernel_size", [(3, 3), (4, 4), (2, 5)], ids=lambda k: f"{k[0]}x{k[1]}")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_integer_padding(kernel_size, padding, layout, seed):
    padding4 = (padding,) * 4 if isinstance(padding, int) else padding
    check_all_kernels((2, 3, 9, 11), kernel_size, padding4, torch.float32, LAYOUTS[layout], seed)


# (N, C, H, W, kernel size): images smaller than the filter in one or both directions, 1 x 1
# images, and a single plane.
EDGE_CASES = [
    (2, 1, 3, 4, (7, 7)),
    (2, 2, 12, 2, (5, 5)),
    (2, 3, 1, 1, (3, 3)),
    (1, 2, 1, 1, (4, 4)),
    (1, 1, 9, 11, (3, 3)),
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "case", EDGE_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}x{c[3]}-k{c[4][0]}x{c[4][1]}"
)
def test_edge_shapes(case, layout, seed):
    *shape, kernel_size = case
    check_all_kernels(
        tuple(shape), kernel_size, same_padding(kernel_size), torch.float32, LAYOUTS[layout], seed
    )


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tile_seams(layout, seed):
    # 35 x 21 outputs need 3 x 2 interpreter tiles, neither size a multiple of 16. Under
    # channels_last, 6 channels need two blocks of 4, the second one partial.
    channels = 6 if layout == "channels_last" else 2
    check_all_kernels(
        (2, channels, 35, 21), (3, 3), same_padding((3, 3)), torch.float32, LAYOUTS[layout], seed
    )


def test_31x31_forward_and_input_grad(seed):
    # The reductions run the same loops as for 13 x 13 and are left out to save interpreter time.
    generator = torch.Generator().manual_seed(seed)
    shape, kernel_size = (1, 2, 4, 5), (31, 31)
    padding4 = same_padding(kernel_size)
    x = random_tensor(shape, generator, torch.float32, torch.channels_last)
    weight = random_tensor((2, 1, *kernel_size), generator, torch.float32)
    grad_output = random_tensor(shape, generator, torch.float32, torch.channels_last)

    y = depthwise.depthwise_forward(
        x, weight, None, padding4, out=nan_tensor(shape, torch.float32, torch.channels_last)
    )
    expected_y = reference.depthwise_conv2d(x.double(), weight.double(), None, padding4)
    assert_matches(y, expected_y, torch.float32, 31 * 31, "forward", seed)

    grad_x = depthwise.depthwise_input_grad(
        grad_output, weight, padding4, shape[-2:], out=nan_tensor(shape, torch.float32, torch.channels_last)
    )
    expected_grad_x = reference.depthwise_conv2d_input_grad(
        grad_output.double(), weight.double(), padding4, shape[-2:]
    )
    assert_matches(grad_x, expected_grad_x, torch.float32, 31 * 31, "input gradient", seed)


def gelu_truth(preactivation64, grad64, approximate):
    """Return GELU(preactivation) and grad * GELU'(preactivation) in float64 via torch autograd."""
    pre = preactivation64.detach().clone().requires_grad_(True)
    activated = F.gelu(pre, approximate=approximate)
    (grad_pre,) = torch.autograd.grad(activated, pre, grad64)
    return activated.detach(), grad_pre


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_fused_gelu(activation, layout, dtype, seed):
    approximate = "tanh" if activation == "gelu_tanh" else "none"
    memory_format = LAYOUTS[layout]
    generator = torch.Generator().manual_seed(seed)
    shape, kernel_size = (2, 3, 9, 11), (5, 5)
    padding4 = same_padding(kernel_size)
    x = random_tensor(shape, generator, dtype, memory_format)
    weight = random_tensor((3, 1, *kernel_size), generator, dtype)
    bias = random_tensor((3,), generator, dtype)
    grad_output = random_tensor(shape, generator, dtype, memory_format)
    x64, weight64, bias64, grad64 = (t.double() for t in (x, weight, bias, grad_output))

    y, preactivation = depthwise.depthwise_forward(
        x,
        weight,
        bias,
        padding4,
        activation=activation,
        save_preactivation=True,
        out=nan_tensor(shape, dtype, memory_format),
        preactivation_out=nan_tensor(shape, dtype, memory_format),
    )
    expected_pre = reference.depthwise_conv2d(x64, weight64, bias64, padding4)
    assert_matches(preactivation, expected_pre, dtype, 25, "preactivation", seed)
    assert_matches(y, F.gelu(expected_pre, approximate=approximate), dtype, 25, "activated output", seed)
    assert y.is_contiguous(memory_format=memory_format), f"output strides {y.stride()}"
    assert preactivation.is_contiguous(
        memory_format=memory_format
    ), f"preactivation strides {preactivation.stride()}"

    # The backward kernels see the rounded preactivation, so the truth uses it too.
    _, grad_pre = gelu_truth(preactivation.double(), grad64, approximate)
    saved = dict(activation=activation, preactivation=preactivation)
    grad_x = depthwise.depthwise_input_grad(
        grad_output, weight, padding4, shape[-2:], **saved, out=nan_tensor(shape, dtype, memory_format)
    )
    expected_grad_x = reference.depthwise_conv2d_input_grad(grad_pre, weight64, padding4, shape[-2:])
    assert_matches(grad_x, expected_grad_x, dtype, 25, "input gradient", seed)

    grad_bias = depthwise.depthwise_bias_grad(grad_output, **saved)
    assert_matches(grad_bias, grad_pre.sum(dim=(0, 2, 3)), dtype, 2 * 9 * 11, "bias gradient", seed)

    grad_weight = depthwise.depthwise_weight_grad(x, grad_output, kernel_size, padding4, **saved)
    expected_grad_weight = reference.depthwise_conv2d_weight_grad(x64, grad_pre, kernel_size, padding4)
    assert_matches(grad_weight, expected_grad_weight, dtype, 2 * 9 * 11, "weight gradient", seed)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_fused_gelu_matches_autograd(activation, seed):
    # End to end in float32: the kernels' chain rule against float64 autograd through torch.
    approximate = "tanh" if activation == "gelu_tanh" else "none"
    generator = torch.Generator().manual_seed(seed)
    shape, kernel_size = (2, 3, 8, 7), (3, 4)
    padding4 = same_padding(kernel_size)
    x = random_tensor(shape, generator, torch.float32)
    weight = random_tensor((3, 1, *kernel_size), generator, torch.float32)
    bias = random_tensor((3,), generator, torch.float32)
    grad_output = random_tensor(shape, generator, torch.float32)

    leaves = [t.double().requires_grad_(True) for t in (x, weight, bias)]
    activated = F.gelu(reference.depthwise_conv2d(*leaves, padding4), approximate=approximate)
    expected = torch.autograd.grad(activated, leaves, grad_output.double())

    _, preactivation = depthwise.depthwise_forward(
        x, weight, bias, padding4, activation=activation, save_preactivation=True
    )
    saved = dict(activation=activation, preactivation=preactivation)
    grad_x = depthwise.depthwise_input_grad(grad_output, weight, padding4, shape[-2:], **saved)
    grad_weight = depthwise.depthwise_weight_grad(x, grad_output, kernel_size, padding4, **saved)
    grad_bias = depthwise.depthwise_bias_grad(grad_output, **saved)
    assert_matches(grad_x, expected[0], torch.float32, 12, "input gradient", seed)
    assert_matches(grad_weight, expected[1], torch.float32, 2 * 8 * 7, "weight gradient", seed)
    assert_matches(grad_bias, expected[2], torch.float32, 2 * 8 * 7, "bias gradient", seed)


def test_input_grad_mixed_layouts(seed):
    # Autograd can hand over an NCHW output gradient for a channels_last preactivation.
    generator = torch.Generator().manual_seed(seed)
    shape, kernel_size = (2, 3, 9, 11), (3, 3)
    padding4 = same_padding(kernel_size)
    weight = random_tensor((3, 1, *kernel_size), generator, torch.float32)
    grad_output = random_tensor(shape, generator, torch.float32)
    preactivation = random_tensor(shape, generator, torch.float32, torch.channels_last)

    grad_x = depthwise.depthwise_input_grad(
        grad_output,
        weight,
        padding4,
        shape[-2:],
        activation="gelu",
        preactivation=preactivation,
        memory_format=torch.channels_last,
        out=nan_tensor(shape, torch.float32, torch.channels_last),
    )
    _, grad_pre = gelu_truth(preactivation.double(), grad_output.double(), "none")
    expected = reference.depthwise_conv2d_input_grad(grad_pre, weight.double(), padding4, shape[-2:])
    assert_matches(grad_x, expected, torch.float32, 9, "input gradient", seed)
    assert grad_x.is_contiguous(memory_format=torch.channels_last), f"strides {grad_x.stride()}"


def test_forward_reads_strided_view(seed):
    generator = torch.Generator().manual_seed(seed)
    base = random_tensor((2, 4, 10, 12), generator, torch.float32, torch.channels_last)
    x = base[:, 1:, 1:, ::2]
    weight = random_tensor((3, 1, 3, 3), generator, torch.float32)
    padding4 = same_padding((3, 3))

    y = depthwise.depthwise_forward(x, weight, None, padding4)
    expected = reference.depthwise_conv2d(x.double(), weight.double(), None, padding4)
    assert_matches(y, expected, torch.float32, 9, "forward of a strided view", seed)
    assert y.is_contiguous(), f"output strides {y.stride()}"


def test_weight_grad_is_reproducible(seed):
    generator = torch.Generator().manual_seed(seed)
    x = random_tensor((2, 3, 9, 11), generator, torch.float32, torch.channels_last)
    grad_output = random_tensor((2, 3, 9, 11), generator, torch.float32, torch.channels_last)
    padding4 = same_padding((3, 3))

    first = depthwise.depthwise_weight_grad(x, grad_output, (3, 3), padding4)
    second = depthwise.depthwise_weight_grad(x, grad_output, (3, 3), padding4)
    assert torch.equal(first, second), f"seed {seed}: weight gradients differ between runs"


def test_forward_rejects_oversized_kernel():
    x = torch.randn(1, 2, 3, 3, device=DEVICE)
    weight = torch.randn(2, 1, 5, 5, device=DEVICE)
    with pytest.raises(ValueError, match="smaller than the kernel"):
        depthwise.depthwise_forward(x, weight, None, (0, 0, 0, 0))


def test_forward_rejects_out_with_wrong_layout():
    x = torch.randn(1, 3, 4, 4, device=DEVICE).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(3, 1, 3, 3, device=DEVICE)
    out = torch.empty(1, 3, 4, 4, device=DEVICE)
    with pytest.raises(ValueError, match="memory format"):
        depthwise.depthwise_forward(x, weight, None, (1, 1, 1, 1), out=out)


def test_rejects_unknown_activation():
    x = torch.randn(1, 1, 4, 4, device=DEVICE)
    weight = torch.randn(1, 1, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match="activation must be one of"):
        depthwise.depthwise_forward(x, weight, None, (1, 1, 1, 1), activation="relu")


def test_backward_rejects_missing_preactivation():
    grad_output = torch.randn(1, 1, 4, 4, device=DEVICE)
    weight = torch.randn(1, 1, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match="preactivation"):
        depthwise.depthwise_input_grad(grad_output, weight, (1, 1, 1, 1), (4, 4), activation="gelu")
    with pytest.raises(ValueError, match="preactivation"):
        depthwise.depthwise_bias_grad(grad_output, activation="gelu_tanh")


def test_backward_rejects_preactivation_shape():
    grad_output = torch.randn(1, 2, 8, 8, device=DEVICE)
    weight = torch.randn(2, 1, 3, 3, device=DEVICE)
    x = torch.randn(1, 2, 8, 8, device=DEVICE)
    small = torch.randn(1, 2, 3, 3, device=DEVICE)
    saved = dict(activation="gelu", preactivation=small)
    for formulation in depthwise.FORMULATIONS:
        with pytest.raises(ValueError, match=r"preactivation has shape \(1, 2, 3, 3\)"):
            depthwise.depthwise_input_grad(
                grad_output, weight, (1, 1, 1, 1), (8, 8), **saved, formulation=formulation
            )
    with pytest.raises(ValueError, match="preactivation has shape"):
        depthwise.depthwise_weight_grad(x, grad_output, (3, 3), (1, 1, 1, 1), **saved)
    with pytest.raises(ValueError, match="preactivation has shape"):
        depthwise.depthwise_bias_grad(grad_output, **saved)


def test_autotuned_launch_matches_reference(monkeypatch, seed):
    # The GPU launch path, autotuner and pruning included, timed on the CPU: the interpreter
    # itself never autotunes.
    def cpu_bench(kernel_call, quantiles):
        start = time.perf_counter()
        kernel_call()
        return [time.perf_counter() - start] * len(quantiles)

    tuned = {
        False: depthwise.make_tuned_conv_kernel(depthwise._NCHW_CONFIGS, do_bench=cpu_bench),
        True: depthwise.make_tuned_conv_kernel(depthwise._CHANNELS_LAST_CONFIGS, do_bench=cpu_bench),
    }
    monkeypatch.setattr(depthwise, "_TUNED_CONV_KERNELS", tuned)
    monkeypatch.setattr(depthwise, "_interpreter_active", lambda: False)
    generator = torch.Generator().manual_seed(seed)
    padding4 = same_padding((3, 3))
    for layout, memory_format in LAYOUTS.items():
        x = random_tensor((1, 3, 9, 11), generator, torch.float32, memory_format)
        weight = random_tensor((3, 1, 3, 3), generator, torch.float32)
        y = depthwise.depthwise_forward(
            x, weight, None, padding4, out=nan_tensor(x.shape, torch.float32, memory_format)
        )
        expected = reference.depthwise_conv2d(x.double(), weight.double(), None, padding4)
        assert_matches(y, expected, torch.float32, 9, f"autotuned forward, {layout}", seed)
        chosen = tuned[layout == "channels_last"].best_config
        assert chosen.kwargs["BLOCK_H"] <= 16, f"{layout}: pruning left {chosen}"


def test_prune_configs_fits_output():
    configs = depthwise._NCHW_CONFIGS
    remaining = depthwise.prune_configs(configs, {"H_out": 7, "W_out": 7, "C": 96})
    assert [c.kwargs["BLOCK_H"] for c in remaining] == [8], f"remaining {remaining}"
    remaining = depthwise.prune_configs(configs, {"H_out": 56, "W_out": 56, "C": 96})
    assert len(remaining) == len(configs), f"remaining {remaining}"
    remaining = depthwise.prune_configs(depthwise._CHANNELS_LAST_CONFIGS, {"H_out": 1, "W_out": 1, "C": 8})
    assert len(remaining) == 1, f"remaining {remaining}"


# The Toeplitz formulation: the same correlation as one tl.dot per filter row. The 7 x 7 case
# on 35 x 21 images needs 3 x 2 interpreter tiles, and the others fit one.
TOEPLITZ_CASES = [
    ((3, 3), (2, 3, 9, 11)),
    ((4, 4), (2, 3, 9, 11)),
    ((7, 7), (1, 2, 35, 21)),
    ((13, 13), (1, 2, 5, 6)),
    ((5, 31), (1, 2, 6, 9)),
    ((31, 5), (1, 2, 9, 6)),
]


def check_toeplitz(shape, kernel_size, padding4, dtype, memory_format, seed, activation=None):
    """Compare the Toeplitz forward and input gradient with their float64 truth."""
    x, weight, bias, grad_output = random_inputs(shape, kernel_size, padding4, dtype, memory_format, seed)
    out_shape = grad_output.shape
    x64, weight64, bias64, grad64 = (t.double() for t in (x, weight, bias, grad_output))
    taps = kernel_size[0] * kernel_size[1]

    expected_pre = reference.depthwise_conv2d(x64, weight64, bias64, padding4)
    y, preactivation = depthwise.depthwise_forward(
        x,
        weight,
        bias,
        padding4,
        activation=activation,
        save_preactivation=True,
        out=nan_tensor(out_shape, dtype, memory_format),
        preactivation_out=nan_tensor(out_shape, dtype, memory_format),
        formulation="toeplitz",
    )
    assert_matches(preactivation, expected_pre, dtype, taps, "Toeplitz preactivation", seed)
    grad_pre = grad64
    if activation is not None:
        approximate = "tanh" if activation == "gelu_tanh" else "none"
        expected_pre = F.gelu(expected_pre, approximate=approximate)
        _, grad_pre = gelu_truth(preactivation.double(), grad64, approximate)
    assert_matches(y, expected_pre, dtype, taps, "Toeplitz forward", seed)
    assert y.is_contiguous(memory_format=memory_format), f"forward output strides {y.stride()}"

    saved = dict(activation=activation, preactivation=preactivation if activation else None)
    grad_x = depthwise.depthwise_input_grad(
        grad_output,
        weight,
        padding4,
        shape[-2:],
        **saved,
        out=nan_tensor(shape, dtype, memory_format),
        formulation="toeplitz",
    )
    expected_grad_x = reference.depthwise_conv2d_input_grad(grad_pre, weight64, padding4, shape[-2:])
    assert_matches(grad_x, expected_grad_x, dtype, taps, "Toeplitz input gradient", seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", TOEPLITZ_CASES, ids=kernel_case_id)
def test_toeplitz_matches_reference(case, layout, dtype, seed):
    kernel_size, shape = case
    check_toeplitz(shape, kernel_size, same_padding(kernel_size), dtype, LAYOUTS[layout], seed)


@pytest.mark.parametrize("padding", [0, (0, 2, 3, 1)], ids=["pad0", "pad0-2-3-1"])
def test_toeplitz_integer_padding(padding, seed):
    padding4 = (padding,) * 4 if isinstance(padding, int) else padding
    check_toeplitz((1, 2, 9, 12), (3, 5), padding4, torch.float32, torch.contiguous_format, seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_toeplitz_fused_gelu(activation, dtype, seed):
    check_toeplitz(
        (2, 3, 9, 11), (5, 5), same_padding((5, 5)), dtype, torch.contiguous_format, seed, activation
    )


def test_toeplitz_rejects_bad_arguments():
    x = torch.randn(1, 2, 8, 8, device=DEVICE)
    weight = torch.randn(2, 1, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match="formulation must be one of"):
        depthwise.depthwise_forward(x, weight, None, (1, 1, 1, 1), formulation="winograd")
    wide = torch.randn(2, 1, 1, depthwise.TOEPLITZ_MAX_KW + 1, device=DEVICE)
    with pytest.raises(ValueError, match="use formulation='fma'"):
        depthwise.depthwise_input_grad(x, wide, (0, 0, 64, 64), (8, 8), formulation="toeplitz")


def test_toeplitz_prune_one_window_per_tile():
    configs = depthwise._TOEPLITZ_CONFIGS
    for kw in (3, 7, 31, 51):
        remaining = depthwise.prune_toeplitz_configs(configs, {"H_out": 112, "W_out": 112}, KW=kw)
        tiles = [(c.kwargs["BLOCK_H"], c.kwargs["BLOCK_W"]) for c in remaining]
        assert len(tiles) == len(set(tiles)) == 5, f"kw={kw}: {remaining}"
        for config in remaining:
            block_w, block_k = config.kwargs["BLOCK_W"], config.kwargs["BLOCK_K"]
            assert block_w + kw - 1 <= block_k < 2 * (block_w + kw - 1), f"kw={kw}: {config}"
    remaining = depthwise.prune_toeplitz_configs(configs, {"H_out": 7, "W_out": 7}, KW=7)
    assert [(c.kwargs["BLOCK_H"], c.kwargs["BLOCK_W"]) for c in remaining] == [(32, 32)]


def test_toeplitz_autotuned_launch(monkeypatch, seed):
    def cpu_bench(kernel_call, quantiles):
        start = time.perf_counter()
        kernel_call()
        return [time.perf_counter() - start] * len(quantiles)

    tuned = depthwise.make_tuned_toeplitz_kernel(depthwise._TOEPLITZ_CONFIGS, do_bench=cpu_bench)
    monkeypatch.setattr(depthwise, "_TUNED_TOEPLITZ_KERNEL", tuned)
    monkeypatch.setattr(depthwise, "_interpreter_active", lambda: False)
    generator = torch.Generator().manual_seed(seed)
    x = random_tensor((1, 2, 33, 40), generator, torch.float32)
    weight = random_tensor((2, 1, 3, 7), generator, torch.float32)
    padding4 = same_padding((3, 7))
    y = depthwise.depthwise_forward(
        x, weight, None, padding4, out=nan_tensor(x.shape, torch.float32), formulation="toeplitz"
    )
    expected = reference.depthwise_conv2d(x.double(), weight.double(), None, padding4)
    assert_matches(y, expected, torch.float32, 21, "autotuned Toeplitz forward", seed)
    chosen = tuned.best_config
    assert chosen.kwargs["BLOCK_K"] == depthwise.toeplitz_window(chosen.kwargs["BLOCK_W"], 7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_toeplitz_gelu_backward_float16_overflow(dtype):
    # grad * GELU'(1.5) = 60000 * 1.127 overflows float16, but the input gradient, about 6000, fits.
    shape, padding4 = (1, 1, 6, 6), (1, 1, 1, 1)
    weight = torch.full((1, 1, 3, 3), 0.01, dtype=dtype, device=DEVICE)
    preactivation = torch.full(shape, 1.5, dtype=dtype, device=DEVICE)
    grad_output = torch.full(shape, 60000.0, dtype=dtype, device=DEVICE)
    _, grad_pre = gelu_truth(preactivation.double(), grad_output.double(), "none")
    expected = reference.depthwise_conv2d_input_grad(grad_pre, weight.double(), padding4, shape[-2:])
    grad_x = depthwise.depthwise_input_grad(
        grad_output,
        weight,
        padding4,
        shape[-2:],
        activation="gelu",
        preactivation=preactivation,
        out=nan_tensor(shape, dtype),
        formulation="toeplitz",
    )
    assert_matches(grad_x, expected, dtype, 9, "Toeplitz GELU input gradient", seed="fixed")
