"""Frozen covariance filters under DistributedDataParallel: two gloo processes on the CPU.

The test runs this file as a script in two processes (ranks 0 and 1) that meet over a free
loopback port. Each rank writes what it observed to a file, and the test compares those files
with each other and with a single-process run. Run one rank by hand with
``python tests/test_distributed.py RANK OUTPUT_DIR``, with MASTER_ADDR, MASTER_PORT and
WORLD_SIZE set.
"""

import datetime
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

import convcov_fast
from convcov_fast.models import ConvMixer, depthwise_layers
from tolerances import tolerance

WORLD_SIZE = 2
SEED = 20261204
BATCH = 8
STEPS = 3
LEARNING_RATE = 0.1
# Both ranks start Python, import torch and meet within a few seconds. A rank that waits far
# longer than that is hung, and the test kills it.
TIMEOUT_SECONDS = 120
PROCESS_GROUP_TIMEOUT = datetime.timedelta(seconds=60)


def seeded_generator(seed=SEED):
    return torch.Generator().manual_seed(seed)


def tiny_convmixer():
    """Build the ConvMixer both the ranks and the single-process run train.

    The global seed fixes the default init of the stem, pointwise and head layers, and the
    generator fixes the frozen filters. The model is in eval mode because BatchNorm in training
    mode normalizes with per-rank batch statistics, which differ from those of the full batch.
    Its running statistics make it an affine map with trainable parameters that DDP reduces.
    """
    torch.manual_seed(SEED)
    model = ConvMixer(
        dim=8,
        depth=2,
        kernel_size=5,
        patch_size=2,
        in_chans=1,
        num_classes=4,
        depthwise="frozen",
        init="closed_form",
        generator=seeded_generator(),
    )
    return model.eval()


def fixed_batch():
    """Return the (BATCH, 1, 8, 8) inputs and the labels that every run trains on."""
    generator = seeded_generator(SEED + 1)
    images = torch.randn(BATCH, 1, 8, 8, generator=generator)
    labels = torch.randint(0, 4, (BATCH,), generator=generator)
    return images, labels


def train(model, images, labels):
    """Take STEPS plain SGD steps on the mean cross-entropy and return the losses before each step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    losses = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def gather(tensor):
    """Return the (WORLD_SIZE, ...) stack of ``tensor`` from every rank."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.stack(parts)


