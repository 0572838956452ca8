"""Tests of FrozenCovDepthwiseConv2d and convert() against F.conv2d and sampling statistics."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convcov_fast import FrozenCovDepthwiseConv2d, convert, covariance, cpu_conv
from tolerances import SAMPLE_Z_BOUND, tolerance

# F.conv2d warns that padding="same" on an even kernel copies the input. The truth computations
# here use that padding on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def forbid_weight_grad(*args, **kwargs):
    raise AssertionError("the weight gradient was computed for frozen filters")


def conv2d_truth(x, layer, padding):
    return F.conv2d(x, layer.weight, layer.bias, padding=padding, groups=x.shape[1])


# FrozenCovDepthwiseConv2d


def test_weight_is_buffer_bias_is_parameter():
    layer = FrozenCovDepthwiseConv2d(6, 3, generator=seeded(0))
    assert "weight" in dict(layer.named_buffers())
    assert "weight" in layer.state_dict()
    assert "bias" in layer.state_dict()
    names = [name for name, _ in layer.named_parameters()]
    assert names == ["bias"]
    assert layer.weight.shape == (6, 1, 3, 3)
    assert not layer.weight.requires_grad
    assert isinstance(layer.bias, nn.Parameter)
    assert layer.bias.requires_grad


def test_bias_false_has_no_parameters():
    layer = FrozenCovDepthwiseConv2d(4, 3, bias=False, generator=seeded(0))
    assert layer.bias is None
    assert list(layer.parameters()) == []
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(layer(x), conv2d_truth(x, layer, "same"))


@pytest.mark.parametrize("kernel_size", [3, 4, (3, 5)], ids=str)
@pytest.mark.parametrize("padding", ["same", "valid", 1, (2, 1)], ids=str)
def test_forward_matches_conv2d(kernel_size, padding):
    layer = FrozenCovDepthwiseConv2d(3, kernel_size, padding=padding, generator=seeded(1))
    x = torch.randn(2, 3, 7, 8)
    torch.testing.assert_close(layer(x), conv2d_truth(x, layer, padding), **tolerance(torch.float32, 25))


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_forward_with_activation(activation):
    layer = FrozenCovDepthwiseConv2d(3, (3, 5), generator=seeded(1), activation=activation)
    x = torch.randn(2, 3, 7, 8)
    approximate = "tanh" if activation == "gelu_tanh" else "none"
    expected = F.gelu(conv2d_truth(x, layer, "same"), approximate=approximate)
    torch.testing.assert_close(layer(x), expected, **tolerance(torch.float32, 15))
    assert f"activation={activation!r}" in repr(layer)


def test_backward_skips_weight_grad(monkeypatch):
    monkeypatch.setattr(cpu_conv, "weight_grad", forbid_weight_grad)
    layer = FrozenCovDepthwiseConv2d(3, (3, 5), generator=seeded(2))
    x = torch.randn(2, 3, 6, 7, requires_grad=True)
    upstream = torch.randn(2, 3, 6, 7)
    (layer(x) * upstream).sum().backward()
    assert layer.weight.grad is None
    assert not layer.weight.requires_grad
    x_truth = x.detach().clone().requires_grad_()
    bias_truth = layer.bias.detach().clone().requires_grad_()
    expected = F.conv2d(x_truth, layer.weight, bias_truth, padding="same", groups=3)
    (expected * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_truth.grad, **tolerance(torch.float32, 15))
    torch.testing.assert_close(layer.bias.grad, bias_truth.grad, **tolerance(torch.float32, 84))


def test_optimizer_step_leaves_filters():
    layer = FrozenCovDepthwiseConv2d(3, 3, generator=seeded(3))
    weight_before = layer.weight.clone()
    bias_before = layer.bias.detach().clone()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(torch.randn(2, 3, 5, 5)).square().sum().backward()
    optimizer.step()
    assert torch.equal(layer.weight, weight_before)
    assert not torch.equal(layer.bias.detach(), bias_before)


def test_state_dict_round_trip():
    layer = FrozenCovDepthwiseConv2d(5, (3, 4), generator=seeded(4))
    copy = FrozenCovDepthwiseConv2d(5, (3, 4), generator=seeded(5))
    assert not torch.equal(copy.weight, layer.weight)
    copy.load_state_dict(layer.state_dict())
    assert torch.equal(copy.weight, layer.weight)
    assert torch.equal(copy.bias, layer.bias)
    x = torch.randn(2, 5, 6, 6)
    assert torch.equal(copy(x), layer(x))


def test_loads_conv2d_state_dict():
    conv = nn.Conv2d(4, 4, 3, padding="same", groups=4)
    layer = FrozenCovDepthwiseConv2d(4, 3, generator=seeded(6))
    layer.load_state_dict(conv.state_dict())
    assert torch.equal(layer.weight, conv.weight.detach())
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(layer(x), conv(x), **tolerance(torch.float32, 9))


def test_generator_reproducible():
    first = FrozenCovDepthwiseConv2d(4, 5, generator=seeded(7))
    second = FrozenCovDepthwiseConv2d(4, 5, generator=seeded(7))
    other = FrozenCovDepthwiseConv2d(4, 5, generator=seeded(8))
    assert torch.equal(first.weight, second.weight)
    assert torch.equal(first.bias, second.bias)
    assert not torch.allclose(first.weight, other.weight)
    assert not torch.allclose(first.bias, other.bias)


def test_repr_shows_configuration():
    text = repr(FrozenCovDepthwiseConv2d(8, (3, 5), padding="valid", generator=seeded(0)))
    assert text.startswith("FrozenCovDepthwiseConv2d(")
    assert "8" in text
    assert "kernel_size=(3, 5)" in text
    assert "padding='valid'" in text
    assert "bias=True" in text


def test_to_dtype_moves_buffer():
    layer = FrozenCovDepthwiseConv2d(3, 3, generator=seeded(0))
    weight = layer.weight.clone()
    layer.to(torch.float64)
    assert layer.weight.dtype == torch.float64
    assert layer.bias.dtype == torch.float64
    assert torch.equal(layer.weight, weight.double())
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    result = layer(x)
    assert result.dtype == torch.float64
    torch.testing.assert_close(result, conv2d_truth(x, layer, "same"), **tolerance(torch.float64, 9))


def test_to_device_moves_buffer():
    layer = FrozenCovDepthwiseConv2d(3, 3, generator=seeded(0)).to("meta")
    assert layer.weight.device.type == "meta"
    assert layer.bias.device.type == "meta"


def test_dtype_argument():
    layer = FrozenCovDepthwiseConv2d(3, 3, dtype=torch.bfloat16, generator=seeded(0))
    assert layer.weight.dtype == torch.bfloat16
    assert layer.bias.dtype == torch.bfloat16
    assert layer(torch.randn(1, 3, 4, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_filters_have_covariance_scale(scale_z):
    cov = covariance.gaussian(3, 0.5, variance=4.0)
    layer = FrozenCovDepthwiseConv2d(2048, 3, cov=cov, generator=seeded(9))
    assert scale_z(layer.weight, cov) < SAMPLE_Z_BOUND
    # The bound rejects a covariance 20% off in scale.
    assert scale_z(layer.weight, 1.2 * cov) > SAMPLE_Z_BOUND
    assert scale_z(layer.weight, cov / 1.2) > SAMPLE_Z_BOUND


def test_filters_have_covariance(covariance_z):
    cov = covariance.gaussian((3, 5), 1.2, variance=0.5)
    layer = FrozenCovDepthwiseConv2d(4096, (3, 5), cov=cov, generator=seeded(10))
    samples = layer.weight.reshape(4096, 15)
    assert covariance_z(samples, cov) < SAMPLE_Z_BOUND


def test_default_covariance_is_closed_form_first_layer(covariance_z):
    layer = FrozenCovDepthwiseConv2d(4096, 3, generator=seeded(11))
    expected = covariance.closed_form(1, 3)[0]
    assert covariance_z(layer.weight.reshape(4096, 9), expected) < SAMPLE_Z_BOUND
    assert covariance_z(layer.weight.reshape(4096, 9), covariance.gaussian(3, 2.5)) > SAMPLE_Z_BOUND


def test_bias_init_matches_conv2d_bound():
    layer = FrozenCovDepthwiseConv2d(4096, (3, 5), generator=seeded(12))
    bound = 1.0 / math.sqrt(15)
    largest = float(layer.bias.detach().abs().max())
    assert largest <= bound
    assert largest > 0.99 * bound


def test_wrong_covariance_size_raises():
    with pytest.raises(ValueError, match=r"does not match kernel_size \(5, 5\)"):
        FrozenCovDepthwiseConv2d(3, 5, cov=covariance.gaussian(3, 1.0))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"channels": 0, "kernel_size": 3}, ValueError, "channels must be >= 1, got 0"),
        ({"channels": 2.0, "kernel_size": 3}, TypeError, "channels must be an int, got 2.0"),
        ({"channels": 2, "kernel_size": 0}, ValueError, "kernel_size must be positive"),
        ({"channels": 2, "kernel_size": 3, "padding": "full"}, ValueError, "padding must be 'same', 'valid'"),
        ({"channels": 2, "kernel_size": 3, "backend": "gpu"}, ValueError, "backend must be one of"),
        ({"channels": 2, "kernel_size": 3, "dtype": torch.int32}, TypeError, "dtype must be one of"),
        ({"channels": 2, "kernel_size": 3, "activation": "relu"}, ValueError, "activation must be one of"),
    ],
)
def test_invalid_arguments_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        FrozenCovDepthwiseConv2d(**kwargs)


def test_from_conv_keeps_filters():
    conv = nn.Conv2d(4, 4, (3, 5), padding=(1, 2), groups=4)
    layer = FrozenCovDepthwiseConv2d.from_conv(conv)
    assert torch.equal(layer.weight, conv.weight.detach())
    assert torch.equal(layer.bias.detach(), conv.bias.detach())
    assert not layer.weight.requires_grad
    x = torch.randn(2, 4, 6, 7)
    torch.testing.assert_close(layer(x), conv(x), **tolerance(torch.float32, 15))


@pytest.mark.parametrize(
    "conv_kwargs",
    [{"stride": 2, "padding": 1}, {"dilation": 2, "padding": 2}, {"padding": 1, "padding_mode": "circular"}],
    ids=["stride", "dilation", "padding_mode"],
)
def test_from_conv_unsupported_conv_raises(conv_kwargs):
    conv = nn.Conv2d(4, 4, 3, groups=4, **conv_kwargs)
    with pytest.raises(ValueError, match="computes stride-1, dilation-1, zero-padded convolutions only"):
        FrozenCovDepthwiseConv2d.from_conv(conv)


def test_from_conv_non_depthwise_raises():
    with pytest.raises(ValueError, match="is not a depthwise nn.Conv2d"):
        FrozenCovDepthwiseConv2d.from_conv(nn.Conv2d(4, 4, 3, groups=2))


# convert


class MixedNet(nn.Module):
    """Two depthwise kernel sizes at two nesting levels, next to convolutions that are not depthwise."""

    def __init__(self, channels=8):
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 3, padding=1)
        self.blocks = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding="same", groups=channels),
            nn.GELU(),
            nn.Sequential(
                nn.Conv2d(channels, channels, 1),
                nn.Conv2d(channels, channels, 5, padding=2, groups=channels, bias=False),
            ),
        )
        self.grouped = nn.Conv2d(channels, channels, 3, padding=1, groups=2)
        self.head = nn.Linear(channels, 3)

    def forward(self, x):
        features = self.grouped(self.blocks(self.stem(x)))
        return self.head(features.mean(dim=(2, 3)))


def depthwise_pair(channels, first_kernel=3, second_kernel=5):
    return nn.Sequential(
        nn.Conv2d(channels, channels, first_kernel, padding="same", groups=channels),
        nn.Sequential(nn.Conv2d(channels, channels, second_kernel, padding="same", groups=channels)),
    )


def test_convert_replaces_depthwise_only():
    torch.manual_seed(0)
    model = MixedNet()
    others = {name: getattr(model, name) for name in ("stem", "grouped", "head")}
    pointwise = model.blocks[2][0]
    saved = {name: module.weight.detach().clone() for name, module in others.items()}
    pointwise_weight = pointwise.weight.detach().clone()
    x = torch.randn(2, 1, 8, 8)
    shape_before = model(x).shape
    features_before = model.blocks(model.stem(x)).shape
    result = convert(model, generator=seeded(0))
    assert result is model
    assert isinstance(model.blocks[0], FrozenCovDepthwiseConv2d)
    assert isinstance(model.blocks[2][1], FrozenCovDepthwiseConv2d)
    assert model.blocks[0].kernel_size == (3, 3)
    assert model.blocks[2][1].kernel_size == (5, 5)
    assert model.blocks[2][1].bias is None
    assert model.blocks[2][0] is pointwise
    assert torch.equal(pointwise.weight, pointwise_weight)
    for name, module in others.items():
        assert getattr(model, name) is module
        assert torch.equal(module.weight, saved[name])
    assert model(x).shape == shape_before
    assert model.blocks(model.stem(x)).shape == features_before


def test_convert_keeps_padding():
    conv = nn.Conv2d(3, 3, (3, 5), padding=(1, 0), groups=3)
    model = nn.Sequential(conv)
    convert(model, generator=seeded(1))
    layer = model[0]
    x = torch.randn(2, 3, 6, 7)
    result = layer(x)
    expected = F.conv2d(x, layer.weight, layer.bias, padding=(1, 0), groups=3)
    assert result.shape == (2, 3, 6, 3)
    torch.testing.assert_close(result, expected, **tolerance(torch.float32, 15))


def test_convert_backward_trains_other_layers(monkeypatch):
    monkeypatch.setattr(cpu_conv, "weight_grad", forbid_weight_grad)
    model = convert(MixedNet(), generator=seeded(2))
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    assert model.blocks[0].weight.grad is None
    assert model.blocks[2][1].weight.grad is None
    assert model.blocks[0].bias.grad is not None
    assert model.stem.weight.grad is not None
    assert model.grouped.weight.grad is not None
    trainable = {id(p) for p in model.parameters()}
    assert id(model.blocks[0].weight) not in trainable


def test_convert_model_that_is_depthwise_conv():
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=4)
    result = convert(conv, generator=seeded(3))
    assert isinstance(result, FrozenCovDepthwiseConv2d)
    assert torch.equal(result.bias.detach(), conv.bias.detach())


def test_convert_closed_form_covariances(covariance_z):
    model = convert(depthwise_pair(2048, 3, 3), generator=seeded(4))
    first, last = model[0].weight.reshape(2048, 9), model[1][0].weight.reshape(2048, 9)
    first_cov = covariance.gaussian(3, covariance.SIGMA_FIRST)
    last_cov = covariance.gaussian(3, covariance.SIGMA_LAST)
    assert covariance_z(first, first_cov) < SAMPLE_Z_BOUND
    assert covariance_z(last, last_cov) < SAMPLE_Z_BOUND
    assert covariance_z(first, last_cov) > SAMPLE_Z_BOUND


def test_convert_single_matrix_resized(scale_z):
    cov = covariance.gaussian(3, 0.5, variance=4.0)
    model = convert(depthwise_pair(2048), cov, generator=seeded(5))
    assert scale_z(model[0].weight, cov) < SAMPLE_Z_BOUND
    resized = covariance.resize(cov, 5)
    assert scale_z(model[1][0].weight, resized) < SAMPLE_Z_BOUND
    assert scale_z(model[1][0].weight, 1.2 * resized) > SAMPLE_Z_BOUND


def test_convert_bank_one_per_layer(scale_z):
    bank = torch.stack([covariance.gaussian(3, 0.5, variance=1.0), covariance.gaussian(3, 0.5, variance=9.0)])
    model = convert(depthwise_pair(2048), bank, generator=seeded(6))
    assert scale_z(model[0].weight, bank[0]) < SAMPLE_Z_BOUND
    assert scale_z(model[1][0].weight, covariance.resize(bank[1], 5)) < SAMPLE_Z_BOUND
    assert scale_z(model[0].weight, bank[1]) > SAMPLE_Z_BOUND


def test_convert_bank_wrong_length_raises():
    bank = covariance.closed_form(3, 3)
    with pytest.raises(ValueError, match="bank of 3 covariances but the model has 2 depthwise convolutions"):
        convert(depthwise_pair(4), bank)


def test_convert_unknown_cov_name_raises():
    with pytest.raises(ValueError, match="cov must be 'closed_form'"):
        convert(depthwise_pair(4), "gaussian")


def test_convert_without_depthwise_raises():
    with pytest.raises(ValueError, match="Sequential has no depthwise nn.Conv2d"):
        convert(nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3, groups=2)))


def test_convert_freeze_false_reinitializes_in_place(scale_z):
    model = depthwise_pair(2048)
    parameters = [model[0].weight, model[1][0].weight]
    before = [p.detach().clone() for p in parameters]
    cov = covariance.gaussian(3, 0.5, variance=4.0)
    convert(model, cov, freeze=False, generator=seeded(7))
    assert type(model[0]) is nn.Conv2d
    assert type(model[1][0]) is nn.Conv2d
    for parameter, old, layer in zip(parameters, before, (model[0], model[1][0])):
        assert layer.weight is parameter
        assert isinstance(layer.weight, nn.Parameter)
        assert layer.weight.requires_grad
        assert not torch.allclose(layer.weight, old)
    assert scale_z(model[0].weight, cov) < SAMPLE_Z_BOUND
    assert scale_z(model[1][0].weight, covariance.resize(cov, 5)) < SAMPLE_Z_BOUND


@pytest.mark.parametrize(
    "conv_kwargs, name",
    [
        ({"stride": 2, "padding": 1}, "stride"),
        ({"dilation": 2, "padding": 2}, "dilation"),
        ({"padding": 1, "padding_mode": "reflect"}, "padding_mode"),
    ],
)
def test_convert_unsupported_conv_frozen_in_place(conv_kwargs, name):
    model = nn.Sequential(
        nn.Conv2d(4, 4, 3, groups=4, **conv_kwargs),
        nn.Conv2d(4, 4, 3, padding="same", groups=4),
    )
    unsupported = model[0]
    before = unsupported.weight.detach().clone()
    x = torch.randn(1, 4, 8, 8)
    shape_before = model[0](x).shape
    with pytest.warns(UserWarning, match=f"0 .*{name}.* stays an nn.Conv2d with a frozen weight"):
        convert(model, generator=seeded(8))
    assert model[0] is unsupported
    assert not unsupported.weight.requires_grad
    assert not torch.allclose(unsupported.weight, before)
    assert isinstance(model[1], FrozenCovDepthwiseConv2d)
    assert model[0](x).shape == shape_before


def test_convert_generator_reproducible():
    torch.manual_seed(0)
    first = convert(MixedNet(), generator=seeded(9))
    torch.manual_seed(1)
    second = convert(MixedNet(), generator=seeded(9))
    third = convert(MixedNet(), generator=seeded(10))
    assert torch.equal(first.blocks[0].weight, second.blocks[0].weight)
    assert torch.equal(first.blocks[2][1].weight, second.blocks[2][1].weight)
    assert not torch.allclose(first.blocks[0].weight, third.blocks[0].weight)
