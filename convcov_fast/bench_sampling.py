"""Timings of filter sampling against the usual PyTorch and NumPy routes.

``sampling_table`` produces the rows of the sampling table of ``convcov-fast bench``. Every
method turns a (B, d, d) bank of covariances into n filters per covariance, factorization
included:

- ``convcov_fast.sample`` through its public API, with the torch backend, and on CUDA also with
  the Triton backend;
- ``torch.distributions.MultivariateNormal(...).sample``, batched over the bank;
- ``torch.linalg.cholesky`` + ``torch.randn`` + a batched matmul;
- ``numpy.random.default_rng().multivariate_normal``, one call per covariance, on the CPU.

Each time is the median of a few ``time.perf_counter`` measurements, with the device
synchronized inside the timed region, after one untimed warm-up call (full mode drops the
warm-up of CPU runs predicted to take over MAX_WARMUP_SECONDS). The "bank" case samples 32
layer covariances of size 9 x 9 (d = 81), 1536 filters each, in one ``convcov_fast.sample`` call
and in 32 ``MultivariateNormal`` calls, and reports the speed-up of the one call.
"""

import math
import os
import statistics
import time

import numpy as np
import torch

from .sampling import sample

FILTER_COUNTS = (1_000, 100_000, 1_000_000)
# Square kernel sides, so d = 9, 49, 81, 169 and 961.
KERNEL_SIDES = (3, 7, 9, 13, 31)
BANK_SIZES = (1, 32)

# (B, n, kernel side) of the quick table: the small end of each axis. The bank case covers
# B = 32 with 9 x 9 kernels.
QUICK_CASES = (
    (1, 1_000, 3),
    (1, 100_000, 3),
    (1, 1_000, 9),
    (1, 100_000, 9),
    (32, 1_000, 3),
)

BANK_LAYERS = 32
BANK_KERNEL_SIDE = 9
BANK_FILTERS = 1536

QUICK_REPEATS = 3
FULL_REPEATS = 5
# Full mode skips a run predicted to take longer than this, and cuts the repeats so that one
# method's case stays within MAX_CASE_SECONDS.
MAX_RUN_SECONDS = 60.0
MAX_CASE_SECONDS = 120.0
# A method is skipped when its predicted peak memory, ``memory_needed``, would exceed this
# fraction of the memory of its device.
MEMORY_FRACTION = 0.5
# On the CPU, full mode skips the warm-up call of a run predicted to take longer than this, because
# such a run has no compilation or cache effect worth a second call. CUDA runs always warm up, so
# that Triton compiles and autotunes outside the timed region.
MAX_WARMUP_SECONDS = 1.0
# Estimated cost of drawing one standard normal, in multiply-adds, for the work model
# B * n * d * (d + NORMAL_COST) that predicts run times from the previous case.
NORMAL_COST = 10

OURS_TORCH = "convcov_fast.sample (torch)"
OURS_TRITON = "convcov_fast.sample (triton)"
MULTIVARIATE_NORMAL = "MultivariateNormal.sample"
CHOLESKY_RANDN = "cholesky + randn + matmul"
NUMPY = "numpy multivariate_normal"

# Peak memory over output size per method, with a margin over the peaks measured on the CPU
# (torch 2.13, numpy 2). Those were up to 2.05 for convcov_fast.sample and cholesky + randn +
# matmul, 3.06 for MultivariateNormal with one matrix, and 3.11 for numpy's float64 output.
MEMORY_FACTORS = {
    OURS_TORCH: 2.5,
    OURS_TRITON: 2.5,
    CHOLESKY_RANDN: 2.5,
    MULTIVARIATE_NORMAL: 3.5,
    NUMPY: 3.5,
}


