"""Layers: the frozen-filter depthwise convolution, and ``convert`` for models built elsewhere."""

import math
import warnings

import torch
from torch import nn

from . import _checks, covariance, ops, sampling


class FrozenCovDepthwiseConv2d(nn.Module):
    """Depthwise convolution whose filters are sampled once from N(0, cov) and never trained.

    The filters live in the persistent buffer ``weight`` of shape (C, 1, kh, kw): they are saved in
    ``state_dict`` and move with ``.to()``, but they are not in ``parameters()``, so no optimizer
    updates them and backward computes only the input and bias gradients. The bias is trainable and
    initialized as ``nn.Conv2d`` initializes it.

    Args:
        channels: number of channels C (input and output).
        kernel_size: int or (kh, kw).
        cov: (d, d) covariance with d = kh * kw. Defaults to ``covariance.closed_form(1, kernel_size)``,
            the closed-form covariance of a first layer.
        bias: whether to add a trainable bias.
        padding: "same", "valid", an int or an (int, int) pair; see ``depthwise_conv2d``.
        generator: optional ``torch.Generator`` for sampling the filters.
        device, dtype: of the filters and the bias.
        backend: "auto", "torch" or "triton"; see ``depthwise_conv2d``.
        activation: None, "gelu" or "gelu_tanh", applied after the bias and fused into the
            convolution kernels on the Triton path.

    Example:
        >>> layer = FrozenCovDepthwiseConv2d(64, 9)
        >>> layer(torch.randn(2, 64, 16, 16)).shape
        torch.Size([2, 64, 16, 16])
    """

    is_depthwise_conv = True

    def __init__(
        self,
        channels,
        kernel_size,
        cov=None,
        *,
        bias=True,
        padding="same",
        generator=None,
        device=None,
        dtype=None,
        backend="auto",
        activation=None,
    ):
        super().__init__()
        self.channels = _checks.positive_int(channels, "channels")
        self.kernel_size = _checks.kernel_size_pair(kernel_size)
        self.padding = padding
        self.padding4 = _checks.padding4(padding, self.kernel_size)
        self.backend = _checks.backend_name(backend)
        self.activation = _checks.activation_name(activation)
        dtype = _checks.float_dtype(dtype if dtype is not None else torch.get_default_dtype())
        if cov is None:
            cov = covariance.closed_form(1, self.kernel_size)[0]
        weight = torch.empty(self.channels, 1, *self.kernel_size, device=device, dtype=dtype)
        sampling.init_(weight, cov, generator=generator)
        self.register_buffer("weight", weight)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.channels, device=device, dtype=dtype))
            bound = 1.0 / math.sqrt(self.kernel_size[0] * self.kernel_size[1])
            with torch.no_grad():
                if generator is not None and generator.device == self.bias.device:
                    self.bias.uniform_(-bound, bound, generator=generator)
                else:
                    self.bias.uniform_(-bound, bound)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_conv(cls, conv, *, backend="auto", activation=None):
        """Build a frozen layer that keeps the filters and bias of a depthwise ``nn.Conv2d``."""
        if covariance.depthwise_weight_of(conv) is None:
            raise ValueError(f"{conv} is not a depthwise nn.Conv2d (groups == in_channels == out_channels)")
        if not is_supported_by_frozen_layer(conv):
            raise ValueError(
                f"{conv} cannot become a FrozenCovDepthwiseConv2d, which computes stride-1, "
                "dilation-1, zero-padded convolutions only; freeze its weight with "
                "conv.weight.requires_grad_(False) instead"
            )
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.channels = conv.in_channels
        layer.kernel_size = tuple(conv.kernel_size)
        layer.padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
        layer.padding4 = _checks.padding4(layer.padding, layer.kernel_size)
        layer.backend = _checks.backend_name(backend)
        layer.activation = _checks.activation_name(activation)
        layer.register_buffer("weight", conv.weight.detach().clone())
        if conv.bias is not None:
            layer.bias = nn.Parameter(conv.bias.detach().clone())
        else:
            layer.register_parameter("bias", None)
        return layer

    def forward(self, x):
        return ops.depthwise_conv2d(
            x, self.weight, self.bias, self.padding, activation=self.activation, backend=self.backend
        )

    def extra_repr(self):
        kh, kw = self.kernel_size
        return (
            f"{self.channels}, kernel_size=({kh}, {kw}), padding={self.padding!r}, "
            f"bias={self.bias is not None}, activation={self.activation!r}, frozen=True"
        )


