"""The CPU route of the depthwise convolution.

The op in ``ops.py`` calls these three functions for CPU tensors. Inputs are already validated.
"""

from . import reference


def forward(x, weight, bias, padding4):
    """Compute the depthwise convolution of ``x`` on the CPU, in the memory format of ``x``."""
    return reference.depthwise_conv2d(x, weight, bias, padding4)


def input_grad(grad_output, weight, padding4, input_size):
    """Compute the input gradient on the CPU."""
    return reference.depthwise_conv2d_input_grad(grad_output, weight, padding4, input_size)


def weight_grad(x, grad_output, kernel_size, padding4):
    """Compute the (C, 1, kh, kw) weight gradient on the CPU."""
    return reference.depthwise_conv2d_weight_grad(x, grad_output, kernel_size, padding4)