def random_covariances(batch, d, seed=0):
    """Return (B, d, d) float64 SPD matrices A A^T / d + 0.1 I, which every method can factor."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, d, d, dtype=torch.float64, generator=generator)
    return a @ a.mT / d + 0.1 * torch.eye(d, dtype=torch.float64)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def method_names(device):
    """Return the methods compared on ``device``, the convcov_fast ones first."""
    names = [OURS_TORCH]
    if device.type == "cuda":
        names.append(OURS_TRITON)
    return names + [MULTIVARIATE_NORMAL, CHOLESKY_RANDN, NUMPY]


def method_device(name, device):
    """Return the device a method runs on: NumPy always runs on the CPU."""
    return torch.device("cpu") if name == NUMPY else device


def build_sampler(name, covs, n, device):
    """Return a function that draws n filters per covariance of the float64 (B, d, d) ``covs``.

    The inputs are copied to the method's device and dtype here, outside the timed region. The
    returned function returns the samples, so that their size gives the bytes the method writes.
    """
    batch, d, _ = covs.shape
    side = math.isqrt(d)
    kernel_size = (side, d // side)
    if name in (OURS_TORCH, OURS_TRITON):
        backend = "torch" if name == OURS_TORCH else "triton"
        covs_device = covs.to(device)
        generator = torch.Generator(device).manual_seed(0)
        return lambda: sample(
            covs_device, n, generator=generator, kernel_size=kernel_size, backend=backend
        )
    if name == MULTIVARIATE_NORMAL:
        covs32 = covs.to(device=device, dtype=torch.float32)
        mean = torch.zeros(batch, d, device=device)
        return lambda: torch.distributions.MultivariateNormal(
            mean, covariance_matrix=covs32
        ).sample((n,))
    if name == CHOLESKY_RANDN:
        covs32 = covs.to(device=device, dtype=torch.float32)
        generator = torch.Generator(device).manual_seed(0)

        def cholesky_randn():
            factors = torch.linalg.cholesky(covs32)
            normals = torch.randn(batch, n, d, generator=generator, device=device)
            return normals @ factors.mT

        return cholesky_randn
    if name == NUMPY:
        covs_numpy = covs.numpy()
        rng = np.random.default_rng(0)
        mean = np.zeros(d)
        return lambda: [rng.multivariate_normal(mean, cov, size=n) for cov in covs_numpy]
    raise ValueError(f"unknown sampling method {name!r}; expected one of {method_names(device)}")


def output_itemsize(name):
    """Return the bytes per sample element a method writes: NumPy draws float64, others float32."""
    return 8 if name == NUMPY else 4


def output_bytes(output):
    """Return the bytes of a method's output, a tensor or a list of tensors or arrays."""
    if isinstance(output, list):
        return sum(part.nbytes for part in output)
    return output.nbytes


def output_numel(output):
    """Return the number of values in a method's output, a tensor or a list of tensors or arrays."""
    if isinstance(output, list):
        return sum(math.prod(part.shape) for part in output)
    return output.numel()


def memory_needed(name, batch, n, d):
    """Return the predicted peak bytes of one method's call, an estimate from ``MEMORY_FACTORS``.

    ``MultivariateNormal`` over a bank broadcasts its (B, d, d) factor against the (n, B, d)
    noise in one matmul, which materializes an (n, B, d, d) tensor: the peak was 83 times the
    output for B = 32 and d = 81 on the CPU, about d + 2 times, so a bank gets d + 4 times.
    """
    output = batch * n * d * output_itemsize(name)
    if name == MULTIVARIATE_NORMAL and batch > 1:
        return output * (d + 4)
    return output * MEMORY_FACTORS[name]


