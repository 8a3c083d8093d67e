"""The Fréchet distance against pytorch-fid's `calculate_frechet_distance` and against its own identities."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from pytorch_fid.fid_score import calculate_frechet_distance
from threadpoolctl import threadpool_limits

from lcsc_ray.errors import LcscError
from lcsc_ray.frechet import FrechetReference, frechet_distance
from metric_fixtures import digits_extractor, metric_cache  # noqa: F401  (fixtures)


def pytorch_fid_distance(mu1, sigma1, mu2, sigma2) -> float:
    """pytorch-fid's value; scipy 1.17 only warns that sqrtm's `disp` argument is deprecated. One BLAS
    thread: on the shared 2-core machine two spinning threads made sqrtm several times slower."""
    with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
        warnings.filterwarnings("ignore", message=".*disp.*", category=DeprecationWarning)
        return float(calculate_frechet_distance(mu1, sigma1, mu2, sigma2))


def gaussian_stats(rng: np.random.Generator, n: int, d: int, scale: float, offset: float):
    """Mean and covariance of n correlated random features (a random mixing makes Σ non-diagonal)."""
    mixing = rng.standard_normal((d, d)) / np.sqrt(d)
    features = rng.standard_normal((n, d)) @ mixing * scale + offset + rng.standard_normal(d) * 0.1
    return features.mean(0), np.cov(features, rowvar=False)


def relative_error(ours: float, theirs: float) -> float:
    return abs(ours - theirs) / abs(theirs)


def scipy_reference_distance(mu1, sigma1, mu2, sigma2) -> float:
    """An independent float64 reference: tr √(Σ₁ Σ₂) as Σ √λ of the non-symmetric Σ₁ Σ₂ (scipy's general `eigvals`,
    real parts of eigenvalues that are real and non-negative in exact arithmetic)."""
    eigenvalues = scipy.linalg.eigvals(sigma1 @ sigma2).real
    diff = mu1 - mu2
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def features_like_pool3(rng: np.random.Generator, n: int, d: int, scale: float) -> np.ndarray:
    """Non-negative correlated features as `benchmarks/fid_bench.py` generates them (rectified mixtures)."""
    mixing = rng.standard_normal((d, d)) / np.sqrt(d)
    return np.abs(rng.standard_normal((n, d)) @ mixing * scale + 0.3)


@pytest.mark.parametrize("use_torch", [False, True])
@pytest.mark.parametrize("n", [40, 300])  # n < d: the Gram form; n > d: the full form from the features
def test_features_match_pytorch_fid_and_scipy(use_torch, n):
    rng = np.random.default_rng(11)
    d = 128
    ref, gen = features_like_pool3(rng, 600, d, 0.3), features_like_pool3(rng, n, d, 0.35)
    mu_ref, sigma_ref = ref.mean(0), np.cov(ref, rowvar=False)
    mu_gen, sigma_gen = gen.mean(0), np.cov(gen, rowvar=False)
    expected = pytorch_fid_distance(mu_gen, sigma_gen, mu_ref, sigma_ref)
    reference = FrechetReference(mu_ref, sigma_ref, use_torch=use_torch)
    from_features = reference.distance_from_features(gen)
    from_statistics = reference.distance(mu_gen, sigma_gen)
    assert relative_error(from_features, expected) <= 1e-6
    assert relative_error(from_statistics, expected) <= 1e-6
    assert relative_error(from_features, scipy_reference_distance(mu_gen, sigma_gen, mu_ref, sigma_ref)) <= 1e-6


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_scipy_reference_both_paths(seed):
    rng = np.random.default_rng(seed)
    mu1, sigma1 = gaussian_stats(rng, 300, 80, 1.0, 0.0)
    mu2, sigma2 = gaussian_stats(rng, 900, 80, 0.7, 0.4)
    expected = scipy_reference_distance(mu1, sigma1, mu2, sigma2)
    for use_torch in (False, True):
        value = FrechetReference(mu2, sigma2, use_torch=use_torch).distance(mu1, sigma1)
        assert relative_error(value, expected) <= 1e-9


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # pytorch-fid's sqrtm of the singular Σ_gen Σ_ref
def test_singular_reference_takes_pivoted_cholesky():
    """A reference with fewer samples than dimensions and a dead feature (a zero row and column of Σ_ref):
    plain Cholesky fails, pivoted Cholesky gives the same distance as the torch eigh path and pytorch-fid."""
    rng = np.random.default_rng(6)
    ref = features_like_pool3(rng, 50, 96, 0.3)
    ref[:, 5] = 0.0  # a feature that never fires
    mu_ref, sigma_ref = ref.mean(0), np.cov(ref, rowvar=False)
    reference = FrechetReference(mu_ref, sigma_ref)
    assert reference._order is not None  # the pivoted path was taken
    for gen in (features_like_pool3(rng, 500, 96, 0.35), features_like_pool3(rng, 30, 96, 0.35)):
        mu_gen, sigma_gen = gen.mean(0), np.cov(gen, rowvar=False)
        expected = pytorch_fid_distance(mu_gen, sigma_gen, mu_ref, sigma_ref)
        torch_path = FrechetReference(mu_ref, sigma_ref, use_torch=True).distance(mu_gen, sigma_gen)
        assert relative_error(reference.distance(mu_gen, sigma_gen), expected) <= 1e-6
        assert relative_error(reference.distance_from_features(gen), expected) <= 1e-6
        assert relative_error(reference.distance(mu_gen, sigma_gen), torch_path) <= 1e-9


def test_inputs_are_not_modified_and_batches_match_single_distances():
    rng = np.random.default_rng(8)
    mu_ref, sigma_ref = gaussian_stats(rng, 400, 48, 1.0, 0.1)
    reference = FrechetReference(mu_ref, sigma_ref)
    features = rng.standard_normal((30, 48)) + 0.2
    stack = np.stack([np.cov(features[i:], rowvar=False) for i in (0, 3)])
    means = np.stack([features[i:].mean(0) for i in (0, 3)])
    kept = features.copy(), stack.copy(), sigma_ref.copy()
    single = [reference.distance(mu, sigma) for mu, sigma in zip(means, stack)]
    assert reference.distances(means, stack) == pytest.approx(single, rel=1e-12)
    reference.distance_from_features(features)
    for before, after in zip(kept, (features, stack, sigma_ref)):
        np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_pytorch_fid_d64(seed):
    rng = np.random.default_rng(seed)
    mu1, sigma1 = gaussian_stats(rng, 500, 64, 1.0, 0.0)
    mu2, sigma2 = gaussian_stats(rng, 700, 64, 1.3, 0.2)
    expected = pytorch_fid_distance(mu1, sigma1, mu2, sigma2)
    assert relative_error(frechet_distance(mu1, sigma1, mu2, sigma2), expected) <= 1e-6
    # the same reference reused for a second candidate, and the torch float64 (GPU) code path
    reference = FrechetReference(mu2, sigma2, use_torch=True)
    assert relative_error(reference.distance(torch.from_numpy(mu1), torch.from_numpy(sigma1)), expected) <= 1e-6


def random_psd(rng: np.random.Generator, d: int) -> np.ndarray:
    """A random full-rank covariance A Aᵀ / d + 0.01 I (cheaper than np.cov of many samples at d = 2048)."""
    mixing = rng.standard_normal((d, d))
    return mixing @ mixing.T / d + 0.01 * np.eye(d)


def test_matches_pytorch_fid_d2048():
    rng = np.random.default_rng(7)
    mu1, sigma1 = rng.standard_normal(2048) * 0.1, random_psd(rng, 2048)
    mu2, sigma2 = rng.standard_normal(2048) * 0.1, random_psd(rng, 2048) * 1.2
    expected = pytorch_fid_distance(mu1, sigma1, mu2, sigma2)  # ~10 s: scipy sqrtm of a 2048x2048 product
    assert relative_error(FrechetReference(mu2, sigma2).distance(mu1, sigma1), expected) <= 1e-6


def test_matches_pytorch_fid_on_digits_features(digits_extractor):
    from lcsc_ray.data import load_digits_labelled

    images, labels = load_digits_labelled()
    real = digits_extractor(images[labels < 5]).double().numpy()
    other = digits_extractor(images[labels >= 3]).double().numpy()
    mu1, sigma1 = real.mean(0), np.cov(real, rowvar=False)
    mu2, sigma2 = other.mean(0), np.cov(other, rowvar=False)
    expected = pytorch_fid_distance(mu1, sigma1, mu2, sigma2)
    assert expected > 1.0
    assert relative_error(frechet_distance(mu1, sigma1, mu2, sigma2), expected) <= 1e-6


def test_identical_covariance_gives_squared_mean_difference():
    rng = np.random.default_rng(3)
    mu, sigma = gaussian_stats(rng, 400, 32, 1.0, 0.0)
    shift = rng.standard_normal(32)
    assert frechet_distance(mu + shift, sigma, mu, sigma) == pytest.approx(float(shift @ shift), rel=1e-9, abs=1e-9)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("use_torch", [False, True])
def test_gram_form_equals_full_form(use_torch):
    rng = np.random.default_rng(4)
    mu_ref, sigma_ref = gaussian_stats(rng, 1000, 96, 1.0, 0.3)
    reference = FrechetReference(mu_ref, sigma_ref, use_torch=use_torch)
    features = rng.standard_normal((40, 96)) * 1.2 + 0.1  # n = 40 < d = 96: rank-deficient Σ_gen
    full = reference.distance(features.mean(0), np.cov(features, rowvar=False))
    # Σ_gen has 56 zero eigenvalues; unless their rounding noise is zeroed, the full form is off by ~1e-8
    assert relative_error(reference.distance_from_features(features), full) <= 1e-10
    # n >= d falls back to the full form with the same covariance as np.cov
    many = rng.standard_normal((200, 96))
    assert relative_error(reference.distance_from_features(many),
                          reference.distance(many.mean(0), np.cov(many, rowvar=False))) <= 1e-9


def test_rank_deficient_covariances_are_clamped_not_nan():
    rng = np.random.default_rng(5)
    few = rng.standard_normal((10, 50))  # both covariances have rank 9 < 50: eigenvalues ~ ±1e-16
    other = rng.standard_normal((12, 50)) + 0.5
    value = frechet_distance(few.mean(0), np.cov(few, rowvar=False), other.mean(0), np.cov(other, rowvar=False))
    assert np.isfinite(value) and value > 0
    reference = FrechetReference(other.mean(0), np.cov(other, rowvar=False))
    assert relative_error(reference.distance_from_features(few), value) <= 1e-10


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_statistics_are_refused(bad):
    mu, sigma = np.zeros(4), np.eye(4)
    broken = sigma.copy()
    broken[1, 2] = bad
    with pytest.raises(LcscError, match="NaN or Inf"):
        FrechetReference(mu, broken)
    with pytest.raises(LcscError, match="NaN or Inf"):
        FrechetReference(mu, sigma).distance(np.full(4, bad), sigma)


def test_not_a_covariance_is_refused():
    with pytest.raises(LcscError, match="not positive semi-definite"):
        FrechetReference(np.zeros(2), np.diag([1.0, -0.5]))
    with pytest.raises(LcscError, match="dimension 3"):
        FrechetReference(np.zeros(2), np.eye(2)).distance(np.zeros(3), np.eye(3))
