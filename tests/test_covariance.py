"""Tests of convcov_fast.covariance against direct recomputations in loops, numpy and F.interpolate."""

import math
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convcov_fast import FrozenCovDepthwiseConv2d, covariance


def gaussian_by_loops(kernel_size, sigma, variance):
    """Build the Gaussian covariance entry by entry over taps (i, j) and (p, q)."""
    kh, kw = kernel_size
    d = kh * kw
    cov = torch.empty(d, d, dtype=torch.float64)
    for i in range(kh):
        for j in range(kw):
            for p in range(kh):
                for q in range(kw):
                    squared_distance = (i - p) ** 2 + (j - q) ** 2
                    cov[i * kw + j, p * kw + q] = variance * math.exp(-squared_distance / (2 * sigma**2))
    return cov


def resampling_by_interpolate(source, target):
    """Build the (d', d) resampling matrix by bilinearly resizing each one-hot basis filter."""
    d = source[0] * source[1]
    basis = torch.eye(d, dtype=torch.float64).reshape(d, 1, *source)
    resized = F.interpolate(basis, size=target, mode="bilinear", align_corners=True)
    return resized.reshape(d, -1).T


def min_eigenvalue_ratio(matrix):
    """Return the smallest eigenvalue of a symmetric matrix divided by its largest."""
    eigenvalues = torch.linalg.eigvalsh(matrix)
    return float(eigenvalues[0] / eigenvalues[-1])


def random_psd(d, seed=0):
    """Return a random (d, d) float64 positive-definite matrix, exactly symmetric."""
    generator = torch.Generator().manual_seed(seed)
    factor = torch.randn(d, d, generator=generator, dtype=torch.float64)
    product = factor @ factor.T
    return 0.5 * (product + product.T)


# gaussian


@pytest.mark.parametrize("kernel_size", [(3, 3), (3, 5), (4, 2)])
@pytest.mark.parametrize("sigma", [0.1, 0.8, 3.0])
def test_gaussian_matches_loops(kernel_size, sigma):
    expected = gaussian_by_loops(kernel_size, sigma, variance=0.2)
    result = covariance.gaussian(kernel_size, sigma, variance=0.2)
    assert result.dtype == torch.float64
    assert result.shape == expected.shape
    torch.testing.assert_close(result, expected, atol=1e-15, rtol=1e-12)


def test_gaussian_int_kernel_size_is_square():
    result = covariance.gaussian(4, 1.0)
    expected = covariance.gaussian((4, 4), 1.0)
    assert result.shape == (16, 16)
    assert torch.equal(result, expected)


@pytest.mark.parametrize("sigma", [0.1, 0.3, 1.0, 2.5, 10.0, 1e3, 1e6])
@pytest.mark.parametrize("kernel_size", [(5, 5), (3, 5)])
def test_gaussian_is_psd(sigma, kernel_size):
    cov = covariance.gaussian(kernel_size, sigma)
    assert torch.equal(cov, cov.T)
    # A huge sigma makes the matrix numerically rank one, so the eigenvalues below the first are
    # float64 rounding of zero.
    assert min_eigenvalue_ratio(cov) > -1e-12


@pytest.mark.parametrize("kernel_size", [(3, 3), (9, 9), (3, 5)])
def test_gaussian_default_variance(kernel_size):
    kh, kw = kernel_size
    cov = covariance.gaussian(kernel_size, 1.3)
    expected = 1.0 / (3 * kh * kw)
    assert float(cov.diagonal().mean()) == pytest.approx(expected, rel=1e-12)
    assert covariance.default_variance(kernel_size) == pytest.approx(expected, rel=1e-12)


def test_gaussian_explicit_variance():
    cov = covariance.gaussian((3, 5), 0.7, variance=2.5)
    assert torch.allclose(cov.diagonal(), torch.full((15,), 2.5, dtype=torch.float64))


