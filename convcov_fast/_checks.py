"""Input validation for the public entry points, with the error messages users see.

Every check runs once, where a call enters the package. The functions below it assume valid input.
"""

import math
import numbers

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
BACKENDS = ("auto", "torch", "triton")
ACTIVATIONS = (None, "gelu", "gelu_tanh")

# A covariance is symmetric when max|S - S^T| <= SYMMETRY_RTOL * max|S|: float32 round trips of a
# symmetric matrix stay well inside this, and a transposition bug does not.
SYMMETRY_RTOL = 1e-5
# An eigenvalue below -NEGATIVE_EIGENVALUE_RTOL * max eigenvalue makes a matrix "clearly
# indefinite". Above that, negative eigenvalues are float64 rounding of a PSD matrix (a rank-deficient
# empirical covariance computed in float32 lands near -1e-7 of its largest eigenvalue).
NEGATIVE_EIGENVALUE_RTOL = 1e-5


def kernel_size_pair(kernel_size, name="kernel_size"):
    """Return ``kernel_size`` as a pair (kh, kw) of positive ints."""
    if isinstance(kernel_size, numbers.Integral) and not isinstance(kernel_size, bool):
        pair = (int(kernel_size), int(kernel_size))
    elif isinstance(kernel_size, (tuple, list, torch.Size)) and len(kernel_size) == 2:
        pair = tuple(kernel_size)
        if not all(isinstance(k, numbers.Integral) and not isinstance(k, bool) for k in pair):
            raise TypeError(f"{name} must be an int or a pair of ints, got {kernel_size!r}")
        pair = (int(pair[0]), int(pair[1]))
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {kernel_size!r}")
    if pair[0] < 1 or pair[1] < 1:
        raise ValueError(f"{name} must be positive, got {kernel_size!r}")
    return pair


def kernel_size_from_dim(dim, kernel_size=None, name="cov"):
    """Return (kh, kw) for covariances of size ``dim``, inferring a square kernel when not given."""
    if kernel_size is not None:
        kh, kw = kernel_size_pair(kernel_size)
        if kh * kw != dim:
            raise ValueError(
                f"{name} has size {dim}, which does not match kernel_size {kernel_size!r} "
                f"(kh * kw = {kh * kw}); pass the kernel size the covariance was built for"
            )
        return kh, kw
    side = math.isqrt(dim)
    if side * side != dim:
        raise ValueError(
            f"{name} has size {dim}, which is not a square number, so the kernel size cannot be "
            "inferred; pass kernel_size=(kh, kw) for a rectangular kernel"
        )
    return side, side


def positive_number(value, name):
    """Return ``value`` as a float, raising unless it is finite and > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def non_negative_int(value, name):
    """Return ``value`` as an int, raising unless it is an integer >= 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return int(value)


