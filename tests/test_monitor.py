"""The search monitor's counts (trials done, best score, failed candidates) on Ray Tune's own `Trial` objects:
right across a resume, and kept without a pass over the trial list per completion, so that the driver's
cost per decision does not grow with the length of a search."""

from __future__ import annotations

import time

from ray.tune.experiment import Trial

from lcsc_ray.search.monitor import SearchMonitor

PENALTY = 1e6


def _trial(score: float | None, *, terminated: bool = False, failed: bool = False) -> Trial:
    trial = Trial("lcsc_trial", config={}, stub=True)
    if score is not None:
        trial.update_last_result({"score": score, "failed": failed})
    if terminated:
        trial.set_status(Trial.TERMINATED)
    return trial


class CountedPasses(list):
    """Tune's trial list, counting the passes made over it."""

    passes = 0

    def __iter__(self):
        self.passes += 1
        return super().__iter__()


def _monitor() -> SearchMonitor:
    monitor = SearchMonitor(experiment="exp", num_trials=10, penalty=PENALTY, echo=False)
    monitor._last_plot = time.monotonic()  # no progress figure in this test (it is drawn from the list)
    return monitor


def test_counts_restored_trials_once_then_each_completion_without_a_pass_over_the_list():
    restored = [_trial(5.0, terminated=True), _trial(PENALTY, terminated=True, failed=True), _trial(None)]
    trials = CountedPasses(restored)
    monitor = _monitor()
    monitor.on_trial_start(0, trials, restored[2])
    assert (monitor.completed, monitor._best, monitor._failed) == (2, 5.0, 1)
    assert trials.passes == 1
    for score in (7.0, 3.0, PENALTY):
        trial = _trial(score, failed=score == PENALTY)  # Tune marks it terminated after the callbacks
        trials.append(trial)
        monitor.on_trial_start(0, trials, trial)
        monitor.on_trial_complete(0, trials, trial)
        monitor.on_trial_complete(0, trials, trial)  # counted once, whatever calls it twice
    assert (monitor.completed, monitor._best, monitor._failed) == (5, 3.0, 2)
    assert trials.passes == 1, "a completion passed over the whole trial list"


def test_a_resumed_monitor_counts_afresh_from_the_restored_trials():
    """Tune pickles the callback with its run config; the copy a resume unpickles must not carry the old
    run's counts into the restored trial list (they would be counted twice)."""
    import pickle

    monitor = _monitor()
    first = [_trial(4.0, terminated=True)]
    monitor.on_trial_start(0, first, first[0])
    assert monitor.completed == 1
    resumed = pickle.loads(pickle.dumps(monitor))
    resumed._last_plot = time.monotonic()
    trials = [*first, _trial(2.0, terminated=True), _trial(None)]
    resumed.on_trial_start(0, trials, trials[2])
    assert (resumed.completed, resumed._best) == (2, 2.0)
    assert resumed.eta() is None  # no completion in this run yet
