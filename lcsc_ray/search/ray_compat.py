"""Every private Ray Tune API and file format this project relies on, in one place.

Each function here leans on something Ray does not promise to keep (an attribute with a leading underscore,
the layout of a file Tune writes, an environment switch). They were written against Ray `RAY_VERSION`;
`check_ray_version` says so in one line when another version is installed, and tests/test_ray_compat.py
checks each behaviour, so a Ray upgrade breaks here and in that test, not all over the code.
See docs/RAY_NEVERGRAD.md for why each one is needed.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import json
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import ray
from ray import tune
from ray.tune.experiment import Trial

from lcsc_ray import stopping

RAY_VERSION = "2.60.0"
EXPERIMENT_STATE_GLOB = "experiment_state-*.json"  # Tune's experiment state files (`TuneController.CKPT_FILE_TMPL`)


def check_ray_version() -> bool:
    """True when the installed Ray is the one this module was written for; otherwise say so once, on stderr."""
    if ray.__version__ == RAY_VERSION:
        return True
    print(f"note: lcsc-ray was tested with Ray {RAY_VERSION}, this is Ray {ray.__version__}; if a search misbehaves, "
          f"install ray[default,tune]=={RAY_VERSION}", file=sys.stderr)
    return False


def run_config_of(tuner: tune.Tuner) -> tune.RunConfig:
    """The run config a (fresh or restored) Tuner will use; a restored Tuner's comes from its tuner.pkl, so
    callbacks must be set on this object rather than passed in."""
    return tuner._local_tuner.get_run_config()


def config_of_result(result: dict[str, Any]) -> dict[str, Any]:
    """The trial config from a result Tune hands the searcher: nested under "config", or flattened into
    "config/<key>" entries when Tune stopped the trial itself."""
    if isinstance(result.get("config"), dict):
        return result["config"]
    return {key.removeprefix("config/"): value for key, value in result.items() if key.startswith("config/")}


@dataclass(frozen=True)
class SavedTrial:
    """A trial as Tune's newest experiment state holds it."""

    trial_id: str
    status: str
    config: dict[str, Any]
    last_result: dict[str, Any]


def newest_experiment_state(experiment_dir: str | os.PathLike) -> Path | None:
    """Tune's experiment state file in a folder that Tune restores from (newest by name, as Tune picks it), or
    None when there is none."""
    names = glob.glob(os.path.join(os.fspath(experiment_dir), EXPERIMENT_STATE_GLOB))
    return Path(max(names)) if names else None


def saved_trials(experiment_dir: str | os.PathLike) -> list[SavedTrial] | None:
    """The trials of the experiment state Tune restores from (`newest_experiment_state`), read as plain JSON
    (nothing is unpickled); None when there is none or it cannot be read. A searcher restored from the same
    folder checks its own state against it: the two files are written one after the other, so a killed
    driver (or a bucket copy taken between them) can leave one newer than the other."""
    state = newest_experiment_state(experiment_dir)
    if state is None:
        return None
    try:
        with open(state) as handle:
            entries = json.load(handle)["trial_data"]
        trials = []
        for state_json, metadata_json in entries:
            trial_state, metadata = json.loads(state_json), json.loads(metadata_json)
            last_result = metadata.get("last_result")
            trials.append(SavedTrial(trial_id=str(trial_state["trial_id"]), status=str(trial_state["status"]),
                                     config=dict(trial_state["config"]),
                                     last_result=last_result if isinstance(last_result, dict) else {}))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return trials


def allow_results_without_metric() -> None:
    """Let a trial report a result without the search metric (an input error) instead of making Tune raise in
    the driver; the searcher never tells such a result to the optimizer."""
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"


def json_trial_logs_only() -> list[tune.Callback]:
    """Stop Tune from adding its CSV and TensorBoard trial loggers and return the JSON one to pass instead.

    Tune writes every result of every trial three times by default; the TensorBoard writer flushes with an
    fsync on each, which cost a fifth of the driver's time per trial in a profile of short trials. Trial
    folders keep `params.json` and `result.json` (one JSON object per result), which our tools read."""
    from ray.tune.logger import JsonLoggerCallback

    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    return [JsonLoggerCallback()]


