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

`LcscTrial` is a class trainable with one `step` per round of samples (a function trainable's result polling
costs more than a demo evaluation); `reset_config` lets Tune reuse the actor, and with it the cached scorer.
With `--scheduler fifo` a trial is one round of `--fid-samples` samples. With `--scheduler asha` or `race` it
grows through `--rounds` (the same fixed noise, only the new samples generated each round) and reports after
each, so Tune's scheduler can stop it; every round's `score` is on the full-fidelity scale (`comparable_score`,
docs/METHOD.md "Multi-fidelity trials"), and that is what the optimizer is told when a trial is stopped. Each
round before the last also reports its delete-a-block distances (`fd_leave_out`) and their jackknife
standard error (`score_se`), which the race's bound uses.
With `--candidates-per-trial` > 1 (fifo only) one step scores a batch of candidates, each recorded as it is
scored and reported under `batch` (docs/METHOD.md "Batched trials"). The search noise of a candidate and the
score it tells come from its `SearchObjective` (lcsc_ray/search/objective.py).
Its `__repr__` (trial index, label, stage, last score) is what Ray's dashboard shows in the Actors page's
Repr column and in the actor's log prefix; Ray takes it once, when the actor has been created.
"""

from __future__ import annotations

import time
import traceback
from typing import Iterator, Sequence

import numpy as np
import torch
from ray import tune

from lcsc_ray.errors import LcscError
from lcsc_ray.evaluator import EvalResult
from lcsc_ray.scoring import CandidateScorer, ScoringSpec, cached_scorer
from lcsc_ray.search.candidates import (BATCH_KEY, INDEX_KEY, LABEL_KEY, candidate_configs, candidate_index,
                                        decode_candidate, load_record, save_record)
from lcsc_ray.search.objective import SearchObjective
from search_spaces.spaces import CoefficientSpace

PENALTY_SCORE = 1.0e6  # far above any Fréchet distance of real images; rank-based optimizers only need "worst"
INPUT_ERROR_KEY = "lcsc_input_error"
INPUT_ERROR_REPEAT_S = 1.0  # pause before reporting a known input error again while the driver stops the search
JACKKNIFE_BLOCKS = 8  # delete-a-block distances per round of a multi-fidelity trial, for the 1/n extrapolation
FULL_FIDELITY_KEY = "full_fidelity"  # True once a trial scored all --fid-samples samples
SCORE_SE_KEY = "score_se"  # jackknife standard error of a round's distance, before the last round
LEAVE_OUT_KEY = "fd_leave_out"  # a round's delete-a-block distances, before the last round (the race pairs them)


def round_schedule(rounds: Sequence[int] | None, fid_samples: int, scheduler: str) -> tuple[int, ...]:
    """The sample counts after each round of a trial: the `rounds` below `fid_samples`, then `fid_samples`
    (always the last) with an early-stopping scheduler; the single round `fid_samples` with fifo. Counts at
    or above `fid_samples` are left out, so a preset's rounds do not stand in the way of a smaller
    --fid-samples (with none left a trial is one round, as with fifo). Bad values name the flag to fix."""
    if fid_samples < 2:
        raise LcscError(f"--fid-samples {fid_samples}: a Fréchet distance needs at least 2 samples")
    counts = [int(n) for n in (rounds or ())]
    if any(n < 2 for n in counts) or counts != sorted(set(counts)):
        raise LcscError(f"--rounds {','.join(map(str, counts))}: sample counts must increase and be at least 2, "
                        f"e.g. --rounds {max(2, fid_samples // 4)},{max(3, fid_samples // 2)} (--fid-samples "
                        f"{fid_samples} is always the last round)")
    if scheduler == "fifo":
        return (int(fid_samples),)
    return (*(n for n in counts if n < fid_samples), int(fid_samples))


def comparable_score(result: EvalResult, full_samples: int) -> float:
    """A round's `score`: the distance at `full_samples` samples, measured once the trial has them; before,
    predicted from the round's 1/n line (`RunningScore` with blocks), so a trial stopped early is told on the
    scale of the complete ones."""
    if result.num_samples >= full_samples or result.extrapolated is None:
        return float(result.score)
    return float(result.extrapolated + result.slope / full_samples)


def jackknife_se(leave_out: Sequence[float] | np.ndarray) -> float:
    """The delete-a-block jackknife standard error of a distance from its B leave-a-block-out values:
    sqrt((B-1)/B · Σ (FD₋b − mean)²). On the digits CM demo it bounds the error of the round's comparable
    score against the measured full-sample distance (docs/METHOD.md, "Racing against the incumbent")."""
    values = np.asarray(leave_out, dtype=np.float64)
    return float(np.sqrt((len(values) - 1) / len(values) * np.sum((values - values.mean()) ** 2)))


def _failure(report: dict, error: Exception) -> dict:
    """A candidate's own failure as a penalised, final report (module docstring)."""
    return {**report, "score": PENALTY_SCORE, "failed": True, FULL_FIDELITY_KEY: True,
            "error": f"{type(error).__name__}: {error}"[:500], "traceback": traceback.format_exc(limit=3)[-2000:]}