def positive_int(value, name):
    """Return ``value`` as an int, raising unless it is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")
    return int(value)


def backend_name(backend):
    """Return ``backend`` after checking it is one of BACKENDS."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def activation_name(activation):
    """Return ``activation`` after checking it is None, "gelu" or "gelu_tanh"."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return activation


def float_dtype(dtype, name="dtype"):
    """Return ``dtype`` after checking it is a supported floating dtype."""
    if dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise TypeError(f"{name} must be one of {names}, got {dtype}")
    return dtype


def covariance_stack(cov, name="cov"):
    """Validate a (d, d) or (B, d, d) covariance and return it as a symmetric float64 (B, d, d) stack.

    Checks the shape, finiteness and symmetry. Definiteness is checked by the factorization, which
    can do it cheaply: a successful Cholesky proves it.
    """
    stack = _float64_stack(cov, name)
    if not torch.isfinite(stack).all():
        raise ValueError(f"{name} contains NaN or Inf; a covariance must be finite")
    scale, asymmetry = _asymmetry(stack)
    bad = asymmetry > SYMMETRY_RTOL * scale
    if bad.any():
        index = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{name}[{index}] is not symmetric: max|S - S^T| = {float(asymmetry[index]):.3g} "
            f"against max|S| = {float(scale[index]):.3g}; a covariance must equal its transpose "
            "(symmetrize it with (S + S.mT) / 2 if the asymmetry is rounding)"
        )
    return symmetrized(stack)


def covariance_stack_deferred(cov, name="cov"):
    """Validate like ``covariance_stack``, but return the value checks as flags instead of raising.

    Only the shape and dtype are checked here, from metadata, so nothing waits for the device.

    Returns:
        (stack, invalid): the symmetric float64 (B, d, d) stack, and a (B,) bool tensor on its
        device, True for a matrix that is not finite or not symmetric. When any flag is set, call
        ``covariance_stack(cov)`` to raise the error that describes it.
    """
    stack = _float64_stack(cov, name)
    scale, asymmetry = _asymmetry(stack)
    # A NaN fails both comparisons, so the finiteness test is separate.
    invalid = ~torch.isfinite(stack).all(dim=-1).all(dim=-1) | (asymmetry > SYMMETRY_RTOL * scale)
    return symmetrized(stack), invalid


def symmetrized(stack):
    """Return (S + S^T) / 2, halved before the sum so that entries near the float64 maximum stay finite."""
    return 0.5 * stack + 0.5 * stack.transpose(-1, -2)


def _float64_stack(cov, name):
    """Check the type, shape and dtype of a covariance and return it as a float64 (B, d, d) stack."""
    if not isinstance(cov, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cov).__name__}")
    if cov.dim() not in (2, 3) or cov.shape[-1] != cov.shape[-2]:
        raise ValueError(
            f"{name} must be a square (d, d) matrix or a (B, d, d) bank, got shape {tuple(cov.shape)}"
        )
    if not cov.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {cov.dtype}")
    if cov.shape[-1] == 0:
        raise ValueError(f"{name} must have d >= 1, got shape {tuple(cov.shape)}")
    stack = cov.detach().to(torch.float64)
    return stack.unsqueeze(0) if stack.dim() == 2 else stack


def _asymmetry(stack):
    """Return (max|S|, max|S - S^T|) of each matrix of a (B, d, d) stack."""
    scale = stack.abs().amax(dim=(-2, -1))
    asymmetry = (stack - stack.transpose(-1, -2)).abs().amax(dim=(-2, -1))
    return scale, asymmetry


def depthwise_weight(weight, name="weight"):
    """Check a (C, 1, kh, kw) depthwise weight and return (C, kh, kw)."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 4 or weight.shape[1] != 1:
        raise ValueError(
            f"{name} must be a depthwise weight of shape (C, 1, kh, kw), got {tuple(weight.shape)}"
        )
    if 0 in weight.shape:
        raise ValueError(f"{name} must not be empty, got shape {tuple(weight.shape)}")
    channels, _, kh, kw = weight.shape
    return channels, kh, kw


def padding4(padding, kernel_size):
    """Resolve ``padding`` ("same", "valid" or an int >= 0) to (top, bottom, left, right).

    "same" on an even kernel puts the extra row and column at the bottom and right, as
    ``torch.nn.Conv2d`` does.
    """
    kh, kw = kernel_size
    if isinstance(padding, str):
        if padding == "same":
            top, left = (kh - 1) // 2, (kw - 1) // 2
            return top, kh - 1 - top, left, kw - 1 - left
        if padding == "valid":
            return 0, 0, 0, 0
        raise ValueError(f"padding must be 'same', 'valid' or an int >= 0, got {padding!r}")
    if isinstance(padding, (tuple, list)) and len(padding) == 2:
        ph, pw = (non_negative_int(p, "padding") for p in padding)
        return ph, ph, pw, pw
    p = non_negative_int(padding, "padding")
    return p, p, p, p


def unit_stride_and_dilation(stride, dilation):
    """Raise unless stride and dilation are both 1, the only values the kernels implement."""
    for name, value in (("stride", stride), ("dilation", dilation)):
        values = value if isinstance(value, (tuple, list)) else (value,)
        if any(v != 1 for v in values):
            raise ValueError(
                f"{name} must be 1, got {value!r}; depthwise_conv2d computes stride-1, dilation-1 "
                "convolutions only, so use torch.nn.functional.conv2d for other values"
            )


def conv_input(x, channels, kernel_size, pad, weight_dtype, name="x"):
    """Check the (N, C, H, W) input of a depthwise convolution against its weight and padding."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape (N, C, H, W), got {x.dim()} dims {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise ValueError(
            f"{name} has {x.shape[1]} channels but the filters expect {channels}; "
            "a depthwise convolution keeps one filter per channel"
        )
    float_dtype(x.dtype, f"{name}.dtype")
    if x.dtype != weight_dtype:
        raise TypeError(
            f"{name} has dtype {x.dtype} but the filters have {weight_dtype}; cast one to the "
            "other, or run the layer under torch.autocast"
        )
    kh, kw = kernel_size
    top, bottom, left, right = pad
    out_h = x.shape[2] + top + bottom - kh + 1
    out_w = x.shape[3] + left + right - kw + 1
    if out_h < 1 or out_w < 1:
        raise ValueError(
            f"{name} of spatial size {tuple(x.shape[2:])} with padding {pad} is smaller than the "
            f"{kh}x{kw} kernel; use padding='same' or a larger input"
        )
    return out_h, out_w