def test_gaussian_tiny_sigma_is_diagonal():
    cov = covariance.gaussian(3, 0.1, variance=1.0)
    off_diagonal = cov - torch.diag(cov.diagonal())
    # Adjacent taps are at distance 1, so their covariance is exp(-50).
    assert float(off_diagonal.abs().max()) == pytest.approx(math.exp(-50), rel=1e-9)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kernel_size": 3, "sigma": 0.0}, "sigma must be a finite number > 0, got 0.0"),
        ({"kernel_size": 3, "sigma": -1.0}, "sigma must be a finite number > 0, got -1.0"),
        ({"kernel_size": 3, "sigma": float("inf")}, "sigma must be a finite number > 0, got inf"),
        ({"kernel_size": 3, "sigma": 1.0, "variance": 0.0}, "variance must be a finite number > 0"),
        ({"kernel_size": 0, "sigma": 1.0}, "kernel_size must be positive, got 0"),
        ({"kernel_size": (3, -1), "sigma": 1.0}, r"kernel_size must be positive, got \(3, -1\)"),
    ],
)
def test_gaussian_invalid_values_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        covariance.gaussian(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kernel_size": 3, "sigma": "1"}, "sigma must be a number, got '1'"),
        ({"kernel_size": 3, "sigma": True}, "sigma must be a number, got True"),
        ({"kernel_size": 3.0, "sigma": 1.0}, "kernel_size must be an int or a pair of ints, got 3.0"),
        ({"kernel_size": (3, 3, 3), "sigma": 1.0}, "kernel_size must be an int or a pair of ints"),
    ],
)
def test_gaussian_invalid_types_raise(kwargs, match):
    with pytest.raises(TypeError, match=match):
        covariance.gaussian(**kwargs)


# closed_form


def sigma_of(cov, kw):
    """Recover sigma from the ratio of a tap's covariance with its right neighbour to its variance."""
    ratio = float(cov[0, 1] / cov[0, 0])
    assert kw > 1
    return math.sqrt(-1.0 / (2.0 * math.log(ratio)))


@pytest.mark.parametrize("kernel_size", [(5, 5), (3, 5)])
def test_closed_form_sigmas_linear_in_depth(kernel_size):
    depth, first, last = 5, 0.6, 2.2
    bank = covariance.closed_form(depth, kernel_size, sigma_first=first, sigma_last=last)
    kh, kw = kernel_size
    assert bank.shape == (depth, kh * kw, kh * kw)
    assert bank.dtype == torch.float64
    for layer in range(depth):
        expected_sigma = first + layer * (last - first) / (depth - 1)
        assert sigma_of(bank[layer], kw) == pytest.approx(expected_sigma, rel=1e-9)
        expected = gaussian_by_loops(kernel_size, expected_sigma, 1.0 / (3 * kh * kw))
        torch.testing.assert_close(bank[layer], expected, atol=1e-15, rtol=1e-12)


def test_closed_form_defaults_span_first_to_last():
    bank = covariance.closed_form(4, 7)
    assert sigma_of(bank[0], 7) == pytest.approx(covariance.SIGMA_FIRST, rel=1e-9)
    assert sigma_of(bank[-1], 7) == pytest.approx(covariance.SIGMA_LAST, rel=1e-9)


def test_closed_form_depth_one_uses_sigma_first():
    bank = covariance.closed_form(1, 3, sigma_first=1.1, sigma_last=4.0)
    assert bank.shape == (1, 9, 9)
    assert sigma_of(bank[0], 3) == pytest.approx(1.1, rel=1e-9)


def test_closed_form_variance_and_psd():
    bank = covariance.closed_form(3, (3, 5), variance=0.5)
    for cov in bank:
        assert float(cov.diagonal().mean()) == pytest.approx(0.5, rel=1e-12)
        assert min_eigenvalue_ratio(cov) > -1e-12


@pytest.mark.parametrize("depth", [0, -2])
def test_closed_form_depth_below_one_raises(depth):
    with pytest.raises(ValueError, match=f"depth must be >= 1, got {depth}"):
        covariance.closed_form(depth, 3)


def test_closed_form_non_int_depth_raises():
    with pytest.raises(TypeError, match="depth must be an int, got 2.5"):
        covariance.closed_form(2.5, 3)


@pytest.mark.parametrize("name", ["sigma_first", "sigma_last"])
def test_closed_form_non_positive_sigma_raises(name):
    with pytest.raises(ValueError, match=f"{name} must be a finite number > 0, got 0"):
        covariance.closed_form(3, 3, **{name: 0})


# empirical


@pytest.mark.parametrize("shape", [(40, 1, 3, 3), (40, 3, 3), (17, 1, 3, 5), (2, 2, 2)])
def test_empirical_matches_numpy(shape):
    generator = torch.Generator().manual_seed(3)
    filters = torch.randn(shape, generator=generator) * 0.3 + 0.1
    expected = np.cov(filters.reshape(shape[0], -1).double().numpy(), rowvar=False)
    result = covariance.empirical(filters)
    assert result.dtype == torch.float64
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-12, atol=1e-15)


