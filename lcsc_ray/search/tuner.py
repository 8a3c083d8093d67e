"""Run the coefficient search as a Ray Tune experiment (fresh or resumed) and collect its trials.

`run_search` is the one place that builds the `tune.Tuner`: `LcscNevergradSearch` as the search algorithm and
the one keeper of the budget (it ends the search; Tune's own trial count is unlimited, since after a killed
driver its saved count may disagree with the trials it restores), `reuse_actors=True` so each worker keeps
its scorer, short trial folder names, `FailureConfig` retries, and a `SearchMonitor` callback.

How a run ends, and what the caller gets:
- the budget is reached: a `ResultTable`;
- a trial reported an input problem: `LcscError` with that line and the resume command (exit status 2);
- Ctrl+C or SIGTERM (or `ray job stop`): Tune saves the experiment state; `SearchInterrupted` with the
  exact resume command (exit status 130 or 143), never a table. A second signal exits at once, and so does
  a driver whose stop takes longer than a few seconds (lcsc_ray/stopping.py);
- trials that ended in ERROR without an input problem (a lost node or worker) are re-run once through the
  same restore, so the search completes its count.
Resume goes through `Tuner.restore(..., resume_unfinished=True, resume_errored=True)`; Ray silently starts
afresh when the experiment state is missing or corrupt, so the files are checked first.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from ray import tune
from ray.tune.result import AUTO_RESULT_KEYS
from ray.tune.logger import JsonLoggerCallback
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from lcsc_ray import stopping
from lcsc_ray.atomic import atomic_write_json
from lcsc_ray.checkpoints import excluded_step
from lcsc_ray.errors import LcscError, SearchInterrupted
from lcsc_ray.search.candidates import (CANDIDATES_DIR, RECORD_SUFFIX, candidate_configs,
                                        candidate_index, decode_candidate)
from lcsc_ray.search.identity import check_identity, search_settings
from lcsc_ray.search.monitor import SearchMonitor
from lcsc_ray.search.objective import SearchObjective
from lcsc_ray.search.optimizers import build_optimizer
from lcsc_ray.search.ray_compat import (EXPERIMENT_STATE_GLOB, ActorKeepingScheduler, allow_pending_trials, allow_results_without_metric, check_ray_version,
                                        interrupt_tune_run, json_trial_logs_only, let_driver_handle_sigint,
                                        newest_experiment_state, quiet_tune_console, run_config_of,
                                        watch_tune_stop)
from lcsc_ray.search.searcher import LcscNevergradSearch, load_searcher
from lcsc_ray.search.trial import FULL_FIDELITY_KEY, LEAVE_OUT_KEY, SCORE_SE_KEY, jackknife_se
from search_spaces.spaces import CoefficientSpace

MANIFEST = "lcsc_search.json"
REBUILD_KEY = "_rebuild"  # set on a manifest whose Ray state is damaged: the search is rebuilt from its store
SET_ASIDE = re.compile(r"^(damaged|budget)-\d{8}-\d{6}$")  # Ray files of an earlier run of a rebuilt experiment
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
UNLIMITED = -1  # Tune's num_samples for "no count of its own": the searcher's budget ends the search
TIME_ATTR = "num_samples"  # what ASHA's rungs count: samples a trial has scored so far
SCHEDULERS = ("fifo", "asha", "race")  # --scheduler
RACE_Z = 1.0  # paired standard errors by which a round must be worse than the incumbent's to stop (METHOD.md)
TUNE_KEYS = frozenset(AUTO_RESULT_KEYS) | {"done", "trial_id", "experiment_tag"}  # Tune's bookkeeping, not the trial's


@dataclass
class TrialRecord:
    """One completed trial: what was evaluated and what it reported."""

    index: int  # suggestion order (baselines first)
    trial_id: str
    label: str  # "baseline:<name>" or "search"
    value: np.ndarray  # the parametrization value
    alpha: np.ndarray  # merge coefficients, float64 [K]
    score: float
    metrics: dict[str, Any]  # everything else the trial reported (timings, flags), Tune's bookkeeping removed


@dataclass
class ResultTable:
    """The completed trials of a search in trial order, plus what the optimizer was told."""

    metric: str
    rows: list[TrialRecord]
    experiment_path: str
    num_errored: int = 0
    told: list[tuple[int, str, float]] = field(default_factory=list)  # (index, label, loss) per optimizer tell
    num_tell_not_asked: int = 0

    def samples_generated(self) -> int:
        """Samples the trials scored, over all trials (a trial stopped early counts the rounds it ran)."""
        return sum(int(row.metrics.get("num_samples", 0)) for row in self.rows)

    def baselines(self) -> dict[str, TrialRecord]:
        """The warm-start trials by name (without the `baseline:` prefix)."""
        return {row.label.split(":", 1)[1]: row for row in self.rows if row.label.startswith("baseline:")}


def short_trial_dirname(trial) -> str:
    """Trial folder names without the config (a K-float array would otherwise end up in the path)."""
    return f"trial_{trial.trial_id}"


def _experiment_dir(storage: str | os.PathLike, name: str) -> Path:
    if not NAME_PATTERN.match(name):
        raise LcscError(f"--name {name!r} must be letters, digits, '.', '_' or '-' (it names a folder)")
    return Path(storage).expanduser().resolve() / name


def _check_resumable(exp_dir: Path) -> dict[str, Any]:
    """The manifest of the experiment to resume. Ray would silently start afresh from a missing or damaged
    experiment state, so the state is checked first; when it is damaged (a disk that filled up, a driver
    killed before Ray's first save) but our manifest is intact, the manifest says so under `REBUILD_KEY` and
    `run_search` rebuilds the search from the candidate store, whose records are the source of truth."""
    if not exp_dir.is_dir():
        raise LcscError(f"no experiment {exp_dir.name} in {exp_dir.parent}; drop --resume to start it")
    try:
        manifest = json.loads((exp_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise LcscError(f"{exp_dir / MANIFEST} is missing or corrupt, so this is not a search lcsc-ray can resume; "
                        f"start again under another --name (or delete {exp_dir})") from None
    damage = ray_state_damage(exp_dir)
    return manifest if damage is None else {**manifest, REBUILD_KEY: damage}


def ray_state_damage(exp_dir: Path) -> str | None:
    """Why Ray cannot restore the experiment in `exp_dir` as it is, or None."""
    if not tune.Tuner.can_restore(str(exp_dir)):
        return "it has no tuner.pkl"
    state = newest_experiment_state(exp_dir)
    if state is None:
        return f"it has no {EXPERIMENT_STATE_GLOB} (stopped before Ray's first save)"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"its experiment state {state.name} is damaged"
    if not glob.glob(str(exp_dir / "searcher-state-*.pkl")):
        return "it has no searcher state"
    return None


def set_aside_ray_state(exp_dir: Path, why: str) -> Path:
    """Move Ray's files of an experiment into `<why>-<time>/` inside it (`damaged`, `budget`), keeping the
    manifest and the candidate store in place, so a fresh Tune run can start in the same folder."""
    aside = exp_dir / f"{why}-{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir()
    for entry in exp_dir.iterdir():
        if entry.name not in (MANIFEST, CANDIDATES_DIR) and not SET_ASIDE.match(entry.name):
            shutil.move(str(entry), str(aside / entry.name))
    return aside


def check_experiment(storage: str | os.PathLike, name: str, *, resume: bool) -> dict[str, Any] | None:
    """Check `--name` in `--storage` before anything expensive starts: a new search must not overwrite an
    existing experiment, a resumed one must be restorable. Returns the manifest of the experiment to resume,
    None for a new one."""
    exp_dir = _experiment_dir(storage, name)
    if resume:
        return _check_resumable(exp_dir)
    if exp_dir.exists() and any(exp_dir.iterdir()):
        raise LcscError(
            f"experiment {name} exists in {exp_dir.parent}; pass --resume to continue or choose another --name"
        )
    return None


def run_search(
    trainable: Callable | type,
    space: CoefficientSpace,
    *,
    optimizer: str,
    num_trials: int,
    seed: int,
    warm_start: dict[str, np.ndarray] | None = None,
    metric: str = "score",
    storage: str | os.PathLike,
    name: str,
    resume: bool = False,
    max_concurrent: int = 1,
    resources: dict[str, float] | None = None,
    max_failures: int = 2,
    progress: bool = True,
    penalty: float = float("inf"),
    resume_hint: str | None = None,
    scheduler: str = "fifo",
    rounds: Sequence[int] = (),
    reduction_factor: float = 3.0,
    race_z: float = RACE_Z,
    race_pair: bool = True,
    objective: SearchObjective = SearchObjective(),
    candidates_per_trial: int = 1,
    identity: Mapping[str, Any] | None = None,
    new_search_hint: Callable[[int], str] | None = None,
) -> ResultTable:
    """Run (or resume) the search to its budget and return its completed trials (module docstring for the
    other endings; `resume_hint` is the command printed for them, by default the flags that name the run;
    `new_search_hint(step)` the command of a new search without the checkpoint at `step`, printed when a
    trial's input error names that remedy, which a resume cannot apply).

    `trainable` is a Ray Tune trainable receiving `config` with the keys of `lcsc_ray.search.candidates`
    (decode with `decode_candidate`); it must report `metric` (lower is better).
    `warm_start` maps baseline names to α [K]; they are the first trials and are told to the optimizer.
    `resources` is the per-trial request, e.g. {"cpu": 1, "gpu": 0.5}. Ray must already be initialised
    (or is started locally by Tune). `scheduler` "asha" stops trials between the `rounds` (sample counts the
    trainable reports as `num_samples`; `trial.round_schedule`) that score worse than all but the best
    1/`reduction_factor` of the trials that reached the same round; "race" stops those worse than the best
    complete trial at the same round by more than `race_z` paired jackknife standard errors (`race_pair`
    False: their own score minus `race_z` standard errors above its full score; `RaceScheduler`); "fifo"
    runs every trial to its end.
    `objective` is what the trainable tells besides the distance (noise per generation, coefficient penalty);
    it is recorded so that a resume with other values is refused. `candidates_per_trial` > 1 has each Tune
    trial evaluate that many candidates asked together (full fidelity only): `num_trials` still counts
    candidates, and every candidate is a row of the table and a tell of the optimizer. `identity` is the job's
    `identity_record` (the run, scoring and search flags), recorded in the manifest with the settings known
    here; a resume is refused when either differs from what the experiment recorded (the job checks the
    same before Ray starts).
    """
    exp_dir = _experiment_dir(storage, name)
    trial_scheduler = build_scheduler(scheduler, rounds, reduction_factor, keep_actors=max_concurrent, race_z=race_z,
                                      race_pair=race_pair)
    check_batching(candidates_per_trial, scheduler)
    manifest = check_experiment(storage, name, resume=resume)
    check_ray_version()
    allow_results_without_metric()
    allow_pending_trials(max_concurrent)
    resume_hint = resume_hint or f"--resume --name {name} --storage {exp_dir.parent}"
    wrapped = _actor_named(tune.with_resources(trainable, resources) if resources else trainable)
    settings = {**(identity or {}), **search_settings(
        space, optimizer=optimizer, seed=seed, scheduler=scheduler, rounds=rounds, objective=objective,
        candidates_per_trial=candidates_per_trial)}
    grow = manifest is not None and num_trials > int(manifest["num_trials"])
    rebuild = manifest is not None and (REBUILD_KEY in manifest or grow)
    if manifest is not None:
        check_identity(name, manifest, settings)
        if num_trials < manifest["num_trials"]:
            print(f"note: resuming {name} to its original budget of {manifest['num_trials']} trials")
    if manifest is not None and not rebuild:
        budget = tune_trials(manifest["num_trials"], candidates_per_trial)
        grid, monitor = _fit(_restore(exp_dir, wrapped), name, budget, metric, penalty, progress, exp_dir)
    else:
        if rebuild:
            recorded = len(list((exp_dir / CANDIDATES_DIR).glob(f"*{RECORD_SUFFIX}")))
            if REBUILD_KEY in manifest:
                num_trials = max(num_trials, int(manifest["num_trials"]))
                why = f"Ray cannot restore {name} ({manifest[REBUILD_KEY]}"
            else:
                why = f"growing the budget of {name} from {manifest['num_trials']} to {num_trials} trials ("
            aside = set_aside_ray_state(exp_dir, "damaged" if REBUILD_KEY in manifest else "budget")
            print(f"note: {why}; Ray's files are kept in {aside}): rebuilding the search from its candidate store, "
                  f"where {recorded} finished evaluation(s) are replayed, not run again")
        if num_trials < 1:
            raise LcscError(f"--num-trials must be at least 1, got {num_trials}")
        warm = list((warm_start or {}).items())
        if len(warm) > num_trials:
            raise LcscError(f"--num-trials {num_trials} is fewer than the {len(warm)} baselines it must evaluate first")
        opt = build_optimizer(
            optimizer, space.parametrization(), budget=num_trials, num_workers=max_concurrent, seed=seed
        )
        searcher = LcscNevergradSearch(
            opt,
            experiment_dir=exp_dir,
            warm_start=[(label, space.to_value(alpha)) for label, alpha in warm],
            metric=metric,
            mode="min",
            max_concurrent=max_concurrent,
            candidates_per_trial=candidates_per_trial,
            budget=num_trials,
            replay_store=rebuild,
        )
        atomic_write_json(exp_dir / MANIFEST, {
            **settings, "num_trials": num_trials, "metric": metric, "warm_start": [label for label, _ in warm],
        })
        tuner = tune.Tuner(
            wrapped,
            tune_config=tune.TuneConfig(
                search_alg=searcher, num_samples=UNLIMITED, metric=metric,
                mode="min", reuse_actors=True,
                trial_dirname_creator=short_trial_dirname,
                scheduler=trial_scheduler,
            ),
            run_config=tune.RunConfig(
                name=name, storage_path=str(exp_dir.parent),
                failure_config=tune.FailureConfig(max_failures=max_failures),
                # A class trainable would be checkpointed at its end by default; ours has nothing to save.
                checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False),
                verbose=0,
            ),
        )
        budget = tune_trials(num_trials, candidates_per_trial)
        grid, monitor = _fit(tuner, name, budget, metric, penalty, progress, exp_dir)
    _check_ending(monitor, name, budget, resume_hint, new_search_hint)
    if monitor.errored:
        # A trial whose node or worker died can end in ERROR with retries left: Tune stops instead of
        # recovering a trial whose second failure event arrives while it is already pending a retry. The
        # candidate was never told, so the budget would come up short: re-run the errored trials once.
        print(f"note: {monitor.errored} trial(s) of {name} ended in error (a lost node or worker); re-running "
              f"them once")
        grid, monitor = _fit(_restore(exp_dir, wrapped), name, budget, metric, penalty, progress, exp_dir)
        _check_ending(monitor, name, budget, resume_hint, new_search_hint)
    return collect_results(grid, space, metric=metric, experiment_path=exp_dir)


def tune_trials(num_candidates: int, candidates_per_trial: int) -> int:
    """Tune trials needed for `num_candidates` candidates at `candidates_per_trial` each (the last may hold fewer)."""
    return -(-num_candidates // candidates_per_trial)


def check_batching(candidates_per_trial: int, scheduler: str) -> None:
    """Batches are scored at full fidelity in one step: an early-stopping scheduler would stop whole batches.
    Called by the tune flags (before anything runs) and by `run_search`."""
    if candidates_per_trial < 1 or (candidates_per_trial > 1 and scheduler != "fifo"):
        raise LcscError(f"--candidates-per-trial {candidates_per_trial}: must be 1, or more with --scheduler fifo "
                        "(a batch trial scores its candidates at full fidelity; ASHA stops single candidates)")


class KeepingFIFOScheduler(ActorKeepingScheduler, FIFOScheduler):
    """Tune's FIFO scheduler that keeps one actor per concurrent trial between trials (`keep_trial_actors`)."""


class KeepingASHAScheduler(ActorKeepingScheduler, ASHAScheduler):
    """Tune's ASHA scheduler that keeps one actor per concurrent trial between trials (`keep_trial_actors`)."""


class RaceScheduler(FIFOScheduler):
    """Racing against the incumbent, the best trial measured at full fidelity so far. A trial's round before
    its last is stopped when its comparable score (the distance predicted at full fidelity) is above the
    incumbent's comparable score at the same round by more than `z` jackknife standard errors of that paired
    difference: d = score − score_inc(n), SE from the B differences of their delete-a-block distances (all
    trials share the search noise, so sample n of both is drawn from the same noise and whatever that draw
    does to the prediction cancels in d). Where the incumbent has no report at that round (another schedule,
    `pair` False) the bound is unpaired: score − z · `score_se` above the incumbent's full score. A trial not
    clearly worse runs on; one that finishes better than the incumbent replaces it. Until a trial has
    finished there is nothing to race against, so the first trial runs to the end.
    docs/METHOD.md, "Racing against the incumbent".

    `stopped` counts the trials stopped, `incumbent` is the best full-fidelity score seen. A resumed search
    gets the scheduler as it was created (Tune keeps it in tuner.pkl), and Tune adds the restored trials to
    it first: the best finished one becomes the incumbent again, raced unpaired (its rounds were not kept)
    until a trial finishes better."""

    def __init__(self, z: float = RACE_Z, pair: bool = True) -> None:
        super().__init__()
        if not z >= 0:
            raise LcscError(f"race confidence z {z}: must be at least 0")
        self.z, self.pair = float(z), bool(pair)
        self.incumbent = float("inf")
        self.stopped = 0
        self._metric = "score"
        self._rounds: dict[Any, dict[int, tuple[float, np.ndarray]]] = {}  # running trials' rounds so far
        self._incumbent_rounds: dict[int, tuple[float, np.ndarray]] = {}  # samples → (score, delete-a-block)

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        if mode not in (None, "min"):
            return False  # the race compares distances: lower is better
        self._metric = metric or self._metric
        return True

    @staticmethod
    def _key(trial: Any, result: dict) -> Any:
        return result.get("trial_id", getattr(trial, "trial_id", id(trial)))

    def _complete(self, trial: Any, result: dict | None) -> None:
        """A full-fidelity score becomes the incumbent when it is the best so far (not a failure's penalty)."""
        result = result or {}
        rounds = self._rounds.pop(self._key(trial, result), {})
        score = result.get(self._metric)
        if (score is not None and not result.get("failed") and result.get(FULL_FIDELITY_KEY, True)
                and float(score) < self.incumbent):
            self.incumbent, self._incumbent_rounds = float(score), rounds

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        """Tune hands a trial's last result (`done`) here, not to `on_trial_result`."""
        self._complete(trial, result)
        super().on_trial_complete(tune_controller, trial, result)

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        """A resume adds the trials that finished before it too: the best of them is the incumbent."""
        if getattr(trial, "status", None) == Trial.TERMINATED and trial.last_result:
            self._complete(trial, trial.last_result)
        super().on_trial_add(tune_controller, trial)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self._rounds.pop(getattr(trial, "trial_id", id(trial)), None)
        super().on_trial_remove(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        score = result.get(self._metric)
        if score is None or result.get("failed"):
            return TrialScheduler.CONTINUE
        if result.get(FULL_FIDELITY_KEY, True):
            self._complete(trial, result)
            return TrialScheduler.CONTINUE
        leave_out = result.get(LEAVE_OUT_KEY)
        leave_out = None if leave_out is None else np.asarray(leave_out, dtype=np.float64)
        samples = int(result.get(TIME_ATTR, 0))
        self._rounds.setdefault(self._key(trial, result), {})[samples] = (float(score), leave_out)
        if self.stopped_by_bound(float(score), samples, leave_out, result.get(SCORE_SE_KEY)):
            self.stopped += 1
            self._rounds.pop(self._key(trial, result), None)
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def stopped_by_bound(self, score: float, samples: int, leave_out: np.ndarray | None, se: float | None) -> bool:
        """The rule (class docstring): True when the round is clearly worse than the incumbent."""
        paired = self._incumbent_rounds.get(samples) if self.pair else None
        if paired is not None and leave_out is not None and paired[1] is not None and len(paired[1]) == len(leave_out):
            return score - paired[0] - self.z * jackknife_se(leave_out - paired[1]) > 0
        return se is not None and score - self.z * float(se) > self.incumbent

    def debug_string(self) -> str:
        return f"Race (z={self.z}): incumbent {self.incumbent:.4g}, {self.stopped} trials stopped"


class KeepingRaceScheduler(ActorKeepingScheduler, RaceScheduler):
    """The race scheduler that keeps one actor per concurrent trial between trials (`keep_trial_actors`)."""


def build_scheduler(name: str, rounds: Sequence[int], reduction_factor: float, keep_actors: int = 1,
                    race_z: float = RACE_Z, race_pair: bool = True) -> TrialScheduler:
    """Tune's scheduler for `--scheduler`: FIFO (every trial runs to its end), ASHA, asynchronous successive
    halving over the sample count (`num_samples`, the trainable's time attribute): rungs at the first round
    and every `reduction_factor` times more samples, up to the last round, or race (`RaceScheduler`: stop a
    round clearly worse than the best complete trial's same round). With one round,
    FIFO. Each keeps `keep_actors` trial actors (the concurrency) alive between trials, so each next trial
    reuses one."""
    if name not in SCHEDULERS:
        raise LcscError(f"unknown --scheduler {name!r}; use {', '.join(SCHEDULERS)}")
    if name == "fifo" or len(rounds) < 2:  # one round: nothing to stop between rounds
        scheduler = KeepingFIFOScheduler()
    elif name == "race":
        scheduler = KeepingRaceScheduler(z=race_z, pair=race_pair)
    elif reduction_factor <= 1:
        raise LcscError(f"--reduction-factor {reduction_factor}: must be above 1 (keep the best 1/factor per round)")
    else:
        scheduler = KeepingASHAScheduler(time_attr=TIME_ATTR, max_t=int(rounds[-1]), grace_period=int(rounds[0]),
                                         reduction_factor=reduction_factor)
    scheduler.keep_actors = max(1, int(keep_actors))
    return scheduler


def _actor_named(trainable: Callable | type) -> Callable | type:
    """Give a class trainable that Tune built (`with_parameters`, `with_resources`) its own name as qualified
    name: Ray names actors by `__qualname__`, which Tune leaves at e.g.
    `with_resources.<locals>.ResourceTrainable`, and the dashboard should list our class instead. `__name__`
    stays as it is: Tune registers the trainable under it and a resumed experiment must find it again."""
    if isinstance(trainable, type) and "<locals>" in trainable.__qualname__:
        trainable.__qualname__ = trainable.__name__
    return trainable


def _check_ending(monitor: SearchMonitor, name: str, budget: int, resume_hint: str,
                  new_search_hint: Callable[[int], str] | None = None) -> None:
    """Raise unless the run ended by reaching its budget (completed or errored trials)."""
    if monitor.input_error:
        step = excluded_step(monitor.input_error)
        if step is not None and new_search_hint is not None:  # a new selection: a resume keeps the old one
            raise LcscError(f"{monitor.input_error} (search stopped; a resumed search keeps the checkpoints it "
                            f"started with, so leave step {step} out in a new search: {new_search_hint(step)}; or "
                            f"once the file is repaired, continue this one with: {resume_hint})")
        raise LcscError(f"{monitor.input_error} (search stopped; fix this, then continue with: {resume_hint})")
    if monitor.completed + monitor.errored < budget or stopping.received() is not None:  # trials a stop failed
        raise SearchInterrupted(f"{_stopped_search(name, monitor.completed, budget)}; continue it with: {resume_hint}")


def _stopped_search(name: str, completed: int, budget: int) -> str:
    """What a stopped search leaves, for its last line (with the command that continues it)."""
    return f"search {name} stopped with {completed} of {budget} trials completed; its state is saved"


def _restore(exp_dir: Path, trainable: Any) -> tune.Tuner:
    """The experiment's Tuner as last saved, set to run its unfinished and errored trials again."""
    return tune.Tuner.restore(str(exp_dir), trainable, resume_unfinished=True, resume_errored=True)


def _fit(tuner: tune.Tuner, name: str, num_trials: int, metric: str, penalty: float,
         progress: bool, exp_dir: Path) -> tuple[Any, SearchMonitor]:
    """Run the tuner with this process's monitor attached; the result grid and the monitor."""
    monitor = _attach_monitor(tuner, name, num_trials, metric, penalty, progress, exp_dir)
    let_driver_handle_sigint()
    quiet_tune_console()
    watch_tune_stop()
    stopping.set_phase(f"search {name}", stopped=lambda: _stopped_search(name, monitor.completed, num_trials))
    with stopping.graceful(interrupt_tune_run):  # Ctrl+C and SIGTERM: Tune saves the state and returns
        grid = tuner.fit()
    return grid, monitor


def _attach_monitor(tuner: tune.Tuner, name: str, num_trials: int, metric: str, penalty: float,
                    progress: bool, exp_dir: Path) -> SearchMonitor:
    """Give the run this process's monitor. A restored run's config comes from tuner.pkl, so it is set on
    the tuner's run config rather than passed in, the same way for fresh and restored runs."""
    monitor = SearchMonitor(experiment=name, num_trials=num_trials, metric=metric, penalty=penalty, echo=progress,
                            storage_dir=str(exp_dir))
    run_config = run_config_of(tuner)
    kept = [c for c in (run_config.callbacks or []) if not isinstance(c, (SearchMonitor, JsonLoggerCallback))]
    run_config.callbacks = kept + [monitor, *json_trial_logs_only()]
    return monitor


def collect_results(grid, space: CoefficientSpace, *, metric: str, experiment_path: Path) -> ResultTable:
    """Turn a `ResultGrid` into a `ResultTable` (completed trials in suggestion order) and read the saved
    searcher for what the optimizer was told."""
    rows, errored = [], 0
    for result in grid:
        if result.error is not None or not result.metrics or metric not in result.metrics:
            errored += 1
            continue
        reports = result.metrics.get("batch") or [result.metrics]
        for config, report in zip(candidate_configs(result.config), reports):
            value, label = decode_candidate(config)
            metrics = {k: v for k, v in report.items() if k not in TUNE_KEYS and k not in (metric, "batch")}
            rows.append(TrialRecord(
                index=candidate_index(config), trial_id=str(result.metrics.get("trial_id", "")),
                label=label, value=value, alpha=space.to_coefficients(value), score=float(report[metric]),
                metrics=metrics,
            ))
    rows.sort(key=lambda row: row.index)
    searcher = load_searcher(experiment_path)
    return ResultTable(
        metric=metric, rows=rows, experiment_path=str(experiment_path), num_errored=errored,
        told=list(searcher.told), num_tell_not_asked=searcher.optimizer.num_tell_not_asked,
    )