def resolve_layer_covariances(cov, kernel_sizes, source_kernel_size=None):
    """Return one (d, d) covariance per layer for ``convert``: closed-form, shared or from a bank.

    ``source_kernel_size`` is the kernel size of ``cov``. Without it a square d gives a square
    kernel, and a non-square d is taken to match the layers of that d. A matrix shared by several
    layers of one kernel size is returned as one object for all of them, so it is factored once.
    """
    depth = len(kernel_sizes)
    if isinstance(cov, str):
        if cov != "closed_form":
            raise ValueError(f"cov must be 'closed_form', a (d, d) matrix or an (L, d, d) bank, got {cov!r}")
        sigmas = covariance.depth_sigmas(depth, covariance.SIGMA_FIRST, covariance.SIGMA_LAST)
        return [
            covariance.gaussian(size, sigma, constant=covariance.CONSTANT)
            for size, sigma in zip(kernel_sizes, sigmas)
        ]
    stack = _checks.covariance_stack(cov)
    if cov.dim() == 2:
        layers = [stack[0]] * depth
    elif stack.shape[0] == depth:
        layers = list(stack)
    else:
        raise ValueError(
            f"cov is a bank of {stack.shape[0]} covariances but the model has {depth} depthwise "
            f"convolutions; map it with covariance.interpolate_depth(bank, {depth}) first"
        )
    if source_kernel_size is not None:
        source_kernel_size = _checks.kernel_size_from_dim(stack.shape[-1], source_kernel_size)
    resized = {}
    resolved = []
    for matrix, size in zip(layers, kernel_sizes):
        if source_kernel_size is not None:
            needs_resize = source_kernel_size != size
        else:
            needs_resize = matrix.shape[-1] != size[0] * size[1]
        if needs_resize:
            key = (id(matrix), size)
            if key not in resized:
                resized[key] = covariance.resize(matrix, size, source_kernel_size=source_kernel_size)
            matrix = resized[key]
        resolved.append(matrix)
    return resolved


def depthwise_convs(model):
    """Return (qualified name, module) of every depthwise ``nn.Conv2d`` of ``model``, in module order."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d) and covariance.depthwise_weight_of(module) is not None
    ]


def is_supported_by_frozen_layer(conv):
    """Return whether the frozen layer computes what ``conv`` computes."""
    return (
        tuple(conv.stride) == (1, 1)
        and tuple(conv.dilation) == (1, 1)
        and conv.padding_mode == "zeros"
    )


def convert(model, cov="closed_form", *, freeze=True, generator=None, backend="auto", kernel_size=None):
    """Re-initialize every depthwise ``nn.Conv2d`` of ``model`` from covariances, in place.

    Args:
        model: any ``nn.Module``.
        cov: "closed_form" (a Gaussian covariance per layer, its width growing with depth), one
            (d, d) matrix for every layer, or an (L, d, d) bank with one matrix per depthwise layer
            in module order. Matrices are resized when a layer's kernel size differs.
        freeze: if True, replace each convolution by a ``FrozenCovDepthwiseConv2d`` that keeps its
            bias. A convolution that layer cannot express (stride or dilation other than 1, or a
            padding mode other than zeros) is re-initialized in place with its weight's
            ``requires_grad`` set to False, and a warning names it. If False, re-initialize the
            weights in place and leave them trainable.
        generator: optional ``torch.Generator``; the same seed gives the same filters.
        backend: backend of the frozen layers.
        kernel_size: the kernel size ``cov`` was built for. Needed only for a rectangular
            covariance applied to layers of another kernel size.

    Returns:
        ``model``, or the new layer when ``model`` itself is a depthwise convolution that was replaced.
    """
    convs = depthwise_convs(model)
    if not convs:
        raise ValueError(
            f"{type(model).__name__} has no depthwise nn.Conv2d "
            "(groups == in_channels == out_channels) to convert"
        )
    kernel_sizes = [tuple(conv.kernel_size) for _, conv in convs]
    covs = resolve_layer_covariances(cov, kernel_sizes, kernel_size)
    factors = {}
    for (name, conv), matrix in zip(convs, covs):
        if id(matrix) not in factors:
            # Sampling runs on the generator's device, as in ``init_``.
            device = generator.device if generator is not None else conv.weight.device
            factors[id(matrix)] = sampling.factorize(matrix.to(device))
        sampling.fill_from_factors(conv.weight, factors[id(matrix)], generator=generator)
        if not freeze:
            continue
        if not is_supported_by_frozen_layer(conv):
            conv.weight.requires_grad_(False)
            warnings.warn(
                f"{name} (stride={conv.stride}, dilation={conv.dilation}, "
                f"padding_mode={conv.padding_mode!r}) stays an nn.Conv2d with a frozen weight, "
                "because FrozenCovDepthwiseConv2d computes stride-1, dilation-1, zero-padded "
                "convolutions only",
                stacklevel=2,
            )
            continue
        frozen = FrozenCovDepthwiseConv2d.from_conv(conv, backend=backend)
        if not name:
            return frozen
        set_submodule(model, name, frozen)
    return model


def set_submodule(model, name, module):
    """Replace the submodule at dotted path ``name`` of ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
