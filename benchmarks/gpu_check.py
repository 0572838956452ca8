"""Check the Triton depthwise and sampling kernels on one GPU, and time them against torch.

    python benchmarks/gpu_check.py [--json PATH] [--dtypes float32,bfloat16] [--budget-s 420]
    python benchmarks/gpu_check.py --dry-run

The first phase runs a correctness matrix: odd, even, rectangular and large kernels, both layouts
and three dtypes, compared with the float64 reference (F.conv2d with groups=C). The second phase
times, with triton.testing.do_bench (median, L2 flushed before each run), the forward pass and the
forward plus backward pass on ConvNeXt-T, ConvMixer-1536/20, RepLKNet-31B, 51 x 5 and 5 x 51
layers, and batch-1 inference. Each timed result is also checked against float32 torch on the
same inputs. Both phases cover the Toeplitz (``tl.dot``) formulation beside the FMA one, the
timings on the rows with a filter side of 13 or more. Between the two, ``gpu_sampling.run_sampling``
checks and times the filter sampler (see that module).

Every timing is set against a roofline. The memory bound is the minimal traffic (each tensor read
or written once) divided by the measured device copy bandwidth. The FMA bound is 2 * N * C *
H_out * W_out * kh * kw flops per convolution divided by the FMA rate of an FMA-chain kernel. That
rate is measured, so it is a lower bound on the device's peak and the reported fractions are upper
bounds.

Phases stop starting new work once the time budget is spent, and the JSON lists what they skipped.
The JSON goes to --json and, when $OUT is set, to $OUT/gpu_check.json as well.

``--dry-run`` runs everything on the CPU under the Triton interpreter with tiny shapes, so the
script itself can be checked without a GPU. Its timings and rates are meaningless.
"""

import os
import sys

# The interpreter must be chosen before triton is first imported.
if "--dry-run" in sys.argv[1:]:
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from convcov_fast import reference  # noqa: E402
from convcov_fast.kernels import depthwise  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tolerances import tolerance  # noqa: E402

import gpu_sampling  # noqa: E402

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
KERNEL_CLASSES = [(3, 3), (4, 4), (7, 7), (3, 5), (5, 3), (13, 13), (31, 31), (51, 5), (5, 51)]

# 40 channels leave a partial channels_last block for every channel block size, and 23 x 29 is
# no multiple of any tile. 6 x 4 is smaller than every large kernel.
GPU_SHAPES = [(2, 40, 23, 29), (3, 5, 6, 4)]
DRY_RUN_SHAPE = (1, 3, 6, 7)

# (name, N, C, H, W, kernel size, with backward). The batch-1 rows time inference only.
BENCHMARK_ROWS = [
    ("convnext_t_stage1", 64, 96, 56, 56, (7, 7), True),
    ("convnext_t_stage2", 64, 192, 28, 28, (7, 7), True),
    ("convnext_t_stage3", 64, 384, 14, 14, (7, 7), True),
    ("convnext_t_stage4", 64, 768, 7, 7, (7, 7), True),
    ("convmixer_1536_20", 64, 1536, 32, 32, (9, 9), True),
    ("replknet_31b_stage1", 64, 128, 56, 56, (31, 31), True),
    ("kernel_51x5", 64, 128, 56, 56, (51, 5), True),
    ("kernel_5x51", 64, 128, 56, 56, (5, 51), True),
    ("convnext_t_stage1_batch1", 1, 96, 56, 56, (7, 7), False),
    ("convmixer_1536_20_batch1", 1, 1536, 32, 32, (9, 9), False),
    ("replknet_31b_stage1_batch1", 1, 128, 56, 56, (31, 31), False),
]
DRY_RUN_ROWS = [
    ("tiny", 2, 4, 8, 8, (3, 3), True),
    ("tiny_batch1", 1, 4, 8, 8, (3, 3), False),
]

