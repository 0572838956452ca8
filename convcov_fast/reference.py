"""Plain PyTorch implementations with the kernels' signatures: the truth for tests and benchmarks.

Nothing here is tuned. Every function is written the most direct way torch allows, so that a
difference between a kernel and this module points at the kernel.
"""

import torch
import torch.nn.functional as F


def depthwise_conv2d(x, weight, bias=None, padding4=(0, 0, 0, 0)):
    """Compute a stride-1 depthwise cross-correlation with explicit zero padding.

    Args:
        x: input of shape (N, C, H, W).
        weight: filters of shape (C, 1, kh, kw).
        bias: optional (C,) bias.
        padding4: zeros added as (top, bottom, left, right).

    Returns:
        (N, C, H + top + bottom - kh + 1, W + left + right - kw + 1).
    """
    top, bottom, left, right = padding4
    x = F.pad(x, (left, right, top, bottom))
    return F.conv2d(x, weight, bias, groups=x.shape[1])


def depthwise_conv2d_input_grad(grad_output, weight, padding4, input_size):
    """Compute the gradient of ``depthwise_conv2d`` with respect to its input.

    The input gradient is the full correlation of ``grad_output`` with the filters rotated by 180
    degrees, cropped to the unpadded input of spatial size ``input_size`` (H, W).
    """
    top, bottom, left, right = padding4
    kh, kw = weight.shape[-2:]
    flipped = weight.flip(-2, -1)
    full = depthwise_conv2d(grad_output, flipped, None, (kh - 1, kh - 1, kw - 1, kw - 1))
    height, width = input_size
    return full[:, :, top : top + height, left : left + width]


def depthwise_conv2d_weight_grad(x, grad_output, kernel_size, padding4):
    """Compute the gradient of ``depthwise_conv2d`` with respect to its (C, 1, kh, kw) filters."""
    top, bottom, left, right = padding4
    kh, kw = kernel_size
    padded = F.pad(x, (left, right, top, bottom))
    out_h, out_w = grad_output.shape[-2:]
    grad = torch.empty(x.shape[1], 1, kh, kw, dtype=x.dtype, device=x.device)
    for i in range(kh):
        for j in range(kw):
            window = padded[:, :, i : i + out_h, j : j + out_w]
            grad[:, 0, i, j] = (window * grad_output).sum(dim=(0, 2, 3))
    return grad


def sample_from_factors(factors, normals):
    """Map standard normals to samples: ``out[b, j] = factors[b] @ normals[b, j]``.

    Args:
        factors: (B, d, d) factors L with L @ L.T equal to the covariance.
        normals: (B, n, d) independent standard normals.

    Returns:
        (B, n, d) samples, in the dtype of ``factors``.
    """
    return normals.to(factors.dtype) @ factors.transpose(-1, -2)
