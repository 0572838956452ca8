"""Triton kernels for stride-1 depthwise convolution with large kernels, and their backward.

One convolution kernel serves both directions. The forward pass correlates the input with the
filters. The input gradient is the same correlation applied to the output gradient with the filters
rotated by 180 degrees and the padding mirrored (``kh - 1 - top`` rows on top, and so on). When a GELU
was fused into the forward pass, the kernel multiplies each loaded output gradient by the GELU
derivative at the saved preactivation while it loads it, so no separate pass writes that product.

Tensors are read through their strides, so NCHW-contiguous and channels_last (NHWC) inputs are
both read in place. A program computes a (BLOCK_H, BLOCK_W, BLOCK_C) tile of one image: rows,
columns and channels. NCHW tiles have ``BLOCK_C == 1``, so one program covers one (n, c) plane and
its loads are contiguous along W. Channels_last tiles span 32 to 128 channels on GPUs, so their
loads are contiguous along C. Each program loops over the filter rows and unrolls the filter columns, and it
reads the taps from a small float32 copy of the filters of shape (kh * kw, C). Every tap loads the
tile shifted by that tap, with masks giving the zero padding. The shifted windows overlap, so
after the first taps most of these loads are expected to hit L1 or L2 rather than DRAM.

The weight and bias gradients are reductions over batch and space. Each program writes float32
partial sums for its tile to a buffer, and torch sums the buffer, so the result does not depend on
the order in which programs run. These two kernels use a fixed tile per layout, never an autotuned
one, so their summation order, and therefore their bits, are the same on every run on one device.

On GPUs the convolution kernel is autotuned over tile shapes, keyed by the batch size, the channel
count, the image and output sizes, the kernel size, the fused activation, the dtypes and the
layout. Under the Triton
interpreter (``TRITON_INTERPRET=1``) it uses one fixed tile per layout, because tuning there would
run every configuration on the CPU.

A second formulation, ``formulation="toeplitz"``, runs the same correlation on tensor cores for
wide filters. For each filter row it expands the row into a banded (Toeplitz) matrix T of shape
(BLOCK_K, BLOCK_W), T[u, w] = tap[u - w] for 0 <= u - w < kw, and multiplies the (BLOCK_H,
BLOCK_K) window of input rows by it with ``tl.dot``, where BLOCK_K >= BLOCK_W + kw - 1 input
columns cover the tile and its halo. The band wastes (BLOCK_K / kw) times the multiply-adds of the
direct loop, which tensor cores can afford only for wide filters. One program covers one
(image, channel) plane tile in either layout, so channels_last loads are strided.

A non-finite input spreads further in this formulation. The band's zeros multiply every value of
the window, and inf * 0 is NaN, so one Inf or NaN turns the whole tile row of outputs to NaN. The
FMA loop makes only the outputs that read it non-finite.

NOTE: ``"fma"`` stays the default for every shape until GPU timings show where the Toeplitz
formulation is faster. ``benchmarks/gpu_check.py`` times both.
"""

import inspect
import math
import os

import torch
import triton
import triton.language as tl

ACTIVATIONS = (None, "gelu", "gelu_tanh")
_ACTIVATION_CODES = {None: 0, "gelu": 1, "gelu_tanh": 2}

# Programs in the weight and bias gradient grids are split over the batch until about this many
# programs exist. It is a fixed count, not one derived from the device, so the partial sums and
# their order depend only on the shapes.
_TARGET_REDUCTION_PROGRAMS = 1024

_SQRT_HALF = 0.7071067811865476  # 1 / sqrt(2)
_INV_SQRT_2PI = 0.3989422804014327  # 1 / sqrt(2 * pi)
_SQRT_2_OVER_PI = 0.7978845608028654  # sqrt(2 / pi)
_GELU_TANH_CUBIC = 0.044715


def _config(block_h, block_w, block_c, num_warps):
    return triton.Config({"BLOCK_H": block_h, "BLOCK_W": block_w, "BLOCK_C": block_c}, num_warps=num_warps)


# NCHW tiles cover one (n, c) plane. Rows of 32 or 64 columns give contiguous loads of 128 or 256
# bytes in float32. The 8 x 8 tile exists for the 7 x 7 planes of late network stages, where any
# larger tile leaves most lanes masked off. num_warps keeps 2 to 8 elements per thread.
_NCHW_CONFIGS = [
    _config(8, 8, 1, 1),
    _config(16, 16, 1, 4),
    _config(8, 32, 1, 4),
    _config(16, 32, 1, 4),
    _config(16, 64, 1, 4),
    _config(32, 64, 1, 8),
]
# Channels_last tiles load BLOCK_C contiguous channels per pixel: 32 channels are 128 bytes in
# float32 and 64 bytes in 16-bit dtypes. A few pixels per tile share the filter taps loaded for
# the channel block. num_warps keeps 4 to 8 elements per thread.
_CHANNELS_LAST_CONFIGS = [
    _config(1, 8, 32, 2),
    _config(2, 8, 32, 4),
    _config(4, 8, 32, 4),
    _config(4, 4, 64, 4),
    _config(2, 4, 128, 4),
    _config(4, 8, 64, 8),
]
# Mid-sized tiles from the lists above, used on GPUs when autotuning is off and always by the
# weight and bias gradient kernels.
_GPU_FIXED_CONFIGS = {False: _config(16, 32, 1, 4), True: _config(4, 8, 32, 4)}
# The interpreter runs each program as numpy operations, so its cost grows with the number of
# programs. One 16 x 16 tile covers a whole test image of about 10 x 10 pixels, and the tests use
# larger images where they need to cross tile seams.
_INTERPRETER_CONFIGS = {False: _config(16, 16, 1, 1), True: _config(16, 16, 4, 1)}

