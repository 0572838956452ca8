"""Tests of the CPU route in convcov_fast.cpu_conv: every strategy against the reference, and the tuner."""

import time

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from convcov_fast import cpu_conv, reference
from tolerances import tolerance

# (input shape, kernel size, padding4): odd, even and rectangular kernels, symmetric and
# asymmetric padding, no padding, and padding wider than the kernel.
CASES = [
    ((2, 3, 9, 10), (3, 3), (1, 1, 1, 1)),
    ((2, 3, 9, 10), (4, 4), (1, 2, 1, 2)),
    ((2, 4, 8, 11), (5, 2), (2, 2, 0, 1)),
    ((3, 2, 7, 7), (1, 5), (2, 2, 2, 2)),
    ((2, 3, 10, 7), (3, 5), (0, 0, 0, 0)),
    ((2, 2, 6, 6), (3, 3), (4, 1, 0, 5)),
    ((1, 3, 12, 12), (7, 7), (3, 3, 3, 3)),
]
CASE_IDS = [f"{shape[2]}x{shape[3]}-k{k[0]}x{k[1]}-p{''.join(map(str, p))}" for shape, k, p in CASES]
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


@pytest.fixture(autouse=True)
def fresh_tuner(monkeypatch):
    monkeypatch.delenv(cpu_conv.ENV_VAR, raising=False)
    cpu_conv.set_strategy(None)
    cpu_conv.clear_cache()
    yield
    cpu_conv.set_strategy(None)
    cpu_conv.clear_cache()


def random_case(shape, kernel_size, padding4, memory_format, dtype=torch.float64, seed=0):
    """Return x, weight, bias and grad_output drawn from N(0, 1), with x and grad_output in memory_format."""
    generator = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    kh, kw = kernel_size
    top, bottom, left, right = padding4
    out_size = (n, c, h + top + bottom - kh + 1, w + left + right - kw + 1)
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    weight = torch.randn(c, 1, kh, kw, generator=generator, dtype=torch.float64)
    bias = torch.randn(c, generator=generator, dtype=torch.float64)
    grad_output = torch.randn(out_size, generator=generator, dtype=torch.float64)
    x = x.to(dtype).contiguous(memory_format=memory_format)
    grad_output = grad_output.to(dtype).contiguous(memory_format=memory_format)
    return x, weight.to(dtype), bias.to(dtype), grad_output


def expected_output(op, x, weight, bias, grad_output, padding4):
    """Return the float64 reference result of ``op``."""
    x, weight, bias, grad_output = (t.double() for t in (x, weight, bias, grad_output))
    if op == "forward":
        return reference.depthwise_conv2d(x, weight, bias, padding4)
    if op == "input_grad":
        return reference.depthwise_conv2d_input_grad(grad_output, weight, padding4, tuple(x.shape[-2:]))
    return reference.depthwise_conv2d_weight_grad(x, grad_output, tuple(weight.shape[-2:]), padding4)


def run_op(op, x, weight, bias, grad_output, padding4):
    if op == "forward":
        return cpu_conv.forward(x, weight, bias, padding4)
    if op == "input_grad":
        return cpu_conv.input_grad(grad_output, weight, padding4, tuple(x.shape[-2:]))
    return cpu_conv.weight_grad(x, grad_output, tuple(weight.shape[-2:]), padding4)


def reduction_length(op, weight, grad_output):
    kh, kw = weight.shape[-2:]
    if op == "weight_grad":
        n, _, out_h, out_w = grad_output.shape
        return n * out_h * out_w
    return kh * kw


def expected_memory_format(op, memory_format):
    return torch.contiguous_format if op == "weight_grad" else memory_format


ALL_STRATEGIES = [(op, name) for op, strategies in cpu_conv.STRATEGIES.items() for name in strategies]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("op, strategy", ALL_STRATEGIES, ids=[f"{op}-{name}" for op, name in ALL_STRATEGIES])
def test_forced_strategy_matches_reference(op, strategy, case, layout):
    shape, kernel_size, padding4 = case
    x, weight, bias, grad_output = random_case(shape, kernel_size, padding4, LAYOUTS[layout])
    expected = expected_output(op, x, weight, bias, grad_output, padding4)
    cpu_conv.set_strategy({op: strategy})

    result = run_op(op, x, weight, bias, grad_output, padding4)

    assert result.shape == expected.shape
    assert result.dtype == torch.float64
    assert result.is_contiguous(memory_format=expected_memory_format(op, LAYOUTS[layout]))
    torch.testing.assert_close(result, expected, **tolerance(torch.float64, reduction_length(op, weight, grad_output)))
    assert cpu_conv.chosen_strategies() == {}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op, strategy", ALL_STRATEGIES, ids=[f"{op}-{name}" for op, name in ALL_STRATEGIES])
