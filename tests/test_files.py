"""Every entry point that reads a file loads it without unpickling code.

A crafted file whose unpickling would create a marker directory must be rejected with an error that
names the file, and the marker must not appear. Truncated and garbage files must get a clear
error that names the file. A control shows that each crafted file does run its code when
unpickled unsafely, so a missing marker means the loader refused it.
"""

import os
import pickle
import zipfile

import pytest
import torch

from convcov_fast import covariance

try:
    from convcov_fast import cli
except ImportError as error:  # the command line is optional for the library
    cli = None
    CLI_MISSING = f"convcov_fast.cli cannot be imported ({error})"
else:
    CLI_MISSING = ""

try:
    from convcov_fast import train
except ImportError as error:
    train = None
    TRAIN_MISSING = f"convcov_fast.train cannot be imported ({error})"
else:
    TRAIN_MISSING = ""


class MarkerPayload:
    """An object whose unpickling calls ``os.mkdir(marker)``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def write_payload(path, marker, container):
    """Write a file at ``path`` whose unpickling creates the directory ``marker``.

    Containers: "zip" (torch.save of the bare payload), "bank" (a bank file whose metadata field
    contains the payload), "checkpoint" (a state_dict with the payload next to a depthwise weight),
    "legacy" (the pre-1.6 torch.save format) and "pickle" (plain ``pickle.dump``).
    """
    payload = MarkerPayload(marker)
    if container == "zip":
        torch.save(payload, path)
    elif container == "bank":
        bank = covariance.closed_form(2, 3)
        torch.save(
            {"format": covariance.BANK_FORMAT, "version": covariance.BANK_VERSION, "bank": bank,
             "kernel_size": [3, 3], "metadata": payload},
            path,
        )
    elif container == "checkpoint":
        torch.save({"model": {"blocks.0.weight": torch.randn(4, 1, 3, 3), "extra": payload}}, path)
    elif container == "legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    elif container == "pickle":
        with open(path, "wb") as file:
            pickle.dump(payload, file)
    else:
        raise ValueError(f"unknown container {container!r}")


def run_unsafely(path, container):
    """Load ``path`` the unsafe way, which runs any code the file carries."""
    if container == "pickle":
        with open(path, "rb") as file:
            return pickle.load(file)
    return torch.load(path, weights_only=False)


CONTAINERS = ("zip", "bank", "checkpoint", "legacy", "pickle")


def call_cli(argv, capsys):
    """Run ``cli.main(argv)`` and return (exit status, stderr). argparse errors exit with 2."""
    try:
        status = cli.main(argv)
    except SystemExit as exit_:
        status = exit_.code
    return status, capsys.readouterr().err


def load_with(entry_point, path, tmp_path, capsys):
    """Load ``path`` through ``entry_point`` and return the error message it produced.

    Python entry points must raise ValueError or OSError. Command-line entry points must exit with
    a nonzero status and print the message to stderr. Returns None when the load succeeded.
    """
    if entry_point.startswith("cli "):
        if cli is None:
            pytest.skip(CLI_MISSING)
        output = tmp_path / "output.pt"
        if entry_point == "cli covariance":
            argv = ["covariance", str(path), str(output)]
        else:
            argv = ["sample", str(output), "--bank", str(path)]
        status, stderr = call_cli(argv, capsys)
        # A command writes its output only after it has read its input.
        assert output.exists() == (status == 0)
        return None if status == 0 else stderr
    if entry_point.startswith("train ") and train is None:
        pytest.skip(TRAIN_MISSING)
    loaders = {
        "load_bank": covariance.load_bank,
        "load_tensors": lambda p: covariance.load_tensors(p, "test file"),
        "train bank_from_checkpoint": lambda p: train.bank_from_checkpoint(p),
        "train resolve_init": lambda p: train.resolve_init(str(p)),
    }
    try:
        loaders[entry_point](path)
    except (ValueError, OSError) as error:
        return str(error)
    return None


ENTRY_POINTS = (
    "load_bank",
    "load_tensors",
    "train bank_from_checkpoint",
    "train resolve_init",
    "cli covariance",
    "cli sample",
)


@pytest.mark.parametrize("container", CONTAINERS)
def test_payload_runs_when_unpickled_unsafely(tmp_path, container):
    marker = tmp_path / "marker"
    path = tmp_path / "crafted.pt"
    write_payload(path, marker, container)

    run_unsafely(path, container)

    assert marker.is_dir()


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
@pytest.mark.parametrize("container", CONTAINERS)
def test_code_payload_rejected(tmp_path, capsys, entry_point, container):
    marker = tmp_path / "marker"
    path = tmp_path / "crafted.pt"
    write_payload(path, marker, container)

    message = load_with(entry_point, path, tmp_path, capsys)

    assert not marker.exists()
    assert message is not None, f"{entry_point} loaded a file that carries code"
    assert str(path) in message


def valid_file(path, entry_point):
    """Write a file that ``entry_point`` loads: a bank, or a checkpoint for ``covariance``."""
    if entry_point in ("cli covariance", "train bank_from_checkpoint"):
        torch.save({"model": {"blocks.0.weight": torch.randn(4, 1, 3, 3)}}, path)
    else:
        covariance.save_bank(path, covariance.closed_form(2, 3), note="valid")


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_valid_file_loads(tmp_path, capsys, entry_point):
    path = tmp_path / "valid.pt"
    valid_file(path, entry_point)

    message = load_with(entry_point, path, tmp_path, capsys)

    assert message is None


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
@pytest.mark.parametrize("keep", (0.0, 0.1, 0.5, 0.9, -1))
def test_truncated_file_rejected(tmp_path, capsys, entry_point, keep):
    path = tmp_path / "truncated.pt"
    valid_file(path, entry_point)
    data = path.read_bytes()
    size = len(data) - 1 if keep == -1 else int(len(data) * keep)
    path.write_bytes(data[:size])

    message = load_with(entry_point, path, tmp_path, capsys)

    assert message is not None, f"{entry_point} loaded a file cut to {size} of {len(data)} bytes"
    assert str(path) in message
    assert "truncated or corrupt" in message


def garbage_bytes(kind):
    if kind == "random":
        return torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).to(
            torch.uint8
        ).numpy().tobytes()
    if kind == "text":
        return b"bank = [[1.0, 0.0], [0.0, 1.0]]\n"
    raise ValueError(f"unknown garbage kind {kind!r}")


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
@pytest.mark.parametrize("kind", ("random", "text", "foreign zip"))
def test_garbage_file_rejected(tmp_path, capsys, entry_point, kind):
    path = tmp_path / "garbage.pt"
    if kind == "foreign zip":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("notes.txt", "not a torch.save archive")
    else:
        path.write_bytes(garbage_bytes(kind))

    message = load_with(entry_point, path, tmp_path, capsys)

    assert message is not None, f"{entry_point} loaded a {kind} file"
    assert str(path) in message


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_missing_file_named(tmp_path, capsys, entry_point):
    path = tmp_path / "missing.pt"

    message = load_with(entry_point, path, tmp_path, capsys)

    assert message is not None
    assert str(path) in message