def allow_pending_trials(count: int) -> None:
    """Let Tune keep `count` trials pending at once. For a searcher that is not wrapped in a
    ConcurrencyLimiter Tune allows one, so a trial waiting for its actor takes the first actor that frees up
    and `--max-concurrent 2` ran every trial in one actor, one at a time."""
    os.environ["TUNE_MAX_PENDING_TRIALS_PG"] = str(max(1, int(count)))


def tune_actor_env_vars() -> dict[str, str]:
    """The environment variables Tune gives every trial actor through its runtime environment
    (`tune.execution.class_cache`): its defaults and the driver's values of the variables it propagates."""
    from ray.tune.execution import class_cache

    propagated = {name: os.environ[name] for name in class_cache.ENV_VARS_TO_PROPAGATE if name in os.environ}
    return {**class_cache.DEFAULT_ENV_VARS, **propagated}


def tune_actors_use_idle_workers(cluster_env: dict[str, str] | None) -> None:
    """Create Tune's trial actors without a runtime environment while every variable Tune would set through
    one (`tune_actor_env_vars`) has the same value in `cluster_env`, the environment a local cluster's workers
    inherited (None: an existing cluster, Tune's behaviour unchanged).

    Ray hands an actor one of its idle, already started workers only when the actor's runtime environment
    is the default one; Tune always sets a few variables that way (`_ActorClassCache.get`), so every trial
    actor waited for a new worker process to start and import torch and our modules (2.5-5 s on a 2-core
    machine, 10-20% of a 50-candidate demo search). On a local cluster the variables already reach the
    workers through the inherited environment, and the actor takes an idle worker that did its imports
    while the driver was busy (`cluster.start_ray`)."""
    from ray.tune.execution import class_cache

    cache_class = class_cache._ActorClassCache
    cache_class._lcsc_cluster_env = None if cluster_env is None else (_ray_session(), dict(cluster_env))
    if not hasattr(cache_class.get, "__wrapped__"):
        cache_class.get = _inherit_env_when_equal(cache_class.get)


def _ray_session() -> str | None:
    """The cluster (its GCS address) and this driver's job in it, None when not connected to Ray."""
    if not ray.is_initialized():
        return None
    context = ray.get_runtime_context()
    return f"{context.gcs_address}/{context.get_job_id()}"


def _inherit_env_when_equal(get: Callable[[Any, type], Any]) -> Callable[[Any, type], Any]:
    """`_ActorClassCache.get`, returning an actor class without a runtime environment when
    `tune_actors_use_idle_workers` found the cluster's environment to hold what Tune would set."""
    @functools.wraps(get)
    def get_class(cache: Any, trainable_cls: type) -> Any:
        session, cluster_env = getattr(type(cache), "_lcsc_cluster_env", None) or (None, None)
        if (cluster_env is None or session != _ray_session()  # another Ray session than the one it was set for
                or any(cluster_env.get(k) != v for k, v in tune_actor_env_vars().items())):
            return get(cache, trainable_cls)
        key = (trainable_cls, "inherited environment")
        if key not in cache._cache:
            cache._cache[key] = ray.remote(trainable_cls)
        return cache._cache[key]

    return get_class


_KEPT = "_lcsc_kept_resources"  # set on a controller's actor cache (never saved) by `keep_trial_actors`