def test_forced_strategy_low_precision(op, strategy, dtype):
    shape, kernel_size, padding4 = CASES[1]
    x, weight, bias, grad_output = random_case(shape, kernel_size, padding4, torch.channels_last, dtype=dtype)
    expected = expected_output(op, x, weight, bias, grad_output, padding4)
    cpu_conv.set_strategy({op: strategy})

    result = run_op(op, x, weight, bias, grad_output, padding4)

    assert result.dtype == dtype
    torch.testing.assert_close(result.double(), expected, **tolerance(dtype, reduction_length(op, weight, grad_output)))


@pytest.mark.parametrize("strategy", cpu_conv.COMMON_STRATEGIES)
def test_string_forces_every_op(strategy, monkeypatch):
    calls = []
    for op in cpu_conv.OPS:
        original = cpu_conv.STRATEGIES[op][strategy]

        def record(*args, op=op, original=original):
            calls.append(op)
            return original(*args)

        monkeypatch.setitem(cpu_conv.STRATEGIES[op], strategy, record)
    shape, kernel_size, padding4 = CASES[0]
    x, weight, bias, grad_output = random_case(shape, kernel_size, padding4, torch.contiguous_format)
    cpu_conv.set_strategy(strategy)

    for op in cpu_conv.OPS:
        run_op(op, x, weight, bias, grad_output, padding4)

    assert calls == list(cpu_conv.OPS)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("op", cpu_conv.OPS)
def test_tuned_choice_matches_reference(op, layout):
    shape, kernel_size, padding4 = (4, 8, 20, 20), (9, 9), (4, 4, 4, 4)
    x, weight, bias, grad_output = random_case(shape, kernel_size, padding4, LAYOUTS[layout], seed=1)
    expected = expected_output(op, x, weight, bias, grad_output, padding4)
    length = reduction_length(op, weight, grad_output)

    first = run_op(op, x, weight, bias, grad_output, padding4)
    second = run_op(op, x, weight, bias, grad_output, padding4)

    choices = cpu_conv.chosen_strategies()
    assert len(choices) == 1
    (key, name), = choices.items()
    assert key.op == op
    assert name in cpu_conv.STRATEGIES[op]
    assert first.is_contiguous(memory_format=expected_memory_format(op, LAYOUTS[layout]))
    assert second.is_contiguous(memory_format=expected_memory_format(op, LAYOUTS[layout]))
    torch.testing.assert_close(first, expected, **tolerance(torch.float64, length))
    torch.testing.assert_close(second, expected, **tolerance(torch.float64, length))


def test_cache_key_per_shape():
    padding4 = (1, 1, 1, 1)
    weight = torch.randn(3, 1, 3, 3)
    inputs = [
        torch.randn(2, 3, 8, 8),
        torch.randn(2, 3, 8, 8),
        torch.randn(2, 3, 8, 9),
        torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last),
        torch.randn(2, 3, 8, 8, dtype=torch.float64),
    ]
    for x in inputs:
        cpu_conv.forward(x, weight.to(x.dtype), None, padding4)

    keys = list(cpu_conv.chosen_strategies())
    assert len(keys) == 4
    assert {(key.h, key.w) for key in keys} == {(8, 8), (8, 9)}
    assert {key.layout for key in keys} == {"nchw", "channels_last"}
    assert {key.dtype for key in keys} == {torch.float32, torch.float64}
    assert all(key.padding4 == padding4 and (key.kh, key.kw) == (3, 3) for key in keys)


def test_cache_key_records_thread_count():
    threads = torch.get_num_threads()
    x, weight = torch.randn(2, 3, 8, 8), torch.randn(3, 1, 3, 3)
    try:
        torch.set_num_threads(1)
        cpu_conv.forward(x, weight, None, (1, 1, 1, 1))
    finally:
        torch.set_num_threads(threads)
    cpu_conv.forward(x, weight, None, (1, 1, 1, 1))

    counts = sorted(key.num_threads for key in cpu_conv.chosen_strategies())
    assert counts == sorted({1, threads})


