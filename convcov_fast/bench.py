"""``convcov-fast bench``: timings of the depthwise convolution and a ConvMixer training step.

Three sections, each printed as a table and written to ``bench.json`` in the output folder:

- ``conv``: every case of ``CASES``, forward (under ``torch.no_grad``) and forward + backward
  (the input requires grad and the bias is trainable), for ``nn.Conv2d``, ``depthwise_conv2d`` and
  ``FrozenCovDepthwiseConv2d`` in NCHW and channels_last, with the depthwise weight trainable or
  frozen. Speed-ups are against ``nn.Conv2d`` in NCHW with a trainable weight, and against two
  plain PyTorch options for frozen filters, each in its faster layout. The first is ``nn.Conv2d``
  with ``weight.requires_grad_(False)``. The second is a frozen bias-free ``nn.Conv2d`` followed
  by a separate bias add. ``conv.png`` draws the forward + backward speed-ups.
- ``sampling``: the rows of ``convcov_fast.bench_sampling.sampling_table``.
- ``training``: one AdamW step of the default ConvMixer on 1 x 28 x 28 inputs with 10 classes,
  with trainable ``nn.Conv2d`` filters, frozen ``nn.Conv2d`` filters and ``FrozenCovDepthwiseConv2d``.

Every time is the median of ``--repeats`` ``time.perf_counter`` measurements after one untimed
warm-up call, which also runs the CPU route's tuner. The variants of one case are timed in turn
within each repeat, so that a change in the load of a shared machine affects all of them alike.
On CUDA the device is synchronized inside the timed region and ``depthwise_conv2d`` runs with
``backend="triton"``.
"""

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_conv, models
from .layers import FrozenCovDepthwiseConv2d
from .ops import depthwise_conv2d

SECTIONS = ("conv", "sampling", "training")
LAYOUTS = {"NCHW": torch.contiguous_format, "channels_last": torch.channels_last}
FULL_REPEATS = 5
QUICK_REPEATS = 3


@dataclasses.dataclass(frozen=True)
class ConvCase:
    """One depthwise convolution shape and the batch sizes it is timed at.

    ``reference_batch`` is a typical per-GPU training batch of the source model (an estimate),
    used on CUDA. ``cpu_batch`` keeps the slowest variant of a full CPU run near a second on an idle
    2-core CPU, and ``quick_batch`` keeps a ``--quick`` run under two minutes there.
    """

    name: str
    source: str
    channels: int
    size: Tuple[int, int]
    kernel_size: Tuple[int, int]
    reference_batch: int
    cpu_batch: int
    quick_batch: int

    def batch_on(self, device, quick):
        if quick:
            return self.quick_batch
        return self.reference_batch if device.type == "cuda" else self.cpu_batch


CASES = (
    ConvCase("convnext-t-s1", "ConvNeXt-T stage 1", 96, (56, 56), (7, 7), 64, 16, 2),
    ConvCase("convnext-t-s2", "ConvNeXt-T stage 2", 192, (28, 28), (7, 7), 64, 16, 4),
    ConvCase("convnext-t-s3", "ConvNeXt-T stage 3", 384, (14, 14), (7, 7), 64, 32, 8),
    ConvCase("convnext-t-s4", "ConvNeXt-T stage 4", 768, (7, 7), (7, 7), 64, 64, 16),
    ConvCase("convmixer-256-8", "ConvMixer-256/8 on 32x32 inputs, patch 1", 256, (32, 32), (9, 9), 128, 16, 2),
    ConvCase("convmixer-1536-20", "ConvMixer-1536/20 on 224x224 inputs, patch 7", 1536, (32, 32), (9, 9), 64, 4, 1),
    ConvCase("replknet-31", "RepLKNet-31B stage 1", 128, (56, 56), (31, 31), 64, 4, 1),
    ConvCase("strip-51x5", "51x5 strip of a decomposed 51x51 kernel, as in SLaK", 128, (56, 56), (51, 5), 64, 4, 1),
    ConvCase("strip-5x51", "5x51 strip of a decomposed 51x51 kernel, as in SLaK", 128, (56, 56), (5, 51), 64, 4, 1),
    ConvCase("fashion-mnist-convmixer", "default model of convcov-fast train (ConvMixer-128/4, patch 4)", 128,
             (7, 7), (9, 9), 128, 128, 32),
)
QUICK_CASE_NAMES = ("convnext-t-s1", "convmixer-256-8", "replknet-31", "strip-51x5", "fashion-mnist-convmixer")