def evaluate_candidate(config: dict, *, scoring: ScoringSpec, space: CoefficientSpace, objective: SearchObjective,
                       num_samples: int, stack_payload: dict | None = None) -> dict:
    """Score the candidate of one trial config on its search noise (`objective.seed_of` its index): `score`
    (what the optimizer is told), the distance itself, stage timings, flags.

    Raises `LcscError` for input problems (module docstring); candidate failures become a penalised result."""
    value, label = decode_candidate(config)
    alpha = space.to_coefficients(value)
    scorer = cached_scorer(scoring, stack_payload)
    report = {"label": label, "alpha_abs_max": float(np.max(np.abs(alpha)))}
    try:
        result = scorer.score(alpha, seed=objective.seed_of(candidate_index(config)), num_samples=num_samples)
    except LcscError:
        raise  # e.g. a model that does not match the checkpoints: no candidate would do better
    except Exception as error:  # noqa: BLE001 - any candidate-specific failure becomes a penalised result
        return _failure(report, error)
    return {**report, **_round_report(scorer, result, round_index=0, distance=float(result.score),
                                      penalty=objective.penalty(alpha), final=True)}


def _round_report(scorer: CandidateScorer, result: EvalResult, *, round_index: int, distance: float, penalty: float,
                  final: bool) -> dict:
    """`score` (told) = `distance` (on the full-fidelity scale) + `penalty` (`SearchObjective.penalty`)."""
    report = {"score": distance + penalty, scorer.metric_name: float(result.score), "failed": False,
              "num_samples": result.num_samples, "round": round_index + 1, FULL_FIDELITY_KEY: final}
    report.update({f"time_{stage}": seconds for stage, seconds in result.timings.items()})
    if penalty:
        report["coef_penalty_term"] = penalty
    report.update(_gpu_memory(scorer))
    return report


def _gpu_memory(scorer: CandidateScorer) -> dict[str, float]:
    """Peak GPU memory of this worker process so far (MiB), when it scores on a GPU."""
    if scorer.device.type != "cuda":
        return {}
    return {"gpu_peak_mib": torch.cuda.max_memory_allocated(scorer.device) / 2**20}


