"""`LcscNevergradSearch`: Ray Tune's `NevergradSearch` with what an LCSC search needs (Ray Tune 2.60).

- Small trial configs: each suggested value goes to the candidate store (`candidates.py`) and the trial
  receives its path, label and suggestion index.
- Warm starts: the baselines go through `points_to_evaluate`, so they are the first trials, in order, and
  reach the optimizer as told-but-not-asked points, each with its label.
- The budget: the searcher ends the search (`Searcher.FINISHED`) once it has suggested `budget` candidates.
- Restore: the state is first brought in line with the trials Tune restores (`_agree_with`: the two are
  saved one after the other, so either may be the newer); trials the optimizer has never seen (a restarted
  trial with a new id, or a searcher state older than the trial) are rebuilt from their config and told
  anyway; completions pop with a default;
  candidates in flight when the state was saved become orphans, told when they finish but not counted
  against the concurrency limit (so a trial Ray never resumes cannot hang the search).
- Replay after a killed driver: a suggestion whose index already has a recorded evaluation in the store
  reuses that value, so the trial replays the record instead of evaluating again.
- Concurrency is enforced from the searcher's own live map (`max_concurrent`), not a ConcurrencyLimiter.
- Batches (`candidates_per_trial` > 1): a trial gets several candidates asked together, as one config
  (`batch_config`), and each is told with its own score from the trial's `batch` report, so the optimizer
  sees every candidate while Tune schedules, logs and checkpoints one trial per batch.
- A trial that errors is never told (Ray's contract): the trainable reports a penalised score instead.
See docs/RAY_NEVERGRAD.md for the Ray behaviours behind these points.
"""

from __future__ import annotations

import glob
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from ray.tune.experiment import Trial
from ray.tune.search import Searcher
from ray.tune.search.nevergrad import NevergradSearch

from lcsc_ray.errors import LcscError
from lcsc_ray.remote_storage import rebased
from lcsc_ray.search.candidates import (BASELINE_PREFIX, CANDIDATES_DIR, SEARCH_LABEL, batch_config, candidate_configs,
                                        candidate_index, decode_candidate, digest, recorded_values, save_candidate)
from lcsc_ray.search.ray_compat import SavedTrial, config_of_result, saved_trials