def run_rank(rank, output_dir):
    """Run the checks of one rank and save what it observed to ``output_dir/rank{rank}.pt``."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=WORLD_SIZE, timeout=PROCESS_GROUP_TIMEOUT
    )
    result = {}

    # Filters from one seed, built on each rank with no communication at all.
    layer = convcov_fast.FrozenCovDepthwiseConv2d(8, 7, generator=seeded_generator())
    result["frozen_layer_filters"] = gather(layer.weight)
    # The control: a per-rank seed must give different filters, or the comparison proves nothing.
    control = convcov_fast.FrozenCovDepthwiseConv2d(8, 7, generator=seeded_generator(SEED + rank))
    result["control_filters"] = gather(control.weight)

    # convert() replaces filters that started from a different global seed on each rank.
    torch.manual_seed(rank)
    plain = nn.Sequential(nn.Conv2d(4, 4, 5, padding=2, groups=4), nn.GELU(), nn.Conv2d(4, 4, 1))
    converted = convcov_fast.convert(plain, generator=seeded_generator())
    result["converted_filters"] = gather(converted[0].weight)

    model = tiny_convmixer()
    frozen = depthwise_layers(model)
    filters_before = [module.weight.clone() for module in frozen]
    result["mixer_filters"] = gather(torch.cat([f.flatten() for f in filters_before]))

    # broadcast_buffers=False: DDP copies no buffer from rank 0, at construction or later.
    ddp = DistributedDataParallel(model, broadcast_buffers=False)
    names_by_pointer = {p.data_ptr(): name for name, p in model.named_parameters()}
    reduced = set()

    def recording_allreduce(state, bucket):
        for tensor in bucket.parameters():
            reduced.add(names_by_pointer.get(tensor.data_ptr(), f"<unknown at {tensor.data_ptr()}>"))
        return default_hooks.allreduce_hook(None, bucket)

    ddp.register_comm_hook(None, recording_allreduce)

    images, labels = fixed_batch()
    half = BATCH // WORLD_SIZE
    local = slice(rank * half, (rank + 1) * half)
    result["losses"] = train(ddp, images[local], labels[local])

    result["reduced_parameters"] = sorted(reduced)
    result["trainable_parameters"] = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    result["ddp_parameter_count"] = len(list(ddp.parameters()))
    result["frozen_buffer_names"] = sorted(
        f"{name}.weight" for name, module in model.named_modules() if module in frozen
    )
    result["buffer_names"] = sorted(name for name, _ in model.named_buffers())
    result["frozen_grads_are_none"] = all(module.weight.grad is None for module in frozen)
    result["frozen_requires_grad"] = any(module.weight.requires_grad for module in frozen)
    result["filters_unchanged"] = all(
        torch.equal(module.weight, before) for module, before in zip(frozen, filters_before)
    )
    result["parameters"] = {name: p.detach().clone() for name, p in model.named_parameters()}

    dist.barrier()
    dist.destroy_process_group()
    torch.save(result, os.path.join(output_dir, f"rank{rank}.pt"))


# ---------------------------------------------------------------------------------------------
# The test, in the pytest process


def free_loopback_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def loopback_interface():
    """Return the name of the loopback interface (lo on Linux, lo0 on macOS), or None."""
    for _, name in socket.if_nameindex():
        if name.startswith("lo"):
            return name
    return None


def run_ranks(output_dir):
    """Start every rank, wait for all of them, and return their loaded results.

    A rank that is still running after TIMEOUT_SECONDS is killed and the test fails, with the
    output of every rank.
    """
    env = dict(os.environ)
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_loopback_port()),
        WORLD_SIZE=str(WORLD_SIZE),
        OMP_NUM_THREADS="1",
    )
    interface = loopback_interface()
    if interface is not None:
        env["GLOO_SOCKET_IFNAME"] = interface
    processes = [
        subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), str(rank), str(output_dir)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(WORLD_SIZE)
    ]
    deadline = time.monotonic() + TIMEOUT_SECONDS
    outputs = []
    timed_out = False
    for process in processes:
        try:
            output, _ = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            for other in processes:
                other.kill()
            output, _ = process.communicate()
        outputs.append(output)
    report = "\n".join(f"--- rank {rank} output:\n{text[-3000:]}" for rank, text in enumerate(outputs))
    if timed_out:
        pytest.fail(f"a rank did not finish within {TIMEOUT_SECONDS} s and was killed\n{report}")
    failed = [rank for rank, process in enumerate(processes) if process.returncode != 0]
    if failed:
        pytest.fail(f"ranks {failed} exited with an error\n{report}")
    return [
        torch.load(output_dir / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)
    ]


def test_ddp_frozen_filters_and_training(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("this torch build has no torch.distributed gloo backend")
    results = run_ranks(tmp_path)

    # (a) The same seed gives the same filters on every rank, with no broadcast.
    for result in results:
        for key in ("frozen_layer_filters", "converted_filters", "mixer_filters"):
            gathered = result[key]
            for rank in range(1, WORLD_SIZE):
                assert torch.equal(gathered[rank], gathered[0]), f"{key} differ between ranks"
        control = result["control_filters"]
        assert not torch.equal(control[1], control[0])
        assert result["filters_unchanged"]

    # (b) Frozen filters are buffers: no gradient, and DDP reduces only the parameters.
    for result in results:
        assert result["frozen_grads_are_none"]
        assert not result["frozen_requires_grad"]
        assert result["reduced_parameters"] == result["trainable_parameters"]
        assert len(result["trainable_parameters"]) == result["ddp_parameter_count"]
        assert len(result["frozen_buffer_names"]) == 2
        assert set(result["frozen_buffer_names"]) <= set(result["buffer_names"])
        assert not set(result["frozen_buffer_names"]) & set(result["reduced_parameters"])

    # (c) DDP on two halves equals one process on the full batch: the mean loss of equal halves
    # is the full-batch mean, and DDP averages the gradients.
    model = tiny_convmixer()
    images, labels = fixed_batch()
    expected_losses = train(model, images, labels)
    mean_losses = torch.stack([r["losses"] for r in results]).mean(dim=0)
    torch.testing.assert_close(mean_losses, expected_losses, **tolerance(torch.float32, BATCH))
    expected_parameters = dict(model.named_parameters())
    for result in results:
        assert sorted(result["parameters"]) == sorted(expected_parameters)
        for name, value in result["parameters"].items():
            torch.testing.assert_close(
                value,
                expected_parameters[name].detach(),
                **tolerance(torch.float32, BATCH),
                msg=lambda text: f"parameter {name}: {text}",
            )
    # The steps moved the parameters, so the comparison above is not of untouched initial values.
    initial = dict(tiny_convmixer().named_parameters())
    moved = [not torch.equal(initial[name], value) for name, value in results[0]["parameters"].items()]
    assert any(moved)


if __name__ == "__main__":
    run_rank(int(sys.argv[1]), sys.argv[2])