class LcscTrial(tune.Trainable):
    """One candidate per trial: each `step` evaluates (or replays) one round of its samples; the last round
    (the only one with `--scheduler fifo`) reports `done`, and a scheduler may stop the trial before.

    `stage` says what the actor is doing (setup, loading stack, scoring, replay, input error, idle) so that
    its repr tells a dashboard reader more than "a trial actor"."""

    stage = "setup"
    last_score: float | None = None
    round_schedule = staticmethod(round_schedule)  # for the job, which builds this trainable's `rounds`

    def setup(self, config: dict, *, scoring: ScoringSpec, space: CoefficientSpace, objective: SearchObjective,
              num_samples: int, stack_payload: dict | None = None, rounds: Sequence[int] | None = None) -> None:
        """`rounds`: sample counts after each round (`round_schedule`); default one round of `num_samples`."""
        self.scoring, self.space, self.objective, self.stack_payload = scoring, space, objective, stack_payload
        self.rounds = tuple(rounds) if rounds else (int(num_samples),)
        self._input_error: str | None = None
        self._start_candidate()
        self.stage = "idle"

    def _start_candidate(self) -> None:
        self._records: list[dict] | None = None  # this candidate's recorded rounds, read at its first step
        self._done: list[dict] = []  # the reports of the rounds so far
        self._rounds_iter: Iterator[EvalResult] | None = None
        self._candidate: tuple[np.ndarray, str] | None = None  # (α, label)

    def step(self) -> dict:
        if self._input_error is not None:  # the driver is stopping the search; do not build the scorer again
            time.sleep(INPUT_ERROR_REPEAT_S)
            return {INPUT_ERROR_KEY: self._input_error}
        if BATCH_KEY in self.config:
            return self._step_batch()
        if self._records is None:
            self._records = load_record(self.config)
        index = len(self._done)
        if index < len(self._records):  # evaluated before a driver was killed: replay, do not evaluate again
            report = self._records[index]
            self._done.append(report)
            self.stage, self.last_score = "replay", report.get("score")
            return {**report, "replayed": True, "done": bool(report.get(FULL_FIDELITY_KEY, True))}
        try:
            self.stage = "loading stack"  # the first candidate of a worker builds its scorer; later ones reuse it
            scorer = cached_scorer(self.scoring, self.stack_payload)
            self.stage = "scoring"
            report = self._evaluate_round(scorer, index)
        except LcscError as error:
            return self._report_input_error(error)
        self._done.append(report)
        try:
            save_record(self.config, self._done)
        except LcscError as error:  # the storage is full or read-only: stop the search, resumable
            return self._report_input_error(error)
        self.stage, self.last_score = "idle", report["score"]
        return {**report, "replayed": False, "done": bool(report[FULL_FIDELITY_KEY])}

    def _report_input_error(self, error: LcscError) -> dict:
        """Keep the input problem (one line) and report it so the driver stops the search (module docstring)."""
        self._input_error = " ".join(str(error).split())
        self.stage = "input error"
        return {INPUT_ERROR_KEY: self._input_error}

    def _step_batch(self) -> dict:
        """All candidates of a batch trial (`--candidates-per-trial`, full fidelity only), one after another on
        this worker: each is recorded as soon as it is scored and replayed if it was recorded before. The
        report holds every candidate's report under `batch` (the searcher tells each), the best score as
        `score` (the progress line), and the stage times and samples summed over the batch."""
        reports = []
        for config in candidate_configs(self.config):
            recorded = load_record(config)
            if recorded:
                reports.append({**recorded[-1], "replayed": True})
                continue
            try:
                self.stage = "scoring"
                report = evaluate_candidate(config, scoring=self.scoring, space=self.space, objective=self.objective,
                                            num_samples=self.rounds[-1], stack_payload=self.stack_payload)
                save_record(config, [report])
            except LcscError as error:
                return self._report_input_error(error)
            reports.append({**report, "replayed": False})
        best = min(reports, key=lambda r: r["score"])
        summary = {key: sum(float(r.get(key, 0.0)) for r in reports)
                   for key in {k for r in reports for k in r if k.startswith("time_")} | {"num_samples"}}
        self.stage, self.last_score = "idle", best["score"]
        return {**summary, "score": best["score"], "failed": all(r.get("failed") for r in reports),
                "num_candidates": len(reports), "batch": reports, FULL_FIDELITY_KEY: True, "done": True}

    def _evaluate_round(self, scorer: CandidateScorer, index: int) -> dict:
        """Round `index` of this candidate. A trial that replayed earlier rounds regenerates their samples
        (their statistics were in the previous driver's workers) without reporting them again."""
        if self._candidate is None:  # decoded once per trial, not per round
            value, label = decode_candidate(self.config)
            self._candidate = (self.space.to_coefficients(value), label)
        alpha, label = self._candidate
        report = {"label": label, "alpha_abs_max": float(np.max(np.abs(alpha)))}
        try:
            if self._rounds_iter is None:
                seed = self.objective.seed_of(candidate_index(self.config))
                self._rounds_iter = scorer.score_rounds(alpha, seed=seed, rounds=self.rounds,
                                                        blocks=JACKKNIFE_BLOCKS if len(self.rounds) > 1 else 1)
                for _ in range(index):
                    next(self._rounds_iter)
            result = next(self._rounds_iter)
        except LcscError:
            raise
        except Exception as error:  # noqa: BLE001 - any candidate-specific failure becomes a penalised result
            return _failure(report, error)
        final = index == len(self.rounds) - 1
        report.update(_round_report(scorer, result, round_index=index, distance=comparable_score(result, self.rounds[-1]),
                                    penalty=self.objective.penalty(alpha), final=final))
        if result.extrapolated is not None:
            report.update(fd_extrapolated=result.extrapolated, fd_slope=result.slope)
        if result.leave_out and not final:  # what `--scheduler race` bounds the comparable score with
            report.update({SCORE_SE_KEY: jackknife_se(result.leave_out), LEAVE_OUT_KEY: list(result.leave_out)})
        return report

    def reset_config(self, new_config: dict) -> bool:
        self.config = new_config
        self._input_error = None
        self._start_candidate()
        self.stage = "idle"
        return True

    def __repr__(self) -> str:
        config = getattr(self, "config", {})  # Ray may ask before Trainable.__init__ has set it
        score = "-" if self.last_score is None else f"{self.last_score:.4g}"
        return (f"LcscTrial(trial {config.get(INDEX_KEY, '?')}, {config.get(LABEL_KEY, 'search')}, "
                f"{self.stage}, last score {score})")
