"""The CPU route of the depthwise convolution: the fastest of several equal computations per shape.

The op in ``ops.py`` calls ``forward``, ``input_grad`` and ``weight_grad`` for CPU tensors whose
arguments it has validated. Each op has several strategies that compute the same result:

* ``forward``: ``"nchw"`` and ``"channels_last"`` (``F.conv2d``, oneDNN on x86, after converting
  to that layout) and ``"fft"`` (``torch.fft.rfft2``; fewer operations for very large kernels).
* ``input_grad``: the input gradient is a forward correlation of ``grad_output`` with the filters
  rotated by 180 degrees, so the forward strategies serve it, plus ``"backward_nchw"`` and
  ``"backward_channels_last"`` (the backward-data kernel of ``aten.convolution_backward``).
* ``weight_grad``: ``"nchw"`` and ``"channels_last"`` (the backward-weights kernel of
  ``aten.convolution_backward``), ``"as_forward"`` (a depthwise forward of the input over the
  N * C planes with ``grad_output`` as the filter, then a sum over the batch) and ``"fft"``.

The first call for a shape key (op, sizes, kernel, padding, dtype, memory formats, thread count)
times the candidates on the caller's tensors and caches the fastest (see ``_tune``). Each timed
call includes the conversion of the output to the caller's memory format, so a strategy that
changes the layout pays for both conversions. ``set_strategy`` or the environment variable ``CONVCOV_CPU_STRATEGY`` force a
strategy, and ``chosen_strategies`` returns the cache. While ``torch.compile`` traces, or on fake
or meta tensors, nothing is timed and ``default_strategy`` is used.

FFT results carry a rounding error that grows with the largest output, not with each element.
The tuner therefore accepts ``"fft"`` only when its output stays within ``FFT_MAX_ERROR_EPS``
float epsilons of the largest output of a direct strategy. The entry points compute float16 and
bfloat16 tensors in float32 and round the result once (see ``HALF_DTYPES``), so the strategies
and the tuner see only float32 and float64.
"""

import collections
import os
import threading
import time
from typing import Callable, Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F

OPS = ("forward", "input_grad", "weight_grad")
ENV_VAR = "CONVCOV_CPU_STRATEGY"

# The tuner rejects an FFT output whose maximum deviation from a direct strategy exceeds this many
# epsilons of the dtype, relative to the largest output of the direct strategy. Measured in float32
# on random normal inputs with kernels of 7x7 to 51x51 (torch 2.13, x86), the deviation was 1.6
# to 2.6 epsilons.
FFT_MAX_ERROR_EPS = 16

# A candidate whose probe (scaled to the full batch) or warm-up call takes longer than this factor
# times the best timed candidate, and longer than PRUNE_MIN_SECONDS, is not timed. Both include
# one-time costs such as oneDNN primitive creation, so the factor is generous.
PRUNE_FACTOR = 3.0
PRUNE_MIN_SECONDS = 0.02

# The probe of a candidate other than the first runs on this fraction of the batch.
PROBE_BATCH_DIVISOR = 8

# The timed runs of one candidate stop after this many seconds (at least one run, at most
# MAX_TIMED_RUNS), and the minimum counts, because other processes only ever add time.
TIMING_BUDGET_SECONDS = 0.05
MAX_TIMED_RUNS = 5

# Kernels with at least this many taps (15x15) default to channels_last for NCHW inputs too.
LARGE_KERNEL_TAPS = 225

ShapeKey = collections.namedtuple(
    "ShapeKey",
    ["op", "n", "c", "h", "w", "kh", "kw", "padding4", "dtype", "layout", "num_threads"],
)
ShapeKey.__doc__ = """Cache key of one tuned choice.

``h`` and ``w`` are the spatial size of the op's first tensor (``x`` for ``forward`` and
``weight_grad``, ``grad_output`` for ``input_grad``). ``layout`` names the memory format of each
tensor input ("nchw" or "channels_last"), joined by "+" for ``weight_grad``.
"""

_cache: Dict[ShapeKey, str] = {}
_cache_lock = threading.Lock()
_forced: Dict[str, str] = {}


# --------------------------------------------------------------------------------------------
# Layout and padding helpers


def _memory_format(t):
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _layout_name(t):
    return "channels_last" if _memory_format(t) is torch.channels_last else "nchw"


