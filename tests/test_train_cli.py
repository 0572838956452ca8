"""The convcov-fast command line and the training loop behind it."""

import dataclasses
import json
import pathlib
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

import convcov_fast
from convcov_fast import cli, covariance, data, train

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
COMMANDS = ("train", "sample", "covariance", "plot", "bench", "study")

REAL_FILES = [data.DEFAULT_DATA_DIR / name for names in data.FILES.values() for name in names]
needs_real_data = pytest.mark.skipif(
    not all(path.is_file() for path in REAL_FILES),
    reason=f"Fashion-MNIST is not installed in {data.DEFAULT_DATA_DIR} "
           "(apt-get install dataset-fashion-mnist)",
)


def run_cli(capsys, *argv):
    """Run ``cli.main`` and return (exit status, stdout, stderr)."""
    status = cli.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


class CreatesMarkerWhenUnpickled:
    """An object whose unpickling runs code: it creates the file ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def checkpoint_with_filters(rng_seed, kernel_sizes, channels=12):
    """A state_dict with depthwise filters of the given sizes, plus non-depthwise tensors."""
    generator = torch.Generator().manual_seed(rng_seed)
    state_dict = {}
    for index, size in enumerate(kernel_sizes):
        depthwise = torch.randn(channels, 1, size, size, generator=generator)
        pointwise = torch.randn(channels, channels, 1, 1, generator=generator)
        state_dict[f"blocks.{index}.weight"] = depthwise
        state_dict[f"blocks.{index}.bias"] = torch.randn(channels, generator=generator)
        state_dict[f"pointwise.{index}.weight"] = pointwise
    state_dict["norm.running_mean"] = torch.zeros(channels, 1, 1, 1)
    state_dict["head.weight"] = torch.randn(10, channels, generator=generator)
    return state_dict


# --------------------------------------------------------------------------------------------
# help


@pytest.mark.parametrize("command", COMMANDS)
def test_subcommand_help(capsys, command):
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--help"])
    assert info.value.code == 0
    assert f"usage: convcov-fast {command}" in capsys.readouterr().out


def test_train_help_lists_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    for option in ("--init", "--frozen", "--trainable", "--dim", "--depth", "--kernel-size",
                   "--patch-size", "--epochs", "--train-subset", "--test-subset", "--batch-size",
                   "--lr", "--seed", "--device", "--data", "--output", "--no-progress"):
        assert option in text


def test_top_level_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    for command in COMMANDS:
        assert command in text


def test_python_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "convcov_fast", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage: convcov-fast" in result.stdout


# --------------------------------------------------------------------------------------------
# train


@needs_real_data
def test_tiny_train_run_writes_results(capsys, tmp_path):
    output = tmp_path / "run"
    status, out, err = run_cli(
        capsys, "train", "--train-subset", 256, "--test-subset", 200, "--epochs", 1,
        "--dim", 16, "--depth", 1, "--batch-size", 64, "--device", "cpu", "--no-progress",
        "--output", output,
    )
    assert status == 0, err
    last_line = out.strip().splitlines()[-1]
    assert last_line.startswith("test accuracy: ")
    printed = float(last_line.removeprefix("test accuracy: "))

    results = json.loads((output / train.RESULTS_FILE).read_text())
    assert f"{results['test_accuracy']:.4f}" == f"{printed:.4f}"
    assert results["train_images"] == 256
    assert results["test_images"] == 200
    assert results["config"]["dim"] == 16
    assert results["torch_version"] == torch.__version__
    assert results["device"] == "cpu"
    assert len(results["history"]) == 1
    epoch = results["history"][0]
    assert np.isfinite(epoch["train_loss"])
    assert epoch["images_per_second"] > 0
    assert epoch["test_accuracy"] == results["test_accuracy"]
    assert len(epoch["loss_trace"]) >= 2
    assert (output / train.CURVES_FILE).read_bytes()[:8] == PNG_SIGNATURE

    # The checkpoint names its depthwise layer, so covariance skips the 2x2 stem of one input
    # channel, whose weight has the depthwise shape (C, 1, kh, kw) too.
    bank_path = tmp_path / "bank.pt"
    status, _, err = run_cli(capsys, "covariance", output / train.CHECKPOINT_FILE, bank_path)
    assert status == 0, err
    bank, metadata = covariance.load_bank(bank_path)
    assert bank.shape == (1, 81, 81)
    assert metadata["kernel_size"] == (9, 9)
    assert metadata["layers"] == ["blocks.0.0.fn.0.weight"]
    checkpoint = torch.load(output / train.CHECKPOINT_FILE, weights_only=True)
    expected = covariance.empirical(checkpoint["model"]["blocks.0.0.fn.0.weight"])
    torch.testing.assert_close(bank[0], expected)

    # A frozen model keeps its initial filters, so the bank is that of the seeded initial model.
    config = train.TrainConfig(**results["config"])
    initial = train.build_model(config, generator=torch.Generator().manual_seed(config.seed))
    torch.testing.assert_close(bank[0], covariance.from_model(initial)[0])


@needs_real_data
def test_train_from_bank_file(capsys, tmp_path):
    bank_path = tmp_path / "bank.pt"
    covariance.save_bank(bank_path, covariance.closed_form(2, 5), kernel_size=5)
    status, out, err = run_cli(
        capsys, "train", "--init", bank_path, "--train-subset", 128, "--test-subset", 100,
        "--dim", 8, "--depth", 1, "--kernel-size", 5, "--batch-size", 64, "--device", "cpu",
        "--no-progress", "--output", tmp_path / "run",
    )
    assert status == 0, err
    assert out.strip().splitlines()[-1].startswith("test accuracy: ")


def test_train_missing_data_folder(capsys, tmp_path):
    missing = tmp_path / "no-data"
    status, out, err = run_cli(capsys, "train", "--data", missing, "--output", tmp_path / "run",
                               "--no-progress")
    assert status == 2
    assert err.startswith("error: ")
    assert len(err.strip().splitlines()) == 1
    assert str(missing) in err
    assert "apt-get update && apt-get install dataset-fashion-mnist" in err
    assert "--data DIR" in err
    assert "Traceback" not in err


def test_train_missing_bank_file(capsys, tmp_path):
    missing = tmp_path / "missing-bank.pt"
    status, _, err = run_cli(capsys, "train", "--init", missing, "--output", tmp_path / "run",
                             "--no-progress")
    assert status == 2
    assert err.startswith("error: init ")
    assert "no bank file exists" in err
    assert str(missing) in err
    assert not (tmp_path / "run").exists()


def test_train_misspelled_init(capsys, tmp_path):
    status, _, err = run_cli(capsys, "train", "--init", "closed-form", "--output", tmp_path / "run",
                             "--no-progress")
    assert status == 2
    assert "init 'closed-form' is not 'default' or 'closed_form'" in err


@pytest.mark.parametrize(
    "argv",
    [["--epochs", "0"], ["--dim", "-3"], ["--lr", "fast"], ["--device", "tpu"],
     ["--frozen", "--trainable"], ["--train-subset", "1.5"]],
)
def test_train_invalid_option_values(capsys, argv):
    with pytest.raises(SystemExit) as info:
        cli.main(["train", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err
    assert "Traceback" not in err


def test_train_config_rejects_invalid_fields():
    with pytest.raises(ValueError, match="depthwise must be one of"):
        train.TrainConfig(depthwise="learned")
    with pytest.raises(ValueError, match="lr must be > 0"):
        train.TrainConfig(lr=0.0)
    with pytest.raises(TypeError, match="epochs must be an int"):
        train.TrainConfig(epochs=1.0)
    with pytest.raises(ValueError, match="warmup_fraction must be in"):
        train.TrainConfig(warmup_fraction=1.0)


def random_dataset(seed, sizes=(64, 16, 32)):
    """A data.FashionMNIST of random images with random labels, with train, val, test sizes."""
    generator = torch.Generator().manual_seed(seed)
    splits = [data.Split(torch.randn(n, 1, 28, 28, generator=generator),
                         torch.randint(0, 10, (n,), generator=generator)) for n in sizes]
    return data.FashionMNIST(*splits)


def test_train_loop_is_seeded(tmp_path):
    dataset = random_dataset(0)
    config = train.TrainConfig(dim=8, depth=1, kernel_size=3, patch_size=4, epochs=2,
                               batch_size=16, schedule="cosine", augment=True, val_size=16,
                               device="cpu", output_dir=None)
    first = train.train(config, dataset=dataset, progress=False, log=lambda line: None)
    again = train.train(config, dataset=dataset, progress=False, log=lambda line: None)
    assert [entry["train_loss"] for entry in first["history"]] == [
        entry["train_loss"] for entry in again["history"]]
    assert first["test_accuracy"] == again["test_accuracy"]

    assert len(first["history"]) == 2
    assert first["train_images"] == 64
    assert first["val_images"] == 16
    assert first["test_images"] == 32
    assert first["val_accuracy"] == first["history"][-1]["val_accuracy"]
    positions = [point[0] for entry in first["history"] for point in entry["loss_trace"]]
    assert positions == sorted(positions)
    assert positions[-1] == pytest.approx(2.0)
    assert all(np.isfinite(entry["train_loss"]) for entry in first["history"])
    assert list(tmp_path.iterdir()) == []

    other = train.train(dataclasses.replace(config, seed=1), dataset=dataset, progress=False,
                        log=lambda line: None)
    assert other["history"][0]["train_loss"] != first["history"][0]["train_loss"]


@pytest.mark.parametrize("schedule", train.SCHEDULES)
def test_schedule_warms_up_and_decays(schedule):
    config = train.TrainConfig(schedule=schedule, lr=0.1, warmup_fraction=0.25)
    model = torch.nn.Linear(2, 2)
    optimizer, scheduler = train.build_optimizer(model, config, total_steps=20)
    rates = []
    for _ in range(20):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    peak = rates.index(max(rates))
    assert peak == 4
    assert max(rates) == pytest.approx(0.1)
    assert rates[:peak + 1] == sorted(rates[:peak + 1])
    assert rates[peak:] == sorted(rates[peak:], reverse=True)
    assert 0 < rates[-1] < 0.02


def test_augment_batch_crops_and_flips():
    images = torch.arange(4 * 28 * 28, dtype=torch.float32).reshape(4, 1, 28, 28)
    generator = torch.Generator().manual_seed(0)
    out = train.augment_batch(images, generator, padding=2)
    assert out.shape == images.shape
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2), value=data.BACKGROUND)
    for index in range(4):
        windows = [padded[index, 0, top : top + 28, left : left + 28]
                   for top in range(5) for left in range(5)]
        windows += [window.flip(-1) for window in windows]
        assert any(torch.equal(out[index, 0], window) for window in windows)


def test_evaluate_counts_correct_predictions():
    class FixedPredictor(torch.nn.Module):
        """Predict class 3 for every image, whatever it shows."""

        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward(self, x):
            logits = torch.zeros(x.shape[0], 10)
            logits[:, 3] = self.scale
            return logits

    labels = torch.tensor([3, 1, 3, 3, 0, 9, 3])
    images = torch.randn(7, 1, 28, 28)
    assert train.evaluate(FixedPredictor(), images, labels, batch_size=3) == pytest.approx(4 / 7)


# --------------------------------------------------------------------------------------------
# sample, covariance and plot


def test_sample_closed_form_pt(capsys, tmp_path):
    path = tmp_path / "filters.pt"
    status, _, err = run_cli(capsys, "sample", path, "-n", 4000, "--sigma", 1.5, "--kernel-size", 5,
                             "--variance", 0.5, "--seed", 3)
    assert status == 0, err
    filters = torch.load(path, weights_only=True)
    assert filters.shape == (4000, 5, 5)
    assert filters.dtype == torch.float32
    expected = covariance.gaussian(5, 1.5, variance=0.5)
    # 4,000 samples estimate each covariance entry with a standard error of at most
    # sqrt(2 / 4000) * 0.5 = 0.011, so atol is over 5 standard errors.
    torch.testing.assert_close(covariance.empirical(filters), expected, atol=0.06, rtol=0)

    again = tmp_path / "again.pt"
    run_cli(capsys, "sample", again, "-n", 4000, "--sigma", 1.5, "--kernel-size", 5,
            "--variance", 0.5, "--seed", 3)
    assert torch.equal(torch.load(again, weights_only=True), filters)


def test_sample_closed_form_bank_npy(capsys, tmp_path):
    path = tmp_path / "filters.npy"
    status, _, err = run_cli(capsys, "sample", path, "-n", 7, "--depth", 3, "--kernel-size", 5)
    assert status == 0, err
    filters = np.load(path)
    assert filters.shape == (3, 7, 5, 5)
    assert np.isfinite(filters).all()
    assert np.abs(filters).max() > 0


def test_covariance_sample_plot_round_trip(capsys, tmp_path):
    state_dict = checkpoint_with_filters(0, [5, 5])
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save({"state_dict": state_dict, "epoch": 3}, checkpoint)
    bank_path = tmp_path / "bank.pt"
    status, _, err = run_cli(capsys, "covariance", checkpoint, bank_path)
    assert status == 0, err

    bank, metadata = covariance.load_bank(bank_path)
    assert bank.shape == (2, 25, 25)
    assert metadata["kernel_size"] == (5, 5)
    assert metadata["layers"] == ["blocks.0.weight", "blocks.1.weight"]
    assert metadata["source"] == str(checkpoint.resolve())
    for layer in range(2):
        expected = covariance.empirical(state_dict[f"blocks.{layer}.weight"])
        torch.testing.assert_close(bank[layer], expected)

    filters_path = tmp_path / "layer1.pt"
    status, _, err = run_cli(capsys, "sample", filters_path, "-n", 10, "--bank", bank_path,
                             "--layer", 1)
    assert status == 0, err
    assert torch.load(filters_path, weights_only=True).shape == (10, 5, 5)

    resized_path = tmp_path / "resized.pt"
    status, _, err = run_cli(capsys, "sample", resized_path, "-n", 10, "--bank", bank_path,
                             "--kernel-size", 7)
    assert status == 0, err
    assert torch.load(resized_path, weights_only=True).shape == (2, 10, 7, 7)

    figure = tmp_path / "bank.png"
    status, _, err = run_cli(capsys, "plot", figure, "--bank", bank_path, "--filters", 3)
    assert status == 0, err
    assert figure.read_bytes()[:8] == PNG_SIGNATURE


def test_plot_closed_form(capsys, tmp_path):
    figure = tmp_path / "closed_form.png"
    status, _, err = run_cli(capsys, "plot", figure, "--depth", 2, "--kernel-size", 5,
                             "--sigma-first", 0.5, "--sigma-last", 1.5)
    assert status == 0, err
    assert figure.read_bytes()[:8] == PNG_SIGNATURE


def test_mixed_kernel_sizes_need_layers(capsys, tmp_path):
    checkpoint = tmp_path / "mixed.pt"
    state_dict = checkpoint_with_filters(1, [3, 5])
    torch.save(state_dict, checkpoint)
    output = tmp_path / "bank.pt"
    status, _, err = run_cli(capsys, "covariance", checkpoint, output)
    assert status == 2
    assert "kernel sizes differ" in err
    assert "blocks.0.weight (3, 3)" in err
    assert not output.exists()

    status, _, err = run_cli(capsys, "covariance", checkpoint, output, "--layers", "blocks.1.*")
    assert status == 0, err
    bank, _ = covariance.load_bank(output)
    torch.testing.assert_close(bank[0], covariance.empirical(state_dict["blocks.1.weight"]))


def test_covariance_without_depthwise_weights(capsys, tmp_path):
    checkpoint = tmp_path / "dense.pt"
    torch.save({"model": {"fc.weight": torch.randn(4, 4), "conv.weight": torch.randn(4, 4, 3, 3)}},
               checkpoint)
    status, _, err = run_cli(capsys, "covariance", checkpoint, tmp_path / "bank.pt")
    assert status == 2
    assert "contains no depthwise convolution weights" in err
    assert str(checkpoint) in err


def test_covariance_rejects_pickled_code(capsys, tmp_path):
    # The same payload, loaded without weights_only, does run code, so the test below can fail.
    live_marker = tmp_path / "live-marker"
    live_checkpoint = tmp_path / "live.pt"
    torch.save({"model": CreatesMarkerWhenUnpickled(live_marker)}, live_checkpoint)
    torch.load(live_checkpoint, weights_only=False)
    assert live_marker.exists()

    marker = tmp_path / "marker"
    checkpoint = tmp_path / "malicious.pt"
    torch.save({"model": CreatesMarkerWhenUnpickled(marker)}, checkpoint)
    output = tmp_path / "bank.pt"
    status, _, err = run_cli(capsys, "covariance", checkpoint, output)
    assert status == 2
    assert not marker.exists()
    assert not output.exists()
    assert str(checkpoint) in err
    assert "Traceback" not in err


def test_covariance_missing_checkpoint(capsys, tmp_path):
    missing = tmp_path / "missing.pt"
    status, _, err = run_cli(capsys, "covariance", missing, tmp_path / "bank.pt")
    assert status == 2
    assert "checkpoint not found" in err
    assert str(missing) in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sample", "{tmp}/f.txt", "--sigma", "1"], "output must end in .pt or .npy"),
        (["sample", "{tmp}/f.pt", "--sigma", "1", "--layer", "0"], "--layer selects a layer"),
        (["sample", "{tmp}/f.pt", "--sigma", "1", "--sigma-last", "2"], "pass --depth N too"),
        (["sample", "{tmp}/f.pt", "--bank", "{tmp}/b.pt", "--variance", "2"], "not to --bank"),
        (["sample", "{tmp}/f.pt", "--bank", "{tmp}/missing.pt"], "bank file not found"),
        (["plot", "{tmp}/f.png", "--bank", "{tmp}/missing.pt"], "bank file not found"),
    ],
)
def test_sample_and_plot_invalid_input(capsys, tmp_path, argv, message):
    argv = [arg.format(tmp=tmp_path) for arg in argv]
    status, _, err = run_cli(capsys, *argv)
    assert status == 2
    assert err.startswith("error: ")
    assert message in err


def test_sample_layer_out_of_range(capsys, tmp_path):
    bank_path = tmp_path / "bank.pt"
    covariance.save_bank(bank_path, covariance.closed_form(2, 3), kernel_size=3)
    status, _, err = run_cli(capsys, "sample", tmp_path / "f.pt", "--bank", bank_path, "--layer", 2)
    assert status == 2
    assert "--layer 2 is out of range" in err


def test_sample_needs_a_source(capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        cli.main(["sample", str(tmp_path / "f.pt")])
    assert info.value.code == 2
    assert "one of the arguments --bank --sigma --depth is required" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# bench and study


@pytest.mark.parametrize("name", ["bench", "study"])
def test_optional_command_unavailable(capsys, monkeypatch, name):
    monkeypatch.delattr(convcov_fast, name, raising=False)
    monkeypatch.setitem(sys.modules, f"convcov_fast.{name}", None)
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert name in capsys.readouterr().out
    status, _, err = run_cli(capsys, name, "--anything", "1")
    assert status == 2
    assert err.startswith(f"error: the {name} command is unavailable")


@pytest.mark.parametrize("name", ["bench", "study"])
def test_optional_command_delegates(capsys, monkeypatch, name):
    module = types.ModuleType(f"convcov_fast.{name}")
    module.add_arguments = lambda parser: parser.add_argument("--size", type=int, required=True)
    module.run = lambda args: 40 + args.size
    monkeypatch.delattr(convcov_fast, name, raising=False)
    monkeypatch.setitem(sys.modules, f"convcov_fast.{name}", module)
    status, _, _ = run_cli(capsys, name, "--size", 2)
    assert status == 42
