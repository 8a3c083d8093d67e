"""The Ray Tune trial: decode the candidate, score it with the worker's cached `CandidateScorer`, report.

A candidate that produces NaN/Inf samples or raises while being scored is reported with `PENALTY_SCORE` and
`failed=True` instead of erroring, because `NevergradSearch` never tells the optimizer about errored trials
(LCSC-NOTES §5) and the optimizer must learn that this region is bad. An input problem (a missing or
corrupt checkpoint, wrong statistics) is not the candidate's fault: it raises while the scorer is built, so
the search stops with the message and stays resumable once the input is fixed.

`LcscTrial` is a class trainable with one `step` per candidate rather than a function trainable: Tune
detects the end of a function trainable by polling its result queue with a 0.2 s timeout, which alone cost
more than a whole demo evaluation (benchmarks/trial_overhead.py). `reset_config` lets Tune reuse the actor,
and with it the cached scorer, for the next candidate.
"""

from __future__ import annotations

import traceback

import numpy as np
from ray import tune

from lcsc_ray.scoring import ScoringSpec, cached_scorer
from lcsc_ray.search.searcher import decode_candidate
from search_spaces.spaces import CoefficientSpace

PENALTY_SCORE = 1.0e6  # far above any Fréchet distance of real images; rank-based optimizers only need "worst"


def evaluate_candidate(config: dict, *, scoring: ScoringSpec, space: CoefficientSpace, seed: int, num_samples: int,
                       stack_payload: dict | None = None) -> dict:
    """Score the candidate of one trial config on the fixed search noise: `score`, stage timings, flags."""
    value, label = decode_candidate(config)
    alpha = space.to_coefficients(value)
    scorer = cached_scorer(scoring, stack_payload)  # an input error here stops the search (module docstring)
    report = {"label": label, "alpha_abs_max": float(np.max(np.abs(alpha)))}
    try:
        result = scorer.score(alpha, seed=seed, num_samples=num_samples)
    except Exception as error:  # noqa: BLE001 - any candidate-specific failure becomes a penalised result
        return {**report, "score": PENALTY_SCORE, "failed": True,
                "error": f"{type(error).__name__}: {error}"[:500],
                "traceback": traceback.format_exc(limit=3)[-2000:]}
    report.update({"score": float(result.score), scorer.metric_name: float(result.score), "failed": False,
                   "num_samples": result.num_samples})
    report.update({f"time_{stage}": seconds for stage, seconds in result.timings.items()})
    return report


class LcscTrial(tune.Trainable):
    """One candidate per trial: `step` evaluates it and reports `done`; the actor is reused across trials."""

    def setup(self, config: dict, *, scoring: ScoringSpec, space: CoefficientSpace, seed: int, num_samples: int,
              stack_payload: dict | None = None) -> None:
        self.options = dict(scoring=scoring, space=space, seed=seed, num_samples=num_samples,
                            stack_payload=stack_payload)

    def step(self) -> dict:
        return {**evaluate_candidate(self.config, **self.options), "done": True}

    def reset_config(self, new_config: dict) -> bool:
        self.config = new_config
        return True