def test_empirical_ignores_autograd():
    filters = torch.randn(8, 1, 3, 3, requires_grad=True)
    result = covariance.empirical(filters)
    assert not result.requires_grad


def test_empirical_single_filter_raises():
    with pytest.raises(ValueError, match="at least 2"):
        covariance.empirical(torch.randn(1, 1, 3, 3))


@pytest.mark.parametrize("shape", [(9,), (4, 9), (4, 2, 3, 3), (1, 4, 1, 3, 3)])
def test_empirical_wrong_shape_raises(shape):
    with pytest.raises(ValueError, match=re.escape(f"got {shape}")):
        covariance.empirical(torch.randn(shape))


def test_empirical_non_finite_raises():
    filters = torch.randn(4, 3, 3)
    filters[2, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        covariance.empirical(filters)


def test_empirical_non_tensor_raises():
    with pytest.raises(TypeError, match="filters must be a torch.Tensor, got list"):
        covariance.empirical([[1.0, 2.0], [3.0, 4.0]])


# from_model


class TwoStageNet(nn.Module):
    """Depthwise convolutions at several nesting levels, mixed with convolutions that are not."""

    def __init__(self, second_kernel=3):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.stage = nn.Sequential(
            nn.Conv2d(4, 4, 3, groups=4, padding=1),
            nn.ReLU(),
            nn.Sequential(nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, second_kernel, groups=8, padding="same")),
        )
        self.grouped = nn.Conv2d(8, 8, 3, groups=2, padding=1)
        self.frozen = FrozenCovDepthwiseConv2d(8, 3, generator=torch.Generator().manual_seed(1))

    def forward(self, x):
        return self.frozen(self.grouped(self.stage(self.stem(x))))


def test_from_model_order_and_values():
    model = TwoStageNet()
    bank = covariance.from_model(model)
    depthwise = [model.stage[0].weight, model.stage[2][1].weight, model.frozen.weight]
    assert bank.shape == (3, 9, 9)
    for layer, weight in enumerate(depthwise):
        expected = np.cov(weight.detach().reshape(weight.shape[0], -1).double().numpy(), rowvar=False)
        np.testing.assert_allclose(bank[layer].numpy(), expected, rtol=1e-12, atol=1e-15)


def test_from_model_single_conv():
    conv = nn.Conv2d(6, 6, 5, groups=6)
    bank = covariance.from_model(conv)
    assert bank.shape == (1, 25, 25)


def test_from_model_without_depthwise_raises():
    model = nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 8, 3, groups=4), nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="Sequential has no depthwise convolution"):
        covariance.from_model(model)


def test_from_model_differing_kernel_sizes_names_layers():
    model = TwoStageNet(second_kernel=5)
    with pytest.raises(ValueError, match="kernel sizes differ") as info:
        covariance.from_model(model)
    message = str(info.value)
    assert "stage.0: (3, 3)" in message
    assert "stage.2.1: (5, 5)" in message
    assert "frozen: (3, 3)" in message


# resize


@pytest.mark.parametrize(
    "source, target",
    [
        ((5, 5), (3, 7)),
        ((3, 3), (9, 9)),
        ((9, 9), (5, 5)),
        ((3, 5), (5, 3)),
        ((4, 4), (2, 6)),
        ((7, 7), (7, 7)),
    ],
)
def test_resize_matches_interpolated_basis(source, target):
    d = source[0] * source[1]
    cov = random_psd(d, seed=d)
    resampling = resampling_by_interpolate(source, target)
    expected = resampling @ cov @ resampling.T
    result = covariance.resize(cov, target, source_kernel_size=source)
    assert result.shape == (target[0] * target[1],) * 2
    assert result.dtype == torch.float64
    torch.testing.assert_close(result, expected, atol=1e-12, rtol=1e-12)
    assert min_eigenvalue_ratio(result) > -1e-12