FORMULATIONS = ("fma", "toeplitz")
# The Toeplitz window spans BLOCK_W + kw - 1 input columns, padded to a power of two, so up to
# this width the tiles of at most 64 columns need windows of at most 256 columns.
TOEPLITZ_MAX_KW = 128
# tl.dot precision of float32 operands in the Toeplitz formulation: three TF32 products per
# product, which by our estimate keeps the error near float32 rounding on tensor cores.
TOEPLITZ_FLOAT32_PRECISION = "tf32x3"


def _toeplitz_config(block_h, block_w, block_k, num_warps):
    return triton.Config({"BLOCK_H": block_h, "BLOCK_W": block_w, "BLOCK_K": block_k}, num_warps=num_warps)


def toeplitz_window(block_w, kw):
    """Return BLOCK_K for a tile of ``block_w`` output columns: the window with its halo."""
    return max(16, triton.next_power_of_2(block_w + kw - 1))


# Toeplitz tiles are (BLOCK_H, BLOCK_W) outputs of one plane, with every BLOCK_K a config may
# need. ``prune_toeplitz_configs`` keeps, for each tile, the one BLOCK_K that fits kw.
_TOEPLITZ_CONFIGS = [
    _toeplitz_config(block_h, block_w, block_k, num_warps)
    for block_h, block_w, num_warps in [(32, 32, 4), (64, 32, 4), (128, 32, 8), (32, 64, 4), (64, 64, 8)]
    for block_k in (32, 64, 128, 256)
    if block_k >= block_w
]
_TOEPLITZ_FIXED_TILES = {"gpu": (64, 32, 4), "interpreter": (16, 16, 1)}

_autotune = True


def set_autotune(enabled):
    """Turn autotuning of the convolution kernel on or off for this process.

    When off, GPUs use one fixed tile per layout. The Triton interpreter never autotunes.
    """
    global _autotune
    _autotune = bool(enabled)


def _interpreter_active():
    return os.environ.get("TRITON_INTERPRET") == "1"


def _fixed_config(channels_last):
    if _interpreter_active():
        return _INTERPRETER_CONFIGS[channels_last]
    return _GPU_FIXED_CONFIGS[channels_last]


# The output size that bounds each tile size, by the name of the kernel argument.
_TILE_BOUNDS = {"BLOCK_H": "H_out", "BLOCK_W": "W_out", "BLOCK_C": "C"}


def _tile_sizes(config):
    """Return the tile sizes of ``config`` along output rows, columns and channels, by name."""
    return {name: value for name, value in config.kwargs.items() if name in _TILE_BOUNDS}


def prune_configs(configs, named_args, **kwargs):
    """Drop tiles larger than the next power of two of the output's rows, columns or channels.

    Such tiles leave most lanes masked off and only cost tuning time. When no tile fits, the
    smallest one is returned, so at least one configuration remains. Configs without BLOCK_C,
    such as the Toeplitz ones, are bounded by rows and columns only.
    """
    fitting = [
        config
        for config in configs
        if all(
            size <= triton.next_power_of_2(named_args[_TILE_BOUNDS[name]])
            for name, size in _tile_sizes(config).items()
        )
    ]
    if fitting:
        return fitting
    return [min(configs, key=lambda config: math.prod(_tile_sizes(config).values()))]


def prune_toeplitz_configs(configs, named_args, **kwargs):
    """Keep the Toeplitz configs whose BLOCK_K is ``toeplitz_window`` of their tile and kw.

    Of those, ``prune_configs`` then drops the tiles larger than the output.
    """
    kw = kwargs["KW"] if "KW" in kwargs else named_args["KW"]
    windowed = [
        config
        for config in configs
        if config.kwargs["BLOCK_K"] == toeplitz_window(config.kwargs["BLOCK_W"], kw)
    ]
    return prune_configs(windowed, named_args)


@triton.jit
def _tanh(u):
    """tanh of float32 ``u`` from exp(-2|u|), which cannot overflow. triton.language has no tanh."""
    decay = tl.exp(-2.0 * tl.abs(u))
    magnitude = (1.0 - decay) / (1.0 + decay)
    return tl.where(u >= 0, magnitude, -magnitude)


@triton.jit
def _gelu(z, APPROXIMATE: tl.constexpr):
    """GELU of float32 ``z``: exact (erf) when APPROXIMATE is 1, the tanh form when it is 2."""
    if APPROXIMATE == 1:
        return 0.5 * z * (1.0 + tl.erf(z * _SQRT_HALF))
    else:
        tanh_u = _tanh(_SQRT_2_OVER_PI * (z + _GELU_TANH_CUBIC * z * z * z))
        return 0.5 * z * (1.0 + tanh_u)


@triton.jit
def _gelu_derivative(z, APPROXIMATE: tl.constexpr):
    """Derivative of ``_gelu`` at float32 ``z``."""
    if APPROXIMATE == 1:
        cdf = 0.5 * (1.0 + tl.erf(z * _SQRT_HALF))
        pdf = _INV_SQRT_2PI * tl.exp(-0.5 * z * z)
        return cdf + z * pdf
    else:
        tanh_u = _tanh(_SQRT_2_OVER_PI * (z + _GELU_TANH_CUBIC * z * z * z))
        du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_CUBIC * z * z)
        return 0.5 * (1.0 + tanh_u) + 0.5 * z * (1.0 - tanh_u * tanh_u) * du