def _split_padding(padding4):
    """Split padding4 into the symmetric (height, width) part that ``F.conv2d`` accepts and the
    remainder in ``F.pad`` order (left, right, top, bottom)."""
    top, bottom, left, right = padding4
    pad_h, pad_w = min(top, bottom), min(left, right)
    remainder = (left - pad_w, right - pad_w, top - pad_h, bottom - pad_h)
    return (pad_h, pad_w), remainder


def _pad_remainder(x, remainder):
    return F.pad(x, remainder) if any(remainder) else x


def _conv(x, weight, bias, padding4):
    """Depthwise ``F.conv2d`` in the layout of ``x``, passing the symmetric part of the padding."""
    symmetric, remainder = _split_padding(padding4)
    return F.conv2d(_pad_remainder(x, remainder), weight, bias, padding=symmetric, groups=x.shape[1])


def _fft_length(n):
    """Return the smallest integer >= n with no prime factor above 7, a fast size for pocketfft."""
    while True:
        m = n
        for p in (2, 3, 5, 7):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def _fft_lengths(in_size, out_size, kernel_size, padding4):
    """Return the circular lengths (Lh, Lw) at which circular correlation equals the padded one.

    An index h - top + i of the input stays in [-top, H + bottom - 1], so a length of at least
    H + max(top, bottom) sends every index outside the input onto the zero tail. The length must
    also hold the output and the kernel.
    """
    top, bottom, left, right = padding4
    lh = max(in_size[0] + max(top, bottom), out_size[0], kernel_size[0])
    lw = max(in_size[1] + max(left, right), out_size[1], kernel_size[1])
    return _fft_length(lh), _fft_length(lw)


def _fft_dtype(dtype):
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


# --------------------------------------------------------------------------------------------
# Forward strategies: (x, weight, bias, padding4) -> y in any memory format (``_run`` converts it)


def _forward_nchw(x, weight, bias, padding4):
    return _conv(x.contiguous(), weight, bias, padding4)


def _forward_channels_last(x, weight, bias, padding4):
    return _conv(x.contiguous(memory_format=torch.channels_last), weight, bias, padding4)


def _forward_fft(x, weight, bias, padding4):
    """Compute the padded correlation as a circular convolution of length ``_fft_lengths``.

    With ``kernel[(top - i) % Lh, (left - j) % Lw] = weight[i, j]``, the circular convolution of the
    zero-extended input with ``kernel`` at (h, w) equals the correlation of the padded input.
    """
    top, _, left, _ = padding4
    channels, _, kh, kw = weight.shape
    in_size = tuple(x.shape[-2:])
    out_size = (in_size[0] + padding4[0] + padding4[1] - kh + 1, in_size[1] + padding4[2] + padding4[3] - kw + 1)
    lh, lw = _fft_lengths(in_size, out_size, (kh, kw), padding4)
    compute_dtype = _fft_dtype(x.dtype)

    kernel = weight.new_zeros((channels, lh, lw), dtype=compute_dtype)
    rows = (top - torch.arange(kh)) % lh
    cols = (left - torch.arange(kw)) % lw
    kernel[:, rows[:, None], cols[None, :]] = weight[:, 0].to(compute_dtype)

    spectrum = torch.fft.rfft2(x.to(compute_dtype), s=(lh, lw))
    spectrum = spectrum * torch.fft.rfft2(kernel)
    y = torch.fft.irfft2(spectrum, s=(lh, lw))[..., : out_size[0], : out_size[1]]
    if bias is not None:
        y = y + bias.to(compute_dtype).view(1, channels, 1, 1)
    return y.to(x.dtype)


FORWARD_STRATEGIES: Dict[str, Callable] = {
    "nchw": _forward_nchw,
    "channels_last": _forward_channels_last,
    "fft": _forward_fft,
}


# --------------------------------------------------------------------------------------------
# Input-gradient strategies: (grad_output, weight, padding4, input_size) -> grad_x in any memory format


def _input_grad_as_forward(forward_strategy):
    """Build an input-gradient strategy from a forward strategy.

    The input gradient is the correlation of ``grad_output`` padded by (kh-1-top, kh-1-bottom,
    kw-1-left, kw-1-right) with the flipped filters. A negative entry, from a padding wider than
    the kernel, crops ``grad_output`` on that side instead.
    """

    def input_grad(grad_output, weight, padding4, input_size):
        top, bottom, left, right = padding4
        kh, kw = weight.shape[-2:]
        out_h, out_w = grad_output.shape[-2:]
        pad_top, pad_left = kh - 1 - top, kw - 1 - left
        pad_bottom = input_size[0] - out_h + kh - 1 - pad_top
        pad_right = input_size[1] - out_w + kw - 1 - pad_left
        crop = (max(0, -pad_top), max(0, -pad_bottom), max(0, -pad_left), max(0, -pad_right))
        if any(crop):
            grad_output = grad_output[:, :, crop[0] : out_h - crop[1], crop[2] : out_w - crop[3]]
        padding = (max(0, pad_top), max(0, pad_bottom), max(0, pad_left), max(0, pad_right))
        return forward_strategy(grad_output, weight.flip(-2, -1), None, padding)

    input_grad.__name__ = f"input_grad_via_{forward_strategy.__name__.lstrip('_')}"
    return input_grad


