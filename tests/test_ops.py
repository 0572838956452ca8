"""Tests of convcov_fast.depthwise_conv2d on the CPU against F.conv2d and autograd through it."""

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convcov_fast import FrozenCovDepthwiseConv2d, cpu_conv, depthwise_conv2d
from tolerances import tolerance

# F.conv2d warns that padding="same" on an even kernel copies the input. The truth computations
# here use that padding on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")

KERNEL_SIZES = [3, 4, 7, (3, 5), (5, 2)]
PADDINGS = ["same", "valid", 0, 2, (1, 2)]
CPU_BACKENDS = ["torch", "auto"]


def pair(kernel_size):
    return (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size


def random_inputs(kernel_size, *, shape=(2, 3, 9, 10), dtype=torch.float32, seed=0, requires_grad=False):
    """Return a random input, depthwise weight and bias, none of them zero."""
    generator = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    kh, kw = pair(kernel_size)
    x = torch.randn(n, c, h, w, generator=generator, dtype=torch.float64).to(dtype)
    weight = torch.randn(c, 1, kh, kw, generator=generator, dtype=torch.float64).to(dtype)
    bias = torch.randn(c, generator=generator, dtype=torch.float64).to(dtype)
    for tensor in (x, weight, bias):
        tensor.requires_grad_(requires_grad)
    return x, weight, bias


def conv2d_truth(x, weight, bias, padding):
    """Compute the convolution with F.conv2d, whose own padding argument handles every form."""
    return F.conv2d(x, weight, bias, padding=padding, groups=x.shape[1])


def activated_truth(x, weight, bias, padding, activation):
    """Compute F.gelu of the F.conv2d truth, exact for "gelu" and tanh-approximated for "gelu_tanh"."""
    approximate = "tanh" if activation == "gelu_tanh" else "none"
    return F.gelu(conv2d_truth(x, weight, bias, padding), approximate=approximate)


def forbid_weight_grad(*args, **kwargs):
    raise AssertionError("the weight gradient was computed for filters that do not require grad")


# forward


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("padding", PADDINGS, ids=str)
@pytest.mark.parametrize("kernel_size", KERNEL_SIZES, ids=str)
def test_forward_matches_conv2d(kernel_size, padding, backend):
    x, weight, bias = random_inputs(kernel_size)
    result = depthwise_conv2d(x, weight, bias, padding, backend=backend)
    expected = conv2d_truth(x, weight, bias, padding)
    assert result.dtype == torch.float32
    assert result.shape == expected.shape
    kh, kw = pair(kernel_size)
    torch.testing.assert_close(result, expected, **tolerance(torch.float32, kh * kw))


# The CPU route times its strategies once per new shape, padding and dtype. To bound that cost,
# the other dtypes run a subset of the float32 cases.
DTYPE_CASES = [(3, "same"), (4, "same"), (7, "valid"), ((3, 5), (1, 2)), ((5, 2), "same"), ((5, 2), 2)]


@pytest.mark.parametrize("kernel_size, padding", DTYPE_CASES, ids=str)
def test_forward_float64_matches_conv2d(kernel_size, padding):
    x, weight, bias = random_inputs(kernel_size, dtype=torch.float64)
    result = depthwise_conv2d(x, weight, bias, padding)
    expected = conv2d_truth(x, weight, bias, padding)
    assert result.dtype == torch.float64
    kh, kw = pair(kernel_size)
    torch.testing.assert_close(result, expected, **tolerance(torch.float64, kh * kw))


@pytest.mark.parametrize("kernel_size, padding", DTYPE_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_forward_low_precision_matches_float64(kernel_size, padding, dtype):
    x, weight, bias = random_inputs(kernel_size, dtype=dtype)
    result = depthwise_conv2d(x, weight, bias, padding)
    expected = conv2d_truth(x.double(), weight.double(), bias.double(), padding).to(dtype)
    assert result.dtype == dtype
    kh, kw = pair(kernel_size)
    torch.testing.assert_close(result, expected, **tolerance(dtype, kh * kw))


@pytest.mark.parametrize("kernel_size", KERNEL_SIZES, ids=str)
def test_forward_without_bias(kernel_size):
    x, weight, _ = random_inputs(kernel_size)
    result = depthwise_conv2d(x, weight, None, "same")
    expected = conv2d_truth(x, weight, None, "same")
    torch.testing.assert_close(result, expected, **tolerance(torch.float32, 49))


def test_forward_default_padding_is_same():
    x, weight, bias = random_inputs(4)
    result = depthwise_conv2d(x, weight, bias)
    assert result.shape == x.shape
    torch.testing.assert_close(result, conv2d_truth(x, weight, bias, "same"), **tolerance(torch.float32, 16))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kernel_size", [3, 4, (5, 2)], ids=str)
def test_forward_channels_last(kernel_size, backend):
    x, weight, bias = random_inputs(kernel_size, shape=(2, 4, 7, 8))
    x_last = x.contiguous(memory_format=torch.channels_last)
    result = depthwise_conv2d(x_last, weight, bias, "same", backend=backend)
    assert result.is_contiguous(memory_format=torch.channels_last)
    assert not result.is_contiguous()
    torch.testing.assert_close(result, conv2d_truth(x, weight, bias, "same"), **tolerance(torch.float32, 25))


def test_forward_nchw_output_is_contiguous():
    x, weight, bias = random_inputs(3, shape=(2, 4, 7, 8))
    result = depthwise_conv2d(x, weight, bias, "same")
    assert result.is_contiguous()


def test_forward_non_contiguous_input():
    x, weight, bias = random_inputs(3, shape=(2, 4, 8, 7))
    transposed = x.transpose(2, 3)
    assert not transposed.is_contiguous()
    result = depthwise_conv2d(transposed, weight, bias, "same")
    torch.testing.assert_close(result, conv2d_truth(transposed.contiguous(), weight, bias, "same"))


@pytest.mark.parametrize("kernel_size", [7, (5, 2), 4], ids=str)
def test_forward_input_smaller_than_kernel_same(kernel_size):
    x, weight, bias = random_inputs(kernel_size, shape=(2, 3, 2, 3), requires_grad=True)
    result = depthwise_conv2d(x, weight, bias, "same")
    expected = conv2d_truth(x, weight, bias, "same")
    assert result.shape == (2, 3, 2, 3)
    torch.testing.assert_close(result, expected)
    upstream = torch.randn_like(result)
    grads = torch.autograd.grad((result * upstream).sum(), (x, weight, bias))
    expected_grads = torch.autograd.grad((expected * upstream).sum(), (x, weight, bias))
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)


def test_forward_batch_one_channel_one():
    x, weight, bias = random_inputs(5, shape=(1, 1, 6, 6))
    result = depthwise_conv2d(x, weight, bias, "same")
    assert result.shape == (1, 1, 6, 6)
    torch.testing.assert_close(result, conv2d_truth(x, weight, bias, "same"), **tolerance(torch.float32, 25))


def test_forward_kernel_equal_to_input_valid():
    x, weight, bias = random_inputs((3, 4), shape=(2, 2, 3, 4))
    result = depthwise_conv2d(x, weight, bias, "valid")
    assert result.shape == (2, 2, 1, 1)
    torch.testing.assert_close(result, conv2d_truth(x, weight, bias, "valid"))


ACTIVATION_CASES = [
    (3, "same", "gelu"),
    (4, "valid", "gelu_tanh"),
    ((5, 2), (1, 2), "gelu"),
    ((3, 5), "same", "gelu_tanh"),
]


@pytest.mark.parametrize("kernel_size, padding, activation", ACTIVATION_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_forward_activation_matches_gelu(kernel_size, padding, activation, dtype):
    x, weight, bias = random_inputs(kernel_size, dtype=dtype)
    result = depthwise_conv2d(x, weight, bias, padding, activation=activation)
    expected = activated_truth(x, weight, bias, padding, activation)
    assert result.shape == expected.shape
    kh, kw = pair(kernel_size)
    torch.testing.assert_close(result, expected, **tolerance(dtype, kh * kw))


def test_forward_gelu_differs_from_gelu_tanh():
    x, weight, bias = random_inputs(3, dtype=torch.float64)
    exact = depthwise_conv2d(x, weight, bias, activation="gelu")
    approximate = depthwise_conv2d(x, weight, bias, activation="gelu_tanh")
    assert float((exact - approximate).abs().max()) > 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_forward_activation_low_precision(dtype):
    x, weight, bias = random_inputs((3, 5), dtype=dtype)
    result = depthwise_conv2d(x, weight, bias, "same", activation="gelu")
    expected = activated_truth(x.double(), weight.double(), bias.double(), "same", "gelu").to(dtype)
    assert result.dtype == dtype
    torch.testing.assert_close(result, expected, **tolerance(dtype, 15))


def test_forward_activation_channels_last():
    x, weight, bias = random_inputs(4, shape=(2, 4, 7, 8))
    x_last = x.contiguous(memory_format=torch.channels_last)
    result = depthwise_conv2d(x_last, weight, bias, "same", activation="gelu")
    assert result.is_contiguous(memory_format=torch.channels_last)
    expected = activated_truth(x, weight, bias, "same", "gelu")
    torch.testing.assert_close(result, expected, **tolerance(torch.float32, 16))


# backward


@pytest.mark.parametrize("kernel_size, padding, activation", ACTIVATION_CASES, ids=str)
def test_gradients_activation_match_gelu(kernel_size, padding, activation):
    x, weight, bias = random_inputs(kernel_size, dtype=torch.float64, requires_grad=True)
    result = depthwise_conv2d(x, weight, bias, padding, activation=activation)
    expected = activated_truth(x, weight, bias, padding, activation)
    upstream = torch.randn_like(expected)
    grads = torch.autograd.grad((result * upstream).sum(), (x, weight, bias))
    expected_grads = torch.autograd.grad((expected * upstream).sum(), (x, weight, bias))
    for name, grad, expected_grad in zip(("x", "weight", "bias"), grads, expected_grads):
        assert grad.shape == expected_grad.shape, name
        torch.testing.assert_close(grad, expected_grad, **tolerance(torch.float64, x.shape[0] * 90))


@pytest.mark.parametrize("padding", ["same", "valid", 2, (1, 2)], ids=str)
@pytest.mark.parametrize("kernel_size", KERNEL_SIZES, ids=str)
def test_gradients_match_conv2d(kernel_size, padding):
    x, weight, bias = random_inputs(kernel_size, dtype=torch.float64, requires_grad=True)
    result = depthwise_conv2d(x, weight, bias, padding)
    expected = conv2d_truth(x, weight, bias, padding)
    upstream = torch.randn_like(expected)
    grads = torch.autograd.grad((result * upstream).sum(), (x, weight, bias))
    expected_grads = torch.autograd.grad((expected * upstream).sum(), (x, weight, bias))
    for name, grad, expected_grad in zip(("x", "weight", "bias"), grads, expected_grads):
        assert grad.shape == expected_grad.shape, name
        torch.testing.assert_close(grad, expected_grad, **tolerance(torch.float64, x.shape[0] * 90))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kernel_size", [3, 4, (3, 5)], ids=str)
def test_gradients_match_nn_conv2d(kernel_size, backend):
    x, weight, bias = random_inputs(kernel_size, shape=(2, 4, 8, 8), requires_grad=True)
    conv = nn.Conv2d(4, 4, kernel_size, padding="same", groups=4)
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
    x_conv = x.detach().clone().requires_grad_()
    upstream = torch.randn(2, 4, 8, 8)
    (depthwise_conv2d(x, weight, bias, "same", backend=backend) * upstream).sum().backward()
    (conv(x_conv) * upstream).sum().backward()
    kh, kw = pair(kernel_size)
    torch.testing.assert_close(x.grad, x_conv.grad, **tolerance(torch.float32, kh * kw))
    torch.testing.assert_close(weight.grad, conv.weight.grad, **tolerance(torch.float32, 2 * 64))
    torch.testing.assert_close(bias.grad, conv.bias.grad, **tolerance(torch.float32, 2 * 64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gradients_low_precision(dtype):
    x, weight, bias = random_inputs(3, shape=(2, 3, 6, 6), dtype=dtype, requires_grad=True)
    result = depthwise_conv2d(x, weight, bias, "same")
    upstream = torch.randn(result.shape, dtype=torch.float64)
    grads = torch.autograd.grad((result.double() * upstream).sum(), (x, weight, bias))
    leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    expected = conv2d_truth(*leaves, "same")
    expected_grads = torch.autograd.grad((expected * upstream).sum(), leaves)
    for grad, expected_grad in zip(grads, expected_grads):
        assert grad.dtype == dtype
        torch.testing.assert_close(grad, expected_grad.to(dtype), **tolerance(dtype, 72))


def test_gradients_channels_last():
    x, weight, bias = random_inputs(4, shape=(2, 4, 7, 8), requires_grad=True)
    x_last = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    upstream = torch.randn(2, 4, 7, 8).contiguous(memory_format=torch.channels_last)
    result = depthwise_conv2d(x_last, weight, bias, "same")
    grads = torch.autograd.grad((result * upstream).sum(), (x_last, weight, bias))
    expected = conv2d_truth(x, weight, bias, "same")
    expected_grads = torch.autograd.grad((expected * upstream).sum(), (x, weight, bias))
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, **tolerance(torch.float32, 112))


@pytest.mark.parametrize("padding", ["same", "valid", (1, 2)], ids=str)
@pytest.mark.parametrize("kernel_size", [(3, 3), (2, 3)], ids=str)
@pytest.mark.parametrize("with_bias", [True, False])
def test_gradcheck_fast_mode(kernel_size, padding, with_bias):
    x, weight, bias = random_inputs(kernel_size, shape=(2, 2, 4, 5), dtype=torch.float64, requires_grad=True)
    bias = bias if with_bias else None

    def convolution(x, weight, bias):
        return depthwise_conv2d(x, weight, bias, padding)

    assert torch.autograd.gradcheck(convolution, (x, weight, bias), fast_mode=True)


def test_gradcheck_full_jacobian():
    x, weight, bias = random_inputs((2, 3), shape=(1, 2, 3, 4), dtype=torch.float64, requires_grad=True)

    def convolution(x, weight, bias):
        return depthwise_conv2d(x, weight, bias, "same")

    assert torch.autograd.gradcheck(convolution, (x, weight, bias))


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_gradcheck_activation(activation):
    x, weight, bias = random_inputs((2, 3), shape=(2, 2, 4, 5), dtype=torch.float64, requires_grad=True)

    def convolution(x, weight, bias):
        return depthwise_conv2d(x, weight, bias, "same", activation=activation)

    assert torch.autograd.gradcheck(convolution, (x, weight, bias), fast_mode=True)


@pytest.mark.parametrize("activation", [None, "gelu"])
def test_no_weight_grad_for_frozen_filters(monkeypatch, activation):
    monkeypatch.setattr(cpu_conv, "weight_grad", forbid_weight_grad)
    x, weight, bias = random_inputs(5, requires_grad=True)
    weight.requires_grad_(False)
    upstream = torch.randn(2, 3, 9, 10)
    (depthwise_conv2d(x, weight, bias, "same", activation=activation) * upstream).sum().backward()
    assert weight.grad is None
    x_truth = x.detach().clone().requires_grad_()
    bias_truth = bias.detach().clone().requires_grad_()
    expected = conv2d_truth(x_truth, weight, bias_truth, "same")
    if activation is not None:
        expected = F.gelu(expected)
    (expected * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_truth.grad, **tolerance(torch.float32, 25))
    torch.testing.assert_close(bias.grad, bias_truth.grad, **tolerance(torch.float32, 180))


def test_weight_grad_patch_is_effective(monkeypatch):
    # This control shows that trainable filters do reach the patched function.
    monkeypatch.setattr(cpu_conv, "weight_grad", forbid_weight_grad)
    x, weight, bias = random_inputs(5, requires_grad=True)
    with pytest.raises(AssertionError, match="weight gradient was computed"):
        depthwise_conv2d(x, weight, bias, "same").sum().backward()


def test_only_weight_requires_grad():
    x, weight, bias = random_inputs(3)
    weight.requires_grad_(True)
    result = depthwise_conv2d(x, weight, bias, "same")
    (grad,) = torch.autograd.grad(result.sum(), (weight,))
    weight_truth = weight.detach().clone().requires_grad_()
    (expected,) = torch.autograd.grad(conv2d_truth(x, weight_truth, bias, "same").sum(), (weight_truth,))
    torch.testing.assert_close(grad, expected, **tolerance(torch.float32, 180))
    assert x.grad is None


def test_op_registration_checks():
    x, weight, bias = random_inputs((3, 2), shape=(2, 3, 5, 6), requires_grad=True)
    op = torch.ops.convcov_fast.depthwise_conv2d.default
    torch.library.opcheck(op, (x, weight, bias, [1, 1, 0, 1], "auto"))
    x_last = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    activation_op = torch.ops.convcov_fast.depthwise_conv2d_activation.default
    torch.library.opcheck(activation_op, (x_last, weight, None, [0, 0, 0, 0], "torch", "gelu"))


# torch.compile and autocast


def small_frozen_model():
    generator = torch.Generator().manual_seed(0)
    return nn.Sequential(
        FrozenCovDepthwiseConv2d(4, 3, generator=generator),
        nn.GELU(),
        FrozenCovDepthwiseConv2d(4, (2, 3), generator=generator, activation="gelu"),
    )


def test_compile_aot_eager_matches_eager():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = small_frozen_model()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 4, 6, 7, requires_grad=True)
    x_eager = x.detach().clone().requires_grad_()
    upstream = torch.randn(2, 4, 6, 7)
    result = compiled(x)
    expected = model(x_eager)
    torch.testing.assert_close(result, expected, atol=0, rtol=0)
    (result * upstream).sum().backward()
    compiled_bias_grads = [layer.bias.grad.clone() for layer in (model[0], model[2])]
    model.zero_grad()
    (expected * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_eager.grad, atol=0, rtol=0)
    for layer, compiled_grad in zip((model[0], model[2]), compiled_bias_grads):
        torch.testing.assert_close(compiled_grad, layer.bias.grad, **tolerance(torch.float32, 84))
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0


def test_compile_explain_no_graph_breaks():
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(small_frozen_model())(torch.randn(1, 4, 5, 5))
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


def test_compile_trainable_weight_gradient():
    torch._dynamo.reset()

    def convolution(x, weight, bias):
        return depthwise_conv2d(x, weight, bias, (1, 2))

    compiled = torch.compile(convolution, backend="aot_eager", fullgraph=True)
    x, weight, bias = random_inputs((3, 5), shape=(2, 3, 6, 6), requires_grad=True)
    grads = torch.autograd.grad(compiled(x, weight, bias).sum(), (x, weight, bias))
    expected = torch.autograd.grad(conv2d_truth(x, weight, bias, (1, 2)).sum(), (x, weight, bias))
    for grad, expected_grad in zip(grads, expected):
        torch.testing.assert_close(grad, expected_grad, **tolerance(torch.float32, 72))


def test_compile_inductor_forward():
    # Under no_grad the graph is the custom op alone. Inductor calls it without generating C++
    # code, which keeps a cold compile to seconds (about 5 s on 2 cores with torch 2.13).
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    layer = FrozenCovDepthwiseConv2d(4, (3, 4), generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(2, 4, 6, 7)
    with torch.no_grad():
        result = compiled(x)
        expected = layer(x)
    torch.testing.assert_close(result, expected, atol=0, rtol=0)
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_autocast_matches_conv2d_dtype(dtype, autocast_dtype):
    x = torch.randn(2, 4, 6, 6, dtype=dtype)
    conv = nn.Conv2d(4, 4, 3, padding="same", groups=4).to(dtype)
    layer = FrozenCovDepthwiseConv2d.from_conv(conv)
    with torch.autocast(device_type="cpu", dtype=autocast_dtype):
        expected = conv(x)
        result = layer(x)
        functional = depthwise_conv2d(x, conv.weight, conv.bias, "same")
    assert result.dtype == expected.dtype
    assert functional.dtype == expected.dtype
    torch.testing.assert_close(result, expected, **tolerance(expected.dtype, 9))
    torch.testing.assert_close(functional, expected, **tolerance(expected.dtype, 9))


def test_autocast_backward_reaches_float32_input():
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    layer = FrozenCovDepthwiseConv2d(4, 3, generator=torch.Generator().manual_seed(0))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        result = layer(x)
    result.float().sum().backward()
    assert x.grad.dtype == torch.float32
    assert layer.bias.grad.dtype == torch.float32
    assert layer.weight.grad is None


# invalid input


def test_wrong_rank_raises():
    _, weight, _ = random_inputs(3)
    with pytest.raises(ValueError, match=r"x must have shape \(N, C, H, W\), got 3 dims"):
        depthwise_conv2d(torch.randn(3, 9, 9), weight)


def test_weight_wrong_shape_raises():
    message = "weight must be a depthwise weight of shape (C, 1, kh, kw), got (3, 2, 3, 3)"
    with pytest.raises(ValueError, match=re.escape(message)):
        depthwise_conv2d(torch.randn(1, 3, 8, 8), torch.randn(3, 2, 3, 3))


def test_channel_mismatch_raises():
    _, weight, _ = random_inputs(3)
    with pytest.raises(ValueError, match="x has 4 channels but the filters expect 3"):
        depthwise_conv2d(torch.randn(1, 4, 8, 8), weight)


def test_dtype_mismatch_raises():
    _, weight, _ = random_inputs(3)
    with pytest.raises(TypeError, match="x has dtype torch.float64 but the filters have torch.float32"):
        depthwise_conv2d(torch.randn(1, 3, 8, 8, dtype=torch.float64), weight)


def test_integer_input_raises():
    x = torch.ones(1, 3, 8, 8, dtype=torch.int64)
    with pytest.raises(TypeError, match="x.dtype must be one of .*got torch.int64"):
        depthwise_conv2d(x, torch.ones(3, 1, 3, 3, dtype=torch.int64))


def test_non_tensor_input_raises():
    _, weight, _ = random_inputs(3)
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        depthwise_conv2d([[1.0]], weight)


@pytest.mark.parametrize(
    "name, value", [("stride", 2), ("stride", (1, 2)), ("dilation", 2), ("dilation", (2, 1))]
)
def test_stride_or_dilation_raises(name, value):
    x, weight, bias = random_inputs(3)
    with pytest.raises(ValueError, match=re.escape(f"{name} must be 1, got {value!r}")):
        depthwise_conv2d(x, weight, bias, **{name: value})


def test_stride_one_tuple_accepted():
    x, weight, bias = random_inputs(3)
    result = depthwise_conv2d(x, weight, bias, stride=(1, 1), dilation=(1, 1))
    torch.testing.assert_close(result, conv2d_truth(x, weight, bias, "same"))


@pytest.mark.parametrize(
    "bias", [torch.zeros(4), torch.zeros(3, 1), torch.zeros(())], ids=["4", "3x1", "scalar"]
)
def test_bias_wrong_shape_raises(bias):
    x, weight, _ = random_inputs(3)
    with pytest.raises(ValueError, match=re.escape(f"bias must be a (3,) tensor, got {tuple(bias.shape)}")):
        depthwise_conv2d(x, weight, bias)


def test_bias_wrong_dtype_raises():
    x, weight, _ = random_inputs(3)
    with pytest.raises(TypeError, match="bias has dtype torch.float64 but x has torch.float32"):
        depthwise_conv2d(x, weight, torch.zeros(3, dtype=torch.float64))


def test_input_smaller_than_kernel_valid_raises():
    _, weight, _ = random_inputs(5)
    message = "x of spatial size (4, 9) with padding (0, 0, 0, 0) is smaller than the 5x5 kernel"
    with pytest.raises(ValueError, match=re.escape(message)):
        depthwise_conv2d(torch.randn(1, 3, 4, 9), weight, padding="valid")


@pytest.mark.parametrize("activation", ["relu", "none", "GELU"])
def test_unknown_activation_raises(activation):
    x, weight, _ = random_inputs(3)
    with pytest.raises(ValueError, match=f"activation must be one of .*got '{activation}'"):
        depthwise_conv2d(x, weight, activation=activation)


@pytest.mark.parametrize("padding", ["full", -1, (1, -1), 1.5])
def test_bad_padding_raises(padding):
    x, weight, _ = random_inputs(3)
    with pytest.raises((ValueError, TypeError), match="padding"):
        depthwise_conv2d(x, weight, padding=padding)


def test_unknown_backend_raises():
    x, weight, _ = random_inputs(3)
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'torch', 'triton'\), got 'cuda'"):
        depthwise_conv2d(x, weight, backend="cuda")


def test_triton_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, weight, _ = random_inputs(3)
    with pytest.raises(ValueError, match="backend='triton' needs a CUDA tensor, or TRITON_INTERPRET=1"):
        depthwise_conv2d(x, weight, backend="triton")