# Images of the batch whose outputs a timed row checks against float32 torch.
CHECKED_IMAGES = 2
# Timed rows whose filters have a side this long also time the Toeplitz formulation.
TOEPLITZ_MIN_SIDE = 13


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--json", default="gpu_check.json", help="path of the JSON report (default: %(default)s)"
    )
    parser.add_argument(
        "--dtypes",
        default="float32,bfloat16",
        help="comma-separated dtypes to time, from float32, float16, bfloat16 (default: %(default)s)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="seconds after which no new check or timing starts (default: %(default)s)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="run on the CPU under the Triton interpreter with tiny shapes, where timings are meaningless",
    )
    args = parser.parse_args(argv)
    unknown = [name for name in args.dtypes.split(",") if name not in DTYPES]
    if unknown:
        parser.error(f"--dtypes: unknown dtype {unknown[0]!r}, expected some of {', '.join(DTYPES)}")
    return args


def same_padding(kernel_size):
    kh, kw = kernel_size
    return ((kh - 1) // 2, kh - 1 - (kh - 1) // 2, (kw - 1) // 2, kw - 1 - (kw - 1) // 2)


def output_shape(shape, kernel_size, padding4):
    batch, channels, height, width = shape
    top, bottom, left, right = padding4
    return (
        batch,
        channels,
        height + top + bottom - kernel_size[0] + 1,
        width + left + right - kernel_size[1] + 1,
    )


class Report:
    """Check results, timings and skipped work of one run, each printed as it arrives."""

    def __init__(self):
        self.checks = []
        self.timings = []
        self.skipped = []

    def check(self, case, quantity, actual, expected, dtype, reduction_length):
        """Compare ``actual`` with ``expected`` within the tolerance for ``dtype`` and record it."""
        limits = tolerance(dtype, reduction_length)
        actual = actual.double()
        expected = expected.double()
        error = (actual - expected).abs()
        allowed = limits["atol"] + limits["rtol"] * expected.abs()
        finite = bool(torch.isfinite(actual).all())
        passed = finite and bool((error <= allowed).all())
        max_error = float(error.max()) if error.numel() else 0.0
        self.checks.append(
            {
                "case": case,
                "result": quantity,
                "passed": passed,
                "max_abs_error": max_error,
                "all_finite": finite,
                **limits,
            }
        )
        if not passed:
            print(f"FAIL {case} {quantity}: max abs error {max_error:.3g}, all finite: {finite}", flush=True)

    def require(self, case, quantity, condition, detail):
        """Record a check that passes when ``condition`` holds, with ``detail`` for a failure."""
        self.checks.append({"case": case, "result": quantity, "passed": bool(condition), "detail": detail})
        if not condition:
            print(f"FAIL {case} {quantity}: {detail}", flush=True)

    def skip(self, item):
        self.skipped.append(item)
        print(f"skipped (time budget): {item}", flush=True)

    def failures(self):
        return [check for check in self.checks if not check["passed"]]


def random_tensor(shape, dtype, device, memory_format=torch.contiguous_format):
    return (
        torch.randn(shape, dtype=torch.float32, device=device)
        .to(dtype)
        .contiguous(memory_format=memory_format)
    )


def nan_tensor(shape, dtype, device, memory_format):
    return torch.full(shape, float("nan"), dtype=dtype, device=device).contiguous(memory_format=memory_format)


def check_kernels(
    report, case, shape, kernel_size, padding4, dtype, memory_format, activation, device, formulation="fma"
):
    """Run all four kernels on fresh inputs and compare each with the float64 reference.

    ``formulation`` applies to the forward and input gradient kernels.
    """
    channels = shape[1]
    out_shape = output_shape(shape, kernel_size, padding4)
    x = random_tensor(shape, dtype, device, memory_format)
    weight = random_tensor((channels, 1, *kernel_size), dtype, device)
    bias = random_tensor((channels,), dtype, device)
    grad_output = random_tensor(out_shape, dtype, device, memory_format)
    x64, weight64, bias64, grad64 = (t.double() for t in (x, weight, bias, grad_output))
    taps = kernel_size[0] * kernel_size[1]
    batch_and_space = out_shape[0] * out_shape[2] * out_shape[3]

    expected_pre = reference.depthwise_conv2d(x64, weight64, bias64, padding4)
    if activation is None:
        preactivation = None
        y = depthwise.depthwise_forward(
            x,
            weight,
            bias,
            padding4,
            out=nan_tensor(out_shape, dtype, device, memory_format),
            formulation=formulation,
        )
        report.check(case, "forward", y, expected_pre, dtype, taps)
        grad_pre = grad64
    else:
        y, preactivation = depthwise.depthwise_forward(
            x,
            weight,
            bias,
            padding4,
            activation=activation,
            save_preactivation=True,
            out=nan_tensor(out_shape, dtype, device, memory_format),
            preactivation_out=nan_tensor(out_shape, dtype, device, memory_format),
            formulation=formulation,
        )
        approximate = "tanh" if activation == "gelu_tanh" else "none"
        report.check(case, "preactivation", preactivation, expected_pre, dtype, taps)
        report.check(case, "forward", y, F.gelu(expected_pre, approximate=approximate), dtype, taps)
        # The backward kernels see the rounded preactivation, so the truth starts from it too.
        pre = preactivation.double().requires_grad_(True)
        (grad_pre,) = torch.autograd.grad(F.gelu(pre, approximate=approximate), pre, grad64)
    report.require(
        case, "forward memory format", y.is_contiguous(memory_format=memory_format), f"strides {y.stride()}"
    )

    saved = dict(activation=activation, preactivation=preactivation)
    grad_x = depthwise.depthwise_input_grad(
        grad_output,
        weight,
        padding4,
        shape[-2:],
        **saved,
        out=nan_tensor(shape, dtype, device, memory_format),
        formulation=formulation,
    )
    expected_grad_x = reference.depthwise_conv2d_input_grad(grad_pre, weight64, padding4, shape[-2:])
    report.check(case, "input gradient", grad_x, expected_grad_x, dtype, taps)

    grad_bias = depthwise.depthwise_bias_grad(grad_output, **saved)
    report.check(case, "bias gradient", grad_bias, grad_pre.sum(dim=(0, 2, 3)), dtype, batch_and_space)

    grad_weight = depthwise.depthwise_weight_grad(x, grad_output, kernel_size, padding4, **saved)
    expected_grad_weight = reference.depthwise_conv2d_weight_grad(x64, grad_pre, kernel_size, padding4)
    report.check(case, "weight gradient", grad_weight, expected_grad_weight, dtype, batch_and_space)
    again = depthwise.depthwise_weight_grad(x, grad_output, kernel_size, padding4, **saved)
    report.require(case, "weight gradient reproducible", torch.equal(again, grad_weight), "a rerun differs")


def correctness_cases(dry_run):
    """Return (case name, shape, kernel size, padding4, dtype name, layout, activation,
    formulation) tuples."""
    cases = []

    def add(shape, kernel_size, padding4, dtype, layout, activation=None, label="same", formulation="fma"):
        kh, kw = kernel_size
        name = (
            f"{kh}x{kw} {'x'.join(map(str, shape))} {label} {dtype} {layout} {activation or 'linear'}"
            f" {formulation}"
        )
        cases.append((name, shape, kernel_size, padding4, dtype, layout, activation, formulation))

    shapes = [DRY_RUN_SHAPE] if dry_run else GPU_SHAPES
    classes = [(3, 3), (4, 4), (3, 5), (13, 13)] if dry_run else KERNEL_CLASSES
    sixteen_bit_classes = [(3, 3)] if dry_run else [(3, 3), (4, 4), (7, 7), (31, 31)]
    activation_class = (3, 3) if dry_run else (7, 7)
    toeplitz_classes = [(3, 5)] if dry_run else [(4, 4), (13, 13), (31, 31), (51, 5), (5, 51)]
    for layout in LAYOUTS:
        for kernel_size in classes:
            for shape in shapes:
                add(shape, kernel_size, same_padding(kernel_size), "float32", layout)
        for dtype in ("float16", "bfloat16"):
            for kernel_size in sixteen_bit_classes:
                add(shapes[0], kernel_size, same_padding(kernel_size), dtype, layout)
        for padding in (0, 2):
            add(shapes[0], (3, 3), (padding,) * 4, "float32", layout, label=f"pad{padding}")
        for activation in ("gelu", "gelu_tanh"):
            for dtype in ("float32", "bfloat16"):
                add(shapes[0], activation_class, same_padding(activation_class), dtype, layout, activation)
        for kernel_size in toeplitz_classes:
            for dtype in DTYPES:
                add(shapes[0], kernel_size, same_padding(kernel_size), dtype, layout, formulation="toeplitz")
            for shape in shapes[1:]:
                add(shape, kernel_size, same_padding(kernel_size), "float32", layout, formulation="toeplitz")
        add(shapes[0], activation_class, same_padding(activation_class), "bfloat16", layout, "gelu",
            formulation="toeplitz")
    return cases


def run_correctness(report, device, dry_run, deadline):
    depthwise.set_autotune(False)
    for name, shape, kernel_size, padding4, dtype, layout, activation, formulation in correctness_cases(dry_run):
        if time.monotonic() > deadline:
            report.skip(f"check {name}")
            continue
        check_kernels(
            report,
            name,
            shape,
            kernel_size,
            padding4,
            DTYPES[dtype],
            LAYOUTS[layout],
            activation,
            device,
            formulation,
        )
    depthwise.set_autotune(True)
    print(f"correctness: {len(report.checks)} results, {len(report.failures())} failed", flush=True)


def make_timer(device):
    """Return ``measure(fn, grad_to_none=None) -> milliseconds``.

    On CUDA it is the do_bench median. On the CPU it is one timed run.
    """
    if device.type == "cuda":

        def measure(fn, grad_to_none=None):
            return triton.testing.do_bench(
                fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median"
            )

        return measure

    # Under the interpreter the timing only exercises the code, so one run is enough.
    def measure(fn, grad_to_none=None):
        for tensor in grad_to_none or ():
            tensor.grad = None
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    return measure


def measure_copy_bandwidth(device, measure, dry_run):
    """Return the device copy bandwidth in GB/s: bytes read plus bytes written per second."""
    numel = 2**20 if dry_run else 2**28
    source = torch.randn(numel, device=device)
    target = torch.empty_like(source)
    milliseconds = measure(lambda: target.copy_(source))
    return 2 * source.numel() * source.element_size() / (milliseconds * 1e-3) / 1e9


@triton.jit
def _fma_chain_kernel(out_ptr, ITERATIONS: tl.constexpr, BLOCK: tl.constexpr):
    """Run 8 independent chains of ITERATIONS float32 FMAs per element of a BLOCK-wide program.

    The chains are independent so that FMA latency overlaps. The store keeps the compiler from
    dropping them.
    """
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    a = offsets.to(tl.float32) * 1e-7
    b = a + 0.125
    c = a + 0.25
    d = a + 0.375
    e = a + 0.5
    f = a + 0.625
    g = a + 0.75
    h = a + 0.875
    for _ in range(ITERATIONS):
        a = a * 0.9999 + 0.0001
        b = b * 0.9999 + 0.0001
        c = c * 0.9999 + 0.0001
        d = d * 0.9999 + 0.0001
        e = e * 0.9999 + 0.0001
        f = f * 0.9999 + 0.0001
        g = g * 0.9999 + 0.0001
        h = h * 0.9999 + 0.0001
    tl.store(out_ptr + offsets, a + b + c + d + e + f + g + h)


def measure_fma_rate(device, measure, dry_run):
    """Return the float32 FMA rate of ``_fma_chain_kernel`` in TFLOP/s (2 flops per FMA)."""
    if dry_run:
        programs, iterations, block = 2, 2, 64
    else:
        programs, iterations, block = (
            torch.cuda.get_device_properties(device).multi_processor_count * 64,
            2048,
            512,
        )
    out = torch.empty(programs * block, device=device)

    def run():
        _fma_chain_kernel[(programs,)](out, ITERATIONS=iterations, BLOCK=block, num_warps=4)

    milliseconds = measure(run)
    return 2 * 8 * iterations * programs * block / (milliseconds * 1e-3) / 1e12


def roofline(milliseconds, bytes_moved, flops, bandwidth_gbps, fma_tflops):
    """Return achieved rates, the binding bound and the fraction of the roofline reached."""
    seconds = milliseconds * 1e-3
    memory_seconds = bytes_moved / (bandwidth_gbps * 1e9)
    fma_seconds = flops / (fma_tflops * 1e12)
    return {
        "achieved_gbps": bytes_moved / seconds / 1e9,
        "achieved_tflops": flops / seconds / 1e12,
        "bound": "memory" if memory_seconds >= fma_seconds else "fma",
        "roofline_fraction": max(memory_seconds, fma_seconds) / seconds,
    }


def check_timed_row(report, case, x, weight, bias, grad_output, results, padding4, dtype):
    """Compare a timed row's results with float32 torch on the first CHECKED_IMAGES images."""
    kernel_size = tuple(weight.shape[-2:])
    taps = kernel_size[0] * kernel_size[1]
    first = slice(0, CHECKED_IMAGES)
    x32, weight32, bias32 = x.float(), weight.float(), bias.float()
    expected_y = reference.depthwise_conv2d(x32[first], weight32, bias32, padding4)
    report.check(case, "forward", results["y"][first], expected_y, dtype, taps)
    if "grad_x" not in results:
        return
    grad32 = grad_output.float()
    expected_grad_x = reference.depthwise_conv2d_input_grad(grad32[first], weight32, padding4, x.shape[-2:])
    report.check(case, "input gradient", results["grad_x"][first], expected_grad_x, dtype, taps)
    batch_and_space = grad_output.shape[0] * grad_output.shape[2] * grad_output.shape[3]
    report.check(
        case, "bias gradient", results["grad_bias"], grad32.sum(dim=(0, 2, 3)), dtype, batch_and_space
    )
    expected_grad_weight = reference.depthwise_conv2d_weight_grad(x32, grad32, kernel_size, padding4)
    report.check(
        case, "weight gradient", results["grad_weight"], expected_grad_weight, dtype, batch_and_space
    )


def toeplitz_rows(dry_run):
    """Return ``times_toeplitz(layout, kernel_size)``: whether a row also times the Toeplitz kernel.

    On a GPU only NCHW rows with a filter side of at least TOEPLITZ_MIN_SIDE do: each timing
    autotunes, which costs compilations, and only wide filters can repay the products that the
    band wastes. The dry run times it on every row, so that the code path runs.
    """
    if dry_run:
        return lambda layout, kernel_size: True

    def times_toeplitz(layout, kernel_size):
        return (
            layout == "nchw"
            and max(kernel_size) >= TOEPLITZ_MIN_SIDE
            and kernel_size[1] <= depthwise.TOEPLITZ_MAX_KW
        )

    return times_toeplitz


def time_row(report, row, dtype_name, layout, device, measure, bandwidth_gbps, fma_tflops, times_toeplitz):
    """Time one benchmark row in one dtype and layout against nn.Conv2d, and check its results.

    When ``times_toeplitz(layout, kernel_size)`` is true, the Toeplitz formulation is timed too.
    """
    name, batch, channels, height, width, kernel_size, with_backward = row
    dtype, memory_format = DTYPES[dtype_name], LAYOUTS[layout]
    case = f"{name} {dtype_name} {layout}"
    padding4 = same_padding(kernel_size)
    module = torch.nn.Conv2d(channels, channels, kernel_size, padding="same", groups=channels)
    module = module.to(device=device, dtype=dtype, memory_format=memory_format)
    weight, bias = module.weight.detach(), module.bias.detach()
    x = random_tensor((batch, channels, height, width), dtype, device, memory_format)
    grad_output = random_tensor(x.shape, dtype, device, memory_format)
    element_size = x.element_size()
    activation_bytes = x.numel() * element_size
    conv_flops = 2 * x.numel() * kernel_size[0] * kernel_size[1]

    results = {}

    def triton_forward():
        results["y"] = depthwise.depthwise_forward(x, weight, bias, padding4)

    def triton_input_backward():
        triton_forward()
        results["grad_x"] = depthwise.depthwise_input_grad(grad_output, weight, padding4, x.shape[-2:])
        results["grad_bias"] = depthwise.depthwise_bias_grad(grad_output)

    def triton_full_backward():
        triton_input_backward()
        results["grad_weight"] = depthwise.depthwise_weight_grad(x, grad_output, kernel_size, padding4)

    def toeplitz_forward():
        results["toeplitz_y"] = depthwise.depthwise_forward(x, weight, bias, padding4, formulation="toeplitz")

    def toeplitz_input_backward():
        toeplitz_forward()
        results["toeplitz_grad_x"] = depthwise.depthwise_input_grad(
            grad_output, weight, padding4, x.shape[-2:], formulation="toeplitz"
        )
        depthwise.depthwise_bias_grad(grad_output)

    x_leaf = x.detach().requires_grad_(True)

    def torch_forward():
        with torch.no_grad():
            module(x)

    def torch_backward():
        module(x_leaf).backward(grad_output)

    # (mode, Triton function, torch function, weight requires grad, bytes, flops). The bytes are
    # the minimal traffic: forward reads x and writes y, the input backward reads the output
    # gradient and writes the input gradient, the weight gradient reads x and the output gradient.
    # The Toeplitz formulation is timed beside the FMA one for the modes without a weight gradient,
    # on the rows that ``toeplitz_rows`` picks.
    toeplitz = {"forward": toeplitz_forward, "forward_input_backward": toeplitz_input_backward}
    if not times_toeplitz(layout, kernel_size):
        toeplitz = {}
    modes = [("forward", triton_forward, torch_forward, False, 2 * activation_bytes, conv_flops)]
    if with_backward:
        modes.append(
            (
                "forward_input_backward",
                triton_input_backward,
                torch_backward,
                False,
                4 * activation_bytes,
                2 * conv_flops,
            )
        )
        modes.append(
            (
                "forward_full_backward",
                triton_full_backward,
                torch_backward,
                True,
                6 * activation_bytes,
                3 * conv_flops,
            )
        )
    for mode, triton_fn, torch_fn, weight_grad, bytes_moved, flops in modes:
        module.weight.requires_grad_(weight_grad)
        leaves = [x_leaf, module.bias] + ([module.weight] if weight_grad else [])
        triton_ms = measure(triton_fn)
        torch_ms = measure(torch_fn, grad_to_none=leaves)
        entry = {
            "row": name,
            "dtype": dtype_name,
            "layout": layout,
            "mode": mode,
            "shape": [batch, channels, height, width],
            "kernel_size": list(kernel_size),
            "triton_ms": triton_ms,
            "torch_ms": torch_ms,
            "speedup": torch_ms / triton_ms,
            "bytes": bytes_moved,
            "flops": flops,
            **roofline(triton_ms, bytes_moved, flops, bandwidth_gbps, fma_tflops),
        }
        if mode in toeplitz:
            toeplitz_ms = measure(toeplitz[mode])
            entry.update(
                toeplitz_ms=toeplitz_ms,
                toeplitz_speedup=torch_ms / toeplitz_ms,
                toeplitz_vs_fma=triton_ms / toeplitz_ms,
            )
            print(
                f"{case:48s} {mode:24s} toeplitz {toeplitz_ms:8.3f} ms, x{torch_ms / toeplitz_ms:5.2f} "
                f"against torch, x{triton_ms / toeplitz_ms:5.2f} against fma",
                flush=True,
            )
        report.timings.append(entry)
        print(
            f"{case:48s} {mode:24s} triton {triton_ms:8.3f} ms  torch {torch_ms:8.3f} ms  "
            f"x{entry['speedup']:5.2f}  {entry['achieved_gbps']:7.0f} GB/s  "
            f"{entry['achieved_tflops']:6.2f} TFLOP/s  "
            f"{entry['roofline_fraction']:5.1%} of {entry['bound']} roofline",
            flush=True,
        )
    check_timed_row(report, case, x, weight, bias, grad_output, results, padding4, dtype)
    if "toeplitz_y" in results:
        toeplitz_results = {"y": results["toeplitz_y"]}
        if "toeplitz_grad_x" in results:
            toeplitz_results.update(grad_x=results["toeplitz_grad_x"], grad_bias=results["grad_bias"],
                                    grad_weight=results["grad_weight"])
        check_timed_row(report, f"{case} toeplitz", x, weight, bias, grad_output, toeplitz_results,
                        padding4, dtype)


def run_benchmarks(report, device, dtype_names, dry_run, deadline):
    measure = make_timer(device)
    bandwidth_gbps = measure_copy_bandwidth(device, measure, dry_run)
    fma_tflops = measure_fma_rate(device, measure, dry_run)
    print(f"copy bandwidth {bandwidth_gbps:.0f} GB/s, FMA-chain rate {fma_tflops:.1f} TFLOP/s", flush=True)
    rows = DRY_RUN_ROWS if dry_run else BENCHMARK_ROWS
    times_toeplitz = toeplitz_rows(dry_run)
    for dtype_name in dtype_names:
        for row in rows:
            for layout in LAYOUTS:
                if time.monotonic() > deadline:
                    report.skip(f"timing {row[0]} {dtype_name} {layout}")
                    continue
                time_row(
                    report, row, dtype_name, layout, device, measure, bandwidth_gbps, fma_tflops,
                    times_toeplitz,
                )
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return bandwidth_gbps, fma_tflops


def write_json(payload, path):
    targets = [Path(path)]
    if os.environ.get("OUT"):
        targets.append(Path(os.environ["OUT"]) / "gpu_check.json")
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {target}", flush=True)


def main(argv=None):
    args = parse_args(argv)
    start = time.monotonic()
    if args.dry_run:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print(
            "error: no CUDA device found. Run with --dry-run to check the script on the CPU", file=sys.stderr
        )
        return 2
    # TF32 would make the float32 truth for the timed rows inexact.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False

    report = Report()
    # The correctness matrix gets 35 % of the budget, the sampler 15 % and the convolution
    # benchmark table the rest.
    run_correctness(report, device, args.dry_run, start + 0.35 * args.budget_s)
    sampling_results = gpu_sampling.run_sampling(
        report, device, make_timer(device), args.dry_run, start + 0.5 * args.budget_s
    )
    bandwidth_gbps, fma_tflops = run_benchmarks(
        report, device, args.dtypes.split(","), args.dry_run, start + args.budget_s
    )

    failures = report.failures()
    payload = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)",
        "dry_run": args.dry_run,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "copy_bandwidth_gbps": bandwidth_gbps,
        "fma_chain_tflops": fma_tflops,
        "sampling": sampling_results,
        "wall_s": time.monotonic() - start,
        "checks_passed": len(report.checks) - len(failures),
        "checks_failed": len(failures),
        "failures": failures,
        "skipped": report.skipped,
        "timings": report.timings,
        "checks": report.checks,
    }
    write_json(payload, args.json)
    print(
        f"{payload['checks_passed']} checks passed, {len(failures)} failed, "
        f"{len(report.skipped)} items skipped, {payload['wall_s']:.0f} s",
        flush=True,
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
