"""The depthwise convolution op: validation, backend choice, and autograd.

``depthwise_conv2d`` is built from ``torch.library`` custom ops: ``convcov_fast::depthwise_conv2d``
and ``convcov_fast::depthwise_conv2d_activation`` (forward, without and with a fused GELU), and
``..._input_grad``, ``..._weight_grad`` and ``..._bias_grad`` (the backward pieces). Each has a fake
implementation, so ``torch.compile`` traces a model that uses it as single graph nodes. Its
autograd rule computes the weight gradient only when the weight requires grad, so frozen filters
never pay for the reduction over batch and space.
"""

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from . import _checks, cpu_conv, reference

OP_NAMESPACE = "convcov_fast"


def depthwise_kernels():
    """Import and return the Triton depthwise module."""
    from .kernels import depthwise

    return depthwise


def resolve_backend(backend, device):
    """Return "triton", "cpu" or "reference": the implementation to run on ``device``."""
    if backend == "auto":
        if device.type == "cpu":
            return "cpu"
        return "triton" if device.type == "cuda" else "reference"
    if backend == "torch":
        return "cpu" if device.type == "cpu" else "reference"
    if device.type == "cpu" and not _triton_interpreter_enabled():
        raise ValueError(
            "backend='triton' needs a CUDA tensor, or TRITON_INTERPRET=1 set before triton is "
            "imported to run the kernel on the CPU under the Triton interpreter"
        )
    return "triton"


def _triton_interpreter_enabled():
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


def memory_format_of(x):
    """Return ``torch.channels_last`` when ``x`` is laid out NHWC, else ``torch.contiguous_format``."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def output_size(x_size, kernel_size, padding4):
    top, bottom, left, right = padding4
    return (
        x_size[0] + top + bottom - kernel_size[0] + 1,
        x_size[1] + left + right - kernel_size[1] + 1,
    )


@torch.library.custom_op(f"{OP_NAMESPACE}::depthwise_conv2d", mutates_args=())
def depthwise_conv2d_op(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], padding: List[int], backend: str
) -> torch.Tensor:
    """Forward of the depthwise convolution on validated inputs (see ``depthwise_conv2d``)."""
    padding4 = tuple(padding)
    implementation = resolve_backend(backend, x.device)
    if implementation == "cpu":
        y = cpu_conv.forward(x, weight, bias, padding4)
    elif implementation == "triton":
        y = depthwise_kernels().depthwise_forward(x, weight, bias, padding4)
    else:
        y = reference.depthwise_conv2d(x, weight, bias, padding4)
    return y.contiguous(memory_format=memory_format_of(x))


@depthwise_conv2d_op.register_fake
def _depthwise_conv2d_fake(x, weight, bias, padding, backend):
    out_h, out_w = output_size(x.shape[-2:], weight.shape[-2:], padding)
    shape = (x.shape[0], x.shape[1], out_h, out_w)
    return x.new_empty(shape).contiguous(memory_format=memory_format_of(x))


def apply_activation(preactivation, activation):
    """Apply a fused activation in plain torch ("none", "gelu" or "gelu_tanh")."""
    if activation == "none":
        return preactivation
    return F.gelu(preactivation, approximate="tanh" if activation == "gelu_tanh" else "none")


def activation_grad(grad_output, preactivation, activation):
    """Return the gradient with respect to the preactivation of a fused activation, in plain torch."""
    if activation == "none":
        return grad_output
    approximate = "tanh" if activation == "gelu_tanh" else "none"
    return torch.ops.aten.gelu_backward(grad_output, preactivation, approximate=approximate)


def kernel_activation(activation):
    """Translate an activation name to the Triton kernels' argument (None for no activation)."""
    return None if activation == "none" else activation