def test_weight_grad_key_names_both_layouts():
    x, weight, _, grad_output = random_case((2, 3, 8, 8), (3, 3), (1, 1, 1, 1), torch.channels_last)
    cpu_conv.weight_grad(x, grad_output.contiguous(), (3, 3), (1, 1, 1, 1))

    (key,) = cpu_conv.chosen_strategies()
    assert key.layout == "channels_last+nchw"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forced_fft_low_precision(dtype):
    shape, kernel_size, padding4 = (2, 4, 24, 24), (15, 15), (7, 7, 7, 7)
    x, weight, bias, grad_output = random_case(shape, kernel_size, padding4, torch.contiguous_format, dtype=dtype)
    cpu_conv.set_strategy("fft")

    for op in cpu_conv.OPS:
        result = run_op(op, x, weight, bias, grad_output, padding4)
        expected = expected_output(op, x, weight, bias, grad_output, padding4)
        assert result.dtype == dtype
        length = reduction_length(op, weight, grad_output)
        torch.testing.assert_close(result.double(), expected, **tolerance(dtype, length))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes_computed_in_float32(dtype):
    x, weight, bias, grad_output = random_case((2, 3, 8, 8), (5, 5), (2, 2, 2, 2), torch.contiguous_format, dtype=dtype)

    outputs = [run_op(op, x, weight, bias, grad_output, (2, 2, 2, 2)) for op in cpu_conv.OPS]

    for output in outputs:
        assert output.dtype == dtype
    tuned_dtypes = {key.dtype for key in cpu_conv.chosen_strategies()}
    assert tuned_dtypes == {torch.float32}


def test_tuner_rejects_inaccurate_fft(monkeypatch):
    def inaccurate_fft(x, weight, bias, padding4):
        y = cpu_conv.FORWARD_STRATEGIES["nchw"](x, weight, bias, padding4)
        return y + 1e-3 * y.abs().max()

    monkeypatch.setitem(cpu_conv.FORWARD_STRATEGIES, "fft", inaccurate_fft)
    monkeypatch.setattr(cpu_conv, "_candidates", lambda op, dtype, kernel_size, layout: ["nchw", "fft"])
    x, weight = torch.randn(2, 3, 8, 8), torch.randn(3, 1, 3, 3)

    cpu_conv.forward(x, weight, None, (1, 1, 1, 1))

    assert list(cpu_conv.chosen_strategies().values()) == ["nchw"]


def test_tuner_accepts_accurate_fft(monkeypatch):
    # Control for the test above: an exact "fft" that is faster than "nchw" is chosen.
    def slow_nchw(*args):
        time.sleep(0.05)
        return cpu_conv._forward_channels_last(*args)

    monkeypatch.setitem(cpu_conv.FORWARD_STRATEGIES, "nchw", slow_nchw)
    monkeypatch.setitem(cpu_conv.FORWARD_STRATEGIES, "fft", cpu_conv._forward_channels_last)
    monkeypatch.setattr(cpu_conv, "_candidates", lambda op, dtype, kernel_size, layout: ["nchw", "fft"])
    x, weight = torch.randn(2, 3, 8, 8), torch.randn(3, 1, 3, 3)

    cpu_conv.forward(x, weight, None, (1, 1, 1, 1))

    assert list(cpu_conv.chosen_strategies().values()) == ["fft"]


def test_tuner_skips_failing_candidate(monkeypatch):
    def unsupported(*args):
        raise RuntimeError("unsupported")

    failing = cpu_conv.default_strategy("forward", (3, 3), "nchw")
    monkeypatch.setitem(cpu_conv.FORWARD_STRATEGIES, failing, unsupported)
    x, weight, bias, grad_output = random_case((2, 3, 8, 8), (3, 3), (1, 1, 1, 1), torch.contiguous_format)

    result = cpu_conv.forward(x, weight, bias, (1, 1, 1, 1))

    (chosen,) = cpu_conv.chosen_strategies().values()
    assert chosen != failing
    expected = expected_output("forward", x, weight, bias, grad_output, (1, 1, 1, 1))
    torch.testing.assert_close(result, expected, **tolerance(torch.float64, 9))