# The ConvMixer of the training section. These equal the defaults of ``train.TrainConfig``, which
# this module may not import because train.py sits in the same layer.
TRAIN_MODEL = {"dim": 128, "depth": 4, "kernel_size": 9, "patch_size": 4}
TRAIN_BATCH = 128
QUICK_TRAIN_BATCH = 32
IMAGE_SIZE = 28
NUM_CLASSES = 10

# Variants of the conv section: (implementation, weight). Each runs in both layouts.
BASELINE = ("nn.Conv2d", "trainable")
FROZEN_TORCH = ("nn.Conv2d", "frozen")
# nn.Conv2d without bias, then a separate trainable bias add. On the CPU (torch 2.13, oneDNN),
# aten.convolution_backward takes about as long for the bias gradient alone as for the weight
# gradient, so nn.Conv2d with a trainable bias pays for a weight gradient even when the weight is
# frozen (docs/benchmarks.md). The separate add avoids that.
FROZEN_TORCH_SEPARATE_BIAS = ("nn.Conv2d+bias", "frozen")
VARIANTS = (
    BASELINE,
    FROZEN_TORCH,
    FROZEN_TORCH_SEPARATE_BIAS,
    ("depthwise_conv2d", "trainable"),
    ("depthwise_conv2d", "frozen"),
    ("FrozenCovDepthwiseConv2d", "frozen"),
)
# Without autograd a trainable weight changes nothing, so the forward pass times one weight kind.
FORWARD_VARIANTS = (BASELINE, ("depthwise_conv2d", "frozen"), ("FrozenCovDepthwiseConv2d", "frozen"))
# Names of the training-section variants: the depthwise layers of the ConvMixer.
TRAIN_VARIANTS = ("nn.Conv2d trainable", "nn.Conv2d frozen", "FrozenCovDepthwiseConv2d")

# Targets checked in the summary.
TARGET_FROZEN_VS_BASELINE = 5.0
TARGET_FROZEN_VS_BEST_TORCH = 1.0
TARGET_TRAINING_STEP = 1.5


# ---------------------------------------------------------------------------------------------
# Command line


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def add_arguments(parser):
    """Add the options of ``convcov-fast bench`` to ``parser``."""
    parser.add_argument(
        "--quick", action="store_true",
        help=f"time {len(QUICK_CASE_NAMES)} cases with small batches and {QUICK_REPEATS} repeats, "
             "well under two minutes on a 2-core CPU without other load",
    )
    parser.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"),
        help="device to time on; 'auto' picks CUDA when available (default: auto)",
    )
    parser.add_argument(
        "--output", default="bench-results", metavar="DIR",
        help="folder for bench.json and conv.png, created if missing (default: bench-results)",
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=None, metavar="N",
        help=f"timed calls per variant, after one warm-up (default: {FULL_REPEATS}, "
             f"or {QUICK_REPEATS} with --quick)",
    )
    parser.add_argument(
        "--shapes", default=None, metavar="NAMES",
        help="comma-separated substrings; time only the cases whose name contains one "
             f"(names: {', '.join(case.name for case in CASES)})",
    )
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), metavar="NAMES",
        help=f"comma-separated sections to run, of {', '.join(SECTIONS)} (default: all)",
    )


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was given but CUDA is not available; use --device cpu")
    return torch.device(name)


def parse_sections(text):
    sections = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in sections if name not in SECTIONS]
    if unknown or not sections:
        raise ValueError(f"--sections must name some of {', '.join(SECTIONS)}, got {text!r}")
    return sections


def select_cases(patterns, quick):
    """Return the cases whose name contains one of the comma-separated ``patterns``.

    Without patterns, ``--quick`` selects ``QUICK_CASE_NAMES`` and a full run selects all cases.
    """
    if patterns is None:
        return [case for case in CASES if not quick or case.name in QUICK_CASE_NAMES]
    requested = [pattern.strip().lower() for pattern in patterns.split(",") if pattern.strip()]
    cases = [case for case in CASES if any(pattern in case.name for pattern in requested)]
    if not cases:
        names = ", ".join(case.name for case in CASES)
        raise ValueError(f"--shapes {patterns!r} matches no case; the cases are {names}")
    return cases