@torch.library.custom_op(f"{OP_NAMESPACE}::depthwise_conv2d_activation", mutates_args=())
def depthwise_conv2d_activation_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    padding: List[int],
    backend: str,
    activation: str,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward of convolution + bias + activation; returns (output, preactivation).

    The preactivation is kept for the backward, as the unfused activation would keep its input.
    """
    padding4 = tuple(padding)
    memory_format = memory_format_of(x)
    implementation = resolve_backend(backend, x.device)
    if implementation == "triton":
        y, preactivation = depthwise_kernels().depthwise_forward(
            x, weight, bias, padding4, activation=kernel_activation(activation), save_preactivation=True
        )
    else:
        convolve = cpu_conv.forward if implementation == "cpu" else reference.depthwise_conv2d
        preactivation = convolve(x, weight, bias, padding4)
        y = apply_activation(preactivation, activation)
    return y.contiguous(memory_format=memory_format), preactivation.contiguous(memory_format=memory_format)


@depthwise_conv2d_activation_op.register_fake
def _depthwise_conv2d_activation_fake(x, weight, bias, padding, backend, activation):
    out = _depthwise_conv2d_fake(x, weight, bias, padding, backend)
    return out, torch.empty_like(out)


@torch.library.custom_op(f"{OP_NAMESPACE}::depthwise_conv2d_input_grad", mutates_args=())
def depthwise_conv2d_input_grad_op(
    grad_output: torch.Tensor,
    weight: torch.Tensor,
    padding: List[int],
    input_size: List[int],
    backend: str,
    activation: str,
    preactivation: Optional[torch.Tensor],
) -> torch.Tensor:
    """Input gradient of the depthwise convolution, in the memory format of ``grad_output``.

    With an activation, ``grad_output`` is the gradient of the activated output and
    ``preactivation`` the saved input of the activation.
    """
    padding4 = tuple(padding)
    input_size = tuple(input_size)
    implementation = resolve_backend(backend, grad_output.device)
    if implementation == "triton":
        grad = depthwise_kernels().depthwise_input_grad(
            grad_output,
            weight,
            padding4,
            input_size,
            activation=kernel_activation(activation),
            preactivation=preactivation,
        )
    else:
        grad_pre = activation_grad(grad_output, preactivation, activation)
        if implementation == "cpu":
            grad = cpu_conv.input_grad(grad_pre, weight, padding4, input_size)
        else:
            grad = reference.depthwise_conv2d_input_grad(grad_pre, weight, padding4, input_size)
    return grad.contiguous(memory_format=memory_format_of(grad_output))


@depthwise_conv2d_input_grad_op.register_fake
def _input_grad_fake(grad_output, weight, padding, input_size, backend, activation, preactivation):
    shape = (grad_output.shape[0], grad_output.shape[1], input_size[0], input_size[1])
    return grad_output.new_empty(shape).contiguous(memory_format=memory_format_of(grad_output))


@torch.library.custom_op(f"{OP_NAMESPACE}::depthwise_conv2d_weight_grad", mutates_args=())
def depthwise_conv2d_weight_grad_op(
    x: torch.Tensor,
    grad_output: torch.Tensor,
    kernel_size: List[int],
    padding: List[int],
    backend: str,
    activation: str,
    preactivation: Optional[torch.Tensor],
) -> torch.Tensor:
    """Weight gradient (C, 1, kh, kw) of the depthwise convolution."""
    padding4 = tuple(padding)
    kernel_size = tuple(kernel_size)
    implementation = resolve_backend(backend, x.device)
    if implementation == "triton":
        return depthwise_kernels().depthwise_weight_grad(
            x,
            grad_output,
            kernel_size,
            padding4,
            activation=kernel_activation(activation),
            preactivation=preactivation,
        )
    grad_pre = activation_grad(grad_output, preactivation, activation)
    if implementation == "cpu":
        return cpu_conv.weight_grad(x, grad_pre, kernel_size, padding4)
    return reference.depthwise_conv2d_weight_grad(x, grad_pre, kernel_size, padding4)


@depthwise_conv2d_weight_grad_op.register_fake
def _weight_grad_fake(x, grad_output, kernel_size, padding, backend, activation, preactivation):
    return x.new_empty((x.shape[1], 1, kernel_size[0], kernel_size[1]))


@torch.library.custom_op(f"{OP_NAMESPACE}::depthwise_conv2d_bias_grad", mutates_args=())
def depthwise_conv2d_bias_grad_op(
    grad_output: torch.Tensor, backend: str, activation: str, preactivation: Optional[torch.Tensor]
) -> torch.Tensor:
    """Bias gradient (C,): the preactivation gradient summed over batch and space."""
    implementation = resolve_backend(backend, grad_output.device)
    if implementation == "triton":
        return depthwise_kernels().depthwise_bias_grad(
            grad_output, activation=kernel_activation(activation), preactivation=preactivation
        )
    grad_pre = activation_grad(grad_output, preactivation, activation)
    # Half-precision sums accumulate in float32. A float64 sum stays in float64.
    accumulate = torch.float64 if grad_pre.dtype == torch.float64 else torch.float32
    return grad_pre.sum(dim=(0, 2, 3), dtype=accumulate).to(grad_pre.dtype)


@depthwise_conv2d_bias_grad_op.register_fake
def _bias_grad_fake(grad_output, backend, activation, preactivation):
    return grad_output.new_empty((grad_output.shape[1],))


def _save_common(ctx, x, weight, bias, padding, backend, activation, preactivation):
    ctx.padding = padding
    ctx.backend = backend
    ctx.activation = activation
    ctx.input_size = list(x.shape[-2:])
    ctx.has_bias = bias is not None
    # The input is needed only for the weight gradient, so frozen filters do not keep it alive.
    saved_x = x if ctx.needs_input_grad[1] else None
    ctx.save_for_backward(saved_x, weight, preactivation)


def _setup_context(ctx, inputs, output):
    x, weight, bias, padding, backend = inputs
    _save_common(ctx, x, weight, bias, padding, backend, "none", None)


def _setup_activation_context(ctx, inputs, output):
    x, weight, bias, padding, backend, activation = inputs
    _save_common(ctx, x, weight, bias, padding, backend, activation, output[1])


def _gradients(ctx, grad_output):
    """Compute (grad_x, grad_weight, grad_bias), each only when its input requires grad."""
    x, weight, preactivation = ctx.saved_tensors
    grad_x = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = depthwise_conv2d_input_grad_op(
            grad_output, weight, ctx.padding, ctx.input_size, ctx.backend, ctx.activation, preactivation
        )
    if ctx.needs_input_grad[1]:
        kernel_size = list(weight.shape[-2:])
        grad_weight = depthwise_conv2d_weight_grad_op(
            x, grad_output, kernel_size, ctx.padding, ctx.backend, ctx.activation, preactivation
        )
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_bias = depthwise_conv2d_bias_grad_op(grad_output, ctx.backend, ctx.activation, preactivation)
    return grad_x, grad_weight, grad_bias


def _backward(ctx, grad_output):
    return (*_gradients(ctx, grad_output), None, None)


def _activation_backward(ctx, grad_output, grad_preactivation):
    # The preactivation output is internal: nothing outside this module differentiates through it.
    return (*_gradients(ctx, grad_output), None, None, None)


depthwise_conv2d_op.register_autograd(_backward, setup_context=_setup_context)
depthwise_conv2d_activation_op.register_autograd(_activation_backward, setup_context=_setup_activation_context)


def depthwise_conv2d(
    x, weight, bias=None, padding="same", *, activation=None, stride=1, dilation=1, backend="auto"
):
    """Apply a depthwise 2-D convolution (one kh x kw filter per channel, stride 1).

    Equal to ``torch.nn.functional.conv2d(x, weight, bias, padding=padding, groups=C)``, with a
    backward that computes the weight gradient only when ``weight.requires_grad``.

    Args:
        x: (N, C, H, W) input, NCHW or channels_last; float32, float16, bfloat16 or float64.
        weight: (C, 1, kh, kw) filters of the same dtype. Square or rectangular, odd or even.
        bias: optional (C,) bias.
        padding: "same", "valid", an int, or an (int, int) pair for height and width. "same" keeps
            the input's size. On even kernels it pads the extra row and column at the bottom and
            right, as ``nn.Conv2d`` does.
        activation: None, "gelu" (exact) or "gelu_tanh", applied after the bias. The Triton path
            fuses it into the convolution kernels, forward and backward.
        stride, dilation: must be 1.
        backend: "auto" (Triton on CUDA, the tuned CPU route on CPU, PyTorch for float64), "torch"
            (PyTorch ops only: the tuned CPU route on CPU, ``F.conv2d`` elsewhere) or "triton" (on
            the CPU only under ``TRITON_INTERPRET=1``; float32, float16 and bfloat16).

    Returns:
        (N, C, H_out, W_out) in the memory format of ``x``.

    Under ``torch.autocast`` the inputs are cast to the autocast dtype, as for ``nn.Conv2d``.
    """
    _checks.unit_stride_and_dilation(stride, dilation)
    backend = _checks.backend_name(backend)
    channels, kh, kw = _checks.depthwise_weight(weight)
    padding4 = _checks.padding4(padding, (kh, kw))
    if isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type):
        autocast_dtype = torch.get_autocast_dtype(x.device.type)
        # Autocast casts only float32, float16 and bfloat16 tensors. It leaves float64 and integer
        # ones as they are, and nn.Conv2d then computes in float64.
        x, weight, bias = (
            t.to(autocast_dtype)
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
            else t
            for t in (x, weight, bias)
        )
    _checks.conv_input(x, channels, (kh, kw), padding4, weight.dtype)
    if x.dtype == torch.float64:
        if backend == "triton":
            raise TypeError(
                "backend='triton' computes float32, float16 and bfloat16 only, got float64 input; "
                "use backend='torch' or 'auto' for float64"
            )
        backend = "torch"
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (channels,):
            shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"bias must be a ({channels},) tensor, got {shape}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias has dtype {bias.dtype} but x has {x.dtype}; cast one to the other")
    if activation is None:
        return depthwise_conv2d_op(x, weight, bias, list(padding4), backend)
    _checks.activation_name(activation)
    y, _ = depthwise_conv2d_activation_op(x, weight, bias, list(padding4), backend, activation)
    return y
