"""The sampling phase of ``gpu_check.py``: the Triton sampler on one GPU.

It checks the kernel against L @ z in float64 on NaN-poisoned outputs. It compares the GPU's
samples with those of the Triton interpreter for the same seed, run in a subprocess because the
interpreter is chosen when triton is imported. It counts the host synchronizations of one
``sample`` call.
It then times, as medians of ``measure``:

- the sampling step alone (factors given) at n = 1e6, d = 81, against the device's write
  bandwidth, measured with ``fill_``;
- ``sample`` with the Triton backend against ``MultivariateNormal(...).sample`` at n = 1e6,
  d = 81, factorization included;
- one ``sample`` call for a bank of 32 covariances (d = 81, 1536 filters each) against 32
  ``MultivariateNormal`` calls;
- IEEE against TF32 products, and the bias TF32 leaves in the sample covariance;
- the batched factorization, so that the case for a Triton factorization can be judged.

With ``dry_run`` the same code runs on the CPU under the interpreter with small sizes, and the
speed targets are not checked, since interpreter timings mean nothing.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from convcov_fast import reference, sampling
from convcov_fast.kernels import sampling as sampling_kernels

# Targets of the GPU run.
WRITE_BANDWIDTH_TARGET = 0.70
MULTIVARIATE_NORMAL_TARGET = 2.5
BANK_TARGET = 10.0

SAMPLE_FILTERS = 1_000_000
BANK_LAYERS = 32
BANK_FILTERS = 1536
# (B, n, kh, kw) of the correctness cases: odd, even and rectangular kernels up to 31 x 31, and
# filter counts that are no multiple of any tile.
CHECK_CASES = [(1, 1000, 3, 3), (3, 777, 9, 9), (2, 301, 31, 31), (4, 129, 3, 5), (2, 65, 4, 4)]
DRY_RUN_CHECK_CASES = [(1, 70, 3, 3), (2, 33, 3, 5)]
# (B, d) of the factorization timings.
FACTORIZE_CASES = [(32, 9), (4096, 9), (32, 81), (32, 961)]
DRY_RUN_FACTORIZE_CASES = [(4, 9)]
INTERPRETER_CASE = (2, 64, 81, 123)  # B, n, d, seed

_INTERPRETER_SCRIPT = """
import sys, torch
from convcov_fast.kernels import sampling
batch, n, d, seed = (int(value) for value in sys.argv[1:5])
factors = torch.load(sys.argv[5])
torch.save(sampling.sample_from_factors(factors, n, seed), sys.argv[6])
"""


def random_covariances(batch, d, seed):
    """Return (B, d, d) float64 SPD matrices A A^T / d + 0.1 I."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, d, d, dtype=torch.float64, generator=generator)
    return a @ a.mT / d + 0.1 * torch.eye(d, dtype=torch.float64)


def float32_factors(batch, d, seed, device):
    factors = torch.linalg.cholesky(random_covariances(batch, d, seed))
    return factors.to(device, torch.float32).contiguous()


def check_kernel(report, device, dry_run):
    for batch, n, kh, kw in DRY_RUN_CHECK_CASES if dry_run else CHECK_CASES:
        d = kh * kw
        case = f"sampling B={batch} n={n} {kh}x{kw}"
        factors = float32_factors(batch, d, seed=d, device=device)
        out = torch.full((batch, n, d), float("nan"), device=device)
        sampling_kernels.sample_from_factors(factors, n, 7, out=out)
        normals = sampling_kernels.standard_normals(batch, n, d, 7, device=device)
        expected = reference.sample_from_factors(factors.double(), normals.double())
        report.check(case, "L z", out, expected, torch.float32, d)


def interpreter_agreement(device):
    """Return (samples on ``device``, the interpreter's samples) for the same factors and seed."""
    batch, n, d, seed = INTERPRETER_CASE
    factors = float32_factors(batch, d, seed=3, device="cpu")
    with tempfile.TemporaryDirectory() as folder:
        factors_path, samples_path = Path(folder) / "factors.pt", Path(folder) / "samples.pt"
        torch.save(factors, factors_path)
        root = str(Path(__file__).resolve().parents[1])
        path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
        environment = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=path)
        arguments = [str(value) for value in (batch, n, d, seed, factors_path, samples_path)]
        subprocess.run(
            [sys.executable, "-c", _INTERPRETER_SCRIPT, *arguments], env=environment, check=True
        )
        interpreted = torch.load(samples_path)
    on_device = sampling_kernels.sample_from_factors(factors.to(device), n, seed).cpu()
    return on_device, interpreted


def count_synchronizations(device):
    """Return how many synchronizing calls one ``sample`` of a 32-matrix bank makes on CUDA."""
    bank = random_covariances(BANK_LAYERS, 81, seed=5).to(device)
    generator = torch.Generator(device).manual_seed(0)
    sampling.sample(bank, BANK_FILTERS, generator=generator)  # compile and autotune first
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            sampling.sample(bank, BANK_FILTERS, generator=generator)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    messages = [str(item.message) for item in caught if "synchroniz" in str(item.message)]
    return len(messages), messages