def keep_trial_actors(tune_controller: Any, trial: Any, count: int) -> None:
    """Let Tune keep up to `count` finished trials' actors for the next trials with `trial`'s resources, and
    let an actor that is already starting for a trial start instead of being stopped.

    With `reuse_actors`, Tune caches a finished trial's actor only for a trial already waiting for one with
    the same resources (`TuneController._actor_cache`), or a single actor when none waits. Our searcher
    limits the concurrency itself, so the next trial exists only after one finished: all but one finished
    actor were stopped. And a waiting trial takes a cached actor even when its own new actor has its
    resources and is starting, which Tune then stops: while one actor ran short trials back to back, every
    other actor was stopped before it had started, so a search at 8 concurrent trials ran on one actor while
    Ray started and killed worker processes (the driver's rate fell from 20 candidates/s at 1 concurrent trial
    to 3 at 2-8). Raising the cache's floor for these resources by `count` keeps the finished actors, and
    `_reuse_unless_starting` leaves a starting actor to its trial (the cached one serves the next trial);
    an actor still waiting for resources may be replaced as before, so a cached actor never holds resources
    a waiting trial needs. Tune still stops every cached actor when the experiment ends. `tune_controller` is
    what Tune hands a scheduler (a wrapper around the controller); once per controller and resources."""
    controller = getattr(tune_controller, "_tune_controller", tune_controller)
    kept = controller._actor_cache.__dict__.setdefault(_KEPT, set())  # the cache is left out of Tune's saves
    key = trial.placement_group_factory
    if key not in kept:
        kept.add(key)
        controller._actor_cache.increase_max(key, int(count))
    controller_class = type(controller)
    if not hasattr(controller_class._maybe_reuse_cached_actor, "__wrapped__"):
        controller_class._maybe_reuse_cached_actor = _reuse_unless_starting(controller_class._maybe_reuse_cached_actor)


def _reuse_unless_starting(reuse: Callable[[Any, Any], bool]) -> Callable[[Any, Any], bool]:
    """`TuneController._maybe_reuse_cached_actor`, except for a trial whose own actor already holds its resources
    in a controller that `keep_trial_actors` set up (unchanged for any other controller)."""
    @functools.wraps(reuse)
    def maybe_reuse(controller: Any, trial: Any) -> bool:
        own = controller._trial_to_actor.get(trial)
        if (own is not None and _KEPT in controller._actor_cache.__dict__
                and trial not in controller._resetting_trials and controller._actor_manager.is_actor_started(own)):
            return False
        return reuse(controller, trial)

    return maybe_reuse


class ActorKeepingScheduler:
    """Mixin for a Tune scheduler class: the first trial added tells Tune to keep `keep_actors` actors of its
    resources between trials (`keep_trial_actors`). Schedulers are the one place Tune hands its controller."""

    keep_actors = 1

    def _added_order(self) -> dict[Any, int]:
        """Live trial -> its number in the order Tune added it, for `choose_trial_to_run` (made on first use:
        a scheduler that a resumed search unpickles from an earlier version has none)."""
        return self.__dict__.setdefault("_added", {})

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        keep_trial_actors(tune_controller, trial, self.keep_actors)
        self._added_count = getattr(self, "_added_count", 0) + 1
        self._added_order()[trial] = self._added_count
        super().on_trial_add(tune_controller, trial)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        self._added_order().pop(trial, None)
        super().on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self._added_order().pop(trial, None)
        super().on_trial_remove(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller: Any) -> Any:
        """Tune's FIFO choice (the first pending trial in the order trials were added, else the first paused
        one) without its pass over every trial of the experiment, which Tune makes at each step of its loop:
        along a search of 4,000 trials the driver's rate fell by a quarter, and this pass was the largest part
        that grew. The controller keeps its pending trials in a set (`_pending_trials`, at most the pending
        limit, about the concurrency), and this scheduler numbered the trials as Tune added them; where that
        set or a number is missing (another Ray, a trial added before), Tune's own choice."""
        controller = getattr(tune_controller, "_tune_controller", tune_controller)
        pending, added = getattr(controller, "_pending_trials", None), self._added_order()
        if pending is None or getattr(controller, "_paused_trials", None) is None or not pending.issubset(added):
            return super().choose_trial_to_run(tune_controller)
        waiting = [trial for trial in pending if trial.status == Trial.PENDING]
        if waiting:
            return min(waiting, key=added.__getitem__)
        return super().choose_trial_to_run(tune_controller) if controller._paused_trials else None


