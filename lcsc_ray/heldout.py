"""Held-out evaluation of one candidate: the searched metric plus metrics the search never saw.

The search ranks thousands of candidates on one metric and one noise seed, so the best of them is biased
low on exactly that metric (and may exploit the one feature network it was scored with). The final table
therefore re-scores each finalist and baseline on several other noise seeds with
- the searched metric (the same `Evaluator` the trials used),
- a Fréchet distance on each independent extractor (`--eval-extractors`, e.g. `digits_indep`),
- precision and recall (k-NN manifolds, lcsc_ray/precision_recall.py) against real images, on the first
  independent extractor, or on the searched one when none is given,
all from one set of samples per candidate and seed (docs/METHOD.md, "Held-out evaluation").

A candidate is a coefficient vector or a baseline checkpoint file, optionally followed by an affine output
correction x -> clamp(a·x + b, -1, 1): the "rescaled" control, fitted here on the search noise
(`fit_output_affine`), which shows how much of a gain a trivial contrast fix would give.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lcsc_ray.baseline_checkpoints import ExtraBaseline
from lcsc_ray.evaluator import Evaluator
from lcsc_ray.features import build_extractor
from lcsc_ray.precision_recall import DEFAULT_K, knn_radii, precision_recall
from lcsc_ray.reference_stats import load_reference_stats
from lcsc_ray.scoring import CandidateScorer
from lcsc_ray.shipped_files import local_path

Source = np.ndarray | ExtraBaseline  # coefficients over the stack, or a baseline checkpoint file


@dataclass(frozen=True)
class OutputAffine:
    """x -> clamp(a·x + b, -1, 1) applied to every generated image (the rescaled control)."""

    a: float = 1.0
    b: float = 0.0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return (self.a * images + self.b).clamp(-1.0, 1.0)


@dataclass(frozen=True)
class EvalPlan:
    """What the held-out evaluation computes besides the searched metric: (extractor, reference statistics
    path) pairs for independent Fréchet distances, and the real images' dataset spec for precision/recall
    (None: skipped) with how many real and generated samples it uses."""

    extractors: tuple[tuple[str, str], ...] = ()
    real_data: str | None = None
    pr_samples: int = 5000
    inception_weights: str | None = None


class HeldoutMetrics:
    """The independent evaluators and the real features (with their k-NN radii) of one `EvalPlan`, built
    once per worker process next to the cached scorer."""

    def __init__(self, plan: EvalPlan, scorer: CandidateScorer) -> None:
        device = scorer.device
        self.evaluators = []
        for name, stats in plan.extractors:  # the driver's files, or this node's copies of them (shipped_files.py)
            extractor = build_extractor(name, device=device,
                                        inception_weights=local_path(scorer.shipped, plan.inception_weights))
            reference = load_reference_stats(local_path(scorer.shipped, stats), extractor=extractor.name,
                                             dim=extractor.dim)
            self.evaluators.append(Evaluator(extractor, reference, device=device))
        pr_extractors = [e.extractor for e in self.evaluators[:1]] or [scorer.evaluator.extractor]
        self.real: list[tuple[object, torch.Tensor, torch.Tensor]] = []
        self.pr_samples = plan.pr_samples
        if plan.real_data is not None:
            from lcsc_ray.data import load_images

            images = load_images(plan.real_data)
            chosen = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:plan.pr_samples]
            for extractor in pr_extractors:
                real = _features(extractor, images[chosen].split(scorer.spec.batch_size))
                self.real.append((extractor, real, knn_radii(real.double(), DEFAULT_K)))

    def score(self, scorer: CandidateScorer, batches: list[torch.Tensor]) -> dict[str, float]:
        """Every metric of one candidate's samples: {searched metric, fd of each extractor, precision_<name>,
        recall_<name>}."""
        metrics = {scorer.metric_name: float(scorer.evaluator.evaluate(iter(batches)).score)}
        for evaluator in self.evaluators:
            metrics[evaluator.extractor.metric_name] = float(evaluator.evaluate(iter(batches)).score)
        fake_batches = _first(batches, self.pr_samples)
        for extractor, real, radii in self.real:
            precision, recall = precision_recall(real, _features(extractor, fake_batches), real_radii=radii)
            metrics[f"precision_{extractor.name}"], metrics[f"recall_{extractor.name}"] = precision, recall
        return metrics


def candidate_samples(scorer: CandidateScorer, source: Source, transform: OutputAffine | None, *, seed: int,
                      num_samples: int) -> list[torch.Tensor]:
    """The candidate's samples for `seed`'s fixed noise (output correction applied), kept so that every
    metric sees the same images."""
    scorer.load_candidate(source)
    batches = list(scorer.sample_batches(seed=seed, num_samples=num_samples))
    return [transform(b) for b in batches] if transform is not None else batches


def fit_output_affine(scorer: CandidateScorer, source: Source, *, seed: int, num_samples: int,
                      max_evaluations: int = 60) -> tuple[OutputAffine, float]:
    """(a, b) minimising the searched metric of clamp(a·x + b) over one set of samples of `source` on the
    search noise (Nelder-Mead from the identity; each step re-scores the same images, no sampling), and
    that score. The fit sees only the search noise, so its held-out score is as honest as the winner's."""
    from scipy.optimize import minimize

    batches = candidate_samples(scorer, source, None, seed=seed, num_samples=num_samples)

    def loss(params: np.ndarray) -> float:
        affine = OutputAffine(float(params[0]), float(params[1]))
        return float(scorer.evaluator.evaluate(affine(b) for b in batches).score)

    fit = minimize(loss, x0=np.array([1.0, 0.0]), method="Nelder-Mead",
                   options={"maxfev": max_evaluations, "xatol": 1e-3, "fatol": 1e-4, "initial_simplex":
                            np.array([[1.0, 0.0], [1.3, 0.0], [1.0, 0.15]])})
    return OutputAffine(float(fit.x[0]), float(fit.x[1])), float(fit.fun)


def _features(extractor, batches) -> torch.Tensor:
    return torch.cat([extractor(b.to(extractor.device)).double().cpu() for b in batches])


def _first(batches: list[torch.Tensor], count: int) -> list[torch.Tensor]:
    """The leading `count` images of `batches`, still in batches."""
    kept, total = [], 0
    for batch in batches:
        if total >= count:
            break
        kept.append(batch[:count - total])
        total += len(kept[-1])
    return kept


_METRICS: dict[tuple[str, int], HeldoutMetrics] = {}


def cached_metrics(plan: EvalPlan, scorer: CandidateScorer) -> HeldoutMetrics:
    """The worker's `HeldoutMetrics` for `plan` next to its cached scorer (extractors and real features once)."""
    key = (repr(plan), id(scorer))
    if key not in _METRICS:
        _METRICS.clear()
        _METRICS[key] = HeldoutMetrics(plan, scorer)
    return _METRICS[key]
