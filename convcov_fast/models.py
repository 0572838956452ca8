"""ConvMixer (Trockman and Kolter, "Patches Are All You Need?", 2022) with a choice of depthwise conv.

The model is a patch-embedding stem followed by ``depth`` blocks of a residual depthwise
convolution and a pointwise convolution, each followed by GELU and BatchNorm, then global average
pooling and a linear classifier. ``make_depthwise`` is the one place that picks the depthwise layer.
"""

import torch
from torch import nn

from . import _checks, covariance, layers, sampling

DEPTHWISE_KINDS = ("trainable", "frozen")


class Residual(nn.Module):
    """Add the input to the output of ``fn``."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x) + x


def resolve_init(init, depth, kernel_size):
    """Return None for PyTorch's default init, else a (depth, d, d) bank for the depthwise layers."""
    if isinstance(init, str):
        if init == "default":
            return None
        if init == "closed_form":
            return covariance.closed_form(depth, kernel_size)
        raise ValueError(f"init must be 'default', 'closed_form' or an (L, d, d) bank tensor, got {init!r}")
    if not isinstance(init, torch.Tensor):
        raise TypeError(f"init must be a string or a bank tensor, got {type(init).__name__}")
    return torch.stack(layers.resolve_layer_covariances(init, [kernel_size] * depth))


def make_depthwise(dim, kernel_size, kind, cov, generator):
    """Build the depthwise convolution and the GELU after it, as a pair of modules.

    A trainable layer is an ``nn.Conv2d`` followed by ``nn.GELU``. A frozen layer is a
    ``FrozenCovDepthwiseConv2d`` with the GELU fused into its kernels, followed by ``nn.Identity``,
    so both kinds have the same ``state_dict`` keys. With ``cov`` None the filters keep PyTorch's
    default init (frozen ones included, which then stay as ``nn.Conv2d`` would have started them).
    """
    conv = nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same")
    if cov is not None:
        sampling.init_(conv.weight, cov, generator=generator)
    elif generator is not None:
        # Draw the default init from the generator too, so seeded models are reproducible.
        fan_in = kernel_size[0] * kernel_size[1]
        bound = fan_in**-0.5
        with torch.no_grad():
            conv.weight.uniform_(-bound, bound, generator=generator)
    if kind == "frozen":
        return layers.FrozenCovDepthwiseConv2d.from_conv(conv, activation="gelu"), nn.Identity()
    return conv, nn.GELU()


class ConvMixer(nn.Module):
    """ConvMixer-``dim``/``depth`` with kernel ``kernel_size`` and patch ``patch_size``.

    Args:
        dim: channels of every block.
        depth: number of blocks.
        kernel_size: depthwise kernel size, int or (kh, kw).
        patch_size: stride and size of the patch-embedding convolution.
        in_chans: input channels.
        num_classes: classifier outputs.
        depthwise: "trainable" (``nn.Conv2d``) or "frozen" (``FrozenCovDepthwiseConv2d``).
        init: "default" (PyTorch's uniform init), "closed_form" (``covariance.closed_form``), or an
            (L, d, d) bank, interpolated to ``depth`` layers and resized to ``kernel_size`` as needed.
        generator: optional ``torch.Generator`` for the depthwise filters.
    """

    def __init__(
        self,
        dim,
        depth,
        kernel_size=9,
        patch_size=2,
        in_chans=1,
        num_classes=10,
        depthwise="trainable",
        init="default",
        generator=None,
    ):
        super().__init__()
        dim = _checks.positive_int(dim, "dim")
        depth = _checks.positive_int(depth, "depth")
        kernel_size = _checks.kernel_size_pair(kernel_size)
        patch_size = _checks.positive_int(patch_size, "patch_size")
        if depthwise not in DEPTHWISE_KINDS:
            raise ValueError(f"depthwise must be one of {DEPTHWISE_KINDS}, got {depthwise!r}")
        if isinstance(init, torch.Tensor) and init.dim() == 3 and init.shape[0] != depth:
            init = covariance.interpolate_depth(init, depth)
        bank = resolve_init(init, depth, kernel_size)
        self.dim, self.depth, self.kernel_size, self.patch_size = dim, depth, kernel_size, patch_size
        self.num_classes = num_classes
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, dim, patch_size, stride=patch_size), nn.GELU(), nn.BatchNorm2d(dim)
        )
        blocks = []
        for layer in range(depth):
            cov = None if bank is None else bank[layer]
            depthwise_conv, activation = make_depthwise(dim, kernel_size, depthwise, cov, generator)
            blocks.append(
                nn.Sequential(
                    Residual(nn.Sequential(depthwise_conv, activation, nn.BatchNorm2d(dim))),
                    nn.Conv2d(dim, dim, 1),
                    nn.GELU(),
                    nn.BatchNorm2d(dim),
                )
            )
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(dim, num_classes)

    def forward_features(self, x):
        return self.blocks(self.stem(x))

    def forward_head(self, x):
        return self.head(self.pool(x).flatten(1))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def depthwise_layers(model):
    """Return the depthwise convolution modules of ``model`` in module order."""
    return [m for m in model.modules() if covariance.depthwise_weight_of(m) is not None]
