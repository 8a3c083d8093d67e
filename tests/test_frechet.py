"""The Fréchet distance against pytorch-fid's `calculate_frechet_distance` and against its own identities."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
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