@triton.jit
def _depthwise_conv_kernel(
    in_ptr,
    pre_ptr,
    taps_ptr,
    bias_ptr,
    out_ptr,
    save_ptr,
    N,
    C,
    H,
    W,
    H_out,
    W_out,
    pad_top,
    pad_left,
    stride_in_n,
    stride_in_c,
    stride_in_h,
    stride_in_w,
    stride_pre_n,
    stride_pre_c,
    stride_pre_h,
    stride_pre_w,
    stride_out_n,
    stride_out_c,
    stride_out_h,
    stride_out_w,
    KH: tl.constexpr,
    KW: tl.constexpr,
    INPUT_ACT: tl.constexpr,
    OUTPUT_ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SAVE_PRE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Correlate each channel of ``in`` with its filter: out[n, c, y, x] = sum over taps (i, j) of
    taps[i * KW + j, c] * in[n, c, y + i - pad_top, x + j - pad_left], zero outside the image.

    Pointers:
        in_ptr: (N, C, H, W), any strides, float32, float16 or bfloat16. Forward: the input.
            Input gradient: the output gradient.
        pre_ptr: (N, C, H, W), any strides, read only when INPUT_ACT != 0: the preactivation that
            each loaded ``in`` value is multiplied by the GELU derivative of.
        taps_ptr: (KH * KW, C) contiguous float32 filters, tap-major so that the taps of a channel
            block are contiguous.
        bias_ptr: (C,) float32, read only when HAS_BIAS.
        out_ptr: (N, C, H_out, W_out), any strides, any of the three dtypes.
        save_ptr: the preactivation (bias added, before the activation), with out_ptr's shape,
            strides and dtype, written only when SAVE_PRE.

    Loads are converted to float32 and the sum is accumulated in float32. The activation
    OUTPUT_ACT (0 none, 1 GELU, 2 tanh GELU) runs on the float32 sum after the bias, and the
    result is cast to the output dtype once, at the store. N is read only by the autotuner key.
    Offsets within one image are 32-bit, so an image may hold up to 2**31 elements.

    BLOCK_H, BLOCK_W and BLOCK_C come from the configuration lists above, which give their
    reasons. Every output element sums its taps in the same order whatever the tile, so the tile
    choice does not change the result.

    Grid: axis 0 covers N * cdiv(C, BLOCK_C) (image, channel block) pairs, so in NCHW, where
    BLOCK_C is 1, it covers the N * C planes. Axis 1 covers cdiv(H_out, BLOCK_H) tile rows and
    axis 2 covers cdiv(W_out, BLOCK_W) tile columns. Axes 1 and 2 stay far below the CUDA limit of
    65535, while axis 0, whose limit is 2**31 - 1, takes the count that grows with the batch.
    """
    pid_nc = tl.program_id(0)
    num_c_blocks = tl.cdiv(C, BLOCK_C)
    n = pid_nc // num_c_blocks
    c_block = pid_nc % num_c_blocks

    rows = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None, None]
    cols = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)[None, :, None]
    channels = c_block * BLOCK_C + tl.arange(0, BLOCK_C)[None, None, :]

    # Index tensors are broadcast to the full tile once, here, so that the per-tap arithmetic
    # below needs no broadcasting. The batch and channel part of each offset is 64-bit because it
    # can exceed 2**31 on large activations.
    zero = tl.zeros((BLOCK_H, BLOCK_W, BLOCK_C), dtype=tl.int32)
    first_rows = rows - pad_top + zero
    first_cols = cols - pad_left + zero
    channel_ok = channels < C
    tile_channel_ok = (channels + zero) < C
    in_tile = in_ptr + (n.to(tl.int64) * stride_in_n + channels.to(tl.int64) * stride_in_c + zero)
    in_tile += first_cols * stride_in_w
    pre_tile = pre_ptr + (n.to(tl.int64) * stride_pre_n + channels.to(tl.int64) * stride_pre_c + zero)
    pre_tile += first_cols * stride_pre_w

    acc = tl.zeros((BLOCK_H, BLOCK_W, BLOCK_C), dtype=tl.float32)
    for i in range(KH):
        in_rows = first_rows + i
        row_ok = (in_rows >= 0) & (in_rows < H) & tile_channel_ok
        in_row = in_tile + in_rows * stride_in_h
        pre_row = pre_tile + in_rows * stride_pre_h
        tap_row = taps_ptr + i * KW * C + channels
        for j in tl.static_range(KW):
            in_cols = first_cols + j
            mask = row_ok & (in_cols >= 0) & (in_cols < W)
            values = tl.load(in_row + j * stride_in_w, mask=mask, other=0.0).to(tl.float32)
            if INPUT_ACT != 0:
                pre = tl.load(pre_row + j * stride_pre_w, mask=mask, other=0.0).to(tl.float32)
                values = values * _gelu_derivative(pre, INPUT_ACT)
            acc += values * tl.load(tap_row + j * C, mask=channel_ok, other=0.0)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + channels, mask=channel_ok, other=0.0)

    out_offsets = (
        n.to(tl.int64) * stride_out_n
        + channels.to(tl.int64) * stride_out_c
        + rows * stride_out_h
        + cols * stride_out_w
    )
    out_mask = (rows < H_out) & (cols < W_out) & channel_ok
    if SAVE_PRE:
        tl.store(save_ptr + out_offsets, acc.to(save_ptr.dtype.element_ty), mask=out_mask)
    if OUTPUT_ACT != 0:
        acc = _gelu(acc, OUTPUT_ACT)
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _depthwise_toeplitz_kernel(
    in_ptr,
    pre_ptr,
    taps_ptr,
    bias_ptr,
    out_ptr,
    save_ptr,
    N,
    C,
    H,
    W,
    H_out,
    W_out,
    pad_top,
    pad_left,
    stride_in_n,
    stride_in_c,
    stride_in_h,
    stride_in_w,
    stride_pre_n,
    stride_pre_c,
    stride_pre_h,
    stride_pre_w,
    stride_out_n,
    stride_out_c,
    stride_out_h,
    stride_out_w,
    KH: tl.constexpr,
    KW: tl.constexpr,
    INPUT_ACT: tl.constexpr,
    OUTPUT_ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SAVE_PRE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_IN_FLOAT32: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Compute the correlation of ``_depthwise_conv_kernel`` with one ``tl.dot`` per filter row.

    Arguments are those of ``_depthwise_conv_kernel``, plus:
        INPUT_PRECISION: ``tl.dot`` precision of float32 operands ("ieee", "tf32" or "tf32x3").
        DOT_IN_FLOAT32: multiply in float32, which INPUT_ACT requires. Otherwise 16-bit inputs
            multiply in their own dtype, with the taps rounded to it.
        BLOCK_K: input columns per tile, a power of two >= BLOCK_W + KW - 1 and >= 16.

    For filter row i, the (BLOCK_H, BLOCK_K) window X of input rows y + i - pad_top and columns
    x0 - pad_left + u is multiplied by T[u, w] = taps[i * KW + u - w] (zero off the band), which
    gives sum_j taps[i * KW + j] * in[y + i - pad_top, x0 + w + j - pad_left] for each output
    (y, x0 + w). Accumulation is float32.

    Grid: axis 0 covers the N * C (image, channel) planes, axis 1 cdiv(H_out, BLOCK_H) tile rows
    and axis 2 cdiv(W_out, BLOCK_W) tile columns.
    """
    pid_nc = tl.program_id(0)
    n = pid_nc // C
    c = pid_nc % C
    col0 = tl.program_id(2) * BLOCK_W

    rows = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = col0 + tl.arange(0, BLOCK_W)
    window = tl.arange(0, BLOCK_K)
    in_cols = col0 - pad_left + window
    col_ok = (in_cols >= 0) & (in_cols < W)
    # The band of T: window column u feeds output column w through tap u - w.
    band = window[:, None] - tl.arange(0, BLOCK_W)[None, :]
    band_ok = (band >= 0) & (band < KW)

    plane_in = in_ptr + n.to(tl.int64) * stride_in_n + c.to(tl.int64) * stride_in_c
    plane_pre = pre_ptr + n.to(tl.int64) * stride_pre_n + c.to(tl.int64) * stride_pre_c
    acc = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
    for i in range(KH):
        in_rows = rows - pad_top + i
        mask = ((in_rows >= 0) & (in_rows < H))[:, None] & col_ok[None, :]
        values = tl.load(
            plane_in + in_rows[:, None] * stride_in_h + in_cols[None, :] * stride_in_w,
            mask=mask,
            other=0.0,
        )
        if INPUT_ACT != 0:
            pre = tl.load(
                plane_pre + in_rows[:, None] * stride_pre_h + in_cols[None, :] * stride_pre_w,
                mask=mask,
                other=0.0,
            ).to(tl.float32)
            values = values.to(tl.float32) * _gelu_derivative(pre, INPUT_ACT)
        toeplitz = tl.load(taps_ptr + (i * KW + band) * C + c, mask=band_ok, other=0.0)
        if DOT_IN_FLOAT32:
            values = values.to(tl.float32)
        else:
            toeplitz = toeplitz.to(values.dtype)
        acc = tl.dot(values, toeplitz, acc, input_precision=INPUT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + c)

    out_offsets = (
        n.to(tl.int64) * stride_out_n
        + c.to(tl.int64) * stride_out_c
        + rows[:, None] * stride_out_h
        + cols[None, :] * stride_out_w
    )
    out_mask = (rows < H_out)[:, None] & (cols < W_out)[None, :]
    if SAVE_PRE:
        tl.store(save_ptr + out_offsets, acc.to(save_ptr.dtype.element_ty), mask=out_mask)
    if OUTPUT_ACT != 0:
        acc = _gelu(acc, OUTPUT_ACT)
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


# The batch size N is in the key because it sets the program count: batch-1 inference can prefer
# smaller tiles than training to fill the GPU. The kernel uses N for nothing else.
_CONV_TUNING_KEY = [
    "N",
    "C",
    "H",
    "W",
    "H_out",
    "W_out",
    "KH",
    "KW",
    "INPUT_ACT",
    "OUTPUT_ACT",
    "HAS_BIAS",
    "SAVE_PRE",
]


def _short_bench(kernel_call, quantiles):
    # Shorter than do_bench's 25 ms warm-up and 100 ms measurement, because a benchmark table can
    # hold dozens of tuning keys. A depthwise launch takes microseconds to a few milliseconds, so
    # 20 ms still covers several runs of it.
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


def _autotuned(kernel, configs, key, prune, do_bench):
    """Wrap ``kernel`` in an autotuner over ``configs``, timed by ``do_bench``.

    ``do_bench`` defaults to a short ``triton.testing.do_bench``. Triton releases whose autotune
    takes no ``do_bench`` get the same warm-up and measurement times as ``warmup`` and ``rep``.
    """
    timing = {"do_bench": do_bench or _short_bench}
    if "do_bench" not in inspect.signature(triton.autotune).parameters:
        timing = {"warmup": 5, "rep": 20}
    return triton.autotune(
        configs=configs, key=key, prune_configs_by={"early_config_prune": prune}, **timing
    )(kernel)


def make_tuned_conv_kernel(configs, do_bench=None):
    """Return the FMA convolution kernel autotuned over ``configs`` (see ``_autotuned``)."""
    return _autotuned(_depthwise_conv_kernel, configs, _CONV_TUNING_KEY, prune_configs, do_bench)


def make_tuned_toeplitz_kernel(configs, do_bench=None):
    """Return the Toeplitz convolution kernel autotuned over ``configs`` (see ``_autotuned``)."""
    return _autotuned(
        _depthwise_toeplitz_kernel,
        configs,
        _CONV_TUNING_KEY + ["INPUT_PRECISION"],
        prune_toeplitz_configs,
        do_bench,
    )


# One autotuner per layout. The autotuner adds the tensor dtypes to the key, and the separate
# objects add the layout.
_TUNED_CONV_KERNELS = {
    False: make_tuned_conv_kernel(_NCHW_CONFIGS),
    True: make_tuned_conv_kernel(_CHANNELS_LAST_CONFIGS),
}
_TUNED_TOEPLITZ_KERNEL = make_tuned_toeplitz_kernel(_TOEPLITZ_CONFIGS)


@triton.jit
def _depthwise_weight_grad_kernel(
    x_ptr,
    grad_ptr,
    pre_ptr,
    partial_ptr,
    N,
    C,
    H,
    W,
    H_out,
    W_out,
    pad_top,
    pad_left,
    num_splits,
    stride_x_n,
    stride_x_c,
    stride_x_h,
    stride_x_w,
    stride_grad_n,
    stride_grad_c,
    stride_grad_h,
    stride_grad_w,
    stride_pre_n,
    stride_pre_c,
    stride_pre_h,
    stride_pre_w,
    KH: tl.constexpr,
    KW: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Write partial weight gradients: partial[s, t, i * KW + j, c] is the sum, over the output
    tile t and the images n = s, s + num_splits, ..., of x[n, c, y + i - pad_top, x + j - pad_left]
    times the output gradient at (n, c, y, x).

    Pointers:
        x_ptr: (N, C, H, W) input, any strides, float32, float16 or bfloat16.
        grad_ptr: (N, C, H_out, W_out) output gradient, any strides, same dtypes.
        pre_ptr: (N, C, H_out, W_out) preactivation, any strides, read only when ACT != 0. The
            output gradient is then multiplied by the GELU derivative there.
        partial_ptr: (num_splits, tiles, KH * KW, C) contiguous float32, with tiles =
            cdiv(H_out, BLOCK_H) * cdiv(W_out, BLOCK_W). Every element is written.

    Loads are converted to float32 and every sum is float32. Each program keeps an elementwise
    accumulator over its images for one tap at a time and reduces it over the tile once per tap.

    Grid: axis 0 covers num_splits * cdiv(C, BLOCK_C) (batch split, channel block) pairs, axis 1
    the tile rows and axis 2 the tile columns of the output.
    """
    pid = tl.program_id(0)
    num_c_blocks = tl.cdiv(C, BLOCK_C)
    split = pid // num_c_blocks
    c_block = pid % num_c_blocks
    tile = tl.program_id(1) * tl.cdiv(W_out, BLOCK_W) + tl.program_id(2)
    num_tiles = tl.cdiv(H_out, BLOCK_H) * tl.cdiv(W_out, BLOCK_W)

    rows = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None, None]
    cols = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)[None, :, None]
    channel_vector = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
    channels = channel_vector[None, None, :]

    # As in the convolution kernel, index tensors are broadcast to the full tile once, here. The
    # image loop walks n = split, split + num_splits, ... by advancing 64-bit pointers.
    zero = tl.zeros((BLOCK_H, BLOCK_W, BLOCK_C), dtype=tl.int32)
    first_rows = rows - pad_top + zero
    first_cols = cols - pad_left + zero
    out_ok = (rows < H_out) & (cols < W_out) & (channels < C) & (zero == 0)
    first_image = split.to(tl.int64)
    image_step = tl.full((), num_splits, tl.int64)
    x_step = image_step * stride_x_n
    grad_step = image_step * stride_grad_n
    pre_step = image_step * stride_pre_n
    grad_first = grad_ptr + (first_image * stride_grad_n + channels.to(tl.int64) * stride_grad_c + zero)
    grad_first += rows * stride_grad_h + cols * stride_grad_w
    pre_first = pre_ptr + (first_image * stride_pre_n + channels.to(tl.int64) * stride_pre_c + zero)
    pre_first += rows * stride_pre_h + cols * stride_pre_w
    x_first = x_ptr + (first_image * stride_x_n + channels.to(tl.int64) * stride_x_c + zero)
    x_first += first_cols * stride_x_w
    partial_row = partial_ptr + (split * num_tiles + tile).to(tl.int64) * (KH * KW * C)

    for i in range(KH):
        in_rows = first_rows + i
        row_ok = out_ok & (in_rows >= 0) & (in_rows < H)
        x_row = x_first + in_rows * stride_x_h
        for j in tl.static_range(KW):
            in_cols = first_cols + j
            mask = row_ok & (in_cols >= 0) & (in_cols < W)
            x_image = x_row + j * stride_x_w
            grad_image = grad_first
            pre_image = pre_first
            acc = tl.zeros((BLOCK_H, BLOCK_W, BLOCK_C), dtype=tl.float32)
            for _ in range(split, N, num_splits):
                grad = tl.load(grad_image, mask=out_ok, other=0.0).to(tl.float32)
                if ACT != 0:
                    pre = tl.load(pre_image, mask=out_ok, other=0.0).to(tl.float32)
                    grad = grad * _gelu_derivative(pre, ACT)
                    pre_image += pre_step
                acc += tl.load(x_image, mask=mask, other=0.0).to(tl.float32) * grad
                x_image += x_step
                grad_image += grad_step
            tap_sum = tl.sum(tl.sum(acc, axis=0), axis=0)
            tl.store(partial_row + (i * KW + j) * C + channel_vector, tap_sum, mask=channel_vector < C)


@triton.jit
def _depthwise_bias_grad_kernel(
    grad_ptr,
    pre_ptr,
    partial_ptr,
    N,
    C,
    H_out,
    W_out,
    num_splits,
    stride_grad_n,
    stride_grad_c,
    stride_grad_h,
    stride_grad_w,
    stride_pre_n,
    stride_pre_c,
    stride_pre_h,
    stride_pre_w,
    ACT: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Write partial bias gradients: partial[s, t, c] is the sum of the output gradient (times the
    GELU derivative at the preactivation when ACT != 0) over output tile t and the images
    n = s, s + num_splits, ....

    Pointers:
        grad_ptr: (N, C, H_out, W_out) output gradient, any strides, float32, float16 or bfloat16.
        pre_ptr: (N, C, H_out, W_out) preactivation, any strides, read only when ACT != 0.
        partial_ptr: (num_splits, tiles, C) contiguous float32. Every element is written.

    Grid and accumulation as in ``_depthwise_weight_grad_kernel``.
    """
    pid = tl.program_id(0)
    num_c_blocks = tl.cdiv(C, BLOCK_C)
    split = pid // num_c_blocks
    c_block = pid % num_c_blocks
    tile = tl.program_id(1) * tl.cdiv(W_out, BLOCK_W) + tl.program_id(2)
    num_tiles = tl.cdiv(H_out, BLOCK_H) * tl.cdiv(W_out, BLOCK_W)

    rows = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[:, None, None]
    cols = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)[None, :, None]
    channel_vector = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
    channels = channel_vector[None, None, :]
    out_ok = (rows < H_out) & (cols < W_out) & (channels < C)
    grad_offsets = channels.to(tl.int64) * stride_grad_c + rows * stride_grad_h + cols * stride_grad_w
    pre_offsets = channels.to(tl.int64) * stride_pre_c + rows * stride_pre_h + cols * stride_pre_w

    acc = tl.zeros((BLOCK_H, BLOCK_W, BLOCK_C), dtype=tl.float32)
    first_image = split.to(tl.int64)
    image_step = tl.full((), num_splits, tl.int64)
    grad_image = grad_ptr + first_image * stride_grad_n
    pre_image = pre_ptr + first_image * stride_pre_n
    for _ in range(split, N, num_splits):
        grad = tl.load(grad_image + grad_offsets, mask=out_ok, other=0.0).to(tl.float32)
        if ACT != 0:
            pre = tl.load(pre_image + pre_offsets, mask=out_ok, other=0.0)
            grad = grad * _gelu_derivative(pre.to(tl.float32), ACT)
        acc += grad
        grad_image += image_step * stride_grad_n
        pre_image += image_step * stride_pre_n
    channel_sum = tl.sum(tl.sum(acc, axis=0), axis=0)
    partial = partial_ptr + (split * num_tiles + tile).to(tl.int64) * C
    tl.store(partial + channel_vector, channel_sum, mask=channel_vector < C)


def is_channels_last(tensor):
    """Return whether a 4-D tensor is laid out NHWC and not also NCHW-contiguous."""
    return tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous()


def _memory_format(channels_last):
    return torch.channels_last if channels_last else torch.contiguous_format


def _activation_code(activation, preactivation=None, grad_output=None):
    """Return the kernel code of ``activation``.

    In a backward call, with ``grad_output`` given, it also checks that an activation comes with
    a preactivation of the same shape and device, because the kernels read it element by element.
    """
    if activation not in _ACTIVATION_CODES:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if grad_output is not None and activation is not None:
        if preactivation is None:
            raise ValueError(
                f"activation={activation!r} needs preactivation=, the tensor that "
                "depthwise_forward(..., save_preactivation=True) returns after the output"
            )
        if preactivation.shape != grad_output.shape or preactivation.device != grad_output.device:
            raise ValueError(
                f"preactivation has shape {tuple(preactivation.shape)} on {preactivation.device}, "
                f"but grad_output has shape {tuple(grad_output.shape)} on {grad_output.device}; "
                "pass the preactivation saved by the forward pass that produced this output"
            )
    return _ACTIVATION_CODES[activation]


def _filter_taps(weight, rotate):
    """Return the (C, 1, kh, kw) filters as a contiguous float32 (kh * kw, C) tensor.

    ``rotate`` turns each filter by 180 degrees, which the input gradient correlates with.
    """
    channels, _, kh, kw = weight.shape
    if rotate:
        weight = weight.flip(-2, -1)
    return weight.reshape(channels, kh * kw).t().to(torch.float32).contiguous()


def _check_out(out, name, shape, dtype, device, memory_format):
    """Return ``out`` after checking it, or a new tensor with that shape, dtype and layout."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device:
        raise ValueError(
            f"{name} must be a {dtype} tensor of shape {tuple(shape)} on {device}, got a {out.dtype} "
            f"tensor of shape {tuple(out.shape)} on {out.device}"
        )
    if not out.is_contiguous(memory_format=memory_format):
        raise ValueError(
            f"{name} must be contiguous in memory format {memory_format}, got strides {out.stride()}. "
            f"Allocate it with torch.empty(..., memory_format={memory_format})"
        )
    return out


def _check_formulation(formulation, kernel_size):
    if formulation not in FORMULATIONS:
        raise ValueError(f"formulation must be one of {FORMULATIONS}, got {formulation!r}")
    if formulation == "toeplitz" and kernel_size[1] > TOEPLITZ_MAX_KW:
        raise ValueError(
            f"formulation='toeplitz' takes kernels up to {TOEPLITZ_MAX_KW} columns wide, got "
            f"{kernel_size[1]}; use formulation='fma'"
        )


def _launch_conv(
    src, pre, taps, bias, out, save, padding_top_left, kernel_size, input_act, output_act, formulation="fma"
):
    """Launch the convolution kernel of ``formulation`` with an autotuned or a fixed tile."""
    batch, channels, height, width = src.shape
    out_h, out_w = out.shape[-2:]
    if out.numel() == 0:
        return
    channels_last = is_channels_last(out)
    if pre is None:
        # Without INPUT_ACT the kernel never loads through pre_ptr, so any tensor will do.
        pre = src
    args = (
        src,
        pre,
        taps,
        bias,
        out,
        save,
        batch,
        channels,
        height,
        width,
        out_h,
        out_w,
        padding_top_left[0],
        padding_top_left[1],
        *src.stride(),
        *pre.stride(),
        *out.stride(),
    )
    flags = dict(
        KH=kernel_size[0],
        KW=kernel_size[1],
        INPUT_ACT=input_act,
        OUTPUT_ACT=output_act,
        HAS_BIAS=bias is not None,
        SAVE_PRE=save is not None,
    )

    if formulation == "toeplitz":
        _launch_toeplitz(args, flags, src.dtype, batch * channels, out_h, out_w, kernel_size[1])
        return

    def grid(meta):
        return (
            batch * triton.cdiv(channels, meta["BLOCK_C"]),
            triton.cdiv(out_h, meta["BLOCK_H"]),
            triton.cdiv(out_w, meta["BLOCK_W"]),
        )

    if _autotune and not _interpreter_active():
        _TUNED_CONV_KERNELS[channels_last][grid](*args, **flags)
    else:
        config = _fixed_config(channels_last)
        _depthwise_conv_kernel[grid](*args, **flags, **config.kwargs, num_warps=config.num_warps)


def _launch_toeplitz(args, flags, dtype, planes, out_h, out_w, kw):
    """Launch the Toeplitz kernel over ``planes`` (image, channel) planes."""
    # With a fused GELU backward, the product of the output gradient and the derivative stays in
    # float32, as in the FMA kernel, because rounding it to 16 bits can overflow float16.
    # The interpreter's tl.dot goes through numpy, which has no bfloat16, so there bfloat16 is
    # multiplied in float32 too. Widening bfloat16 is exact, and only the summation order differs.
    in_float32 = (
        dtype == torch.float32
        or flags["INPUT_ACT"] != 0
        or (dtype == torch.bfloat16 and _interpreter_active())
    )
    flags = dict(
        flags,
        INPUT_PRECISION=TOEPLITZ_FLOAT32_PRECISION if in_float32 else "ieee",
        DOT_IN_FLOAT32=in_float32,
    )

    def grid(meta):
        return (planes, triton.cdiv(out_h, meta["BLOCK_H"]), triton.cdiv(out_w, meta["BLOCK_W"]))

    if _autotune and not _interpreter_active():
        _TUNED_TOEPLITZ_KERNEL[grid](*args, **flags)
        return
    block_h, block_w, num_warps = _TOEPLITZ_FIXED_TILES["interpreter" if _interpreter_active() else "gpu"]
    _depthwise_toeplitz_kernel[grid](
        *args, **flags, BLOCK_H=block_h, BLOCK_W=block_w, BLOCK_K=toeplitz_window(block_w, kw),
        num_warps=num_warps,
    )


def depthwise_forward(
    x,
    weight,
    bias,
    padding4,
    *,
    activation=None,
    save_preactivation=False,
    out=None,
    preactivation_out=None,
    formulation="fma",
):
    """Compute a stride-1 depthwise cross-correlation, optionally followed by a fused GELU.

    Args:
        x: (N, C, H, W) float32, float16 or bfloat16, NCHW-contiguous or channels_last. Other
            strides are read correctly as well, and give an NCHW output.
        weight: (C, 1, kh, kw) filters in any layout and floating dtype.
        bias: (C,) or None.
        padding4: zero padding (top, bottom, left, right), each an int, possibly 0.
        activation: None, "gelu" (exact, with erf) or "gelu_tanh", applied after the bias.
        save_preactivation: also return the values before the activation, which the backward
            functions need when ``activation`` is set.
        out, preactivation_out: optional tensors to write into, with the shape, dtype and memory
            format of the result.
        formulation: "fma" (the direct loop) or "toeplitz" (``tl.dot`` on banded filter rows,
            float32 in 3xTF32 and 16-bit inputs with the taps rounded to their dtype, as the
            module docstring explains).

    Returns:
        ``y`` of shape (N, C, H + top + bottom - kh + 1, W + left + right - kw + 1), or
        ``(y, preactivation)`` when ``save_preactivation``. Both have the dtype and memory format
        of ``x``.
    """
    output_act = _activation_code(activation)
    batch, channels, height, width = x.shape
    kh, kw = weight.shape[-2:]
    _check_formulation(formulation, (kh, kw))
    top, bottom, left, right = padding4
    out_h = height + top + bottom - kh + 1
    out_w = width + left + right - kw + 1
    if out_h <= 0 or out_w <= 0:
        raise ValueError(
            f"the padded input ({height + top + bottom} x {width + left + right}) is smaller than the "
            f"kernel ({kh} x {kw}), padding4={tuple(padding4)}. Pad at least {kh - 1} rows and "
            f"{kw - 1} columns in total, as 'same' padding does"
        )
    shape = (batch, channels, out_h, out_w)
    memory_format = _memory_format(is_channels_last(x))
    y = _check_out(out, "out", shape, x.dtype, x.device, memory_format)
    save = None
    if save_preactivation:
        save = _check_out(preactivation_out, "preactivation_out", shape, x.dtype, x.device, memory_format)
    taps = _filter_taps(weight, rotate=False)
    bias32 = bias.to(torch.float32).contiguous() if bias is not None else None
    _launch_conv(x, None, taps, bias32, y, save, (top, left), (kh, kw), 0, output_act, formulation)
    if save_preactivation:
        return y, save
    return y


def depthwise_input_grad(
    grad_output,
    weight,
    padding4,
    input_size,
    *,
    activation=None,
    preactivation=None,
    memory_format=None,
    out=None,
    formulation="fma",
):
    """Compute the gradient of ``depthwise_forward`` with respect to its input.

    This is the correlation of ``grad_pre`` with the filters rotated by 180 degrees, where
    ``grad_pre`` is ``grad_output``, or ``grad_output * act'(preactivation)`` when an activation
    was fused. The kernel forms that product while it loads ``grad_output``.

    NOTE: with an activation, the derivative is evaluated once per tap, so kh * kw times per
    element. For large kernels, materializing ``grad_pre`` once and calling this with
    ``activation=None`` may be faster. That has not been measured.

    Args:
        grad_output: (N, C, H_out, W_out) gradient of ``y``, any strides.
        weight: (C, 1, kh, kw) filters of the forward pass.
        padding4: (top, bottom, left, right) of the forward pass.
        input_size: (H, W) of the forward input.
        activation: the forward pass's activation.
        preactivation: (N, C, H_out, W_out), required when ``activation`` is set.
        memory_format: layout of the result, by default that of ``grad_output``.
        out: optional (N, C, H, W) tensor to write into.
        formulation: "fma" or "toeplitz", as in ``depthwise_forward``. With an activation, the
            Toeplitz products run in float32 (3xTF32) for every input dtype.

    Returns:
        (N, C, H, W) in the dtype of ``grad_output``.
    """
    input_act = _activation_code(activation, preactivation, grad_output)
    batch, channels, out_h, out_w = grad_output.shape
    kh, kw = weight.shape[-2:]
    _check_formulation(formulation, (kh, kw))
    top, bottom, left, right = padding4
    height, width = input_size
    if memory_format is None:
        memory_format = _memory_format(is_channels_last(grad_output))
    shape = (batch, channels, height, width)
    grad_x = _check_out(out, "out", shape, grad_output.dtype, grad_output.device, memory_format)
    taps = _filter_taps(weight, rotate=True)
    pre = preactivation if input_act != 0 else None
    mirrored = (kh - 1 - top, kw - 1 - left)
    _launch_conv(grad_output, pre, taps, None, grad_x, None, mirrored, (kh, kw), input_act, 0, formulation)
    return grad_x


def _alloc_partials(shape, device):
    """Allocate a float32 buffer of partial sums that the reduction kernels fill completely."""
    return torch.empty(shape, dtype=torch.float32, device=device)


def _reduction_launch(grad_output, out_h, out_w):
    """Return the fixed tile, the batch split count and the grid of a reduction kernel."""
    batch, channels = grad_output.shape[:2]
    config = _fixed_config(is_channels_last(grad_output))
    block_h, block_w, block_c = (config.kwargs[name] for name in ("BLOCK_H", "BLOCK_W", "BLOCK_C"))
    tiles_h, tiles_w = triton.cdiv(out_h, block_h), triton.cdiv(out_w, block_w)
    programs_per_split = triton.cdiv(channels, block_c) * tiles_h * tiles_w
    num_splits = max(1, min(batch, triton.cdiv(_TARGET_REDUCTION_PROGRAMS, programs_per_split)))
    grid = (num_splits * triton.cdiv(channels, block_c), tiles_h, tiles_w)
    return config, num_splits, tiles_h * tiles_w, grid


def depthwise_weight_grad(x, grad_output, kernel_size, padding4, *, activation=None, preactivation=None):
    """Compute the gradient of ``depthwise_forward`` with respect to its (C, 1, kh, kw) filters.

    The result is bitwise reproducible from run to run on one device: the kernel writes float32
    partial sums from a fixed tile and torch adds them up.

    Args:
        x: (N, C, H, W) forward input, any strides.
        grad_output: (N, C, H_out, W_out) gradient of ``y``, any strides.
        kernel_size: (kh, kw).
        padding4: (top, bottom, left, right) of the forward pass.
        activation, preactivation: as in ``depthwise_input_grad``.

    Returns:
        (C, 1, kh, kw) contiguous, in the dtype of ``x``.
    """
    act = _activation_code(activation, preactivation, grad_output)
    batch, channels, height, width = x.shape
    out_h, out_w = grad_output.shape[-2:]
    kh, kw = kernel_size
    top, _, left, _ = padding4
    if batch == 0 or out_h == 0 or out_w == 0:
        return torch.zeros(channels, 1, kh, kw, dtype=x.dtype, device=x.device)
    config, num_splits, num_tiles, grid = _reduction_launch(grad_output, out_h, out_w)
    partials = _alloc_partials((num_splits, num_tiles, kh * kw, channels), x.device)
    # Without an activation the kernel never loads through pre_ptr, so any tensor will do.
    pre = preactivation if act != 0 else grad_output
    _depthwise_weight_grad_kernel[grid](
        x,
        grad_output,
        pre,
        partials,
        batch,
        channels,
        height,
        width,
        out_h,
        out_w,
        top,
        left,
        num_splits,
        *x.stride(),
        *grad_output.stride(),
        *pre.stride(),
        KH=kh,
        KW=kw,
        ACT=act,
        **config.kwargs,
        num_warps=config.num_warps,
    )
    grad_weight = partials.sum(dim=(0, 1))
    return grad_weight.t().reshape(channels, 1, kh, kw).to(x.dtype).contiguous()


def depthwise_bias_grad(grad_output, *, activation=None, preactivation=None):
    """Compute the bias gradient: the sum of ``grad_pre`` over batch, rows and columns.

    ``grad_pre`` is ``grad_output``, times the activation's derivative at ``preactivation`` when an
    activation was fused. The sum is float32 and bitwise reproducible, as in
    ``depthwise_weight_grad``.

    Returns:
        (C,) in the dtype of ``grad_output``.
    """
    act = _activation_code(activation, preactivation, grad_output)
    batch, channels, out_h, out_w = grad_output.shape
    if batch == 0 or out_h == 0 or out_w == 0:
        return torch.zeros(channels, dtype=grad_output.dtype, device=grad_output.device)
    config, num_splits, num_tiles, grid = _reduction_launch(grad_output, out_h, out_w)
    partials = _alloc_partials((num_splits, num_tiles, channels), grad_output.device)
    # Without an activation the kernel never loads through pre_ptr, so any tensor will do.
    pre = preactivation if act != 0 else grad_output
    _depthwise_bias_grad_kernel[grid](
        grad_output,
        pre,
        partials,
        batch,
        channels,
        out_h,
        out_w,
        num_splits,
        *grad_output.stride(),
        *pre.stride(),
        ACT=act,
        **config.kwargs,
        num_warps=config.num_warps,
    )
    return partials.sum(dim=(0, 1)).to(grad_output.dtype)
