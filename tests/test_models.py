"""Tests of the ConvMixer model: shapes, depthwise layer kinds, covariance init and arguments."""

import pytest
import torch
from torch import nn

from convcov_fast import FrozenCovDepthwiseConv2d, covariance
from convcov_fast.models import ConvMixer, depthwise_layers
from tolerances import SAMPLE_Z_BOUND, tolerance

# nn.Conv2d warns that padding="same" on an even kernel copies the input. The trainable ConvMixer
# with an even kernel uses that padding on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")


def seeded(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("depthwise", ["trainable", "frozen"])
@pytest.mark.parametrize(
    "config, input_shape",
    [
        ({"dim": 8, "depth": 2, "kernel_size": 3, "patch_size": 2}, (2, 1, 8, 8)),
        (
            {"dim": 6, "depth": 1, "kernel_size": (3, 5), "patch_size": 1, "in_chans": 3, "num_classes": 4},
            (1, 3, 6, 7),
        ),
        ({"dim": 4, "depth": 3, "kernel_size": 4, "patch_size": 3, "num_classes": 2}, (3, 1, 9, 12)),
    ],
    ids=["square", "rectangular", "even"],
)
def test_forward_shapes(config, input_shape, depthwise):
    model = ConvMixer(**config, depthwise=depthwise, generator=seeded(0))
    x = torch.randn(input_shape)
    n, _, h, w = input_shape
    patch = config["patch_size"]
    features = model.forward_features(x)
    assert features.shape == (n, config["dim"], h // patch, w // patch)
    logits = model(x)
    assert logits.shape == (n, config.get("num_classes", 10))
    assert torch.isfinite(logits).all()
    assert torch.equal(model.forward_head(features), logits)


def test_depthwise_layers_in_order():
    model = ConvMixer(8, 3, kernel_size=5, generator=seeded(0))
    layers = depthwise_layers(model)
    assert len(layers) == 3
    for layer, block in zip(layers, model.blocks):
        assert layer is block[0].fn[0]
        assert isinstance(layer, nn.Conv2d)
        assert layer.weight.shape == (8, 1, 5, 5)


def test_frozen_has_no_depthwise_parameters():
    trainable = ConvMixer(8, 2, kernel_size=3, depthwise="trainable", generator=seeded(1))
    frozen = ConvMixer(8, 2, kernel_size=3, depthwise="frozen", generator=seeded(1))
    layers = depthwise_layers(frozen)
    assert len(layers) == 2
    parameter_ids = {id(p) for p in frozen.parameters()}
    for layer in layers:
        assert isinstance(layer, FrozenCovDepthwiseConv2d)
        assert id(layer.weight) not in parameter_ids
        assert id(layer.bias) in parameter_ids
    trainable_count = sum(p.numel() for p in trainable.parameters())
    frozen_count = sum(p.numel() for p in frozen.parameters())
    assert trainable_count - frozen_count == 2 * 8 * 9
    assert all(not name.endswith("fn.0.weight") for name, _ in frozen.named_parameters())
    assert any(name.endswith("fn.0.weight") for name in frozen.state_dict())


def test_frozen_training_step_keeps_filters():
    model = ConvMixer(8, 2, kernel_size=3, depthwise="frozen", generator=seeded(2))
    filters = [layer.weight.clone() for layer in depthwise_layers(model)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(model(torch.randn(4, 1, 8, 8)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    for layer, before in zip(depthwise_layers(model), filters):
        assert torch.equal(layer.weight, before)
        assert layer.weight.grad is None


def test_frozen_loads_trainable_state_dict():
    trainable = ConvMixer(8, 2, kernel_size=3, init="closed_form", generator=seeded(11)).eval()
    frozen = ConvMixer(8, 2, kernel_size=3, depthwise="frozen", generator=seeded(12)).eval()
    frozen.load_state_dict(trainable.state_dict())
    for source, target in zip(depthwise_layers(trainable), depthwise_layers(frozen)):
        assert torch.equal(target.weight, source.weight.detach())
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(frozen(x), trainable(x), **tolerance(torch.float32, 81))


@pytest.mark.parametrize("depthwise", ["trainable", "frozen"])
def test_closed_form_init(depthwise, covariance_z):
    dim = 1024
    model = ConvMixer(dim, 2, kernel_size=3, depthwise=depthwise, init="closed_form", generator=seeded(3))
    bank = covariance.closed_form(2, 3)
    layers = depthwise_layers(model)
    for layer, cov in zip(layers, bank):
        assert covariance_z(layer.weight.reshape(dim, 9), cov) < SAMPLE_Z_BOUND
    # The first and last layers of the closed-form bank differ enough to fail the bound.
    assert covariance_z(layers[0].weight.reshape(dim, 9), bank[1]) > SAMPLE_Z_BOUND


def test_default_init_scale(scale_z):
    model = ConvMixer(1024, 1, kernel_size=3, generator=seeded(4))
    # PyTorch's default init is U(-b, b) with b = 1 / sqrt(9), uncorrelated taps of variance 1 / 27.
    uniform = torch.eye(9, dtype=torch.float64) / 27.0
    weight = depthwise_layers(model)[0].weight
    assert float(weight.detach().abs().max()) <= 1.0 / 3.0
    assert scale_z(weight, uniform) < SAMPLE_Z_BOUND
    assert scale_z(weight, 1.2 * uniform) > SAMPLE_Z_BOUND


def test_bank_of_other_depth_interpolated(scale_z):
    bank = torch.stack([covariance.gaussian(3, 0.5, variance=1.0), covariance.gaussian(3, 0.5, variance=9.0)])
    model = ConvMixer(1024, 3, kernel_size=3, init=bank, generator=seeded(5))
    expected = [bank[0], 0.5 * (bank[0] + bank[1]), bank[1]]
    layers = depthwise_layers(model)
    for layer, cov in zip(layers, expected):
        assert scale_z(layer.weight, cov) < SAMPLE_Z_BOUND
    assert scale_z(layers[1].weight, bank[1]) > SAMPLE_Z_BOUND


def test_bank_of_other_kernel_size_resized(scale_z):
    bank = torch.stack([covariance.gaussian(5, 0.5, variance=4.0)])
    model = ConvMixer(1024, 2, kernel_size=3, depthwise="frozen", init=bank, generator=seeded(6))
    resized = covariance.resize(bank[0], 3)
    for layer in depthwise_layers(model):
        assert layer.weight.shape == (1024, 1, 3, 3)
        assert scale_z(layer.weight, resized) < SAMPLE_Z_BOUND


def test_learned_bank_round_trip():
    source = ConvMixer(8, 2, kernel_size=3, generator=seeded(7))
    bank = covariance.from_model(source)
    assert bank.shape == (2, 9, 9)
    model = ConvMixer(8, 4, kernel_size=5, depthwise="frozen", init=bank, generator=seeded(8))
    assert len(depthwise_layers(model)) == 4
    assert model(torch.randn(1, 1, 8, 8)).shape == (1, 10)


@pytest.mark.parametrize("init", ["default", "closed_form"])
@pytest.mark.parametrize("depthwise", ["trainable", "frozen"])
def test_generator_reproducible(init, depthwise):
    def build(seed):
        return ConvMixer(8, 2, kernel_size=3, depthwise=depthwise, init=init, generator=seeded(seed))

    first, second, other = build(9), build(9), build(10)
    for a, b, c in zip(depthwise_layers(first), depthwise_layers(second), depthwise_layers(other)):
        assert torch.equal(a.weight, b.weight)
        assert not torch.allclose(a.weight, c.weight)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"depthwise": "x"}, ValueError, r"depthwise must be one of \('trainable', 'frozen'\), got 'x'"),
        ({"init": "x"}, ValueError, "init must be 'default', 'closed_form' or an .* bank tensor, got 'x'"),
        ({"init": 3}, TypeError, "init must be a string or a bank tensor, got int"),
        ({"dim": 0}, ValueError, "dim must be >= 1, got 0"),
        ({"depth": 0}, ValueError, "depth must be >= 1, got 0"),
        ({"patch_size": 0}, ValueError, "patch_size must be >= 1, got 0"),
        ({"kernel_size": (3, 0)}, ValueError, "kernel_size must be positive"),
    ],
)
def test_invalid_arguments_raise(kwargs, error, match):
    arguments = {"dim": 4, "depth": 2, "kernel_size": 3}
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        ConvMixer(**arguments)


def test_indefinite_bank_raises():
    bad = torch.eye(9, dtype=torch.float64)
    bad[4, 4] = -1.0
    with pytest.raises(ValueError, match="not positive semidefinite"):
        ConvMixer(4, 1, kernel_size=3, init=bad[None])
