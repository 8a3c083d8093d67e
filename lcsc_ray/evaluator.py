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
from lcsc_ray.frechet import FrechetReference
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
        timings = dict.fromkeys(STAGES, 0.0)
        stats = RunningStats(self.extractor.dim, device=self.device)
        kept: list[torch.Tensor] | None = []  # features while n < d, for the Gram form
        iterator = iter(batches)
        while True:
            start = time.perf_counter()
            batch = next(iterator, None)
            self._sync()
            timings["sample"] += time.perf_counter() - start
            if batch is None:
                break
            start = time.perf_counter()
            batch = batch.to(self.extractor.device)
            if not torch.isfinite(batch).all():
                raise NonFiniteSamplesError(f"generated images contain NaN/Inf (after {stats.num_samples} samples)")
            features = self.extractor(batch)
            if not torch.isfinite(features).all():
                raise NonFiniteSamplesError(f"{self.extractor.name} features of generated images contain NaN/Inf")
            self._sync()
            timings["features"] += time.perf_counter() - start
            start = time.perf_counter()
            stats.update(features)
            if kept is not None:
                kept.append(features.to(self.device, torch.float64))
                kept = kept if stats.num_samples < self.extractor.dim else None
            self._sync()
            timings["statistics"] += time.perf_counter() - start
        if stats.num_samples < 2:
            raise ValueError(f"need at least 2 generated images to score, got {stats.num_samples}")
        start = time.perf_counter()
        if kept is not None:
            score = self.reference.distance_from_features(torch.cat(kept))
        else:
            score = self.reference.distance(stats.mean(), stats.covariance())
        timings["distance"] += time.perf_counter() - start
        return EvalResult(score, self.extractor.metric_name, stats.num_samples, timings)