class LcscNevergradSearch(NevergradSearch):
    """NevergradSearch over `ng.p.Dict(alpha=Array)` with labelled warm starts, small configs and safe restore."""

    def __init__(
        self,
        optimizer,
        *,
        experiment_dir: str | os.PathLike,
        warm_start: Sequence[tuple[str, np.ndarray]] = (),
        metric: str = "score",
        mode: str = "min",
        max_concurrent: int = 1,
        candidates_per_trial: int = 1,
        budget: int | None = None,
        replay_store: bool = False,
    ) -> None:
        """`optimizer`: a built Nevergrad optimizer (`build_optimizer`); `experiment_dir`: the Tune experiment
        folder, which holds the candidate store; `warm_start`: (name, value) pairs in the order they should
        run (values in the space's parametrization, `space.to_value(α)`); `candidates_per_trial`: candidates
        asked together and evaluated by one trial, each told with its own score; `budget`: candidates in all
        (the last trial gets what is left; None: no cap); `replay_store`: the store already holds evaluations
        of this search (rebuilt after its Ray state was damaged): suggestions reuse their values, so their
        trials replay the records from the first suggestion on."""
        if max_concurrent < 1:
            raise LcscError(f"--max-concurrent must be at least 1, got {max_concurrent}")
        self._warm_labels = [f"{BASELINE_PREFIX}{name}" for name, _ in warm_start]
        self._max_concurrent = int(max_concurrent)
        self._candidates_per_trial = int(candidates_per_trial)
        self._budget = budget
        # Absolute, and pickled with the searcher: a restored search keeps writing to the same store.
        self._candidates_dir = str(Path(experiment_dir).expanduser().resolve() / CANDIDATES_DIR)
        self._num_suggested = 0
        self._orphans: dict = {}
        # Evaluations recorded in the store, read once after a restore (None: not read yet); empty for a new search.
        self._recorded: dict[int, np.ndarray] | None = None if replay_store else {}
        # (index, label, loss) of every tell, in tell order: small, and lets callers check what was told.
        self.told: list[tuple[int, str, float]] = []
        self._told_indices: set[int] = set()  # a candidate is told once, also when a restore runs it again
        super().__init__(
            optimizer=optimizer,
            metric=metric,
            mode=mode,
            points_to_evaluate=[{"alpha": np.asarray(value, dtype=np.float64)} for _, value in warm_start],
        )

    @property
    def optimizer(self):
        """The Nevergrad optimizer (its `num_tell`, `num_tell_not_asked`, `archive`...)."""
        return self._nevergrad_opt

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        self._max_concurrent = int(max_concurrent)
        return True

    def suggest(self, trial_id: str) -> dict | str | None:
        # The searcher, not Tune's trial count, ends the search (`_agree_with` says why), and says so as soon as
        # the budget is suggested: Tune, not finished, may otherwise block its loop for up to 10 minutes asking
        # for one more trial (it does when it holds none pending or running, as while a trial's actor is replaced).
        if self._budget is not None and self._num_suggested >= self._budget:
            return Searcher.FINISHED
        if len(self._live_trial_mapping) >= self._max_concurrent:
            return None
        count = self._candidates_per_trial
        if self._budget is not None:
            count = min(count, self._budget - self._num_suggested)
        entries, configs = [], []
        try:
            for _ in range(count):
                entry, config = self._suggest_one()
                entries.append(entry)
                configs.append(config)
        except LcscError:  # the store cannot be written (disk full, read-only): suggest nothing more; the
            return None    # monitor's storage watchdog stops the search with the line saying why
        self._live_trial_mapping[trial_id] = entries
        return batch_config(configs)

    def _suggest_one(self) -> tuple[tuple, dict]:
        """The next candidate: its (index, label, parameter) entry and its config (a file in the store)."""
        candidate = self._nevergrad_opt.ask()  # suggestions (the warm starts) are popped first, in order
        index = self._num_suggested
        label = self._warm_labels[index] if index < len(self._warm_labels) else SEARCH_LABEL
        if self._recorded is None:  # pickled with the searcher: keep only the suggestions still to come
            self._recorded = {i: v for i, v in recorded_values(self._candidates_dir).items() if i >= index}
        # After a restore, this index may have been evaluated by the previous driver after its last saved
        # state: take that value (told as not-asked) so the trial replays the record.
        value = self._recorded.pop(index, None)
        if value is None and index < len(self._warm_labels):  # a baseline asked again after `restore` went back
            value = self._points_to_evaluate[index]["alpha"]
        if value is not None and digest(value) != digest(candidate.value["alpha"]):
            candidate = self._nevergrad_opt.parametrization.spawn_child(new_value={"alpha": value})
        self._num_suggested += 1
        return (index, label, candidate), save_candidate(self._candidates_dir, index, label, candidate.value["alpha"])

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        entries = self._live_trial_mapping.pop(trial_id, None) or self._orphans.pop(trial_id, None)
        if error or not result or self._metric not in result:
            return  # Ray's contract: errored trials are not told (the trainable reports penalties instead)
        if isinstance(entries, tuple):  # a searcher state saved before trials held several candidates
            entries = [entries]
        if entries is None:
            entries = []
            for config in candidate_configs(config_of_result(result)):
                value, label = decode_candidate(config)
                candidate = self._nevergrad_opt.parametrization.spawn_child(new_value={"alpha": value})
                entries.append((candidate_index(config), label, candidate))
        reports = result.get("batch") or [result]
        for (index, label, candidate), report in zip(entries, reports):
            if index in self._told_indices:  # re-run after a restore from an older experiment state (`_agree_with`)
                continue
            loss = self._metric_op * float(report[self._metric])
            self._nevergrad_opt.tell(candidate, loss if not math.isnan(loss) else math.inf)
            self.told.append((index, label, loss))
            self._told_indices.add(index)

    def restore(self, checkpoint_path: str) -> None:
        """Tune's restore of a search that continues: the saved state, then agreed with Tune's trials."""
        self._restore_saved(checkpoint_path)
        # The experiment folder's state, the one Tune restored its trials from: this searcher comes from Tune's
        # staging folder, which on a cluster that outlives the driver may still hold a killed driver's files.
        trials = saved_trials(rebased(Path(self._candidates_dir)).parent)
        if trials is not None:
            self._agree_with(trials)

    def _restore_saved(self, checkpoint_path: str) -> None:
        """The state as saved, with its trials in flight set aside as orphans."""
        super().restore(checkpoint_path)
        self._orphans.update(self._live_trial_mapping)
        self._live_trial_mapping = {}
        self._recorded = None
        self._told_indices = {index for index, _, _ in self.told}

    def _agree_with(self, trials: list[SavedTrial]) -> None:
        """Continue from the trials Tune restores, whatever this state's age. Tune saves its experiment state
        and then this searcher; a driver killed between the two, a bucket copy made between them, or a killed
        driver's staged files found by a resume on the same cluster leave one older than the other. Counting
        on from this state's own count then asked again for indices Tune already held (a search of 16 ended
        with 21 trials), or skipped those it never created; Tune's own trial count, saved in a third file, had
        the same problem, so the search ends with this searcher's `FINISHED` at its budget (`run_search` gives
        Tune no count). So: the next index is the one after Tune's last trial; a baseline asked again gets its
        value back (`_suggest_one`); the baseline suggestions of skipped indices are dropped; a finished trial
        this state never heard of is told now (Tune re-runs only the unfinished ones); and a candidate told
        before is not told again when Tune, from an older experiment state, runs it again (its record replays
        the same score)."""
        following = max((index for trial in trials for index in _indices(trial)), default=-1) + 1
        for _ in range(self._num_suggested, min(following, len(self._warm_labels))):
            self._nevergrad_opt.ask()  # a baseline suggestion Tune's trials already hold
        self._num_suggested = following
        for trial in trials:
            if trial.status == Trial.TERMINATED and not self._told_indices.issuperset(_indices(trial)):
                self.on_trial_complete(trial.trial_id, {**trial.last_result, "config": trial.config})


def _indices(trial: SavedTrial) -> list[int]:
    """The suggestion indices of a saved trial's candidates."""
    return [candidate_index(config) for config in candidate_configs(trial.config)]


def load_searcher(experiment_path: str | os.PathLike) -> LcscNevergradSearch:
    """The searcher as last saved in an experiment folder (Ray writes `searcher-state-*.pkl` there).

    The file is the experiment's own pickle, the same one `Tuner.restore` loads; never point this at a
    folder from an untrusted source.
    """
    states = glob.glob(os.path.join(os.fspath(experiment_path), NevergradSearch.CKPT_FILE_TMPL.format("*")))
    if not states:
        raise LcscError(f"no searcher state in {experiment_path}; is it a search experiment folder?")
    # Without the constructor (the state holds every attribute; the constructor needs an optimizer we do not
    # have), from the newest state as Ray's `restore_from_dir` picks it, and as saved: what the search had
    # told when it saved, not agreed with Tune's trials as a continuing search is.
    searcher = LcscNevergradSearch.__new__(LcscNevergradSearch)
    searcher._restore_saved(max(states))
    return searcher
