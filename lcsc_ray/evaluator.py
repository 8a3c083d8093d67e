"""One call for the search: stream generated batches -> features -> running statistics -> Fréchet distance.

The expensive, candidate-independent work (building the extractor, √Σ_ref) happens once in `Evaluator`;
`evaluate` then costs sampling + feature extraction + one `eigvalsh` (docs/METHOD.md, "Scoring"). Memory is bounded by
d × d: the float64 sums always, and while fewer than d samples have arrived also the features themselves,
which the n × n Gram form needs (n < d features take less room than the d × d covariance).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable

import torch

from lcsc_ray.errors import LcscError
from lcsc_ray.features import FeatureExtractor
from lcsc_ray.frechet import FrechetReference, extrapolate_frechet
from lcsc_ray.reference_stats import ReferenceStats
from lcsc_ray.statistics import RunningStats

STAGES = ("sample", "features", "statistics", "distance")


class NonFiniteSamplesError(ValueError):
    """A candidate produced NaN/Inf images or features: the search scores it with a penalty instead."""


@dataclass
class EvalResult:
    """A candidate's score and where its evaluation time went (seconds per stage in `STAGES`)."""

    score: float
    metric_name: str
    num_samples: int
    timings: dict[str, float] = field(default_factory=dict)
    extrapolated: float | None = None  # the distance extrapolated to infinitely many samples (blocks > 1)
    slope: float | None = None  # of the distance in 1/n: score ≈ extrapolated + slope / num_samples
    leave_out: list[float] | None = None  # the B delete-a-block distances (blocks > 1), for the jackknife SE


class Evaluator:
    """Scores image generators against fixed reference statistics with one extractor."""

    def __init__(self, extractor: FeatureExtractor, reference: ReferenceStats, *,
                 device: str | torch.device = "cpu") -> None:
        stored = reference.meta.get("extractor")
        if stored is not None and stored != extractor.name:
            raise LcscError(f"reference statistics were computed with the {stored!r} extractor, but {extractor.name!r} "
                            f"is in use; use --extractor {stored} or statistics from {extractor.name!r}")
        if reference.dim != extractor.dim:
            raise LcscError(f"reference statistics have dimension {reference.dim}, the {extractor.name!r} extractor "
                            f"gives {extractor.dim}; use statistics computed with this extractor")
        identity = reference.meta.get("extractor_identity")
        if identity is not None and identity != extractor.identity:
            raise LcscError(f"reference statistics come from another {extractor.name!r} extractor ({identity}, now "
                            f"{extractor.identity}); recompute them with launch/fid_stats.py")
        self.extractor = extractor
        self.device = torch.device(device)
        self.reference = FrechetReference(reference.mu, reference.sigma, device=self.device)

    def _sync(self) -> None:
        """Wait for queued GPU work so each stage's time is its own (no-op on the CPU)."""
        for device in {self.device, self.extractor.device}:
            if device.type == "cuda":
                torch.cuda.synchronize(device)

    def evaluate(self, batches: Iterable[torch.Tensor]) -> EvalResult:
        """Score the images in `batches` ([B, C, H, W] in [-1, 1]); raises `NonFiniteSamplesError` on NaN/Inf."""
        return RunningScore(self).add(batches)


class RunningScore:
    """The running statistics of one candidate's samples so far, scored whenever more samples arrive.

    A multi-fidelity trial generates its samples in rounds (samples 0..n₁-1, then n₁..n₂-1, ...): each
    `add` feeds one round and returns the distance at the new sample count. Scoring n samples in one `add`
    or in several gives the same distance, because the statistics are running sums. With `blocks` = B > 1
    the result also carries the distance extrapolated to infinitely many samples and its 1/n slope, from the
    B delete-a-block distances (`lcsc_ray.frechet.extrapolate_frechet`): B more distances per `add`.
    """

    def __init__(self, evaluator: Evaluator, *, blocks: int = 1) -> None:
        self.evaluator = evaluator
        self.stats = RunningStats(evaluator.extractor.dim, device=evaluator.device, blocks=blocks)
        self._kept: list[torch.Tensor] | None = []  # features while n < d, for the Gram form

    @property
    def num_samples(self) -> int:
        return self.stats.num_samples

    def distance(self, exclude: int | None = None) -> float:
        """FD of the samples so far (all, or all but block `exclude`): the n × n Gram form while n < d, the
        d × d form from the sums after."""
        if self.stats.count(exclude) < 2:
            raise ValueError(f"need at least 2 generated images to score, got {self.stats.count(exclude)}")
        reference = self.evaluator.reference
        if self._kept is None:
            return reference.distance(self.stats.mean(exclude), self.stats.covariance(exclude))
        features = torch.cat(self._kept)
        if exclude is not None:
            features = features[torch.arange(len(features), device=features.device) % self.stats.blocks != exclude]
        return reference.distance_from_features(features)

    def _leave_one_out(self) -> list[tuple[int, float]]:
        """(samples, distance) with each block left out in turn: one batched eigenvalue problem from the sums
        once n >= d, the Gram form per block before."""
        if self._kept is not None:
            return [(self.stats.count(b), self.distance(exclude=b)) for b in range(self.stats.blocks)]
        counts, means, covariances = self.stats.leave_one_out()
        return list(zip(counts, self.evaluator.reference.distances(means, covariances)))

    def add(self, batches: Iterable[torch.Tensor]) -> EvalResult:
        """Feed `batches`; the distance at the new sample count, with this call's seconds per stage. Raises
        `NonFiniteSamplesError` on NaN/Inf images or features."""
        evaluator = self.evaluator
        timings = dict.fromkeys(STAGES, 0.0)
        iterator = iter(batches)
        while True:
            start = time.perf_counter()
            batch = next(iterator, None)
            evaluator._sync()
            timings["sample"] += time.perf_counter() - start
            if batch is None:
                break
            start = time.perf_counter()
            batch = batch.to(evaluator.extractor.device)
            if not torch.isfinite(batch).all():
                raise NonFiniteSamplesError(f"generated images contain NaN/Inf (after {self.num_samples} samples)")
            features = evaluator.extractor(batch)
            if not torch.isfinite(features).all():
                raise NonFiniteSamplesError(f"{evaluator.extractor.name} features of generated images contain NaN/Inf")
            evaluator._sync()
            timings["features"] += time.perf_counter() - start
            start = time.perf_counter()
            self.stats.update(features)
            if self._kept is not None:
                self._kept.append(features.to(evaluator.device, torch.float64))
                self._kept = self._kept if self.num_samples < evaluator.extractor.dim else None
            evaluator._sync()
            timings["statistics"] += time.perf_counter() - start
        start = time.perf_counter()
        result = EvalResult(self.distance(), evaluator.extractor.metric_name, self.num_samples, timings)
        if self.stats.blocks > 1:
            leave_out = self._leave_one_out()
            result.extrapolated, result.slope = extrapolate_frechet(result.score, self.num_samples, leave_out)
            result.leave_out = [float(distance) for _, distance in leave_out]
        timings["distance"] += time.perf_counter() - start
        return result
