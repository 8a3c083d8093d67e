"""The search's one call: batches -> digits features -> running statistics -> Fréchet distance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lcsc_ray.data import load_digits_labelled
from lcsc_ray.errors import LcscError
from lcsc_ray.evaluator import STAGES, Evaluator, NonFiniteSamplesError
from lcsc_ray.frechet import frechet_distance
from lcsc_ray.reference_stats import ReferenceStats, compute_reference_stats
from metric_fixtures import digits_extractor, metric_cache  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def setup(digits_extractor):
    images = load_digits_labelled()[0]
    reference = compute_reference_stats(images[:1000], digits_extractor, dataset="digits[:1000]")
    return images, reference, Evaluator(digits_extractor, reference)


def batches_of(images: torch.Tensor, size: int):
    """A generator, like the sampler's: batches are produced only when asked for."""
    for start in range(0, len(images), size):
        yield images[start:start + size]


def features_of(extractor, images: torch.Tensor, size: int) -> np.ndarray:
    """All features at once, batched as the evaluator saw them (float32 convolutions differ by ~1e-6
    between batch sizes, which would show at the 1e-9 level of these comparisons)."""
    return torch.cat([extractor(batch) for batch in batches_of(images, size)]).double().numpy()


def test_score_equals_frechet_distance_of_all_features(setup, digits_extractor):
    images, reference, evaluator = setup
    held_out = images[1000:]
    result = evaluator.evaluate(batches_of(held_out, 128))
    features = features_of(digits_extractor, held_out, 128)
    expected = frechet_distance(features.mean(0), np.cov(features, rowvar=False), reference.mu, reference.sigma)
    # streamed float64 sums vs np.cov differ at ~1e-13; FD ≈ 21 is a difference of terms ~100x larger
    assert result.score == pytest.approx(expected, rel=1e-7)
    assert (result.metric_name, result.num_samples) == ("fd_digits", 797)
    assert set(result.timings) == set(STAGES) and all(t >= 0 for t in result.timings.values())
    noise = evaluator.evaluate(batches_of(torch.rand(797, 1, 8, 8) * 2 - 1, 128))
    assert noise.score > 10 * result.score  # real held-out digits are much closer than uniform noise


def test_fewer_samples_than_dimensions_use_the_gram_form(setup, digits_extractor):
    images, reference, evaluator = setup
    few = images[1000:1040]  # n = 40 < d = 64
    features = features_of(digits_extractor, few, 16)
    expected = frechet_distance(features.mean(0), np.cov(features, rowvar=False), reference.mu, reference.sigma)
    assert evaluator.evaluate(batches_of(few, 16)).score == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_samples_raise_the_penalty_exception(setup, bad):
    images, _, evaluator = setup
    broken = images[:64].clone()
    broken[3, 0, 2, 2] = bad
    with pytest.raises(NonFiniteSamplesError):
        evaluator.evaluate(batches_of(broken, 32))


def test_reference_from_another_extractor_is_refused(setup, digits_extractor):
    _, reference, _ = setup
    with pytest.raises(LcscError, match="'inception' extractor, but 'digits'"):
        Evaluator(digits_extractor, ReferenceStats(reference.mu, reference.sigma, {"extractor": "inception"}))
    with pytest.raises(LcscError, match="dimension 2048"):
        Evaluator(digits_extractor, ReferenceStats(np.zeros(2048), np.eye(2048)))  # plain pytorch-fid file
    with pytest.raises(LcscError, match="another 'digits' extractor"):
        Evaluator(digits_extractor, ReferenceStats(reference.mu, reference.sigma,
                                                   {**reference.meta, "extractor_identity": "digits:0000"}))
