"""Run `launch/tune_cm.py` as a real driver process for the resume, dashboard and fault tests.

Each driver runs in its own session (`start_new_session`), so everything it starts (the local Ray's GCS,
raylet, agents and workers) can be found by session id and stopped by process group, without touching
anyone else's Ray processes (never `ray stop` on a shared machine).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
TUNE_CM = REPO / "launch" / "tune_cm.py"

# Small evaluations on the tiny run: a trial takes a fraction of a second, the whole job well under a minute.
FAST = ["--fid-samples", "200", "--final-samples", "200", "--top-k", "2", "--max-concurrent", "2", "--quiet"]


def driver_env(**extra: str) -> dict[str, str]:
    """The test environment (conftest: private cache, no Ray token) plus frequent experiment checkpoints, so
    a kill after N synced results loses little (Ray's default period is 10 s or more)."""
    return {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1", **extra}


def start_driver(args: list[str], log: Path, env: dict[str, str] | None = None,
                 cwd: Path = REPO) -> subprocess.Popen:
    """Start `tune_cm.py args` in a new session (working directory `cwd`) with stdout+stderr going to `log`."""
    handle = open(log, "w")  # noqa: SIM115 - owned by the child; closed when the test's process ends
    return subprocess.Popen([sys.executable, str(TUNE_CM), *args], stdout=handle, stderr=subprocess.STDOUT,
                            env=env or driver_env(), cwd=cwd, start_new_session=True)


def run_driver(args: list[str], log: Path, env: dict[str, str] | None = None, timeout: float = 240,
               cwd: Path = REPO) -> int:
    """Run `tune_cm.py args` to the end; returns its exit code. Its Ray processes are stopped afterwards."""
    driver = start_driver(args, log, env, cwd)
    try:
        return driver.wait(timeout=timeout)
    finally:
        kill_session(driver.pid)


def session_pids(sid: int) -> dict[int, str]:
    """pid -> command line of every live process in session `sid` (the driver's pid)."""
    pids = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) == sid:
                pids[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (ProcessLookupError, PermissionError, FileNotFoundError):
            continue
    return pids


def kill_session(sid: int) -> None:
    """SIGKILL every process group of session `sid` (Ray puts some workers in groups of their own)."""
    for pid in session_pids(sid):
        try:
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            continue


def wait_for(condition: Callable[[], object], timeout: float, what: str, driver: subprocess.Popen | None = None,
             poll: float = 0.2):
    """Poll `condition` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if driver is not None and driver.poll() is not None:
            raise AssertionError(f"the driver exited (code {driver.returncode}) before: {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for: {what}")
        time.sleep(poll)


def trial_scores(exp_dir: Path) -> dict[str, float]:
    """trial id -> reported score of every trial whose result reached the experiment folder."""
    scores = {}
    for result in exp_dir.glob("trial_*/result.json"):
        lines = [line for line in result.read_text().splitlines() if line.strip()]
        if lines:
            record = json.loads(lines[-1])
            scores[record["trial_id"]] = record["score"]
    return scores


def trial_failures(exp_dir: Path) -> dict[str, int]:
    """trial id -> number of failures (process or node deaths, errors) from the newest experiment state."""
    state = json.loads(sorted(exp_dir.glob("experiment_state-*.json"))[-1].read_text())
    failures = {}
    for trial_json, metadata_json in state["trial_data"]:
        failures[json.loads(trial_json)["trial_id"]] = json.loads(metadata_json)["num_failures"]
    return failures


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def last_line(log: Path) -> str:
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    return lines[-1] if lines else ""
