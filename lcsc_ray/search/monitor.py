"""Watching a running search: a console progress line, live metrics for Ray's metrics pipeline, and the
stop switch for input errors.

- `SearchMonitor` (a Ray Tune callback, in the driver) prints `trials done/total, best score, ETA` and
  exports, through `ray.util.metrics`, the best score so far (`lcsc_best_score`), the trials completed
  (`lcsc_trials_completed`) and the seconds per trial by stage (`lcsc_trial_stage_seconds`). They are
  served in Prometheus format at each node's metrics endpoint (`ray.nodes()[i]["MetricsExportPort"]`) and
  appear in the dashboard's Metrics tab once Prometheus and Grafana are set up (Ray writes their configs
  under the session folder, /tmp/ray/session_latest/metrics).
- A trial that raises `LcscError` (a missing or corrupt checkpoint, wrong statistics) is not the
  candidate's fault; `InputErrorStopper` then stops the whole experiment so the driver can print the
  message, and the user fixes the input and continues with `--resume`.
"""

from __future__ import annotations

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
        self._started = time.monotonic()
        self._done_at_start: int | None = None
        self._last_print = 0.0
        self._metrics: tuple | None = None

    def __getstate__(self) -> dict:
        """Tune pickles its run config (tuner.pkl); metric handles and clocks belong to one process."""
        return {**self.__dict__, "_metrics": None, "_done_at_start": None, "_started": time.monotonic()}

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
        error = trial.get_error()
        text = str(error) if error is not None else ""
        if "LcscError" in text:
            lines = [line for line in text.splitlines() if "LcscError" in line]
            self.input_error = lines[-1].split("LcscError:", 1)[-1].strip() if lines else text.strip()


class InputErrorStopper(tune.Stopper):
    """Stops every trial once the monitor has seen an input error (see module docstring)."""

    def __init__(self, monitor: SearchMonitor) -> None:
        self.monitor = monitor

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.monitor.input_error is not None