def _input_grad_backward(memory_format):
    """Build an input-gradient strategy on ``aten.convolution_backward`` in ``memory_format``.

    ``F.conv2d`` takes only symmetric padding, so the gradient is computed for the input padded by
    the remainder and then cropped.
    """

    def input_grad(grad_output, weight, padding4, input_size):
        symmetric, (left, right, top, bottom) = _split_padding(padding4)
        grad_output = grad_output.contiguous(memory_format=memory_format)
        n, c = grad_output.shape[:2]
        padded_size = (n, c, input_size[0] + top + bottom, input_size[1] + left + right)
        # The backward-data kernel reads only the size and memory format of the input.
        shape_only = grad_output.new_empty(padded_size).contiguous(memory_format=memory_format)
        grad, _, _ = torch.ops.aten.convolution_backward(
            grad_output, shape_only, weight, None, [1, 1], list(symmetric), [1, 1], False, [0, 0], c,
            [True, False, False],
        )
        if top or bottom or left or right:
            grad = grad[:, :, top : top + input_size[0], left : left + input_size[1]]
        return grad

    return input_grad


INPUT_GRAD_STRATEGIES: Dict[str, Callable] = {
    "nchw": _input_grad_as_forward(_forward_nchw),
    "channels_last": _input_grad_as_forward(_forward_channels_last),
    "fft": _input_grad_as_forward(_forward_fft),
    "backward_nchw": _input_grad_backward(torch.contiguous_format),
    "backward_channels_last": _input_grad_backward(torch.channels_last),
}


# --------------------------------------------------------------------------------------------
# Weight-gradient strategies: (x, grad_output, kernel_size, padding4) -> (C, 1, kh, kw)


def _weight_grad_backward(memory_format):
    """Build a weight-gradient strategy on ``aten.convolution_backward`` in ``memory_format``."""

    def weight_grad(x, grad_output, kernel_size, padding4):
        symmetric, remainder = _split_padding(padding4)
        x = _pad_remainder(x.contiguous(memory_format=memory_format), remainder)
        grad_output = grad_output.contiguous(memory_format=memory_format)
        c = x.shape[1]
        # The backward-weights kernel reads only the size of the weight.
        shape_only = x.new_empty((c, 1) + tuple(kernel_size))
        _, grad, _ = torch.ops.aten.convolution_backward(
            grad_output, x, shape_only, None, [1, 1], list(symmetric), [1, 1], False, [0, 0], c,
            [False, True, False],
        )
        return grad

    return weight_grad


def _weight_grad_as_forward(x, grad_output, kernel_size, padding4):
    """Correlate each padded (n, c) input plane with its (n, c) grad_output plane, then sum over n.

    That is a depthwise forward over N * C channels with batch 1 whose filters are the
    grad_output planes and whose output is kh x kw.
    """
    n, c, h, w = x.shape
    out_h, out_w = grad_output.shape[-2:]
    # The (C, N) reshapes copy anyway, so float16 and bfloat16 are cast to float32 on the way and
    # the per-sample results are summed before the one rounding to the input dtype.
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    planes = x.transpose(0, 1).reshape(1, c * n, h, w).to(compute_dtype)
    filters = grad_output.transpose(0, 1).reshape(c * n, 1, out_h, out_w).to(compute_dtype)
    per_sample = _conv(planes, filters, None, padding4)
    grad = per_sample.view(c, n, kernel_size[0], kernel_size[1]).sum(dim=1)
    return grad.unsqueeze(1).to(x.dtype)


