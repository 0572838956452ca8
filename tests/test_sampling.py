"""Tests of sampling filters from N(0, cov): shapes, statistics, factorization and input checks."""

import re

import pytest
import torch

from convcov_fast import covariance, factorize, init_, sample, sampling
from tolerances import SAMPLE_Z_BOUND


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def orthogonal(d, seed):
    """Return a random (d, d) float64 orthogonal matrix."""
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=seeded(seed), dtype=torch.float64))
    return q


def with_eigenvalues(eigenvalues, seed=0):
    """Return the exactly symmetric matrix Q diag(eigenvalues) Q^T for a random orthogonal Q."""
    eigenvalues = torch.as_tensor(eigenvalues, dtype=torch.float64)
    q = orthogonal(eigenvalues.numel(), seed)
    matrix = q @ torch.diag(eigenvalues) @ q.T
    return 0.5 * (matrix + matrix.T)


def rank_deficient(count, kernel_size=(3, 3), seed=0):
    """Return the empirical covariance of ``count`` random filters, of rank ``count - 1``."""
    filters = torch.randn(count, *kernel_size, generator=seeded(seed), dtype=torch.float64)
    return covariance.empirical(filters)


# shapes and dtypes


def test_sample_single_matrix_shape():
    filters = sample(covariance.gaussian(3, 1.0), 7)
    assert filters.shape == (7, 3, 3)


def test_sample_bank_shape():
    filters = sample(covariance.closed_form(4, 5), 6)
    assert filters.shape == (4, 6, 5, 5)


@pytest.mark.parametrize("kernel_size", [(3, 5), (5, 3), (1, 4)])
def test_sample_rectangular_shape(kernel_size):
    cov = covariance.gaussian(kernel_size, 1.0)
    assert sample(cov, 3, kernel_size=kernel_size).shape == (3, *kernel_size)
    bank = covariance.closed_form(2, kernel_size)
    assert sample(bank, 3, kernel_size=kernel_size).shape == (2, 3, *kernel_size)


def test_sample_dtype_default_float32():
    assert sample(covariance.gaussian(3, 1.0), 4).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_sample_dtype_on_request(dtype):
    filters = sample(covariance.gaussian(3, 1.0), 4, dtype=dtype)
    assert filters.dtype == dtype
    assert torch.isfinite(filters).all()


def test_sample_zero_filters():
    assert sample(covariance.gaussian(3, 1.0), 0).shape == (0, 3, 3)
    assert sample(covariance.closed_form(2, 3), 0).shape == (2, 0, 3, 3)


def test_sample_float32_input_covariance():
    cov = covariance.gaussian(3, 1.0).float()
    filters = sample(cov, 5, generator=seeded(0))
    assert filters.shape == (5, 3, 3)
    assert filters.dtype == torch.float32


# statistics


@pytest.mark.parametrize("kernel_size, sigma", [((3, 3), 1.0), ((5, 5), 1.5), ((3, 5), 0.7)])
def test_sample_covariance_matches(kernel_size, sigma, covariance_z):
    cov = covariance.gaussian(kernel_size, sigma)
    n = 20000
    filters = sample(cov, n, generator=seeded(11), kernel_size=kernel_size, dtype=torch.float64)
    samples = filters.reshape(n, -1)
    assert covariance_z(samples, cov) < SAMPLE_Z_BOUND
    # The bound is tight enough to reject a covariance 20% off in scale.
    assert covariance_z(samples, 1.2 * cov) > SAMPLE_Z_BOUND
    assert covariance_z(samples, cov / 1.2) > SAMPLE_Z_BOUND


def test_sample_bank_matches_each_matrix(covariance_z):
    bank = covariance.closed_form(3, 3, sigma_first=0.5, sigma_last=3.0)
    n = 20000
    filters = sample(bank, n, generator=seeded(5)).reshape(3, n, 9)
    for layer in range(3):
        assert covariance_z(filters[layer], bank[layer]) < SAMPLE_Z_BOUND
    # The bank's first and last layers differ enough that swapping them fails the bound.
    assert covariance_z(filters[0], bank[2]) > SAMPLE_Z_BOUND


def test_sample_mean_is_zero():
    cov = covariance.gaussian(3, 1.0, variance=4.0)
    n = 20000
    filters = sample(cov, n, generator=seeded(2), dtype=torch.float64).reshape(n, 9)
    standard_error = (cov.diagonal() / n).sqrt()
    assert float((filters.mean(0).abs() / standard_error).max()) < SAMPLE_Z_BOUND