def multivariate_normal(covs32, n):
    mean = torch.zeros(covs32.shape[:-1], device=covs32.device)
    return torch.distributions.MultivariateNormal(mean, covariance_matrix=covs32).sample((n,))


def measure_write_bandwidth(device, measure, dry_run):
    """Return the device write bandwidth in GB/s, from ``fill_`` of a large float32 buffer."""
    target = torch.empty(2**20 if dry_run else 2**28, device=device)
    milliseconds = measure(lambda: target.fill_(1.0))
    return target.numel() * 4 / (milliseconds * 1e-3) / 1e9


def tf32_covariance_bias(factors, n):
    """Return mean(diag(cov_tf32) / diag(cov_ieee)) - 1 for samples drawn with the same noise."""
    ieee = sampling_kernels.sample_from_factors(factors, n, 11, input_precision="ieee")
    tf32 = sampling_kernels.sample_from_factors(factors, n, 11, input_precision="tf32")
    ratio = tf32.double().square().mean(dim=1) / ieee.double().square().mean(dim=1)
    return float(ratio.mean()) - 1.0


def run_sampling(report, device, measure, dry_run, deadline):
    """Run the sampling checks and timings, and return their results for the JSON report."""
    results = {}
    check_kernel(report, device, dry_run)
    on_device, interpreted = interpreter_agreement(device)
    report.check("sampling interpreter agreement", "samples", on_device, interpreted.double(),
                 torch.float32, INTERPRETER_CASE[2])
    if device.type == "cuda":
        count, messages = count_synchronizations(device)
        results["sample_synchronizations"] = count
        results["sample_synchronization_messages"] = messages
        print(f"sampling: one sample() call of a 32-matrix bank synchronized {count} time(s)",
              flush=True)
        # One flag is expected: it covers the validation and the factorization of every matrix.
        report.require("sample of a 32-matrix bank", "host synchronizations", count <= 1,
                       "; ".join(messages))

    n = 4096 if dry_run else SAMPLE_FILTERS
    bank_layers, bank_filters = (4, 64) if dry_run else (BANK_LAYERS, BANK_FILTERS)
    write_gbps = measure_write_bandwidth(device, measure, dry_run)
    results["write_bandwidth_gbps"] = write_gbps

    timings = {}
    cov = random_covariances(1, 81, seed=8).to(device)
    factors = sampling.factorize(cov).to(torch.float32).contiguous()
    for precision in ("ieee", "tf32"):
        if time.monotonic() > deadline:
            report.skip(f"sampling step {precision}")
            continue
        milliseconds = measure(lambda: sampling_kernels.sample_from_factors(
            factors, n, 1, input_precision=precision))
        timings[f"step_{precision}_ms"] = milliseconds
        timings[f"step_{precision}_gbps"] = n * 81 * 4 / (milliseconds * 1e-3) / 1e9
    if "step_ieee_gbps" in timings:
        timings["step_ieee_write_fraction"] = timings["step_ieee_gbps"] / write_gbps
        if not dry_run:
            report.require(f"sampling step n={n} d=81", "write bandwidth target",
                           timings["step_ieee_write_fraction"] >= WRITE_BANDWIDTH_TARGET,
                           f"{timings['step_ieee_write_fraction']:.1%} of {write_gbps:.0f} GB/s")

    if time.monotonic() <= deadline:
        generator = torch.Generator(device).manual_seed(0)
        ours = measure(lambda: sampling.sample(cov[0], n, generator=generator, backend="triton"))
        theirs = measure(lambda: multivariate_normal(cov[0].float(), n))
        timings.update(sample_ms=ours, multivariate_normal_ms=theirs,
                       sample_speedup=theirs / ours)
        if not dry_run:
            report.require(f"sample n={n} d=81", "MultivariateNormal target",
                           theirs / ours >= MULTIVARIATE_NORMAL_TARGET, f"x{theirs / ours:.2f}")

        bank = random_covariances(bank_layers, 81, seed=9).to(device)
        bank32 = bank.float()
        ours = measure(lambda: sampling.sample(bank, bank_filters, generator=generator,
                                               backend="triton"))
        theirs = measure(lambda: [multivariate_normal(matrix, bank_filters) for matrix in bank32])
        timings.update(bank_ms=ours, bank_multivariate_normal_ms=theirs, bank_speedup=theirs / ours)
        if not dry_run:
            report.require(f"bank of {bank_layers}, n={bank_filters}, d=81", "one-call target",
                           theirs / ours >= BANK_TARGET, f"x{theirs / ours:.2f}")
    else:
        report.skip("sampling against MultivariateNormal")

    if time.monotonic() <= deadline:
        timings["tf32_covariance_bias"] = tf32_covariance_bias(factors, n)
        for batch, d in DRY_RUN_FACTORIZE_CASES if dry_run else FACTORIZE_CASES:
            covs = random_covariances(batch, d, seed=d).to(device)
            timings[f"factorize_B{batch}_d{d}_ms"] = measure(lambda: sampling.factorize(covs))
    results.update(timings)
    print("sampling: " + json.dumps(results, default=str), flush=True)
    return results
