"""The Ray Tune trial: decode the candidate, score it with the worker's cached `CandidateScorer`, report.

Three outcomes, kept apart because each needs different handling:
- a score: recorded in the candidate store first (so a killed driver loses nothing), then reported;
- a candidate's own numerical failure (NaN/Inf samples, an overflow at extreme α): reported with
  `PENALTY_SCORE` and `failed=True`, because Ray's Nevergrad searcher never tells errored trials and the
  optimizer must learn that this region is bad;
- an input problem (the model factory, a checkpoint, the statistics; any `LcscError` while the scorer is
  built): reported under `INPUT_ERROR_KEY` without a score and without finishing the trial, so the driver
  stops the search with that one line and the trial runs again after `--resume`. Raising instead would make
  Tune retry it as if the worker had died and print its tracebacks.

`LcscTrial` is a class trainable with one `step` per candidate (a function trainable's result polling costs
more than a demo evaluation); `reset_config` lets Tune reuse the actor, and with it the cached scorer.
Its `__repr__` (trial index, label, stage, last score) is what Ray's dashboard shows in the Actors page's
Repr column and in the actor's log prefix; Ray takes it once, when the actor has been created.
"""

from __future__ import annotations

import time
import traceback

import numpy as np
import torch
from ray import tune

from lcsc_ray.errors import LcscError
from lcsc_ray.scoring import CandidateScorer, ScoringSpec, cached_scorer
from lcsc_ray.search.candidates import INDEX_KEY, LABEL_KEY, decode_candidate, load_record, save_record
from search_spaces.spaces import CoefficientSpace

PENALTY_SCORE = 1.0e6  # far above any Fréchet distance of real images; rank-based optimizers only need "worst"
INPUT_ERROR_KEY = "lcsc_input_error"
INPUT_ERROR_REPEAT_S = 1.0  # pause before reporting a known input error again while the driver stops the search


def evaluate_candidate(config: dict, *, scoring: ScoringSpec, space: CoefficientSpace, seed: int, num_samples: int,
                       stack_payload: dict | None = None) -> dict:
    """Score the candidate of one trial config on the fixed search noise: `score`, stage timings, flags.

    Raises `LcscError` for input problems (module docstring); candidate failures become a penalised result."""
    value, label = decode_candidate(config)
    alpha = space.to_coefficients(value)
    scorer = cached_scorer(scoring, stack_payload)
    report = {"label": label, "alpha_abs_max": float(np.max(np.abs(alpha)))}
    try:
        result = scorer.score(alpha, seed=seed, num_samples=num_samples)
    except LcscError:
        raise  # e.g. a model that does not match the checkpoints: no candidate would do better
    except Exception as error:  # noqa: BLE001 - any candidate-specific failure becomes a penalised result
        return {**report, "score": PENALTY_SCORE, "failed": True,
                "error": f"{type(error).__name__}: {error}"[:500],
                "traceback": traceback.format_exc(limit=3)[-2000:]}
    report.update({"score": float(result.score), scorer.metric_name: float(result.score), "failed": False,
                   "num_samples": result.num_samples})
    report.update({f"time_{stage}": seconds for stage, seconds in result.timings.items()})
    report.update(_gpu_memory(scorer))
    return report


def _gpu_memory(scorer: CandidateScorer) -> dict[str, float]:
    """Peak GPU memory of this worker process so far (MiB), when it scores on a GPU."""
    if scorer.device.type != "cuda":
        return {}
    return {"gpu_peak_mib": torch.cuda.max_memory_allocated(scorer.device) / 2**20}


class LcscTrial(tune.Trainable):
    """One candidate per trial: `step` evaluates it (or replays its record) and reports `done`.

    `stage` says what the actor is doing (setup, loading stack, scoring, replay, input error, idle) so that
    its repr tells a dashboard reader more than "a trial actor"."""

    stage = "setup"
    last_score: float | None = None

    def setup(self, config: dict, *, scoring: ScoringSpec, space: CoefficientSpace, seed: int, num_samples: int,
              stack_payload: dict | None = None) -> None:
        self.options = dict(scoring=scoring, space=space, seed=seed, num_samples=num_samples,
                            stack_payload=stack_payload)
        self._input_error: str | None = None
        self.stage = "idle"

    def step(self) -> dict:
        if self._input_error is not None:  # the driver is stopping the search; do not build the scorer again
            time.sleep(INPUT_ERROR_REPEAT_S)
            return {INPUT_ERROR_KEY: self._input_error}
        record = load_record(self.config)
        if record is not None:  # evaluated before a driver was killed: replay, do not evaluate again
            self.stage, self.last_score = "replay", record.get("score")
            return {**record, "replayed": True, "done": True}
        try:
            self.stage = "loading stack"  # the first candidate of a worker builds its scorer; later ones reuse it
            cached_scorer(self.options["scoring"], self.options["stack_payload"])
            self.stage = "scoring"
            report = evaluate_candidate(self.config, **self.options)
        except LcscError as error:
            self._input_error = " ".join(str(error).split())
            self.stage = "input error"
            return {INPUT_ERROR_KEY: self._input_error}
        save_record(self.config, report)
        self.stage, self.last_score = "idle", report["score"]
        return {**report, "replayed": False, "done": True}

    def reset_config(self, new_config: dict) -> bool:
        self.config = new_config
        self._input_error = None
        self.stage = "idle"
        return True

    def __repr__(self) -> str:
        config = getattr(self, "config", {})  # Ray may ask before Trainable.__init__ has set it
        score = "-" if self.last_score is None else f"{self.last_score:.4g}"
        return (f"LcscTrial(trial {config.get(INDEX_KEY, '?')}, {config.get(LABEL_KEY, 'search')}, "
                f"{self.stage}, last score {score})")
