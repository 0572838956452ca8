"""pytest-benchmark timings of filter sampling, one benchmark group per case.

Run with ``pytest benchmarks/test_bench_sampling.py``. The methods are those of
``convcov_fast.bench_sampling``: ``convcov_fast.sample`` (torch backend, and on CUDA the Triton
backend), batched ``MultivariateNormal``, Cholesky + randn + matmul, and NumPy's
``multivariate_normal`` on the CPU. Every timed call synchronizes the device before it returns.
"""

import pytest
import torch

from convcov_fast import bench_sampling

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
METHODS = bench_sampling.method_names(DEVICE)
ROUNDS = 5

# (B, n, kernel side): one covariance with many filters, and a bank with few filters each.
CASES = [
    pytest.param(
        batch,
        n,
        side,
        marks=pytest.mark.benchmark(group=f"sample B={batch} n={n} {side}x{side}"),
        id=f"B{batch}-n{n}-{side}x{side}",
    )
    for batch, n, side in [(1, 10_000, 9), (32, 1_000, 3)]
]

BANK_GROUP = (
    f"bank: {bench_sampling.BANK_LAYERS} covariances "
    f"{bench_sampling.BANK_KERNEL_SIDE}x{bench_sampling.BANK_KERNEL_SIDE}, "
    f"{bench_sampling.BANK_FILTERS} filters each"
)
# The one-call method of the bank case: the Triton backend where it runs natively.
BANK_OURS = bench_sampling.OURS_TRITON if DEVICE.type == "cuda" else bench_sampling.OURS_TORCH


def synchronized(sampler, device):
    def call():
        output = sampler()
        bench_sampling.synchronize(device)
        return output

    return call


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("batch", "n", "side"), CASES)
def test_sampling_speed(benchmark, batch, n, side, method):
    d = side * side
    device = bench_sampling.method_device(method, DEVICE)
    covs = bench_sampling.random_covariances(batch, d)
    sampler = bench_sampling.build_sampler(method, covs, n, device)

    output = benchmark.pedantic(
        synchronized(sampler, device), rounds=ROUNDS, iterations=1, warmup_rounds=1
    )

    assert bench_sampling.output_numel(output) == batch * n * d


@pytest.mark.benchmark(group=BANK_GROUP)
@pytest.mark.parametrize("method", ["one sample call", "32 MultivariateNormal calls"])
def test_bank_sampling_speed(benchmark, method):
    covs = bench_sampling.bank_covariances()
    n = bench_sampling.BANK_FILTERS
    if method == "one sample call":
        sampler = bench_sampling.build_sampler(BANK_OURS, covs, n, DEVICE)
    else:
        sampler = bench_sampling.build_per_layer_sampler(covs, n, DEVICE)

    output = benchmark.pedantic(
        synchronized(sampler, DEVICE), rounds=ROUNDS, iterations=1, warmup_rounds=1
    )

    assert bench_sampling.output_numel(output) == covs.shape[0] * n * covs.shape[-1]