def test_sample_singular_covariance(covariance_z):
    # Four filters give a rank-3 covariance over 9 taps, so Cholesky fails and the jitter path runs.
    cov = rank_deficient(4, seed=8)
    assert torch.linalg.cholesky_ex(cov).info != 0
    n = 20000
    samples = sample(cov, n, generator=seeded(9), dtype=torch.float64).reshape(n, 9)
    assert covariance_z(samples, cov) < SAMPLE_Z_BOUND
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    null_space = eigenvectors[:, eigenvalues < 1e-9 * eigenvalues[-1]]
    assert null_space.shape[1] == 6
    # Samples lie in the column space of cov. The jitter of 1e-8 of the mean diagonal at most
    # leaves components of about 1e-4 of a filter's scale in the null space.
    scale = float(eigenvalues[-1].sqrt())
    assert float((samples @ null_space).abs().max()) < 1e-3 * scale
    assert float((samples @ eigenvectors[:, -1]).abs().max()) > 0.5 * scale


def test_sample_indefinite_raises():
    cov = with_eigenvalues([1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, -0.25])
    with pytest.raises(ValueError, match="most negative eigenvalue is -0.25"):
        sample(cov, 3)


def test_sample_indefinite_bank_names_matrix():
    good = covariance.gaussian(3, 1.0)
    bad = with_eigenvalues([1.0] * 8 + [-0.5])
    with pytest.raises(ValueError, match=r"cov\[2\] is not positive semidefinite"):
        sample(torch.stack([good, good, bad]), 3)
    with pytest.raises(ValueError, match=r"cov\[0\] is not positive semidefinite"):
        sample(torch.stack([bad, good, good]), 3)


# determinism


def test_sample_same_seed_same_filters():
    cov = covariance.closed_form(2, 5)
    first = sample(cov, 9, generator=seeded(123))
    second = sample(cov, 9, generator=seeded(123))
    assert torch.equal(first, second)


def test_sample_different_seed_differs():
    cov = covariance.gaussian(5, 1.0)
    first = sample(cov, 9, generator=seeded(1))
    second = sample(cov, 9, generator=seeded(2))
    assert not torch.allclose(first, second)


def test_sample_global_seed_reproducible():
    cov = covariance.gaussian(3, 1.0)
    torch.manual_seed(4)
    first = sample(cov, 5)
    torch.manual_seed(4)
    second = sample(cov, 5)
    assert torch.equal(first, second)


# factorize


@pytest.mark.parametrize("kernel_size", [(3, 3), (7, 7), (3, 5)])
def test_factorize_reproduces_covariance(kernel_size):
    cov = covariance.gaussian(kernel_size, 1.3)
    factors = factorize(cov)
    d = kernel_size[0] * kernel_size[1]
    assert factors.shape == (1, d, d)
    assert factors.dtype == torch.float64
    torch.testing.assert_close(factors[0] @ factors[0].T, cov, atol=1e-14, rtol=1e-12)
    assert torch.equal(factors[0], factors[0].tril())


def test_factorize_bank():
    bank = covariance.closed_form(4, 3)
    factors = factorize(bank)
    assert factors.shape == (4, 9, 9)
    for layer in range(4):
        torch.testing.assert_close(factors[layer] @ factors[layer].T, bank[layer], atol=1e-14, rtol=1e-12)


def test_factorize_jitter_only_for_failing_matrix():
    positive_definite = covariance.gaussian(3, 1.0)
    singular = rank_deficient(5, seed=3)
    for bank in (torch.stack([positive_definite, singular]), torch.stack([singular, positive_definite])):
        factors = factorize(bank)
        good = 0 if torch.equal(bank[0], positive_definite) else 1
        assert torch.equal(factors[good], torch.linalg.cholesky(positive_definite))
        bad = 1 - good
        torch.testing.assert_close(factors[bad] @ factors[bad].T, singular, atol=1e-8, rtol=0)


def test_factorize_repeated_matrices():
    first = covariance.gaussian(3, 0.8)
    second = covariance.gaussian(3, 2.0)
    bank = torch.stack([first, second, first, first, second])
    factors = factorize(bank)
    for layer in range(5):
        torch.testing.assert_close(factors[layer], torch.linalg.cholesky(bank[layer]), atol=0, rtol=0)