def in_ray_job() -> bool:
    """True in the driver of a job started with `ray job submit` (its supervisor sets this variable)."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    return RAY_JOB_CONFIG_JSON_ENV_VAR in os.environ


@contextlib.contextmanager
def driver_keeps_sigterm_handler() -> Iterator[None]:
    """While `ray.init` runs in a command that handles its own stop signals (lcsc_ray/stopping.py): keep that
    SIGTERM handler. `ray.init` replaces it (`ray._private.utils.set_sigterm_handler`) with one that raises
    SystemExit wherever the driver is, inside Ray's start-up or later inside a `ray.get`, which ended the
    driver with status 1 or 15 and no line saying how to continue. The driver's core worker also gets no
    failure signal handler (`ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER`, read when it connects; the
    workers, other processes, keep theirs): on SIGTERM it printed a stack and armed a 3 s alarm that
    aborted a driver still stopping (status -6)."""
    if not stopping.owns_process():
        yield
        return
    from ray._private import ray_constants, utils

    original = utils.set_sigterm_handler, ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER
    utils.set_sigterm_handler, ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = (lambda handler: None), True
    try:
        yield
    finally:
        utils.set_sigterm_handler, ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = original


def quiet_tune_console() -> None:
    """Keep Tune's own lines out of the driver's console at `verbose=0` (`RAY_AIR_NEW_OUTPUT=0`, read at each
    run: Tune's older reporter, silent at that verbosity). The newer one printed a configuration box whose
    trial count is Tune's, unlimited for our searches (9223372036854775807 on screen), and the scratch folder
    as where the results are, also for a bucket; the search prints its own count and paths."""
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"


def let_driver_handle_sigint() -> None:
    """Keep Tune from installing its own SIGINT handler (`TUNE_DISABLE_SIGINT_HANDLER`, read at each run): the
    driver's handler (lcsc_ray/stopping.py) asks Tune to stop through SIGUSR1 instead, which Tune handles
    the same way, so Ctrl+C and SIGTERM take one path and a second signal of either kind exits at once."""
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"


# Tune's log lines about a stopped run: restore advice for its Python API and trial lists, where the driver
# prints one line with the command that continues the search.
TUNE_STOP_MESSAGES = ("Stop signal received", "Experiment has been interrupted", "Trials did not complete",
                      "Failed to fetch metrics")
TUNE_STOP_LOGGERS = ("ray.tune.tune", "ray.tune.analysis.experiment_analysis")
TUNE_SAVED_MESSAGE = "Wrote the latest version of all result files and experiment state"  # after its loop


class _TuneStopRecords(logging.Filter):
    """Drops Tune's records that start with one of `TUNE_STOP_MESSAGES`, and reports its final save."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if message.startswith(TUNE_SAVED_MESSAGE):
            stopping.state_saved()
        return not message.startswith(TUNE_STOP_MESSAGES)


def watch_tune_stop() -> None:
    """Leave Tune's stop and restore advice out of the console (`TUNE_STOP_MESSAGES`), and tell the driver's
    stop handling when Tune has saved the experiment after leaving its loop: from then on the driver may
    exit without losing anything, also when Tune's cleanup waits for a Ray that a process-group SIGTERM
    already took down. Tune logs that save at INFO level; idempotent."""
    for name in TUNE_STOP_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _TuneStopRecords) for f in logger.filters):
            logger.addFilter(_TuneStopRecords())


def interrupt_tune_run() -> None:
    """End the running Tune loop as a first Ctrl+C would: Tune handles SIGUSR1 in the driver's main thread by
    leaving its loop, saving the experiment state once more and returning."""
    if threading.current_thread() is not threading.main_thread() or not callable(signal.getsignal(signal.SIGUSR1)):
        raise RuntimeError("the search must run in the main thread of the driver (Tune handles SIGUSR1 there)")
    os.kill(os.getpid(), signal.SIGUSR1)