def run(args) -> int:
    """Run the sections named by ``args``, print their tables, write the JSON and PNG files."""
    device = resolve_device(args.device)
    sections = parse_sections(args.sections)
    repeats = args.repeats or (QUICK_REPEATS if args.quick else FULL_REPEATS)
    cases = select_cases(args.shapes, args.quick) if "conv" in sections else []
    output_dir = Path(args.output)
    output_dir.mkdir(parents=True, exist_ok=True)

    json_path = output_dir / "bench.json"
    report = {"machine": machine_info(device), "argv": sys.argv, "quick": args.quick, "repeats": repeats}
    print(format_machine(report["machine"]))
    # The report is rewritten after each section, so that a failure later keeps what was measured.
    if "conv" in sections:
        report["conv"] = conv_table(cases, device, repeats, args.quick)
        print(format_conv_table(report["conv"]))
        report["cpu_strategies"] = strategy_rows() if device.type == "cpu" else []
        if report["cpu_strategies"]:
            print(format_strategy_table(report["cpu_strategies"]))
        write_report(report, json_path)
    if "training" in sections:
        report["training"] = training_table(device, repeats, args.quick)
        print(format_training_table(report["training"]))
        write_report(report, json_path)
    report["targets"] = check_targets(report.get("conv", []), report.get("training", []))
    print(format_targets(report["targets"]))
    if "sampling" in sections:
        report["sampling"] = sampling_rows(args.quick, device)
        if report["sampling"]:
            print(format_sampling_table(report["sampling"]))
    report["load_average_1min_at_end"] = load_average()
    write_report(report, json_path)
    print(f"wrote {json_path}")
    if report.get("conv"):
        png_path = output_dir / "conv.png"
        plot_conv(report["conv"], png_path)
        print(f"wrote {png_path}")
    return 0


def write_report(report, path):
    path.write_text(json.dumps(report, indent=2) + "\n")


def machine_info(device):
    """Return the CPU model, core and thread counts, torch version, device name and date."""
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_count": _cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "load_average_1min": load_average(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def load_average():
    """Return the 1-minute load average, or None where the OS has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _cpu_count():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def cpu_model():
    """Return the CPU model name from /proc/cpuinfo, else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ---------------------------------------------------------------------------------------------
# Timing


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_in_turn(calls: Dict[str, Callable[[], object]], repeats, device) -> Dict[str, List[float]]:
    """Return the seconds of each of ``repeats`` runs per call, timing the calls in turn.

    Every call first runs once untimed, which compiles kernels and runs the CPU route's tuner.
    """
    for call in calls.values():
        call()
    synchronize(device)
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            synchronize(device)
            start = time.perf_counter()
            call()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


# ---------------------------------------------------------------------------------------------
# Conv section


def make_case_tensors(case, batch, device, seed=0):
    """Return the NCHW input, the upstream gradient, the filters and the bias of ``case``."""
    generator = torch.Generator().manual_seed(seed)
    c = case.channels
    h, w = case.size
    kh, kw = case.kernel_size
    x = torch.randn(batch, c, h, w, generator=generator)
    grad = torch.randn(batch, c, h, w, generator=generator)
    weight = torch.randn(c, 1, kh, kw, generator=generator) / math.sqrt(kh * kw)
    bias = torch.randn(c, generator=generator) * 0.1
    return x.to(device), grad.to(device), weight.to(device), bias.to(device)


def depthwise_backend(device):
    return "triton" if device.type == "cuda" else "auto"


def build_conv_module(implementation, weight_kind, weight, bias, device):
    """Return a module that applies the depthwise convolution with ``weight`` and ``bias``."""
    channels = weight.shape[0]
    conv = nn.Conv2d(channels, channels, tuple(weight.shape[-2:]), groups=channels, padding="same").to(device)
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
    if implementation == "nn.Conv2d":
        conv.weight.requires_grad_(weight_kind == "trainable")
        return conv
    if implementation == "nn.Conv2d+bias":
        return ConvThenBias(conv, trainable=weight_kind == "trainable")
    if implementation == "FrozenCovDepthwiseConv2d":
        return FrozenCovDepthwiseConv2d.from_conv(conv, backend=depthwise_backend(device))
    if implementation == "depthwise_conv2d":
        return DepthwiseConv(conv, trainable=weight_kind == "trainable", backend=depthwise_backend(device))
    raise ValueError(f"unknown implementation {implementation!r}")


