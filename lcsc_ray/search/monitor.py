"""Watching a running search: a console progress line, live metrics for Ray's metrics pipeline, and the
stop switch for input errors.

- `SearchMonitor` (a Ray Tune callback, in the driver) prints `trials done/total, best score, ETA` and
  exports, through `ray.util.metrics`, the best score so far (`lcsc_best_score`), the trials completed
  (`lcsc_trials_completed`) and the seconds per trial by stage (`lcsc_trial_stage_seconds`). They are
  served in Prometheus format at each node's metrics endpoint (`ray.nodes()[i]["MetricsExportPort"]`) and
  appear in the dashboard's Metrics tab once Prometheus and Grafana are set up (Ray writes their configs
  under the session folder, /tmp/ray/session_latest/metrics).
- A trial that reports an input error (`INPUT_ERROR_KEY`: the model factory, a checkpoint, the statistics)
  stops the experiment the way a first Ctrl+C does: Tune leaves its loop, saves the experiment state and
  returns, so the driver prints the one line and the user fixes the input and continues with `--resume`.
  A `tune.Stopper` cannot do this: it is pickled into the experiment state, so a resumed run would stop again.
- When the run ends it counts trials completed, errored and unfinished, which is how the driver tells a
  finished search from an interrupted one (Tune returns normally in both cases).
- `progress.png` in the experiment folder (best score vs trial, baselines marked) is redrawn at most every
  `PROGRESS_PLOT_EVERY_S` and once at the end, for a user who can open one file but not the dashboard.
  A daemon thread draws it: a figure costs a few hundred milliseconds that Tune's event loop should not wait.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from ray import tune
from ray.tune.experiment import Trial
from ray.tune.result import AUTO_RESULT_KEYS
from ray.util import metrics

from lcsc_ray.search.candidates import BASELINE_PREFIX, INDEX_KEY, LABEL_KEY
from lcsc_ray.search.ray_compat import interrupt_tune_run
from lcsc_ray.search.report import plot_best_so_far
from lcsc_ray.search.trial import INPUT_ERROR_KEY
from lcsc_ray.storage import storage_problem

STAGE_BUCKETS = [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0]
PROGRESS_PLOT = "progress.png"  # in the experiment folder
PROGRESS_PLOT_EVERY_S = 30.0
PLOT_WAIT_S = 5.0  # the longest the end of a search waits for a figure (written atomically: whole or not at all)
STORAGE_CHECK_EVERY_S = 1.0  # a free-space query and a probe write: about 0.4 ms


class SearchMonitor(tune.Callback):
    """Progress line and live metrics of one search (see module docstring)."""

    def __init__(self, *, experiment: str, num_trials: int, metric: str = "score", print_every_s: float = 10.0,
                 penalty: float = float("inf"), echo: bool = True, storage_dir: str | None = None) -> None:
        self.experiment, self.num_trials, self.metric = experiment, num_trials, metric
        self.storage_dir = storage_dir  # the experiment folder the storage watchdog checks
        self._last_storage_check = float("-inf")
        self.print_every_s, self.penalty, self.echo = print_every_s, penalty, echo
        self.input_error: str | None = None
        self.unfinished: int | None = None  # trials neither completed nor errored when the run ended
        self.completed = 0  # trials that reported their final score (this run's and restored ones)
        self.errored = 0  # trials that ended in ERROR (retries used up, or Tune gave up on them)
        self._counted: set[str] | None = None  # ids of the trials in `completed`; None until the first event
        self._best: float | None = None  # best score below the penalty among them
        self._failed = 0  # of them, candidates that failed (penalised)
        self._started = time.monotonic()
        self._done_at_start = 0
        self._last_print = 0.0
        self._metrics: tuple | None = None
        self._last_plot = float("-inf")
        self._plotter: threading.Thread | None = None

    def __getstate__(self) -> dict:
        """Tune pickles its run config (tuner.pkl); metric handles, clocks, threads and counts belong to one
        process (a resumed run counts its restored trials afresh)."""
        return {**self.__dict__, "_metrics": None, "_counted": None, "_best": None, "_failed": 0,
                "_done_at_start": 0, "_started": time.monotonic(), "input_error": None, "unfinished": None,
                "completed": 0, "_last_plot": float("-inf"), "_plotter": None, "_last_storage_check": float("-inf")}

    def metrics(self) -> tuple[metrics.Gauge, metrics.Gauge, metrics.Gauge, metrics.Histogram]:
        """(best score, completed trials, failed trials gauges; stage seconds histogram), created on first use."""
        if self._metrics is None:
            tags = {"experiment": self.experiment}
            best = metrics.Gauge("lcsc_best_score", "best search score so far (lower is better)",
                                 tag_keys=("experiment",))
            completed = metrics.Gauge("lcsc_trials_completed", "completed trials of the search",
                                      tag_keys=("experiment",))
            failed = metrics.Gauge("lcsc_trials_failed", "completed trials whose candidate failed (penalised)",
                                   tag_keys=("experiment",))
            stage = metrics.Histogram("lcsc_trial_stage_seconds", "seconds per trial by stage",
                                      boundaries=STAGE_BUCKETS, tag_keys=("experiment", "stage"))
            for metric in (best, completed, failed, stage):
                metric.set_default_tags(tags)
            self._metrics = (best, completed, failed, stage)
        return self._metrics

    def _count(self, trial: Trial) -> None:
        """Add one trial that reported its final score to the running counts (once per trial)."""
        if trial.trial_id in self._counted:
            return
        self._counted.add(trial.trial_id)
        self.completed = len(self._counted)
        score = trial.last_result[self.metric]
        if score < self.penalty and (self._best is None or score < self._best):
            self._best = score
        self._failed += bool(trial.last_result.get("failed"))

    def _start_counting(self, trials: list[Trial]) -> None:
        """At the first event of this run: count the trials already done (restored by a resume), the one pass
        over Tune's trial list; each completion after it adds its own trial, so the driver's cost per decision
        does not grow with the length of the search."""
        if self._counted is None:
            self._counted = set()
            for done in self._done(trials, None):
                self._count(done)
            self._done_at_start = self.completed

    def eta(self) -> float | None:
        """Seconds to the last trial at this run's rate of completions (None before the first)."""
        new = self.completed - self._done_at_start
        rate = new / (time.monotonic() - self._started) if new > 0 else 0.0
        return (self.num_trials - self.completed) / rate if rate > 0 else None

    def _done(self, trials: list[Trial], completing: Trial | None) -> list[Trial]:
        """The trials that reported their final score. `completing` is the trial whose completion is being
        handled: Tune marks it terminated only after the callbacks ran."""
        return [t for t in trials if (t.status == Trial.TERMINATED or t is completing)
                and t.last_result and self.metric in t.last_result]

    def plot_progress(self, trials: list[Trial], *, completing: Trial | None = None, final: bool = False) -> None:
        """Redraw `progress.png` from a daemon thread unless one is still drawing or the last one started
        less than `PROGRESS_PLOT_EVERY_S` ago; `final` (the run's end) draws the last state and waits for it,
        at most `PLOT_WAIT_S` each time: a slow figure must never hold up the end of a search or its stop.
        Only a figure to draw passes over Tune's trial list (`completing`: as in `_done`)."""
        busy = self._plotter is not None and self._plotter.is_alive()
        now = time.monotonic()
        if not final and (busy or now - self._last_plot < PROGRESS_PLOT_EVERY_S):
            return
        if busy:
            self._plotter.join(timeout=PLOT_WAIT_S)
        done = sorted(self._done(trials, completing), key=lambda t: t.config.get(INDEX_KEY, 0))
        if not done:
            return
        labels = [str(t.config.get(LABEL_KEY, "")) for t in done]
        scores = [float(t.last_result[self.metric]) for t in done]
        baselines = {label[len(BASELINE_PREFIX):]: score for label, score in zip(labels, scores)
                     if label.startswith(BASELINE_PREFIX)}
        path = Path(done[0].remote_experiment_path) / PROGRESS_PLOT
        self._last_plot = now
        self._plotter = threading.Thread(target=plot_best_so_far, args=(path, scores), daemon=True,
                                         name="lcsc-progress-plot",
                                         kwargs=dict(metric_name=self.metric, penalty=self.penalty,
                                                     baselines=baselines))
        self._plotter.start()
        if final:
            self._plotter.join(timeout=PLOT_WAIT_S)

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        self._start_counting(trials)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        self._start_counting(trials)
        if trial.last_result and self.metric in trial.last_result:
            self._count(trial)  # kept current for the line of a stop that ends the driver early
        self.plot_progress(trials, completing=trial)
        best_gauge, completed_gauge, failed_gauge, stage_histogram = self.metrics()
        completed_gauge.set(self.completed)
        failed_gauge.set(self._failed)
        if self._best is not None:
            best_gauge.set(self._best)
        for key, value in (trial.last_result or {}).items():
            if key.startswith("time_") and key not in AUTO_RESULT_KEYS:  # our stages, not Tune's clocks
                stage_histogram.observe(float(value), tags={"stage": key[5:]})
        now = time.monotonic()
        if self.echo and (now - self._last_print >= self.print_every_s or self.completed >= self.num_trials):
            self._last_print = now
            eta = self.eta()
            best_text = "-" if self._best is None else f"{self._best:.4f}"
            eta_text = "-" if eta is None else time.strftime("%H:%M:%S", time.gmtime(eta))
            print(f"[lcsc] {self.experiment}: {self.completed}/{self.num_trials} trials, best {self.metric} "
                  f"{best_text}, ETA {eta_text}", flush=True)

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info) -> None:
        if INPUT_ERROR_KEY in result:
            self.stop_for(str(result[INPUT_ERROR_KEY]))

    def stop_for(self, problem: str) -> None:
        """Stop the search the way a first Ctrl+C does, keeping `problem` as the line the driver prints."""
        if self.input_error is None:
            self.input_error = problem
            interrupt_tune_run()

    def on_step_begin(self, iteration: int, trials: list[Trial], **info) -> None:
        """The storage watchdog: every `STORAGE_CHECK_EVERY_S`, stop the search while its folder can still
        take Tune's last save (lcsc_ray/storage.py), rather than let a full or read-only disk fail inside it."""
        now = time.monotonic()
        if self.storage_dir is None or now - self._last_storage_check < STORAGE_CHECK_EVERY_S:
            return
        self._last_storage_check = now
        problem = storage_problem(Path(self.storage_dir))
        if problem is not None:
            self.stop_for(f"storage {problem}")

    def on_experiment_end(self, trials: list[Trial], **info) -> None:
        self.completed = len(self._done(trials, None))
        self.unfinished = sum(t.status not in (Trial.TERMINATED, Trial.ERROR) for t in trials)
        self.errored = sum(t.status == Trial.ERROR for t in trials)
        self.plot_progress(trials, final=True)

