"""Ctrl+C (SIGINT) and SIGTERM in every phase of the real job, to the driver and to its process group.

One experiment on the tiny CM run is stopped twelve times in a row, each phase with both signals (one sent to
the driver, the other to its process group, alternating so that each signal reaches both targets over the
phases): Ray start-up, the search, the control fit, held-out scoring, the export and the final plots. Each
driver is started with the command the previous one printed, from another folder than the first (so the
command must hold the entry point and absolute paths), and the last printed command finishes the job.
Each stop must end the driver within `EXIT_BOUND_S` with status 128 + the signal (130, 143), print the
command that continues as its last line, leave no process of the driver's session (its local Ray) alive
10 s later, and leave the final folder's results.json, export and sidecar all there or none of them. The
phase is detected from the driver's output (and, for Ray start-up, from Ray's GCS appearing), and the stop
line must name the phase the signal landed in.
About six minutes on 2 busy cores (each driver starts a local Ray).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from cli_runs import TUNE_CM, driver_env, kill_session, last_line, session_pids, wait_for

EXIT_BOUND_S = 20.0  # a correctness bound; stops take 1-5 s on 2 cores
NAME = "stops"
FINAL_FILES = ("results.json", "lcsc_merged.safetensors", "lcsc_merged.safetensors.json")
# Small evaluations; --fid-samples 600 keeps the control fit long enough (about a second) to be hit.
FLAGS = ["--num-trials", "12", "--no-dashboard", "--fid-samples", "600", "--final-samples", "200", "--top-k", "2",
         "--max-concurrent", "2", "--heldout-seeds", "2", "--eval-extractors", "", "--quiet"]


class Chain:
    """The experiment the cases stop one after another, and the command the last stop printed."""

    def __init__(self, root: Path, run: Path) -> None:
        self.root, self.run = root, run
        self.storage = root / "storage"
        self.command: list[str] = []
        self.elsewhere = root / "elsewhere"
        self.elsewhere.mkdir(parents=True)

    @property
    def exp_dir(self) -> Path:
        return self.storage / NAME

    def records(self) -> int:
        return len(list((self.exp_dir / "candidates").glob("*.result.json")))


@pytest.fixture(scope="module")
def chain(tiny_cm_run, tmp_path_factory) -> Chain:
    chain = Chain(tmp_path_factory.mktemp("stops"), tiny_cm_run)
    # The first driver gets relative paths from its own folder; every later one runs the printed command
    # from another folder.
    chain.command = [sys.executable, str(TUNE_CM), "--ckpt-dir", os.path.relpath(tiny_cm_run, chain.root),
                     "--storage", "storage", "--name", NAME, *FLAGS]
    return chain


def _gcs_started(pid: int) -> bool:
    return any("gcs_server" in command for command in session_pids(pid).values())


def _log_has(log: Path, text: str) -> Callable[[int], bool]:
    return lambda pid: text in log.read_text()


def _stop(chain: Chain, log: Path, ready: Callable[[int], bool], sig: int, group: bool,
          cwd: Path) -> tuple[int, float]:
    """Run the chain's command, send `sig` once `ready(pid)`; (exit status, seconds to exit). The driver's
    session must be empty 10 s after it exited."""
    env = driver_env(PYTHONUNBUFFERED="1")  # phases are read from the output as it is written
    with open(log, "w") as handle:
        driver = subprocess.Popen(chain.command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                  start_new_session=True)
    try:
        wait_for(lambda: ready(driver.pid), 240, f"the phase before {signal.Signals(sig).name}", driver, poll=0.02)
        sent = time.monotonic()
        (os.killpg if group else os.kill)(driver.pid, sig)
        code = driver.wait(timeout=120)
        took = time.monotonic() - sent
        wait_for(lambda: not session_pids(driver.pid), 10, "the driver's Ray processes to be gone after its exit")
        return code, took
    finally:
        kill_session(driver.pid)


def _check(chain: Chain, log: Path, code: int, took: float, sig: int, phase: str, resume: bool) -> None:
    """The stop's status, time, last line (the continue command, which becomes the chain's next command) and
    that the final folder holds its three files together or none of them."""
    text, line = log.read_text(), last_line(log)
    assert code == 128 + sig, text[-3000:]
    assert took < EXIT_BOUND_S, f"{took:.1f} s to exit"
    assert phase in line, line
    assert "Traceback" not in text and "Stop signal received" not in text and "Tuner.restore" not in text, text[-3000:]
    command = shlex.split(line.split("continue it with: ", 1)[1])
    assert command[0] in ("python", sys.executable, "lcsc-tune-cm") or Path(command[0]).is_absolute()
    assert ("--resume" in command) == resume, command
    paths = [command[command.index(flag) + 1] for flag in ("--ckpt-dir", "--storage")]
    assert all(Path(path).is_absolute() for path in paths), command
    present = [name for name in FINAL_FILES if (chain.exp_dir / "final" / name).exists()]
    assert present in ([], list(FINAL_FILES)), present
    assert not (chain.exp_dir / "final" / ".lcsc-partial").exists()  # a stopped export's pieces are removed
    chain.command = [shutil.which(command[0]) or command[0], *command[1:]]


def test_ctrl_c_during_ray_start_up_to_the_group(chain):
    log = chain.root / "startup-int.log"
    code, took = _stop(chain, log, _gcs_started, signal.SIGINT, True, chain.root)
    _check(chain, log, code, took, signal.SIGINT, "during Ray start-up", resume=False)


def test_sigterm_during_ray_start_up_to_the_driver_started_as_the_console_script(chain):
    script = Path(sys.executable).with_name("lcsc-tune-cm")
    chain.command = [str(script), *chain.command[2:]]
    log = chain.root / "startup-term.log"
    code, took = _stop(chain, log, _gcs_started, signal.SIGTERM, False, chain.elsewhere)
    _check(chain, log, code, took, signal.SIGTERM, "during Ray start-up", resume=False)
    printed = shlex.split(last_line(log).split("continue it with: ", 1)[1])[0]
    on_path = shutil.which("lcsc-tune-cm")
    assert printed == ("lcsc-tune-cm" if on_path and Path(on_path).resolve() == script.resolve() else str(script))


@pytest.mark.parametrize("sig, group", [(signal.SIGINT, False), (signal.SIGTERM, True)])
def test_stop_during_the_search(chain, sig, group):
    log = chain.root / f"search-{sig}.log"
    target = chain.records() + 2
    code, took = _stop(chain, log, lambda pid: chain.records() >= target, sig, group, chain.elsewhere)
    _check(chain, log, code, took, sig, f"stopped: search {NAME} stopped with ", resume=True)
    assert not (chain.exp_dir / "final").exists()


@pytest.mark.parametrize("sig, group, marker, phase", [
    (signal.SIGTERM, False, "baseline checkpoints of the run, search score", "during the control fit"),
    (signal.SIGINT, True, "baseline checkpoints of the run, search score", "during the control fit"),
    (signal.SIGINT, False, "held-out scoring:", "during held-out scoring"),
    (signal.SIGTERM, True, "held-out scoring:", "during held-out scoring"),
    (signal.SIGTERM, False, "\nuse: ", "during the export"),
    (signal.SIGINT, True, "\nuse: ", "during the export"),
    (signal.SIGINT, False, "\nexport: ", "during the final plots"),
    (signal.SIGTERM, True, "\nexport: ", "during the final plots"),
])
def test_stop_after_the_search(chain, sig, group, marker, phase):
    log = chain.root / f"{phase.split()[-1]}-{sig}.log"
    code, took = _stop(chain, log, _log_has(log, marker), sig, group, chain.elsewhere)
    _check(chain, log, code, took, sig, phase, resume=True)


def test_the_last_printed_command_finishes_the_job(chain):
    log = chain.root / "finish.log"
    with open(log, "w") as handle:
        driver = subprocess.Popen(chain.command, stdout=handle, stderr=subprocess.STDOUT, env=driver_env(),
                                  cwd=chain.elsewhere, start_new_session=True)
    try:
        code = driver.wait(timeout=300)
    finally:
        kill_session(driver.pid)
    assert code == 0, log.read_text()[-3000:]
    assert all((chain.exp_dir / "final" / name).is_file() for name in FINAL_FILES)
    assert not (chain.exp_dir / "final" / ".lcsc-partial").exists()