class ConvThenBias(nn.Module):
    """The depthwise ``nn.Conv2d`` of ``conv`` without its bias, followed by a separate bias add."""

    def __init__(self, conv, *, trainable):
        super().__init__()
        channels = conv.in_channels
        self.conv = nn.Conv2d(channels, channels, conv.kernel_size, groups=channels, padding="same", bias=False)
        self.conv.to(conv.weight.device)
        with torch.no_grad():
            self.conv.weight.copy_(conv.weight)
        self.conv.weight.requires_grad_(trainable)
        self.bias = nn.Parameter(conv.bias.detach().clone())

    def forward(self, x):
        return self.conv(x) + self.bias.view(1, -1, 1, 1)


class DepthwiseConv(nn.Module):
    """``depthwise_conv2d`` on the filters and bias of ``conv``, the weight trainable or frozen."""

    def __init__(self, conv, *, trainable, backend):
        super().__init__()
        weight = conv.weight.detach().clone()
        if trainable:
            self.weight = nn.Parameter(weight)
        else:
            self.register_buffer("weight", weight)
        self.bias = nn.Parameter(conv.bias.detach().clone())
        self.backend = backend

    def forward(self, x):
        return depthwise_conv2d(x, self.weight, self.bias, "same", backend=self.backend)


def forward_backward_call(module, x, grad):
    """Return a call that runs forward and backward and returns the input gradient.

    The gradients are reset before each run, so that no run pays for accumulating into them.
    """
    x = x.detach().requires_grad_(True)
    parameters = [p for p in module.parameters() if p.requires_grad]

    def call():
        x.grad = None
        for parameter in parameters:
            parameter.grad = None
        module(x).backward(grad)
        return x.grad

    return call


def forward_call(module, x):
    def call():
        with torch.no_grad():
            return module(x)

    return call


def conv_variants(pass_name):
    """Return the (implementation, layout, weight) triples timed in ``pass_name``.

    Without autograd a trainable weight changes nothing, so the forward pass has one row per
    implementation and layout, with the weight "any".
    """
    variants = []
    for layout in LAYOUTS:
        for implementation, weight_kind in VARIANTS:
            if pass_name == "forward":
                if (implementation, weight_kind) in FORWARD_VARIANTS:
                    variants.append((implementation, layout, "any"))
            else:
                variants.append((implementation, layout, weight_kind))
    return variants


def conv_call(tensors, device, pass_name, implementation, layout, weight_kind):
    """Return a call that runs one variant on ``tensors`` from ``make_case_tensors``."""
    x, grad, weight, bias = tensors
    memory_format = LAYOUTS[layout]
    module = build_conv_module(implementation, "frozen" if weight_kind == "any" else weight_kind, weight, bias,
                               device)
    if pass_name == "forward":
        return forward_call(module, x.contiguous(memory_format=memory_format))
    return forward_backward_call(module, x.contiguous(memory_format=memory_format),
                                 grad.contiguous(memory_format=memory_format))


def conv_table(cases, device, repeats, quick):
    """Time every case and return one row per (case, pass, implementation, layout, weight)."""
    rows = []
    for case in cases:
        batch = case.batch_on(device, quick)
        start = time.perf_counter()
        for pass_name in ("forward", "forward+backward"):
            tensors = make_case_tensors(case, batch, device)
            calls = {" ".join(variant): conv_call(tensors, device, pass_name, *variant)
                     for variant in conv_variants(pass_name)}
            times = time_in_turn(calls, repeats, device)
            del calls
            rows.extend(conv_rows(case, batch, pass_name, times))
        print(f"conv: timed {case.name} at batch {batch} in {time.perf_counter() - start:.1f} s", flush=True)
    return rows


