"""Every private Ray Tune API and file format this project relies on, in one place.

Each function here leans on something Ray does not promise to keep (an attribute with a leading underscore,
the layout of a file Tune writes, an environment switch). They were written against Ray `RAY_VERSION`;
`check_ray_version` says so in one line when another version is installed, and tests/test_ray_compat.py
checks each behaviour, so a Ray upgrade breaks here and in that test, not all over the code.
See docs/RAY_NEVERGRAD.md for why each one is needed.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Any, TypeVar

import ray
from ray import tune

from lcsc_ray import stopping

RAY_VERSION = "2.60.0"
_Searcher = TypeVar("_Searcher")


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


def restore_searcher(cls: type[_Searcher], experiment_path: str | os.PathLike) -> _Searcher:
    """An instance of searcher class `cls` as last saved in an experiment folder, without running its
    constructor (the state file holds every attribute; the constructor needs an optimizer we do not have)."""
    searcher = cls.__new__(cls)
    searcher.restore_from_dir(os.fspath(experiment_path))
    return searcher


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


def in_ray_job() -> bool:
    """True in the driver of a job started with `ray job submit` (its supervisor sets this variable)."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    return RAY_JOB_CONFIG_JSON_ENV_VAR in os.environ


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