def test_resize_is_covariance_of_resized_filters():
    generator = torch.Generator().manual_seed(7)
    filters = torch.randn(64, 1, 5, 5, generator=generator, dtype=torch.float64)
    resized_filters = F.interpolate(filters, size=(3, 7), mode="bilinear", align_corners=True)
    expected = covariance.empirical(resized_filters)
    result = covariance.resize(covariance.empirical(filters), (3, 7))
    torch.testing.assert_close(result, expected, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("kernel_size", [(5, 5), (3, 5)])
def test_resize_same_size_is_identity(kernel_size):
    cov = covariance.gaussian(kernel_size, 1.2)
    result = covariance.resize(cov, kernel_size, source_kernel_size=kernel_size)
    torch.testing.assert_close(result, cov, atol=1e-15, rtol=0)


def test_resize_bank_resizes_each_matrix():
    bank = covariance.closed_form(3, 5)
    result = covariance.resize(bank, 3)
    resampling = resampling_by_interpolate((5, 5), (3, 3))
    assert result.shape == (3, 9, 9)
    for layer in range(3):
        expected = resampling @ bank[layer] @ resampling.T
        torch.testing.assert_close(result[layer], expected, atol=1e-14, rtol=1e-12)


def test_resize_to_one_tap_reads_centre():
    # F.interpolate with align_corners=True reads the first tap for a size-1 output, so this case
    # is checked against the centre by hand.
    odd = random_psd(25, seed=1)
    result = covariance.resize(odd, 1)
    assert result.shape == (1, 1)
    assert float(result[0, 0]) == pytest.approx(float(odd[12, 12]), rel=1e-12)
    even = random_psd(16, seed=2)
    # On a 4 x 4 grid the centre is the mean of taps (1, 1), (1, 2), (2, 1) and (2, 2).
    weights = torch.zeros(16, dtype=torch.float64)
    weights[[5, 6, 9, 10]] = 0.25
    expected = weights @ even @ weights
    assert float(covariance.resize(even, 1)[0, 0]) == pytest.approx(float(expected), rel=1e-12)


def test_resize_rectangular_needs_source_kernel_size():
    cov = covariance.gaussian((3, 5), 1.0)
    with pytest.raises(ValueError, match="size 15, which is not a square number"):
        covariance.resize(cov, 3)


def test_resize_wrong_source_kernel_size_raises():
    cov = covariance.gaussian(3, 1.0)
    with pytest.raises(ValueError, match=r"does not match kernel_size \(2, 5\)"):
        covariance.resize(cov, 5, source_kernel_size=(2, 5))


# interpolate_depth


def test_interpolate_depth_endpoints_and_midpoints():
    bank = torch.stack([random_psd(9, seed=s) for s in range(3)])
    result = covariance.interpolate_depth(bank, 5)
    assert result.shape == (5, 9, 9)
    torch.testing.assert_close(result[0], bank[0], atol=1e-14, rtol=1e-14)
    torch.testing.assert_close(result[2], bank[1], atol=1e-14, rtol=1e-14)
    torch.testing.assert_close(result[4], bank[2], atol=1e-14, rtol=1e-14)
    torch.testing.assert_close(result[1], 0.5 * (bank[0] + bank[1]), atol=1e-14, rtol=1e-14)
    torch.testing.assert_close(result[3], 0.5 * (bank[1] + bank[2]), atol=1e-14, rtol=1e-14)


def test_interpolate_depth_uneven_positions():
    bank = torch.stack([random_psd(4, seed=s) for s in range(2)])
    result = covariance.interpolate_depth(bank, 4)
    for layer in range(4):
        fraction = layer / 3
        expected = (1 - fraction) * bank[0] + fraction * bank[1]
        torch.testing.assert_close(result[layer], expected, atol=1e-13, rtol=1e-13)
        assert min_eigenvalue_ratio(result[layer]) > -1e-12


def test_interpolate_depth_shrinks():
    bank = torch.stack([random_psd(4, seed=s) for s in range(5)])
    result = covariance.interpolate_depth(bank, 3)
    torch.testing.assert_close(result[0], bank[0], atol=1e-14, rtol=1e-14)
    torch.testing.assert_close(result[1], bank[2], atol=1e-14, rtol=1e-14)
    torch.testing.assert_close(result[2], bank[4], atol=1e-14, rtol=1e-14)


def test_interpolate_depth_one():
    bank = torch.stack([random_psd(4, seed=s) for s in range(3)])
    torch.testing.assert_close(covariance.interpolate_depth(bank, 1), bank[:1], atol=0, rtol=0)
    single = covariance.interpolate_depth(bank[:1], 3)
    assert single.shape == (3, 4, 4)
    for layer in range(3):
        assert torch.equal(single[layer], bank[0])


def test_interpolate_depth_invalid_depth_raises():
    with pytest.raises(ValueError, match="depth must be >= 1, got 0"):
        covariance.interpolate_depth(covariance.closed_form(2, 3), 0)


# save_bank and load_bank


def test_bank_round_trip(tmp_path):
    bank = covariance.closed_form(3, (3, 5))
    path = tmp_path / "bank.pt"
    covariance.save_bank(path, bank, kernel_size=(3, 5), source="learned", epochs=12, sigmas=[0.5, 1.0])
    loaded, metadata = covariance.load_bank(path)
    assert loaded.dtype == torch.float64
    assert torch.equal(loaded, bank)
    assert metadata["kernel_size"] == (3, 5)
    assert metadata["source"] == "learned"
    assert metadata["epochs"] == 12
    assert metadata["sigmas"] == [0.5, 1.0]


def test_bank_round_trip_square_inferred(tmp_path):
    bank = covariance.closed_form(2, 4).float()
    path = os.fspath(tmp_path / "bank.pt")
    covariance.save_bank(path, bank)
    loaded, metadata = covariance.load_bank(path)
    assert metadata == {"kernel_size": (4, 4)}
    assert torch.equal(loaded, bank.double())


def test_save_bank_rectangular_without_kernel_size_raises(tmp_path):
    with pytest.raises(ValueError, match="not a square number"):
        covariance.save_bank(tmp_path / "bank.pt", covariance.closed_form(2, (3, 5)))


def test_save_bank_unserializable_metadata_raises(tmp_path):
    with pytest.raises(TypeError, match="metadata must be JSON-serializable"):
        covariance.save_bank(tmp_path / "bank.pt", covariance.closed_form(2, 3), model=nn.Linear(1, 1))


def create_marker(path):
    """Create the file at ``path``, standing in for the code that a malicious bank file runs."""
    with open(path, "w") as marker:
        marker.write("unpickled")


class CodePayload:
    """An object whose unpickling calls ``create_marker``."""

    def __init__(self, marker_path):
        self.marker_path = marker_path

    def __reduce__(self):
        return (create_marker, (self.marker_path,))


def test_load_bank_rejects_pickled_code(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "bank.pt"
    payload = {
        "format": covariance.BANK_FORMAT,
        "bank": covariance.closed_form(1, 3),
        "extra": CodePayload(os.fspath(marker)),
    }
    torch.save(payload, path)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        covariance.load_bank(path)
    assert not marker.exists()


def test_code_payload_runs_when_unpickled(tmp_path):
    # This control shows that the payload creates the marker when loading runs pickled code.
    marker = tmp_path / "marker"
    path = tmp_path / "bank.pt"
    torch.save({"extra": CodePayload(os.fspath(marker))}, path)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_load_bank_truncated_raises(tmp_path):
    path = tmp_path / "bank.pt"
    covariance.save_bank(path, covariance.closed_form(3, 5))
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*truncated or corrupt"):
        covariance.load_bank(path)


@pytest.mark.parametrize(
    "content", [b"", b"not a bank file\n" * 20, b"\x80\x02garbage"], ids=["empty", "text", "pickle-header"]
)
def test_load_bank_garbage_raises(tmp_path, content):
    path = tmp_path / "bank.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*truncated or corrupt"):
        covariance.load_bank(path)


def test_load_bank_missing_file_raises(tmp_path):
    path = tmp_path / "missing.pt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        covariance.load_bank(path)


def test_load_bank_other_tensor_file_raises(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.randn(3, 3)}, path)
    with pytest.raises(ValueError, match="is not a convcov_fast bank file"):
        covariance.load_bank(path)


def test_load_bank_wrong_shape_raises(tmp_path):
    path = tmp_path / "bank.pt"
    covariance.save_bank(path, covariance.closed_form(2, 3))
    payload = torch.load(path, weights_only=True)
    payload["kernel_size"] = [2, 2]
    torch.save(payload, path)
    with pytest.raises(ValueError, match=r"corrupt bank file: bank does not have shape \(L, 4, 4\)"):
        covariance.load_bank(path)


def test_load_bank_corrupt_metadata_raises(tmp_path):
    path = tmp_path / "bank.pt"
    covariance.save_bank(path, covariance.closed_form(2, 3))
    payload = torch.load(path, weights_only=True)
    payload["metadata"] = "{not json"
    torch.save(payload, path)
    with pytest.raises(ValueError, match=re.escape(str(path)) + " is a corrupt bank file"):
        covariance.load_bank(path)