def conv_rows(case, batch, pass_name, times):
    """Turn the run times of one case and pass into rows with the speed-ups of their medians.

    Forward rows compare with ``nn.Conv2d`` alone: NCHW, and the faster layout. Forward + backward
    rows compare with ``nn.Conv2d`` NCHW trainable, the faster layout of ``nn.Conv2d`` frozen, and
    the faster layout of frozen ``nn.Conv2d`` with a separate bias add.
    """

    medians = {name: statistics.median(values) for name, values in times.items()}

    def fastest(implementation, weight_kind):
        return min(medians[f"{implementation} {layout} {weight_kind}"] for layout in LAYOUTS)

    if pass_name == "forward":
        baseline = medians["nn.Conv2d NCHW any"]
        best_frozen = best_separate_bias = fastest("nn.Conv2d", "any")
    else:
        baseline = medians["nn.Conv2d NCHW trainable"]
        best_frozen = fastest(*FROZEN_TORCH)
        best_separate_bias = fastest(*FROZEN_TORCH_SEPARATE_BIAS)
    rows = []
    for name, seconds in medians.items():
        implementation, layout, weight_kind = name.split(" ")
        kh, kw = case.kernel_size
        rows.append({
            "case": case.name,
            "source": case.source,
            "batch": batch,
            "reference_batch": case.reference_batch,
            "channels": case.channels,
            "size": f"{case.size[0]}x{case.size[1]}",
            "kernel_size": f"{kh}x{kw}",
            "pass": pass_name,
            "implementation": implementation,
            "layout": layout,
            "weight": weight_kind,
            "median_ms": seconds * 1e3,
            "min_ms": min(times[name]) * 1e3,
            "speedup_vs_nn_nchw_trainable": baseline / seconds,
            "speedup_vs_best_nn_frozen": best_frozen / seconds,
            "speedup_vs_best_nn_frozen_separate_bias": best_separate_bias / seconds,
        })
    return rows


def strategy_rows():
    """Return the CPU route's tuned choices as rows, one per shape key."""
    rows = []
    for key, name in cpu_conv.chosen_strategies().items():
        rows.append({
            "op": key.op, "shape": f"{key.n}x{key.c}x{key.h}x{key.w}", "kernel_size": f"{key.kh}x{key.kw}",
            "padding4": list(key.padding4), "dtype": str(key.dtype).replace("torch.", ""),
            "layout": key.layout, "threads": key.num_threads, "strategy": name,
        })
    return rows


# ---------------------------------------------------------------------------------------------
# Sampling section


def sampling_rows(quick, device):
    """Return the sampling table, or an empty list with a printed note if it is unavailable.

    A RuntimeError inside the table, such as exhausted memory, is printed and the run goes on,
    because the sections before it are already measured.
    """
    try:
        from .bench_sampling import sampling_table
    except ImportError as error:
        print(f"sampling: skipped, convcov_fast.bench_sampling could not be imported ({error})")
        return []
    try:
        return sampling_table(quick=quick, device=device)
    except RuntimeError as error:
        print(f"sampling: failed with {type(error).__name__}: {error}")
        return []


# ---------------------------------------------------------------------------------------------
# Training section


def build_train_model(variant, device, memory_format, seed=0):
    """Return the default ConvMixer with the depthwise layers of ``variant``.

    Every variant starts from the same closed-form filters and the same other weights.
    """
    torch.manual_seed(seed)
    depthwise = "frozen" if variant == "FrozenCovDepthwiseConv2d" else "trainable"
    generator = torch.Generator().manual_seed(seed)
    model = models.ConvMixer(
        TRAIN_MODEL["dim"], TRAIN_MODEL["depth"], TRAIN_MODEL["kernel_size"],
        patch_size=TRAIN_MODEL["patch_size"], in_chans=1, num_classes=NUM_CLASSES,
        depthwise=depthwise, init="closed_form", generator=generator,
    )
    if variant == "nn.Conv2d frozen":
        for layer in models.depthwise_layers(model):
            layer.weight.requires_grad_(False)
    if depthwise == "frozen" and device.type == "cuda":
        for layer in models.depthwise_layers(model):
            layer.backend = "triton"
    return model.to(device=device, memory_format=memory_format).train()