def _weight_grad_fft(x, grad_output, kernel_size, padding4):
    """Sum the circular cross-correlations of x and grad_output over the batch in frequency space.

    ``d[m] = sum_h grad_output[h] * x[(h + m) % L]`` and the weight gradient at tap i is
    ``d[(i - top) % L]``, with L from ``_fft_lengths`` so that no index wraps onto the input.
    """
    top, _, left, _ = padding4
    kh, kw = kernel_size
    in_size = tuple(x.shape[-2:])
    lh, lw = _fft_lengths(in_size, tuple(grad_output.shape[-2:]), kernel_size, padding4)
    compute_dtype = _fft_dtype(x.dtype)
    x_spectrum = torch.fft.rfft2(x.to(compute_dtype), s=(lh, lw))
    grad_spectrum = torch.fft.rfft2(grad_output.to(compute_dtype), s=(lh, lw))
    cross = (x_spectrum * grad_spectrum.conj()).sum(dim=0)
    correlation = torch.fft.irfft2(cross, s=(lh, lw))
    rows = (torch.arange(kh) - top) % lh
    cols = (torch.arange(kw) - left) % lw
    grad = correlation[:, rows[:, None], cols[None, :]]
    return grad.unsqueeze(1).to(x.dtype).contiguous()


WEIGHT_GRAD_STRATEGIES: Dict[str, Callable] = {
    "nchw": _weight_grad_backward(torch.contiguous_format),
    "channels_last": _weight_grad_backward(torch.channels_last),
    "as_forward": _weight_grad_as_forward,
    "fft": _weight_grad_fft,
}

STRATEGIES: Dict[str, Dict[str, Callable]] = {
    "forward": FORWARD_STRATEGIES,
    "input_grad": INPUT_GRAD_STRATEGIES,
    "weight_grad": WEIGHT_GRAD_STRATEGIES,
}

# Names offered by every op, the only ones a single string may force.
COMMON_STRATEGIES = tuple(name for name in FORWARD_STRATEGIES if all(name in s for s in STRATEGIES.values()))


# --------------------------------------------------------------------------------------------
# Forcing and inspection


def _parse_strategy(strategy, source):
    """Return the {op: name} dict that ``strategy`` (None, a name, or an {op: name} mapping) forces."""
    if strategy is None:
        return {}
    if isinstance(strategy, str):
        if strategy not in COMMON_STRATEGIES:
            raise ValueError(
                f"{source} must be one of {COMMON_STRATEGIES}, or a mapping from op to strategy, "
                f"got {strategy!r}; strategies of a single op are forced as {{op: name}}"
            )
        return {op: strategy for op in OPS}
    if not isinstance(strategy, Mapping):
        raise TypeError(f"{source} must be None, a strategy name or a mapping from op to name, got {type(strategy).__name__}")
    forced = {}
    for op, name in strategy.items():
        if op not in STRATEGIES:
            raise ValueError(f"{source} names the unknown op {op!r}; the ops are {OPS}")
        if name not in STRATEGIES[op]:
            raise ValueError(f"{source} forces {name!r} on {op}, whose strategies are {tuple(STRATEGIES[op])}")
        forced[op] = name
    return forced


def _parse_env(value):
    """Parse ``CONVCOV_CPU_STRATEGY``: a name such as ``fft``, or ``op=name`` pairs joined by commas."""
    if "=" not in value:
        return _parse_strategy(value.strip(), ENV_VAR)
    mapping = {}
    for item in value.split(","):
        op, sep, name = item.partition("=")
        if not sep:
            raise ValueError(f"{ENV_VAR} must be a strategy name or op=name pairs joined by commas, got {value!r}")
        mapping[op.strip()] = name.strip()
    return _parse_strategy(mapping, ENV_VAR)


def set_strategy(strategy: Union[None, str, Mapping[str, str]]) -> None:
    """Force a strategy for later calls, or pass None to return to tuning.

    A string must be a name every op offers (``COMMON_STRATEGIES``). A mapping such as
    ``{"weight_grad": "as_forward"}`` forces single ops, and the other ops keep tuning. While set,
    this takes precedence over ``CONVCOV_CPU_STRATEGY``. Forced calls leave the cache unchanged.
    """
    global _forced
    _forced = _parse_strategy(strategy, "strategy")


def forced_strategy(op: str) -> Optional[str]:
    """Return the strategy forced on ``op`` by ``set_strategy`` or ``CONVCOV_CPU_STRATEGY``, or None."""
    if _forced:
        return _forced.get(op)
    value = os.environ.get(ENV_VAR, "").strip()
    if not value:
        return None
    return _parse_env(value).get(op)


def chosen_strategies() -> Dict[ShapeKey, str]:
    """Return a copy of the tuned choices, keyed by ``ShapeKey``."""
    with _cache_lock:
        return dict(_cache)


