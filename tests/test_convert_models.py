"""convert() on models defined outside the package: a ConvNeXt-style network and a network with
depthwise convolutions of several kernel sizes."""

import copy

import pytest
import torch
from torch import nn

import convcov_fast
from convcov_fast import FrozenCovDepthwiseConv2d
from tolerances import tolerance

DIM = 16
CLASSES = 4


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7, LayerNorm over channels, pointwise MLP as Linear layers in channels-last
    order, layer scale and a residual connection."""

    def __init__(self, dim, kernel_size=7, layer_scale=0.1):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(layer_scale * torch.ones(dim))

    def forward(self, x):
        shortcut = x
        x = self.dwconv(x).permute(0, 2, 3, 1)
        x = self.pwconv2(self.act(self.pwconv1(self.norm(x))))
        x = (self.gamma * x).permute(0, 3, 1, 2)
        return shortcut + x


class TinyConvNeXt(nn.Module):
    def __init__(self, dim=DIM, num_classes=CLASSES):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 2, stride=2)
        self.blocks = nn.Sequential(ConvNeXtBlock(dim), ConvNeXtBlock(dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(self.norm(x.mean(dim=(2, 3))))


class MixedKernelNet(nn.Module):
    """Depthwise convolutions of 3x3, 7x7 without bias, and a rectangular 1x5."""

    def __init__(self, dim=DIM, num_classes=CLASSES):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 1)
        self.small = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.mix = nn.Conv2d(dim, dim, 1)
        self.large = nn.Conv2d(dim, dim, 7, padding=3, groups=dim, bias=False)
        self.wide = nn.Conv2d(dim, dim, (1, 5), padding=(0, 2), groups=dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = x + torch.relu(self.small(x))
        x = torch.relu(self.mix(x))
        x = x + self.large(x)
        x = self.wide(x)
        return self.head(x.mean(dim=(2, 3)))


MODELS = {"convnext": TinyConvNeXt, "mixed_kernels": MixedKernelNet}
KERNEL_SIZES = {"convnext": [(7, 7), (7, 7)], "mixed_kernels": [(3, 3), (7, 7), (1, 5)]}


def build(name, seed):
    torch.manual_seed(seed)
    return MODELS[name]()


def fixed_batch(size=16):
    """Return images and labels that a fixed linear map of the mean colour of each image decides."""
    generator = torch.Generator().manual_seed(100)
    images = torch.randn(size, 3, 16, 16, generator=generator)
    images = images + torch.randn(size, 3, 1, 1, generator=generator)
    projection = torch.randn(3, CLASSES, generator=generator)
    labels = (images.mean(dim=(2, 3)) @ projection).argmax(dim=1)
    return images, labels


def frozen_layers(model):
    return [m for m in model.modules() if isinstance(m, FrozenCovDepthwiseConv2d)]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_convert_replaces_depthwise_only(name):
    model = build(name, seed=0)
    original = copy.deepcopy(model)
    images, _ = fixed_batch()
    output_shape = model(images).shape
    keys = list(model.state_dict())

    converted = convcov_fast.convert(model, generator=torch.Generator().manual_seed(1))

    assert converted is model
    layers = frozen_layers(model)
    assert [layer.kernel_size for layer in layers] == KERNEL_SIZES[name]
    assert not any(
        isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels for m in model.modules()
    )
    assert converted(images).shape == output_shape
    # The frozen layers keep the names weight and bias, so the state_dict keys are unchanged.
    assert sorted(model.state_dict()) == sorted(keys)
    frozen_names = {name for name, m in model.named_modules() if isinstance(m, FrozenCovDepthwiseConv2d)}
    for key, value in original.state_dict().items():
        module_name, _, field = key.rpartition(".")
        if module_name in frozen_names and field == "weight":
            assert not torch.equal(model.state_dict()[key], value), f"{key} was not re-sampled"
        else:
            assert torch.equal(model.state_dict()[key], value), f"{key} changed"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_convert_matches_conv2d_with_new_filters(name):
    model = build(name, seed=0)
    original = copy.deepcopy(model)
    convcov_fast.convert(model, generator=torch.Generator().manual_seed(1))
    images, _ = fixed_batch()

    # The unconverted architecture with the sampled filters loaded computes the same function.
    original.load_state_dict(model.state_dict())

    with torch.no_grad():
        torch.testing.assert_close(model(images), original(images), **tolerance(torch.float32, 49))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_state_dict_round_trip(name):
    source = convcov_fast.convert(build(name, seed=0), generator=torch.Generator().manual_seed(1))
    target = convcov_fast.convert(build(name, seed=5), generator=torch.Generator().manual_seed(2))
    images, _ = fixed_batch()
    with torch.no_grad():
        assert not torch.allclose(source(images), target(images))

    target.load_state_dict(source.state_dict())

    for mine, theirs in zip(frozen_layers(target), frozen_layers(source)):
        assert torch.equal(mine.weight, theirs.weight)
    with torch.no_grad():
        torch.testing.assert_close(target(images), source(images), **tolerance(torch.float32))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_training_reduces_loss(name):
    model = convcov_fast.convert(build(name, seed=0), generator=torch.Generator().manual_seed(1))
    filters = [layer.weight.clone() for layer in frozen_layers(model)]
    images, labels = fixed_batch()
    parameters = list(model.parameters())
    assert not any(p is layer.weight for p in parameters for layer in frozen_layers(model))
    optimizer = torch.optim.Adam(parameters, lr=1e-2)

    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    assert losses[-1] < 0.7 * losses[0], f"losses {losses}"
    for layer, before in zip(frozen_layers(model), filters):
        assert layer.weight.grad is None
        assert torch.equal(layer.weight, before)
