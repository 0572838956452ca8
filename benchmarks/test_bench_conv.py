"""pytest-benchmark timings of the depthwise convolution and a ConvMixer training step.

Run with ``pytest benchmarks/test_bench_conv.py --benchmark-only``. The cases and variants are
those of ``convcov-fast bench`` (``convcov_fast.bench``), at the ``--quick`` batch sizes so that the
file runs in a few minutes on a 2-core CPU. One benchmark group per case and pass compares
``nn.Conv2d``, ``depthwise_conv2d`` and ``FrozenCovDepthwiseConv2d`` in both layouts, with the
weight trainable or frozen. Every timed call synchronizes the device before it returns.
"""

import argparse
import json

import pytest
import torch

from convcov_fast import bench, train

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROUNDS = 3
PASSES = ("forward", "forward+backward")
CASES = [case for case in bench.CASES if case.name in bench.QUICK_CASE_NAMES]


def synchronized(call, device):
    def run():
        output = call()
        bench.synchronize(device)
        return output

    return run


def conv_params():
    params = []
    for case in CASES:
        for pass_name in PASSES:
            group = f"{case.name} {pass_name} (batch {case.quick_batch})"
            for variant in bench.conv_variants(pass_name):
                params.append(pytest.param(
                    case, pass_name, variant,
                    marks=pytest.mark.benchmark(group=group),
                    id=f"{case.name}-{pass_name}-{'-'.join(variant)}",
                ))
    return params


@pytest.fixture(scope="module")
def case_tensors():
    """Return the tensors of each case, made once per module so that every variant shares them."""
    cache = {}

    def get(case):
        if case.name not in cache:
            cache[case.name] = bench.make_case_tensors(case, case.quick_batch, DEVICE)
        return cache[case.name]

    return get


@pytest.mark.parametrize(("case", "pass_name", "variant"), conv_params())
def test_conv_speed(benchmark, case_tensors, case, pass_name, variant):
    tensors = case_tensors(case)
    call = bench.conv_call(tensors, DEVICE, pass_name, *variant)

    output = benchmark.pedantic(synchronized(call, DEVICE), rounds=ROUNDS, iterations=1, warmup_rounds=1)

    x = tensors[0]
    assert output.shape == x.shape
    assert torch.isfinite(output).all()


@pytest.mark.benchmark(group=f"ConvMixer training step (batch {bench.TRAIN_BATCH})")
@pytest.mark.parametrize("layout", list(bench.LAYOUTS))
@pytest.mark.parametrize("variant", bench.TRAIN_VARIANTS)
def test_training_step_speed(benchmark, variant, layout):
    memory_format = bench.LAYOUTS[layout]
    model = bench.build_train_model(variant, DEVICE, memory_format)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(bench.TRAIN_BATCH, 1, bench.IMAGE_SIZE, bench.IMAGE_SIZE, generator=generator)
    labels = torch.randint(bench.NUM_CLASSES, (bench.TRAIN_BATCH,), generator=generator)
    images = images.to(DEVICE).contiguous(memory_format=memory_format)
    step = bench.training_step_call(model, images, labels.to(DEVICE))
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]

    benchmark.pedantic(synchronized(step, DEVICE), rounds=ROUNDS, iterations=1, warmup_rounds=1)

    after = [p.detach() for p in model.parameters() if p.requires_grad]
    assert any(not torch.equal(old, new) for old, new in zip(before, after))


def test_train_model_matches_train_defaults():
    defaults = train.TrainConfig()

    assert bench.TRAIN_MODEL == {
        "dim": defaults.dim,
        "depth": defaults.depth,
        "kernel_size": defaults.kernel_size,
        "patch_size": defaults.patch_size,
    }
    assert bench.TRAIN_BATCH == defaults.batch_size
    (case,) = [case for case in bench.CASES if case.name == "fashion-mnist-convmixer"]
    side = bench.IMAGE_SIZE // defaults.patch_size
    assert (case.channels, case.size, case.kernel_size) == (defaults.dim, (side, side), (defaults.kernel_size,) * 2)


def test_bench_command_writes_report(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args([
        "--quick", "--device", str(DEVICE.type), "--output", str(tmp_path), "--repeats", "1",
        "--shapes", "convnext-t-s4", "--sections", "conv,training",
    ])

    assert bench.run(args) == 0

    report = json.loads((tmp_path / "bench.json").read_text())
    conv_rows = report["conv"]
    assert {row["case"] for row in conv_rows} == {"convnext-t-s4"}
    expected_rows = sum(len(bench.conv_variants(pass_name)) for pass_name in PASSES)
    assert len(conv_rows) == expected_rows
    assert all(row["median_ms"] > 0 for row in conv_rows)
    assert len(report["training"]) == len(bench.TRAIN_VARIANTS) * len(bench.LAYOUTS)
    assert any(target["target"].startswith("ConvMixer step") for target in report["targets"])
    assert (tmp_path / "conv.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "convnext-t-s4" in printed
    assert "batch sizes: convnext-t-s4 16 (reference 64)" in printed


def test_bench_rejects_unknown_shape():
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--shapes", "resnet"])

    with pytest.raises(ValueError, match="matches no case"):
        bench.run(args)


def test_quick_case_names_exist():
    names = {case.name for case in bench.CASES}

    assert set(bench.QUICK_CASE_NAMES) <= names