def clear_cache() -> None:
    """Forget every tuned choice, so that the next call per shape tunes again."""
    with _cache_lock:
        _cache.clear()


def default_strategy(op: str, kernel_size: Tuple[int, int], layout: str = "nchw") -> str:
    """Return the strategy used without timing: while tracing, and as the first candidate.

    ``layout`` names the memory format of the op's tensors (``ShapeKey.layout``). With torch 2.13
    on a 2-core x86 CPU (docs/benchmarks.md), the tuner mostly kept the input's layout for the
    forward and the input gradient up to 9x9 kernels. For 31x31 and 5x51 kernels the NCHW oneDNN
    forward was 28 to 36 times slower than channels_last. "as_forward" won most weight
    gradients. In a one-off measurement under load, the oneDNN weight gradient cost 14 to 27
    times more per tap for 15x15 to 21x21 kernels than for 13x13 ones.
    """
    if op == "weight_grad":
        return "as_forward"
    if layout.startswith("channels_last") or kernel_size[0] * kernel_size[1] >= LARGE_KERNEL_TAPS:
        return "channels_last"
    return "nchw"


# --------------------------------------------------------------------------------------------
# Tuning


def _is_tracing(tensors):
    if torch.compiler.is_compiling():
        return True
    from torch._subclasses.fake_tensor import FakeTensor

    return any(isinstance(t, FakeTensor) or t.device.type == "meta" for t in tensors)


def _candidates(op, dtype, kernel_size, layout):
    """Return the strategy names the tuner times, the default first."""
    names = list(STRATEGIES[op])
    if dtype not in (torch.float32, torch.float64):
        names.remove("fft")
    if op == "input_grad" and dtype == torch.float16:
        # With torch 2.13.0+cpu, the float16 backward-data kernel of aten.convolution_backward
        # returns inf where partial sums pass 65504 but the result is finite, and is 4 times
        # less accurate than F.conv2d elsewhere, as a float16 accumulator would be.
        names.remove("backward_nchw")
        names.remove("backward_channels_last")
    first = default_strategy(op, kernel_size, layout)
    names.remove(first)
    return [first] + names


def _within_fft_error(result, direct):
    scale = direct.abs().max().item()
    error = (result - direct).abs().max().item()
    return error <= FFT_MAX_ERROR_EPS * torch.finfo(direct.dtype).eps * scale


def _time_call(call, name, args):
    start = time.perf_counter()
    result = call(name, args)
    return time.perf_counter() - start, result


def _batch_slice(op, args, size):
    """Return ``args`` with every batched tensor cut to its first ``size`` samples."""
    if op == "weight_grad":
        x, grad_output, kernel_size, padding4 = args
        return (x[:size], grad_output[:size], kernel_size, padding4)
    return (args[0][:size],) + tuple(args[1:])


def _probe_is_slow(call, name, probe_args, scale, best_time):
    """Return whether ``name`` on the probe slice, scaled by ``scale``, is too slow to time fully.

    A fast probe that looks slow runs a second time, because its first run may be mostly
    one-time set-up such as oneDNN primitive creation for the new batch size.
    """
    for _ in range(2):
        probe_time, _ = _time_call(call, name, probe_args)
        estimate = probe_time * scale
        if estimate <= PRUNE_MIN_SECONDS or estimate <= PRUNE_FACTOR * best_time:
            return False
        if probe_time > PRUNE_MIN_SECONDS:
            return True
    return True


