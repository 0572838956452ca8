"""Tests of how the sampling benchmark plans its runs: memory and time limits."""

import torch

from convcov_fast import bench_sampling

CPU = torch.device("cpu")
GB = 1e9


def budget(monkeypatch, gigabytes):
    monkeypatch.setattr(bench_sampling, "memory_budget", lambda device: gigabytes * GB)


def test_multivariate_normal_bank_is_skipped(monkeypatch):
    # 32 x 1e5 filters of 81 values are a 1.04 GB output. The other methods' 2.5 to 3.5 times that
    # fit in 12 GB, but MultivariateNormal materializes an (n, B, d, d) product of 84 GB.
    budget(monkeypatch, 12)
    case = (32, 100_000, 81)
    repeats, _, note = bench_sampling.plan_repeats(
        bench_sampling.MULTIVARIATE_NORMAL, CPU, *case, 5, None
    )
    assert repeats == 0
    assert "skipped: needs about 88.1 GB" in note
    for name in (bench_sampling.OURS_TORCH, bench_sampling.CHOLESKY_RANDN, bench_sampling.NUMPY):
        repeats, _, note = bench_sampling.plan_repeats(name, CPU, *case, 5, None)
        assert (repeats, note) == (5, "")


def test_multivariate_normal_single_matrix(monkeypatch):
    # 1e6 filters of 961 values are a 3.84 GB output: MultivariateNormal's 3.5 times that exceeds
    # 12 GB, convcov_fast.sample's 2.5 times does not.
    budget(monkeypatch, 12)
    output = 1_000_000 * 961 * 4
    assert bench_sampling.memory_needed(bench_sampling.MULTIVARIATE_NORMAL, 1, 1_000_000, 961) == (
        bench_sampling.MEMORY_FACTORS[bench_sampling.MULTIVARIATE_NORMAL] * output
    )
    repeats, _, note = bench_sampling.plan_repeats(
        bench_sampling.MULTIVARIATE_NORMAL, CPU, 1, 1_000_000, 961, 5, None
    )
    assert repeats == 0
    assert "13.5 GB" in note
    repeats, _, _ = bench_sampling.plan_repeats(bench_sampling.OURS_TORCH, CPU, 1, 1_000_000, 961, 5, None)
    assert repeats == 5
    repeats, _, _ = bench_sampling.plan_repeats(
        bench_sampling.MULTIVARIATE_NORMAL, CPU, 1, 100_000, 961, 5, None
    )
    assert repeats == 5


def test_predicted_time_limits_repeats(monkeypatch):
    budget(monkeypatch, 12)
    name = bench_sampling.OURS_TORCH
    work = bench_sampling.work(1, 1000, 81)
    # 30 s a run on the CPU, without a warm-up: 4 repeats fit the 120 s a case may take.
    repeats, warmup, note = bench_sampling.plan_repeats(name, CPU, 1, 1000, 81, 5, 30.0 / work)
    assert (repeats, warmup) == (4, False)
    assert "time limit" in note
    # 0.9 s a run warms up first, and 5 repeats fit.
    repeats, warmup, note = bench_sampling.plan_repeats(name, CPU, 1, 1000, 81, 5, 0.9 / work)
    assert (repeats, warmup, note) == (5, True, "")
    repeats, _, note = bench_sampling.plan_repeats(name, CPU, 1, 1000, 81, 5, 60.01 / work)
    assert repeats == 0
    assert "predicted to take 60.01 s, over the 60 s limit" in note


def test_warm_up_within_case_limit(monkeypatch):
    # CUDA runs always warm up: at 30 s a run, the warm-up and 3 repeats fill the 120 s.
    budget(monkeypatch, 12)
    work = bench_sampling.work(1, 1000, 81)
    repeats, warmup, _ = bench_sampling.plan_repeats(
        bench_sampling.OURS_TORCH, torch.device("cuda"), 1, 1000, 81, 5, 30.0 / work
    )
    assert (repeats, warmup) == (3, True)
