"""Watching a running search: a console progress line, live metrics for Ray's metrics pipeline, and the
stop switch for input errors.

- `SearchMonitor` (a Ray Tune callback, in the driver) prints `trials done/total, best score, ETA` and
  exports, through `ray.util.metrics`, the best score so far (`lcsc_best_score`), the trials completed
  (`lcsc_trials_completed`) and the seconds per trial by stage (`lcsc_trial_stage_seconds`). They are
  served in Prometheus format at each node's metrics endpoint (`ray.nodes()[i]["MetricsExportPort"]`) and
  appear in the dashboard's Metrics tab once Prometheus and Grafana are set up (Ray writes their configs
  under the session folder, /tmp/ray/session_latest/metrics).
- A trial that raises `LcscError` (a missing or corrupt checkpoint, wrong statistics) is not the
  candidate's fault; the monitor then interrupts the experiment the way Ctrl+C does (Tune's SIGUSR1
  handler: it leaves the loop, saves the experiment state and returns), so the driver prints the message
  and the user fixes the input and continues with `--resume`. A `tune.Stopper` is no use here (Ray 2.60):
  `stop_all()` marks the search generator finished and the running trials TERMINATED without a score, and
  the stopper itself is pickled into the experiment state, so a resumed run would stop at once, start no
  new trial and never re-run the stopped ones.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from ray import tune
from ray.tune.experiment import Trial
from ray.util import metrics

STAGE_BUCKETS = [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0]


class SearchMonitor(tune.Callback):
    """Progress line and live metrics of one search (see module docstring)."""

    def __init__(self, *, experiment: str, num_trials: int, metric: str = "score", print_every_s: float = 10.0,
                 penalty: float = float("inf"), echo: bool = True) -> None:
        self.experiment, self.num_trials, self.metric = experiment, num_trials, metric
        self.print_every_s, self.penalty, self.echo = print_every_s, penalty, echo
        self.input_error: str | None = None
        self.unfinished: int | None = None  # trials neither completed nor errored when the run ended
        self.errored = 0  # trials that ended in ERROR (retries used up, or Tune gave up on them)
        self._started = time.monotonic()
        self._done_at_start: int | None = None
        self._last_print = 0.0
        self._metrics: tuple | None = None

    def __getstate__(self) -> dict:
        """Tune pickles its run config (tuner.pkl); metric handles and clocks belong to one process."""
        return {**self.__dict__, "_metrics": None, "_done_at_start": None, "_started": time.monotonic(),
                "input_error": None, "unfinished": None}

    def metrics(self) -> tuple[metrics.Gauge, metrics.Gauge, metrics.Histogram]:
        """(best score gauge, completed trials gauge, stage seconds histogram), created on first use."""
        if self._metrics is None:
            tags = {"experiment": self.experiment}
            best = metrics.Gauge("lcsc_best_score", "best search score so far (lower is better)",
                                 tag_keys=("experiment",))
            completed = metrics.Gauge("lcsc_trials_completed", "completed trials of the search",
                                      tag_keys=("experiment",))
            stage = metrics.Histogram("lcsc_trial_stage_seconds", "seconds per trial by stage",
                                      boundaries=STAGE_BUCKETS, tag_keys=("experiment", "stage"))
            for metric in (best, completed, stage):
                metric.set_default_tags(tags)
            self._metrics = (best, completed, stage)
        return self._metrics

    def progress(self, trials: list[Trial], completing: Trial | None = None) -> tuple[int, float | None, float | None]:
        """(trials done, best score or None, ETA seconds or None) from the trial list Tune keeps, so the
        numbers stay right across a resume (restored trials are in the list). `completing` is the trial whose
        completion is being handled: Tune marks it terminated only after the callbacks ran."""
        done = [t for t in trials if (t.status == Trial.TERMINATED or t is completing)
                and t.last_result and self.metric in t.last_result]
        scores = [t.last_result[self.metric] for t in done if t.last_result[self.metric] < self.penalty]
        if self._done_at_start is None:
            self._done_at_start = len(done)
        new = len(done) - self._done_at_start
        rate = new / (time.monotonic() - self._started) if new > 0 else 0.0
        eta = (self.num_trials - len(done)) / rate if rate > 0 else None
        return len(done), (min(scores) if scores else None), eta

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        if self._done_at_start is None:
            self.progress(trials)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        done, best, eta = self.progress(trials, completing=trial)
        best_gauge, completed_gauge, stage_histogram = self.metrics()
        completed_gauge.set(done)
        if best is not None:
            best_gauge.set(best)
        for key, value in (trial.last_result or {}).items():
            if key.startswith("time_"):
                stage_histogram.observe(float(value), tags={"stage": key[5:]})
        now = time.monotonic()
        if self.echo and (now - self._last_print >= self.print_every_s or done >= self.num_trials):
            self._last_print = now
            best_text = "-" if best is None else f"{best:.4f}"
            eta_text = "-" if eta is None else time.strftime("%H:%M:%S", time.gmtime(eta))
            print(f"[lcsc] {self.experiment}: {done}/{self.num_trials} trials, best {self.metric} {best_text}, "
                  f"ETA {eta_text}", flush=True)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        """Called once a trial has used up its `FailureConfig` retries. An `LcscError` is an input problem:
        interrupt the run so it stays resumable (module docstring); other errors only lose that trial."""
        message = input_error_message(trial)
        if message is not None:
            self.input_error = message
            interrupt_tune_run()

    def on_experiment_end(self, trials: list[Trial], **info) -> None:
        self.unfinished = sum(t.status not in (Trial.TERMINATED, Trial.ERROR) for t in trials)
        self.errored = sum(t.status == Trial.ERROR for t in trials)


def input_error_message(trial: Trial) -> str | None:
    """The `LcscError` message of the trial's latest failure, or None when it failed otherwise.

    Read from the driver's own copy of the trial's error file (`trial.error_file`, written just before the
    callback runs), not `trial.get_error()`: that reads the copy in the experiment storage, which Tune
    syncs later and which, on a resumed run, still holds the failures of the previous run (the file is
    appended to, one `Failure # n` section per failure)."""
    path = trial.error_file
    if not path or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8", errors="replace") as handle:
        latest = handle.read().rsplit("Failure # ", 1)[-1]
    lines = [line for line in latest.splitlines() if "LcscError:" in line]
    return lines[-1].split("LcscError:", 1)[1].strip() if lines else None


def interrupt_tune_run() -> None:
    """End the running `tune.run` loop as Ctrl+C would: Tune installs a SIGUSR1 handler in the driver's
    main thread that sets its 'interrupted' event, saves the experiment state once more and returns the
    results so far (Ray 2.60 `tune.tune._setup_signal_catching`). Callbacks run in that thread."""
    if threading.current_thread() is not threading.main_thread() or not callable(signal.getsignal(signal.SIGUSR1)):
        raise RuntimeError("the search must run in the main thread of the driver (Tune handles SIGUSR1 there)")
    os.kill(os.getpid(), signal.SIGUSR1)