def training_step_call(model, images, labels):
    """Return a call that runs one AdamW step: forward, cross-entropy, backward, update."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def call():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()

    return call


def training_table(device, repeats, quick):
    """Time one training step per (variant, layout) and return rows with the speed-up per layout."""
    batch = QUICK_TRAIN_BATCH if quick else TRAIN_BATCH
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator).to(device)
    labels = torch.randint(NUM_CLASSES, (batch,), generator=generator).to(device)
    calls = {}
    for layout, memory_format in LAYOUTS.items():
        images_layout = images.contiguous(memory_format=memory_format)
        for variant in TRAIN_VARIANTS:
            model = build_train_model(variant, device, memory_format)
            calls[f"{variant}|{layout}"] = training_step_call(model, images_layout, labels)
    times = time_in_turn(calls, repeats, device)
    medians = {name: statistics.median(values) for name, values in times.items()}
    rows = []
    for name, seconds in medians.items():
        variant, layout = name.split("|")
        baseline = medians[f"nn.Conv2d trainable|{layout}"]
        rows.append({
            "model": "ConvMixer-{dim}/{depth}, kernel {kernel_size}, patch {patch_size}".format(**TRAIN_MODEL),
            "batch": batch,
            "depthwise": variant,
            "layout": layout,
            "median_ms": seconds * 1e3,
            "min_ms": min(times[name]) * 1e3,
            "images_per_s": batch / seconds,
            "speedup_vs_trainable_same_layout": baseline / seconds,
        })
    return rows


# ---------------------------------------------------------------------------------------------
# Targets


def check_targets(conv, training):
    """Compare the measured speed-ups with the targets and return one row per target."""
    targets = []
    fwd_bwd = [row for row in conv if row["pass"] == "forward+backward"]
    ours = [row for row in fwd_bwd if row["implementation"] == "depthwise_conv2d" and row["weight"] == "frozen"]
    for layout in LAYOUTS:
        speedups = [row["speedup_vs_nn_nchw_trainable"] for row in ours if row["layout"] == layout]
        if speedups:
            median = statistics.median(speedups)
            targets.append(target_row(
                f"frozen depthwise_conv2d {layout} fwd+bwd vs nn.Conv2d NCHW trainable, median over cases",
                TARGET_FROZEN_VS_BASELINE, median,
            ))
    for torch_variant, label in ((FROZEN_TORCH, "frozen nn.Conv2d"),
                                 (FROZEN_TORCH_SEPARATE_BIAS, "frozen nn.Conv2d with a separate bias add")):
        ratios = {}
        for case in dict.fromkeys(row["case"] for row in ours):
            ours_ms = min(row["median_ms"] for row in ours if row["case"] == case)
            torch_ms = min(row["median_ms"] for row in fwd_bwd
                           if row["case"] == case and (row["implementation"], row["weight"]) == torch_variant)
            ratios[case] = torch_ms / ours_ms
        if ratios:
            worst = min(ratios, key=ratios.get)
            targets.append(target_row(
                f"frozen fwd+bwd, faster layout of depthwise_conv2d vs faster layout of {label}, "
                f"worst case ({worst})",
                TARGET_FROZEN_VS_BEST_TORCH, ratios[worst],
            ))
    for row in training:
        if row["depthwise"] == "FrozenCovDepthwiseConv2d":
            targets.append(target_row(
                f"ConvMixer step, FrozenCovDepthwiseConv2d vs trainable nn.Conv2d, {row['layout']}",
                TARGET_TRAINING_STEP, row["speedup_vs_trainable_same_layout"],
            ))
    return targets


def target_row(description, required, measured):
    return {"target": description, "required": required, "measured": measured, "met": measured >= required}


# ---------------------------------------------------------------------------------------------
# Output


def format_table(header, rows):
    """Return ``rows`` (lists of strings) under ``header`` as left-aligned fixed-width columns."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip()
             for line in [header] + rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def format_machine(machine):
    line = (f"machine: {machine['cpu']}, {machine['cpu_count']} CPUs, {machine['torch_threads']} torch "
            f"threads, torch {machine['torch']}, device {machine['device']}")
    if "gpu" in machine:
        line += f" ({machine['gpu']})"
    if machine["load_average_1min"] is not None:
        line += f", load average {machine['load_average_1min']:.1f}"
    return f"{line}, {machine['date']}"


