"""The Ray Tune trial: decode the candidate, score it with the worker's cached `CandidateScorer`, report.

A candidate that produces NaN/Inf samples or raises while being scored is reported with `PENALTY_SCORE` and
`failed=True` instead of erroring, because `NevergradSearch` never tells the optimizer about errored trials
(LCSC-NOTES §5) and the optimizer must learn that this region is bad. An input problem (a missing or
corrupt checkpoint, wrong statistics) is not the candidate's fault: it raises, so the search stops with the
message and stays resumable once the input is fixed.
"""

from __future__ import annotations

import traceback

import numpy as np
from ray import tune

from lcsc_ray.scoring import ScoringSpec, cached_scorer
from lcsc_ray.search.searcher import decode_candidate
from search_spaces.spaces import CoefficientSpace

PENALTY_SCORE = 1.0e6  # far above any Fréchet distance of real images; rank-based optimizers only need "worst"


def lcsc_trial(
    config: dict,
    *,
    scoring: ScoringSpec,
    space: CoefficientSpace,
    seed: int,
    num_samples: int,
    stack_payload: dict | None = None,
) -> None:
    """Score one coefficient vector on the fixed search noise and report `score` plus stage timings."""
    value, label = decode_candidate(config)
    alpha = space.to_coefficients(value)
    scorer = cached_scorer(scoring, stack_payload)  # an input error here stops the search (module docstring)
    try:
        result = scorer.score(alpha, seed=seed, num_samples=num_samples)
    except Exception as error:  # noqa: BLE001 - any candidate-specific failure becomes a penalised result
        tune.report({
            "score": PENALTY_SCORE,
            "failed": True,
            "error": f"{type(error).__name__}: {error}"[:500],
            "traceback": traceback.format_exc(limit=3)[-2000:],
            "label": label,
            "alpha_abs_max": float(np.max(np.abs(alpha))),
        })
        return
    report = {
        "score": float(result.score),
        scorer.metric_name: float(result.score),
        "failed": False,
        "label": label,
        "num_samples": result.num_samples,
        "alpha_abs_max": float(np.max(np.abs(alpha))),
    }
    report.update({f"time_{stage}": seconds for stage, seconds in result.timings.items()})
    tune.report(report)