def test_tuner_raises_when_every_candidate_fails(monkeypatch):
    for name in cpu_conv.FORWARD_STRATEGIES:
        def unsupported(*args, name=name):
            raise RuntimeError(f"{name} is unsupported")

        monkeypatch.setitem(cpu_conv.FORWARD_STRATEGIES, name, unsupported)
    x, weight = torch.randn(2, 3, 8, 8), torch.randn(3, 1, 3, 3)
    first = cpu_conv.default_strategy("forward", (3, 3), "nchw")

    with pytest.raises(RuntimeError, match=f"^{first} is unsupported"):
        cpu_conv.forward(x, weight, None, (1, 1, 1, 1))
    assert cpu_conv.chosen_strategies() == {}


def test_default_strategy_follows_layout():
    assert cpu_conv.default_strategy("forward", (7, 7), "nchw") == "nchw"
    assert cpu_conv.default_strategy("forward", (7, 7), "channels_last") == "channels_last"
    assert cpu_conv.default_strategy("input_grad", (31, 31), "nchw") == "channels_last"
    assert cpu_conv.default_strategy("weight_grad", (3, 3), "nchw+nchw") in cpu_conv.WEIGHT_GRAD_STRATEGIES


def test_fake_tensors_skip_tuning(monkeypatch):
    def forbid_tuning(*args):
        raise AssertionError("the tuner ran on fake tensors")

    monkeypatch.setattr(cpu_conv, "_tune", forbid_tuning)
    with FakeTensorMode():
        x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
        weight = torch.randn(3, 1, 4, 4)
        y = cpu_conv.forward(x, weight, None, (1, 2, 1, 2))
        grad = cpu_conv.input_grad(y, weight, (1, 2, 1, 2), (8, 8))
        grad_weight = cpu_conv.weight_grad(x, y, (4, 4), (1, 2, 1, 2))

    assert y.shape == (2, 3, 8, 8)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert grad.shape == (2, 3, 8, 8)
    assert grad_weight.shape == (3, 1, 4, 4)
    assert cpu_conv.chosen_strategies() == {}


def test_environment_variable_forces_ops(monkeypatch):
    monkeypatch.setenv(cpu_conv.ENV_VAR, "weight_grad=as_forward, input_grad=backward_nchw")

    assert cpu_conv.forced_strategy("forward") is None
    assert cpu_conv.forced_strategy("input_grad") == "backward_nchw"
    assert cpu_conv.forced_strategy("weight_grad") == "as_forward"

    monkeypatch.setenv(cpu_conv.ENV_VAR, "fft")
    assert [cpu_conv.forced_strategy(op) for op in cpu_conv.OPS] == ["fft"] * 3


def test_set_strategy_overrides_environment(monkeypatch):
    monkeypatch.setenv(cpu_conv.ENV_VAR, "fft")
    cpu_conv.set_strategy({"forward": "nchw"})

    assert cpu_conv.forced_strategy("forward") == "nchw"
    assert cpu_conv.forced_strategy("weight_grad") is None


@pytest.mark.parametrize(
    "strategy, message",
    [
        ("as_forward", "must be one of"),
        ("fastest", "must be one of"),
        ({"backward": "nchw"}, "unknown op 'backward'"),
        ({"forward": "as_forward"}, "forces 'as_forward' on forward"),
    ],
    ids=["single-op-name", "unknown-name", "unknown-op", "wrong-op"],
)
def test_set_strategy_rejects_invalid(strategy, message):
    with pytest.raises(ValueError, match=message):
        cpu_conv.set_strategy(strategy)


def test_set_strategy_rejects_wrong_type():
    with pytest.raises(TypeError, match="got int"):
        cpu_conv.set_strategy(3)


def test_invalid_environment_variable_names_it(monkeypatch):
    monkeypatch.setenv(cpu_conv.ENV_VAR, "forward=fastest")
    x, weight = torch.randn(2, 3, 8, 8), torch.randn(3, 1, 3, 3)

    with pytest.raises(ValueError, match=cpu_conv.ENV_VAR):
        cpu_conv.forward(x, weight, None, (1, 1, 1, 1))