def format_conv_table(rows):
    header = ["case", "batch", "C", "HxW", "k", "pass", "implementation", "layout", "weight", "median ms", "min ms",
              "vs nn NCHW trainable", "vs best frozen nn", "vs best frozen nn+bias"]
    body = [[r["case"], r["batch"], r["channels"], r["size"], r["kernel_size"], r["pass"], r["implementation"],
             r["layout"], r["weight"], f"{r['median_ms']:.2f}", f"{r['min_ms']:.2f}",
             f"{r['speedup_vs_nn_nchw_trainable']:.2f}x",
             f"{r['speedup_vs_best_nn_frozen']:.2f}x", f"{r['speedup_vs_best_nn_frozen_separate_bias']:.2f}x"]
            for r in rows]
    batches = dict.fromkeys((r["case"], r["batch"], r["reference_batch"]) for r in rows)
    note = "batch sizes: " + ", ".join(f"{case} {batch} (reference {reference})"
                                       for case, batch, reference in batches)
    return "\nconv\n" + format_table(header, body) + "\n" + note


def format_strategy_table(rows):
    header = ["op", "shape", "k", "padding", "dtype", "layout", "threads", "strategy"]
    body = [[r["op"], r["shape"], r["kernel_size"], ",".join(map(str, r["padding4"])), r["dtype"], r["layout"],
             r["threads"], r["strategy"]] for r in rows]
    return "\nCPU route strategies chosen by the tuner\n" + format_table(header, body)


def format_sampling_table(rows):
    header = ["case", "method", "device", "B", "n", "k", "median ms", "filters/s", "speed-up", "note"]
    body = []
    for r in rows:
        median = "-" if r.get("median_s") is None else f"{r['median_s'] * 1e3:.2f}"
        rate = "-" if r.get("filters_per_s") is None else f"{r['filters_per_s']:.3g}"
        speedup = "-" if r.get("speedup") is None else f"{r['speedup']:.2f}x"
        body.append([r.get("case", ""), r.get("method", ""), r.get("device", ""), r.get("B", ""), r.get("n", ""),
                     r.get("kernel_size", ""), median, rate, speedup, r.get("note", "")])
    return "\nsampling\n" + format_table(header, body)


def format_training_table(rows):
    header = ["model", "batch", "depthwise", "layout", "median ms", "min ms", "images/s", "vs trainable, same layout"]
    body = [[r["model"], r["batch"], r["depthwise"], r["layout"], f"{r['median_ms']:.1f}", f"{r['min_ms']:.1f}",
             f"{r['images_per_s']:.0f}", f"{r['speedup_vs_trainable_same_layout']:.2f}x"] for r in rows]
    return "\ntraining step\n" + format_table(header, body)


def format_targets(targets):
    if not targets:
        return ""
    header = ["target", "required", "measured", "met"]
    body = [[t["target"], f"{t['required']:.1f}x", f"{t['measured']:.2f}x", "yes" if t["met"] else "no"]
            for t in targets]
    return "\ntargets\n" + format_table(header, body)


def plot_conv(rows, path):
    """Draw the forward + backward speed-ups over ``nn.Conv2d`` NCHW trainable to a PNG bar chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["pass"] == "forward+backward"]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    series = list(dict.fromkeys((r["implementation"], r["layout"], r["weight"]) for r in rows))
    speedups = {(r["case"], r["implementation"], r["layout"], r["weight"]): r["speedup_vs_nn_nchw_trainable"]
                for r in rows}
    width = 0.8 / len(series)
    colors = plt.get_cmap("tab20").colors
    figure, axes = plt.subplots(figsize=(max(8.0, 1.4 * len(cases)), 6.5))
    for index, (implementation, layout, weight_kind) in enumerate(series):
        positions = [i + (index - (len(series) - 1) / 2) * width for i in range(len(cases))]
        values = [speedups.get((case, implementation, layout, weight_kind), float("nan")) for case in cases]
        axes.bar(positions, values, width, color=colors[index % len(colors)],
                 label=f"{implementation} {layout} {weight_kind}")
    axes.axhline(1.0, color="black", linewidth=0.8)
    axes.set_yscale("log")
    axes.set_xticks(range(len(cases)))
    axes.set_xticklabels(cases, rotation=30, ha="right")
    axes.set_ylabel("speed-up over nn.Conv2d NCHW trainable")
    axes.set_title("depthwise convolution, forward + backward")
    axes.legend(fontsize="small", ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.32))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