def _tune(op, key, call, args, kernel_size):
    """Time each candidate through ``call``, cache the fastest under ``key``, return its output.

    The default strategy runs first. Every other candidate first runs on a slice of
    1/PROBE_BATCH_DIVISOR of the batch, and one whose time scaled to the full batch exceeds
    PRUNE_FACTOR times the best is dropped, so that a slow strategy costs the tuner little. A
    candidate that raises RuntimeError (an unsupported dtype, or memory exhausted by the FFT) is
    skipped. The first such error is raised when no candidate succeeds.
    """
    batch = key.n
    probe_size = max(1, batch // PROBE_BATCH_DIVISOR)
    best_name, best_time, best_result = None, float("inf"), None
    direct_result, first_error = None, None
    for name in _candidates(op, key.dtype, kernel_size, key.layout):
        try:
            timed = _time_candidate(call, op, name, args, probe_size, best_time, direct_result)
        except RuntimeError as error:
            first_error = first_error or error
            continue
        if timed is None:
            continue
        fastest, result = timed
        if name != "fft" and direct_result is None:
            direct_result = result
        if fastest < best_time:
            best_name, best_time, best_result = name, fastest, result
    if best_name is None:
        raise first_error
    with _cache_lock:
        _cache.setdefault(key, best_name)
    return best_result


def _time_candidate(call, op, name, args, probe_size, best_time, direct_result):
    """Return (fastest seconds, output) of candidate ``name``, or None if it is pruned or rejected."""
    batch = args[0].shape[0]
    if best_time < float("inf") and probe_size < batch:
        probe_args = _batch_slice(op, args, probe_size)
        if _probe_is_slow(call, name, probe_args, batch / probe_size, best_time):
            return None
    warm_up, result = _time_call(call, name, args)
    if name == "fft" and (direct_result is None or not _within_fft_error(result, direct_result)):
        return None
    if warm_up > PRUNE_MIN_SECONDS and warm_up > PRUNE_FACTOR * best_time:
        return None
    fastest, spent = float("inf"), 0.0
    for _ in range(MAX_TIMED_RUNS):
        run_time, result = _time_call(call, name, args)
        fastest = min(fastest, run_time)
        spent += run_time
        if spent >= TIMING_BUDGET_SECONDS:
            break
    return fastest, result


def _run(op, args, tensors, kernel_size, padding4, memory_format):
    """Run the forced, cached or freshly tuned strategy of ``op`` and return its output.

    The output is converted to ``memory_format`` inside the timed call, so that a strategy pays
    for the conversions it needs in both directions.
    """

    def call(name, call_args):
        return STRATEGIES[op][name](*call_args).contiguous(memory_format=memory_format)

    forced = forced_strategy(op)
    if forced is not None:
        return call(forced, args)
    layout = "+".join(_layout_name(t) for t in tensors)
    if _is_tracing(tensors):
        return call(default_strategy(op, kernel_size, layout), args)
    first = tensors[0]
    n, c, h, w = first.shape
    key = ShapeKey(op, n, c, h, w, kernel_size[0], kernel_size[1], padding4, first.dtype, layout, torch.get_num_threads())
    name = _cache.get(key)
    if name is None:
        return _tune(op, key, call, args, kernel_size)
    return call(name, args)


# --------------------------------------------------------------------------------------------
# Entry points called by ops.py


# float16 and bfloat16 are computed in float32 and rounded once at the end. On torch 2.13 (x86),
# oneDNN's bfloat16 depthwise convolution in channels_last did not finish within 400 s for some
# kernels of 15 and more taps per side. The float16 backward-data kernel overflowed partial sums
# to inf. float32 was fast and exact to the final rounding.
HALF_DTYPES = (torch.float16, torch.bfloat16)


def _in_float32(function):
    """Wrap an entry point so half-precision tensors are computed in float32 and cast back."""

    def wrapped(*args):
        dtypes = {a.dtype for a in args if isinstance(a, torch.Tensor)}
        half = dtypes & set(HALF_DTYPES)
        if not half:
            return function(*args)
        upcast = [a.float() if isinstance(a, torch.Tensor) else a for a in args]
        return function(*upcast).to(half.pop())

    wrapped.__name__ = function.__name__
    wrapped.__doc__ = function.__doc__
    return wrapped


@_in_float32
def forward(x, weight, bias, padding4):
    """Compute the depthwise convolution of ``x`` on the CPU, in the memory format of ``x``."""
    padding4 = tuple(padding4)
    args = (x, weight, bias, padding4)
    return _run("forward", args, (x,), tuple(weight.shape[-2:]), padding4, _memory_format(x))


@_in_float32
def input_grad(grad_output, weight, padding4, input_size):
    """Compute the input gradient on the CPU, in the memory format of ``grad_output``."""
    padding4 = tuple(padding4)
    args = (grad_output, weight, padding4, tuple(input_size))
    memory_format = _memory_format(grad_output)
    return _run("input_grad", args, (grad_output,), tuple(weight.shape[-2:]), padding4, memory_format)


@_in_float32
def weight_grad(x, grad_output, kernel_size, padding4):
    """Compute the (C, 1, kh, kw) weight gradient on the CPU."""
    padding4 = tuple(padding4)
    kernel_size = tuple(kernel_size)
    args = (x, grad_output, kernel_size, padding4)
    return _run("weight_grad", args, (x, grad_output), kernel_size, padding4, torch.contiguous_format)
