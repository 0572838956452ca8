"""Tests of the initialization study: the closed-form fit, the run cache and the report.

The cache tests run a micro study on 200 real Fashion-MNIST images and are skipped
when the dataset is not installed. The other tests need no data.
"""

import argparse
import dataclasses
import json
import shutil

import pytest
import torch

from convcov_fast import covariance, data, sampling, study, train

MICRO = study.StudySettings(
    dim=8, depth=2, epochs=1, train_subset=100, val_size=50, test_subset=50,
    seeds=(0,), kernel_sizes=(3,), grid_sigma_first=(0.5,), grid_sigma_last=(1.5,),
    grid_constant=(0.0,), source_dim=16, source_depth=3, source_kernel_size=5, patch_size=4,
    batch_size=50,
)


def micro_runs():
    """Return the number of training runs of a full ``MICRO`` study, source model included."""
    grid = len(MICRO.grid()) * len(MICRO.kernel_sizes) * len(MICRO.grid_seeds)
    arms = len(study.INITS) * len(study.DEPTHWISE_KINDS) * len(MICRO.kernel_sizes) * len(MICRO.seeds)
    return 1 + grid + arms


class CountingTrain:
    """``train.train`` that counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, config, **kwargs):
        self.calls += 1
        return train.train(config, **kwargs)


def fail_if_trained(config, **kwargs):
    raise AssertionError(f"a cached study trained a model: {config}")


@pytest.fixture(scope="module")
def micro_dataset():
    try:
        return data.load_fashion_mnist(None, train_subset=MICRO.train_subset,
                                       val_size=MICRO.val_size, test_subset=MICRO.test_subset,
                                       seed=MICRO.data_seed)
    except data.DatasetNotFoundError as error:
        pytest.skip(f"Fashion-MNIST is not installed: {error}")


@pytest.fixture(scope="module")
def micro_study(tmp_path_factory, micro_dataset):
    """Run the micro study once; return (output folder, results, calls of train)."""
    output = tmp_path_factory.mktemp("micro_study")
    counting = CountingTrain()
    runner = study.Study(MICRO, output, dataset=micro_dataset, train_fn=counting, progress=False,
                         log=lambda line: None)
    results = runner.execute()
    return output, results, counting.calls


def copy_study(micro_study, tmp_path):
    output = tmp_path / "study"
    shutil.copytree(micro_study[0], output)
    return output


# -- gaussian with a constant component -----------------------------------------------------


@pytest.mark.parametrize("sigma,constant", [(0.2, 0.0), (0.2, 0.5), (1.0, 0.3), (3.0, 0.9)])
def test_gaussian_constant_is_psd(sigma, constant):
    cov = covariance.gaussian(7, sigma, constant=constant)
    eigenvalues = torch.linalg.eigvalsh(cov)
    assert float(eigenvalues.min()) >= -1e-12 * float(eigenvalues.max())
    assert torch.equal(cov, cov.T)


@pytest.mark.parametrize("constant", [0.0, 0.25, 0.75])
def test_gaussian_constant_keeps_mean_diagonal(constant):
    cov = covariance.gaussian((5, 7), 1.3, variance=0.02, constant=constant)
    assert float(cov.diagonal().mean()) == pytest.approx(0.02, rel=1e-12)
    assert float(cov.diagonal().min()) == pytest.approx(0.02, rel=1e-12)


def test_gaussian_constant_off_diagonal():
    # Far taps of a narrow Gaussian keep only the constant part: v * c.
    cov = covariance.gaussian(9, 0.5, variance=2.0, constant=0.4)
    assert float(cov[0, 80]) == pytest.approx(2.0 * 0.4, rel=1e-9)


def test_gaussian_small_sigma_factorizes():
    cov = covariance.gaussian(9, 0.2)
    variance = covariance.default_variance(9)
    # Neighbouring taps correlate by exp(-1 / (2 * 0.2^2)) = exp(-12.5), about 3.7e-6.
    assert torch.allclose(cov, variance * torch.eye(81, dtype=torch.float64), atol=4e-6 * variance)
    factor = sampling.factorize(cov)[0]
    assert torch.allclose(factor @ factor.T, cov, rtol=0, atol=1e-12 * variance)


@pytest.mark.parametrize("constant", [-0.1, 1.0, 1.5, float("nan")])
def test_gaussian_rejects_bad_constant(constant):
    with pytest.raises(ValueError, match="constant"):
        covariance.gaussian(5, 1.0, constant=constant)


def test_gaussian_rejects_nonpositive_sigma():
    with pytest.raises(ValueError, match="sigma"):
        covariance.gaussian(5, 0.0)


def test_closed_form_passes_constant():
    bank = covariance.closed_form(3, 5, sigma_first=0.5, sigma_last=2.0, constant=0.3)
    expected = covariance.gaussian(5, 1.25, constant=0.3)
    assert torch.allclose(bank[1], expected, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="constant"):
        covariance.closed_form(3, 5, constant=1.0)


# -- fitting ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel_size,sigma,constant", [(7, 0.8, 0.2), (9, 2.5, 0.0), (5, 1.5, 0.6)])
def test_fit_recovers_known_parameters(kernel_size, sigma, constant):
    cov = covariance.gaussian(kernel_size, sigma, variance=0.37, constant=constant)
    fit = study.fit_gaussian(cov, kernel_size)
    assert fit["sigma"] == pytest.approx(sigma, rel=1e-4)
    assert fit["constant"] == pytest.approx(constant, abs=1e-4)
    assert fit["variance"] == pytest.approx(0.37, rel=1e-12)
    assert fit["relative_error"] < 1e-4


def test_fit_bank_fits_each_layer():
    bank = covariance.closed_form(4, 7, sigma_first=0.6, sigma_last=3.0, constant=0.1)
    fits = study.fit_bank(bank, 7)
    sigmas = covariance.depth_sigmas(4, 0.6, 3.0)
    assert [round(fit["sigma"], 3) for fit in fits] == [round(s, 3) for s in sigmas]
    assert all(abs(fit["constant"] - 0.1) < 1e-4 for fit in fits)
    rebuilt = study.fitted_bank(fits, 7)
    assert torch.allclose(rebuilt, bank, rtol=1e-3, atol=1e-6)


def test_fit_of_noise_reports_large_error():
    generator = torch.Generator().manual_seed(0)
    factor = torch.randn(25, 25, generator=generator, dtype=torch.float64)
    fit = study.fit_gaussian(factor @ factor.T, 5)
    assert fit["relative_error"] > 0.3


def test_noise_floor_shrinks_with_samples():
    fit = {"sigma": 1.2, "constant": 0.1}
    few = study.sampling_noise_floor(fit, 5, 50, torch.Generator().manual_seed(0))
    many = study.sampling_noise_floor(fit, 5, 5000, torch.Generator().manual_seed(0))
    assert many < few
    # The relative error of an empirical covariance scales about as sqrt(d / n) = 0.07 here.
    assert many < 0.2


def test_transfer_sets_default_variance():
    source = covariance.closed_form(3, 7, sigma_first=1.0, sigma_last=2.0, variance=5.0)
    bank = study.transfer(source, 7, 9, 4)
    assert bank.shape == (4, 81, 81)
    means = bank.diagonal(dim1=-2, dim2=-1).mean(-1)
    assert torch.allclose(means, torch.full((4,), covariance.default_variance(9), dtype=torch.float64))


# -- settings --------------------------------------------------------------------------------


def test_settings_reject_source_like_target():
    with pytest.raises(ValueError, match="source_kernel_size"):
        dataclasses.replace(MICRO, source_kernel_size=3)
    with pytest.raises(ValueError, match="source_depth"):
        dataclasses.replace(MICRO, source_depth=MICRO.depth)


def test_grid_contains_eyeballed_point_once():
    grid = MICRO.grid()
    assert grid.count(study.EYEBALLED_POINT) == 1
    assert len(grid) == 2
    with_it = dataclasses.replace(MICRO, grid_sigma_first=(0.75,), grid_sigma_last=(2.5,))
    assert with_it.grid() == [study.EYEBALLED_POINT]


def test_cli_options_override_mode():
    parser = argparse.ArgumentParser()
    study.add_arguments(parser)
    args = parser.parse_args(["--quick", "--seeds", "3", "4", "--kernel-sizes", "9",
                              "--epochs", "2", "--train-subset", "500"])
    settings = study.settings_from_args(args)
    assert settings.seeds == (3, 4)
    assert settings.kernel_sizes == (9,)
    assert settings.epochs == 2
    assert settings.train_subset == 500
    assert settings.dim == study.MODES["quick"].dim
    with pytest.raises(SystemExit):
        parser.parse_args(["--quick", "--full"])


# -- micro study on real data ----------------------------------------------------------------


def test_micro_study_trains_every_run(micro_study):
    _, results, calls = micro_study
    assert calls == micro_runs()
    assert results["runs_trained"] == micro_runs()


def test_micro_study_table_has_every_arm(micro_study):
    output, results, _ = micro_study
    arms = {(row["init"], row["depthwise"], row["kernel_size"]) for row in results["table"]}
    expected = {(init, kind, k) for init in study.INITS for kind in study.DEPTHWISE_KINDS
                for k in MICRO.kernel_sizes}
    assert arms == expected
    assert len(results["table"]) == len(expected)
    markdown = (output / study.RESULTS_MARKDOWN).read_text()
    for init, kind, kernel_size in expected:
        assert f"| {kernel_size} | {init} | {kind} |" in markdown
    stored = json.loads((output / study.RESULTS_JSON).read_text())
    assert len(stored["table"]) == len(expected)


def test_micro_study_writes_figures(micro_study):
    output = micro_study[0]
    names = [study.CURVES_FILE, study.SOURCE_FIGURE] + [
        f"{prefix}_k{k}.png" for prefix in ("banks", "filters") for k in MICRO.kernel_sizes]
    for name in names:
        assert (output / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_micro_study_selects_best_grid_point(micro_study):
    _, results, _ = micro_study
    best = max(point["val_accuracy_mean"] for point in results["grid"])
    selected = results["selected"]
    chosen = [point for point in results["grid"]
              if (point["sigma_first"], point["sigma_last"], point["constant"])
              == (selected["sigma_first"], selected["sigma_last"], selected["constant"])]
    assert len(chosen) == 1
    assert chosen[0]["val_accuracy_mean"] == best


def test_rerun_trains_nothing(micro_study, micro_dataset, tmp_path):
    output = copy_study(micro_study, tmp_path)
    runner = study.Study(MICRO, output, dataset=micro_dataset, train_fn=fail_if_trained,
                         progress=False, log=lambda line: None)
    results = runner.execute(report=False)
    assert runner.trained == 0
    assert results["table"] == micro_study[1]["table"]


def test_rerun_trains_only_missing_arm(micro_study, micro_dataset, tmp_path):
    output = copy_study(micro_study, tmp_path)
    key = study.run_key("fitted", "frozen", MICRO.kernel_sizes[0], MICRO.seeds[0])
    (output / study.RUNS_DIR / f"{key}.json").unlink()
    counting = CountingTrain()
    runner = study.Study(MICRO, output, dataset=micro_dataset, train_fn=counting, progress=False,
                         log=lambda line: None)
    runner.execute(report=False)
    assert counting.calls == 1
    assert (output / study.RUNS_DIR / f"{key}.json").exists()


def test_corrupt_run_file_names_file(micro_study, micro_dataset, tmp_path):
    output = copy_study(micro_study, tmp_path)
    key = study.run_key("learned", "trainable", MICRO.kernel_sizes[0], MICRO.seeds[0])
    path = output / study.RUNS_DIR / f"{key}.json"
    path.write_text('{"key": "learned", "test_acc')
    runner = study.Study(MICRO, output, dataset=micro_dataset, train_fn=fail_if_trained,
                         progress=False, log=lambda line: None)
    with pytest.raises(study.CacheError, match="corrupt") as error:
        runner.execute()
    assert str(path) in str(error.value)


def test_run_file_missing_fields_names_file(micro_study, micro_dataset, tmp_path):
    output = copy_study(micro_study, tmp_path)
    key = study.run_key("default", "frozen", MICRO.kernel_sizes[0], MICRO.seeds[0])
    path = output / study.RUNS_DIR / f"{key}.json"
    path.write_text(json.dumps({"key": key}))
    runner = study.Study(MICRO, output, dataset=micro_dataset, train_fn=fail_if_trained,
                         progress=False, log=lambda line: None)
    with pytest.raises(study.CacheError, match="lacks") as error:
        runner.execute()
    assert str(path) in str(error.value)


def test_corrupt_bank_file_names_file(micro_study, micro_dataset, tmp_path):
    output = copy_study(micro_study, tmp_path)
    path = output / study.SOURCE_BANK_FILE
    path.write_bytes(b"not a torch.save archive")
    runner = study.Study(MICRO, output, dataset=micro_dataset, train_fn=fail_if_trained,
                         progress=False, log=lambda line: None)
    with pytest.raises(ValueError, match="corrupt") as error:
        runner.execute()
    assert str(path) in str(error.value)


def test_other_settings_are_rejected(micro_study, micro_dataset, tmp_path):
    output = copy_study(micro_study, tmp_path)
    other = dataclasses.replace(MICRO, epochs=2)
    runner = study.Study(other, output, dataset=micro_dataset, train_fn=fail_if_trained,
                         progress=False, log=lambda line: None)
    with pytest.raises(study.CacheError, match="epochs"):
        runner.execute()