def memory_budget(device):
    """Return MEMORY_FRACTION of the device's memory in bytes: free CUDA memory, or all RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return MEMORY_FRACTION * free
    return MEMORY_FRACTION * os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def time_sampler(sampler, device, repeats, warmup=True):
    """Return (median seconds, bytes written) of ``repeats`` calls of ``sampler``."""
    if warmup:
        sampler()
    times = []
    written = 0
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        output = sampler()
        synchronize(device)
        times.append(time.perf_counter() - start)
        written = output_bytes(output)
        del output
    return statistics.median(times), written


def work(batch, n, d):
    return batch * n * d * (d + NORMAL_COST)


def table_row(case, name, device, batch, n, d):
    side = math.isqrt(d)
    return {
        "case": case,
        "method": name,
        "device": str(method_device(name, device)),
        "B": batch,
        "n": n,
        "kernel_size": f"{side}x{d // side}",
        "d": d,
        "repeats": 0,
        "median_s": None,
        "filters_per_s": None,
        "write_GBps": None,
        "speedup": None,
        "note": "",
    }


def fill_timing(row, seconds, written, repeats):
    row["repeats"] = repeats
    row["median_s"] = seconds
    row["filters_per_s"] = row["B"] * row["n"] / seconds
    row["write_GBps"] = written / seconds / 1e9


def plan_repeats(name, device, batch, n, d, default_repeats, seconds_per_work):
    """Return (repeats, warm-up flag, note) for one method's case in full mode.

    The time is predicted from the method's previous, smaller case with the work model
    B * n * d * (d + NORMAL_COST), so it is an estimate.
    """
    run_device = method_device(name, device)
    needed = memory_needed(name, batch, n, d)
    budget = memory_budget(run_device)
    if needed > budget:
        return 0, False, (
            f"skipped: needs about {needed / 1e9:.1f} GB, over {MEMORY_FRACTION:.0%} of the "
            f"{'free ' if run_device.type == 'cuda' else ''}memory of {run_device} "
            f"({budget / MEMORY_FRACTION / 1e9:.1f} GB)"
        )
    if seconds_per_work is None:
        return default_repeats, True, ""
    predicted = seconds_per_work * work(batch, n, d)
    if predicted > MAX_RUN_SECONDS:
        return 0, False, (
            f"skipped: one run is predicted to take {predicted:.2f} s, over the "
            f"{MAX_RUN_SECONDS:.0f} s limit per run"
        )
    warmup = run_device.type == "cuda" or predicted <= MAX_WARMUP_SECONDS
    # The warm-up call counts against the case's time too.
    runs = int(MAX_CASE_SECONDS // max(predicted, 1e-9)) - int(warmup)
    repeats = max(1, min(default_repeats, runs))
    note = "" if repeats == default_repeats else f"{repeats} repeats to stay within the time limit"
    return repeats, warmup, note


def table_cases(quick):
    """Return the (B, n, kernel side) cases, smallest work first."""
    if quick:
        cases = list(QUICK_CASES)
    else:
        cases = [
            (batch, n, side)
            for batch in BANK_SIZES
            for n in FILTER_COUNTS
            for side in KERNEL_SIDES
        ]
    return sorted(cases, key=lambda case: work(case[0], case[1], case[2] ** 2))


def build_per_layer_sampler(covs, n, device):
    """Return a function that samples each covariance with its own ``MultivariateNormal``."""
    d = covs.shape[-1]
    covs32 = covs.to(device=device, dtype=torch.float32)
    mean = torch.zeros(d, device=device)

    def per_layer_calls():
        return [
            torch.distributions.MultivariateNormal(mean, covariance_matrix=cov).sample((n,))
            for cov in covs32
        ]

    return per_layer_calls


def bank_covariances():
    """Return the float64 (BANK_LAYERS, 81, 81) covariances of the bank case."""
    return random_covariances(BANK_LAYERS, BANK_KERNEL_SIDE**2, seed=1)


def bank_rows(device, repeats):
    """Time one ``sample`` call for the 32 bank covariances against 32 MultivariateNormal calls."""
    d = BANK_KERNEL_SIDE**2
    covs = bank_covariances()
    per_layer_calls = build_per_layer_sampler(covs, BANK_FILTERS, device)

    loop_name = f"MultivariateNormal.sample, {BANK_LAYERS} calls"
    loop_row = table_row("bank", loop_name, device, BANK_LAYERS, BANK_FILTERS, d)
    loop_seconds, loop_written = time_sampler(per_layer_calls, device, repeats)
    fill_timing(loop_row, loop_seconds, loop_written, repeats)
    loop_row["speedup"] = 1.0

    rows = []
    ours = [OURS_TORCH] + ([OURS_TRITON] if device.type == "cuda" else [])
    for name in ours:
        row = table_row("bank", f"{name}, one call", device, BANK_LAYERS, BANK_FILTERS, d)
        sampler = build_sampler(name, covs, BANK_FILTERS, device)
        seconds, written = time_sampler(sampler, device, repeats)
        fill_timing(row, seconds, written, repeats)
        row["speedup"] = loop_seconds / seconds
        rows.append(row)
    return rows + [loop_row]


def sampling_table(*, quick: bool, device: torch.device) -> list[dict]:
    """Time every sampling method on every case and return one dict per (case, method).

    Args:
        quick: time the small subset ``QUICK_CASES`` with QUICK_REPEATS repeats, sized to take
            well under a minute on an otherwise idle 2-core CPU. Otherwise time all of
            ``FILTER_COUNTS`` x ``KERNEL_SIDES`` x ``BANK_SIZES``. Full mode skips a method's
            case that would exceed the memory or time limits, and that row has
            ``median_s=None`` and a note on why.
        device: where the torch methods and ``convcov_fast.sample`` run.

    Returns:
        Rows with the keys case ("table" or "bank"), method, device, B, n, kernel_size, d,
        repeats, median_s, filters_per_s, write_GBps, speedup and note. filters_per_s is
        B * n / median_s, and write_GBps is the bytes of the output / median_s / 1e9. In bank
        rows, speedup is the time of the 32 MultivariateNormal calls over this method's time.
        Other rows have speedup None.
    """
    device = torch.device(device)
    default_repeats = QUICK_REPEATS if quick else FULL_REPEATS
    rows = []
    seconds_per_work = {}
    for batch, n, side in table_cases(quick):
        d = side * side
        covs = random_covariances(batch, d)
        for name in method_names(device):
            row = table_row("table", name, device, batch, n, d)
            rows.append(row)
            if quick:
                repeats, warmup, note = default_repeats, True, ""
            else:
                repeats, warmup, note = plan_repeats(
                    name, device, batch, n, d, default_repeats, seconds_per_work.get(name)
                )
            row["note"] = note
            if repeats == 0:
                continue
            run_device = method_device(name, device)
            sampler = build_sampler(name, covs, n, run_device)
            seconds, written = time_sampler(sampler, run_device, repeats, warmup)
            fill_timing(row, seconds, written, repeats)
            seconds_per_work[name] = seconds / work(batch, n, d)
            del sampler
    return rows + bank_rows(device, default_repeats)