def test_factorize_rounding_negative_eigenvalue_falls_back():
    # An eigenvalue of -1e-6 is inside the rounding band, so it is not rejected, but it is too
    # negative for the jitter, so the eigendecomposition fallback clamps it to zero.
    eigenvalues = torch.linspace(1.0, 0.1, 9, dtype=torch.float64)
    eigenvalues[-1] = -1e-6
    cov = with_eigenvalues(eigenvalues, seed=4)
    factors = factorize(cov)
    assert torch.isfinite(factors).all()
    clamped = with_eigenvalues(eigenvalues.clamp(min=0.0), seed=4)
    torch.testing.assert_close(factors[0] @ factors[0].T, clamped, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(factors[0] @ factors[0].T, cov, atol=2e-6, rtol=0)


def test_factorize_zero_matrix():
    factors = factorize(torch.zeros(4, 4, dtype=torch.float64))
    assert torch.equal(factors, torch.zeros(1, 4, 4, dtype=torch.float64))


def test_factorize_near_float64_maximum():
    cov = torch.diag(torch.tensor([1e308, 2e307], dtype=torch.float64))
    for factors in (factorize(cov), sampling.factorize_deferred(cov)):
        assert torch.isfinite(factors).all()
        torch.testing.assert_close(factors[0] @ factors[0].T, cov, atol=0, rtol=1e-15)


def test_factorize_indefinite_raises():
    cov = with_eigenvalues([2.0, 1.0, 1.0, -0.5])
    message = "most negative eigenvalue is -0.5 against a largest eigenvalue of 2"
    with pytest.raises(ValueError, match=re.escape(message)):
        factorize(cov)


# factorize_deferred: the CUDA path, run here on CPU tensors


def test_factorize_deferred_matches_factorize():
    singular = rank_deficient(9, seed=5)
    bank = torch.stack([covariance.gaussian(3, 0.7), singular, covariance.gaussian(3, 0.7)])
    deferred = sampling.factorize_deferred(bank)
    direct = factorize(bank)
    torch.testing.assert_close(deferred, direct, atol=1e-12, rtol=0)
    torch.testing.assert_close(deferred[1] @ deferred[1].T, singular, atol=1e-8, rtol=0)
    assert torch.equal(deferred[0], torch.linalg.cholesky(bank[0]))


@pytest.mark.parametrize("problem", ["nan", "inf", "asymmetric", "indefinite"])
def test_factorize_deferred_raises_like_factorize(problem):
    bank = torch.stack([covariance.gaussian(2, 1.0)] * 3)
    if problem == "nan":
        bank[2, 0, 0] = float("nan")
    elif problem == "inf":
        bank[1, 3, 3] = float("inf")
    elif problem == "asymmetric":
        bank[1, 0, 1] += 0.5
    else:
        bank[2] = with_eigenvalues([2.0, 1.0, 1.0, -0.5])
    with pytest.raises(ValueError) as direct:
        factorize(bank)
    with pytest.raises(ValueError) as deferred:
        sampling.factorize_deferred(bank)
    assert str(deferred.value) == str(direct.value)


# init_


def test_init_fills_in_place():
    weight = torch.full((6, 1, 3, 3), float("nan"))
    cov = covariance.gaussian(3, 1.0)
    result = init_(weight, cov, generator=seeded(3))
    assert result is weight
    assert torch.isfinite(weight).all()
    expected = sample(cov, 6, generator=seeded(3)).reshape(6, 1, 3, 3)
    assert torch.equal(weight, expected)


def test_init_parameter_keeps_grad():
    conv = torch.nn.Conv2d(4, 4, (3, 5), groups=4)
    parameter = conv.weight
    init_(conv.weight, covariance.gaussian((3, 5), 1.0), generator=seeded(0))
    assert conv.weight is parameter
    assert conv.weight.requires_grad
    assert conv.weight.grad is None


def test_init_float64_weight():
    weight = torch.empty(5, 1, 3, 3, dtype=torch.float64)
    init_(weight, covariance.gaussian(3, 1.0), generator=seeded(0))
    assert weight.dtype == torch.float64
    assert torch.isfinite(weight).all()


def test_init_accepts_bank_of_one():
    weight = torch.empty(3, 1, 3, 3)
    init_(weight, covariance.closed_form(1, 3), generator=seeded(0))
    assert torch.isfinite(weight).all()


def test_init_bank_raises():
    weight = torch.empty(3, 1, 3, 3)
    with pytest.raises(ValueError, match=r"one \(d, d\) matrix, got shape \(2, 9, 9\)"):
        init_(weight, covariance.closed_form(2, 3))


@pytest.mark.parametrize("shape", [(3, 2, 3, 3), (3, 3, 3), (0, 1, 3, 3)])
def test_init_bad_weight_shape_raises(shape):
    with pytest.raises(ValueError, match=re.escape(str(shape))):
        init_(torch.empty(shape), covariance.gaussian(3, 1.0))


def test_init_covariance_size_mismatch_raises():
    with pytest.raises(ValueError, match=r"does not match kernel_size \(5, 5\)"):
        init_(torch.empty(3, 1, 5, 5), covariance.gaussian(3, 1.0))


def test_init_non_tensor_weight_raises():
    with pytest.raises(TypeError, match="weight must be a torch.Tensor, got list"):
        init_([[0.0]], covariance.gaussian(3, 1.0))


# invalid input


def test_sample_non_square_raises():
    with pytest.raises(ValueError, match=r"square \(d, d\) matrix .* got shape \(9, 8\)"):
        sample(torch.ones(9, 8, dtype=torch.float64), 2)


@pytest.mark.parametrize("shape", [(9,), (1, 2, 9, 9), ()])
def test_sample_wrong_rank_raises(shape):
    with pytest.raises(ValueError, match=r"\(B, d, d\) bank, got shape " + re.escape(str(shape))):
        sample(torch.ones(shape, dtype=torch.float64), 2)


def test_sample_kernel_size_mismatch_raises():
    with pytest.raises(ValueError, match=r"cov has size 9, which does not match kernel_size \(2, 2\)"):
        sample(covariance.gaussian(3, 1.0), 2, kernel_size=(2, 2))


def test_sample_non_square_size_needs_kernel_size():
    with pytest.raises(ValueError, match=r"size 15, which is not a square number.*kernel_size=\(kh, kw\)"):
        sample(covariance.gaussian((3, 5), 1.0), 2)


def test_sample_asymmetric_raises():
    cov = covariance.gaussian(3, 1.0)
    cov[0, 1] += 1e-3
    with pytest.raises(ValueError, match=r"cov\[0\] is not symmetric"):
        sample(cov, 2)


def test_sample_rounding_asymmetry_accepted():
    cov = covariance.gaussian(3, 1.0)
    cov[0, 1] *= 1 + 1e-9
    assert sample(cov, 2).shape == (2, 3, 3)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_sample_non_finite_raises(value):
    cov = covariance.gaussian(3, 1.0)
    cov[4, 4] = value
    with pytest.raises(ValueError, match="cov contains NaN or Inf"):
        sample(cov, 2)


def test_sample_negative_n_raises():
    with pytest.raises(ValueError, match="n must be >= 0, got -1"):
        sample(covariance.gaussian(3, 1.0), -1)


@pytest.mark.parametrize("n", [2.0, "2", True])
def test_sample_non_int_n_raises(n):
    with pytest.raises(TypeError, match="n must be an int"):
        sample(covariance.gaussian(3, 1.0), n)


def test_sample_non_tensor_raises():
    with pytest.raises(TypeError, match="cov must be a torch.Tensor, got list"):
        sample([[1.0, 0.0], [0.0, 1.0]], 2)


def test_sample_integer_tensor_raises():
    with pytest.raises(TypeError, match="cov must be a floating-point tensor, got torch.int64"):
        sample(torch.eye(4, dtype=torch.int64), 2)


def test_sample_empty_matrix_raises():
    with pytest.raises(ValueError, match="d >= 1"):
        sample(torch.empty(0, 0), 2)


def test_sample_unknown_backend_raises():
    with pytest.raises(ValueError, match="backend must be one of .*got 'cuda'"):
        sample(covariance.gaussian(3, 1.0), 2, backend="cuda")


def test_sample_bad_dtype_raises():
    with pytest.raises(TypeError, match="dtype must be one of .*got torch.int32"):
        sample(covariance.gaussian(3, 1.0), 2, dtype=torch.int32)


def test_sample_triton_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' needs a CUDA tensor, or TRITON_INTERPRET=1"):
        sample(covariance.gaussian(3, 1.0), 2, backend="triton")


@pytest.mark.parametrize("sigma", [0, -0.5])
def test_gaussian_sigma_not_positive_raises(sigma):
    with pytest.raises(ValueError, match=f"sigma must be a finite number > 0, got {sigma}"):
        covariance.gaussian(3, sigma)


@pytest.mark.parametrize("depth", [0, -1])
def test_closed_form_depth_below_one_raises(depth):
    with pytest.raises(ValueError, match=f"depth must be >= 1, got {depth}"):
        covariance.closed_form(depth, 3)

