"""How a command stops on Ctrl+C (SIGINT) or SIGTERM: within seconds, in every phase, with the line that says
how to continue, and without leaving processes or half-written files behind.

Exit status: 128 + the signal's number, the shell's convention: 130 after SIGINT, 143 after SIGTERM (what
`timeout`, systemd, Slurm and Kubernetes send, and report as "terminated"). A second signal exits at once.

A stop never raises an exception in the driver. A KeyboardInterrupt lands at whatever bytecode runs: inside
logging's fork hooks while Ray starts (it was swallowed, a lock stayed held, and the driver ran on, then hung)
or inside Ray's own calls (the driver exited 1 and printed nothing). So a stop signal
- inside the search loop (`graceful`) asks Ray Tune to leave its loop and save the experiment state, as a first
  Ctrl+C does;
- inside a commit of result files (`deferred`) waits for the commit's end, so the files appear together;
- anywhere else (run checks, Ray start-up, the stages after the search) ends the driver at once.
A watchdog thread learns of every stop signal at once, through Python's wakeup fd, also while the main thread
sits in C code that never returns to the interpreter (a Ray call waiting for a dead GCS), and ends the driver
when the main thread has not run the handler within `HANDLER_WAIT_S`, or a graceful stop has not ended it
`SAVED_GRACE_S` after Tune's save (`GRACE_S` after the signal at most).
Ending the driver (`exit_stopped`): remove the folders of unfinished files (`discarded_on_stop`), flush the
output, kill every process it started (a local Ray cluster: GCS,
raylet, agents and workers, whose agents otherwise linger for minutes), print the stop line (`set_phase` keeps
it current) and `os._exit`. The cluster's processes are started with SIGTERM blocked (`shielded_children`),
so a signal to the process group or cgroup reaches only the driver. Every file the job writes is written
atomically (lcsc_ray/atomic.py), so exiting at any point leaves whole files or none. The handler writes with
`os.write` and takes no lock a signal could have interrupted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn, Sequence

import psutil

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
GRACE_S = 8.0  # how long Tune may take to save its state after a stop signal before the watchdog ends the driver
SAVED_GRACE_S = 3.0  # how long the driver may take to wind down once Tune has saved (Ray may be gone by then)
EXIT_WAIT_S = 6.0  # how long the watchdog lets a main thread that is ending the process finish
HANDLER_WAIT_S = 2.0  # how long the main thread has to run the Python handler (it cannot inside Ray's C++ calls)


@dataclass
class _State:
    """What the driver is doing, for the stop line, and how a signal is handled now."""

    owner: bool = False  # inside `handling`: this process is a command that may exit on a signal
    phase: str = "start-up"
    stopped: Callable[[], str] | None = None  # what a stop now leaves, when the phase says more than its name
    command: Callable[[], str] | None = None  # the command that continues the work (None: rerun the same one)
    graceful: Callable[[], None] | None = None  # while set, the first signal calls it instead of exiting
    deferring: bool = False
    received: int | None = None  # the first stop signal
    exiting: bool = False
    signals: int | None = None  # the write end of the pipe the watchdog thread reads stop signals from
    cluster: bool = False  # a local Ray cluster was started under `shielded_children`
    saved: threading.Event = field(default_factory=threading.Event)  # Tune saved its state after the stop
    discard: list[Path] = field(default_factory=list)  # folders of unfinished files, removed when a stop ends it


_state = _State()


def status(signum: int | None) -> int:
    """The exit status after stop signal `signum` (130 when no signal is known, e.g. a stop Tune reported)."""
    return 128 + int(signum or signal.SIGINT)


def received() -> int | None:
    """The first stop signal this process received, if any."""
    return _state.received


@contextlib.contextmanager
def handling(command: Callable[[], str] | None = None) -> Iterator[None]:
    """While a command's `main` runs: SIGINT and SIGTERM stop it as the module docstring says (main thread
    only). The previous handlers come back afterwards, so a command run in-process (tests) leaves none."""
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    _state.owner, _state.command, _state.phase, _state.received = True, command, "start-up", None
    _state.cluster = False
    if _state.signals is None:
        # Started here, not in the handler: starting a thread takes locks the interrupted code may hold.
        read, _state.signals = os.pipe()
        os.set_blocking(_state.signals, False)
        threading.Thread(target=_watchdog, args=(read,), daemon=True, name="lcsc-stop-watchdog").start()
    for sig in STOP_SIGNALS:
        signal.signal(sig, _on_signal)
    # Python's C-level handler writes each signal's number here at once, also while the main thread is
    # inside C code that never returns to the interpreter (a Ray call waiting for a GCS that died).
    previous_fd = signal.set_wakeup_fd(_state.signals, warn_on_full_buffer=False)
    try:
        yield
    finally:
        _state.owner, _state.command = False, None
        signal.set_wakeup_fd(previous_fd)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def entry_point(names: Sequence[str] | None = None, fallback: Sequence[str] = ()) -> list[str]:
    """How the user started this process, as words they can paste in any folder: a console script by its name
    when PATH finds this same one (`lcsc-tune-cm`), else by its absolute path; a script as `python <absolute
    path>`. `fallback` when `sys.argv[0]` is not a file named in `names` (a command run in-process)."""
    script = Path(sys.argv[0])
    if not script.is_file() or (names is not None and script.name not in names):
        return list(fallback) or [sys.argv[0]]
    if script.suffix == ".py":
        return [python_command(), str(script.absolute())]
    found = shutil.which(script.name)
    return [script.name if found and Path(found).resolve() == script.resolve() else str(script.absolute())]


def python_command() -> str:
    """`python` when PATH finds this interpreter under that name (an activated environment), else its path:
    another `python` would lack the packages."""
    found = shutil.which("python")
    return "python" if found and os.path.abspath(found) == os.path.abspath(sys.executable) else sys.executable


@contextlib.contextmanager
def shielded_children() -> Iterator[None]:
    """Processes started in the block (a local Ray cluster: GCS, raylet and through it agents and workers)
    inherit SIGTERM blocked, as Ray blocks SIGINT in them itself: a SIGTERM to the process group or the whole
    cgroup (`timeout`, systemd, Slurm) then reaches only the driver, which stops the search and then the
    cluster, instead of the cluster dying first under a driver that waits a minute for it (or that Ray's core
    worker ends with status 1). Only the main thread blocks it, so the driver still hears the signal; a
    command run this way must end through `end`, since Ray's own shutdown waits for a SIGTERM they ignore."""
    if not _state.owner:
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    _state.cluster = True
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def end(status: int) -> None:
    """After a command's `main`: when it started a local Ray cluster (`shielded_children`), kill the cluster
    and end the process with `status` at once (output flushed, no exit handlers, which would talk to the
    killed cluster); else return."""
    if _state.cluster:
        _end_process(status, [])


def owns_process() -> bool:
    """True while a command runs under `handling`: a stop may end the process."""
    return _state.owner


def set_phase(phase: str, command: Callable[[], str] | None = None, *,
              stopped: Callable[[], str] | None = None) -> None:
    """Say what the driver does now (named in the stop line), when given the command that continues it
    (called only at the stop: it may look at what is on disk then), and `stopped`, what a stop in this phase
    leaves (e.g. the trials completed), said instead of the phase's name."""
    _state.phase, _state.stopped = phase, stopped
    if command is not None:
        _state.command = command
    if _state.received is not None and _state.owner and not _state.deferring:
        exit_stopped(_state.received)  # a stop that arrived as the search ended: do not start the next phase


def stop_line(signum: int | None) -> str:
    """The last line of a stopped command: what was stopped and the exact command that continues it."""
    name = signal.Signals(signum).name if signum else "a stop signal"
    try:
        command = _state.command() if _state.command else None
    except Exception as error:  # noqa: BLE001 - a stop must print its line whatever the disk says
        command = None
        name += f" (the continue command could not be built: {error})"
    what = f"stopped: {_state.stopped()}" if _state.stopped else f"stopped by {name} during {_state.phase}"
    return f"{what}; rerun the same command to continue" if command is None else f"{what}; continue it with: {command}"


@contextlib.contextmanager
def graceful(stop: Callable[[], None]) -> Iterator[None]:
    """While the block runs, the first stop signal calls `stop` (which must make the block end soon) instead
    of exiting; outside a command (not under `handling`, e.g. a library call) the handlers are installed for
    the block only and no watchdog runs. After a stop the handlers stay: a second signal exits at once."""
    installed = signal.getsignal(signal.SIGINT) is _on_signal and signal.getsignal(signal.SIGTERM) is _on_signal
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    if not installed:
        for sig in STOP_SIGNALS:
            signal.signal(sig, _on_signal)
    if not _state.owner:
        _state.received = None  # a library caller's earlier stop has been handled by now
    _state.saved.clear()
    _state.graceful = stop
    try:
        yield
    finally:
        _state.graceful = None
        if not installed and _state.received is None:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A stop signal during the block takes effect when it ends (files that must appear together)."""
    _state.deferring = True
    try:
        yield
    finally:
        _state.deferring = False
    if _state.received is not None and _state.owner:
        exit_stopped(_state.received)


@contextlib.contextmanager
def discarded_on_stop(folder: Path) -> Iterator[None]:
    """A stop that ends the driver during the block removes `folder` (files that only count once complete,
    which may weigh as much as an exported network) instead of leaving it for the next run to empty."""
    _state.discard.append(folder)
    try:
        yield
    finally:
        _state.discard.remove(folder)


def _on_signal(signum: int, frame: Any) -> None:
    if _state.received is not None:  # a second signal: exit at once; what was saved stays saved
        if _state.exiting:
            os._exit(status(_state.received))
        exit_stopped(_state.received, note="second stop signal: exiting now")
    _state.received = signum
    if _state.signals is not None:  # for the watchdog, in case something replaced the wakeup fd
        with contextlib.suppress(OSError):
            os.write(_state.signals, bytes([signum]))
    if _state.deferring:
        return
    if _state.graceful is not None:
        _write(f"\nstopping ({signal.Signals(signum).name}): saving the search state; a second signal exits at once")
        try:
            _state.graceful()
        except Exception:  # noqa: BLE001 - nothing to stop gracefully (yet): exit as in any other phase
            exit_stopped(signum)
        return
    exit_stopped(signum)


def state_saved() -> None:
    """Tune has saved the experiment state after a stop: nothing is lost by exiting from now on, so the
    driver gets only `SAVED_GRACE_S` more to wind down (its Ray may already be gone)."""
    _state.saved.set()


def _watchdog(signals: int) -> None:
    """Make sure a stopped command ends: when the main thread has not run the Python handler within
    `HANDLER_WAIT_S` of the signal (it is stuck in C code), end the process from here; else give a graceful
    stop `GRACE_S` from the signal, or `SAVED_GRACE_S` from Tune's save, whichever comes first."""
    signum = _next_stop_signal(signals)
    started = time.monotonic()
    while _state.received is None and time.monotonic() - started < HANDLER_WAIT_S:
        time.sleep(0.05)
    if _state.received is None:
        exit_stopped(signum)
    if _state.saved.wait(max(0.0, GRACE_S - (time.monotonic() - started))):
        time.sleep(SAVED_GRACE_S)
    exit_stopped(_state.received)


def _next_stop_signal(signals: int) -> int:
    """Block until a stop signal arrives while a command runs (`handling`); its number."""
    while True:
        for signum in os.read(signals, 64):
            if signum in STOP_SIGNALS and _state.owner:
                return signum


def exit_stopped(signum: int | None, line: str | None = None, *, note: str | None = None) -> NoReturn:
    """End this process after a stop: flush, kill what it started, print `line` (default: `stop_line`) last
    and exit with `status(signum)` without running exit handlers (they talk to the Ray we just stopped)."""
    if _state.exiting and threading.current_thread() is not threading.main_thread():
        time.sleep(EXIT_WAIT_S)  # the main thread is exiting; let it finish, or exit if it got stuck
        os._exit(status(signum))
    _state.exiting = True
    _end_process(status(signum), [*([note] if note else []), line if line is not None else stop_line(signum)])


def _end_process(code: int, lines: Sequence[str]) -> NoReturn:
    """Freeze every process this one started, flush, print `lines`, kill the frozen processes and exit with
    `code`. Frozen (SIGSTOP), they print nothing after the last line, and the driver's Ray core worker cannot
    see its raylet die and abort the process (status -6) before it exits with `code`."""
    _state.exiting = True
    frozen = freeze_descendants()
    for folder in _state.discard:  # renamed first: a main thread still writing cannot recreate it half-full
        doomed = folder.with_name(f"{folder.name}.{os.getpid()}.discarded")
        with contextlib.suppress(OSError):
            folder.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)
    for stream in (sys.stdout, sys.stderr):
        _flush(stream)
    for line in lines:
        _write(line)
    for process in frozen:
        with contextlib.suppress(psutil.Error):
            process.kill()
    os._exit(code)


def freeze_descendants() -> list[psutil.Process]:
    """SIGSTOP every process this one started, their children included; the frozen processes (to be killed).
    A local Ray cluster is such a tree (GCS, raylet, dashboard, agents, workers); frozen, none starts another
    while the tree is walked. Processes of a cluster this driver only joined are not its descendants and are
    left alone."""
    me, frozen = psutil.Process(), {}
    for _ in range(3):  # a child started while the tree was walked is found on the next walk
        found = [p for p in _children(me) if p.pid not in frozen]
        if not found:
            break
        for process in found:
            with contextlib.suppress(psutil.Error):
                process.suspend()
            frozen[process.pid] = process
    return list(frozen.values())


def _children(process: psutil.Process) -> list[psutil.Process]:
    try:
        return process.children(recursive=True)
    except psutil.Error:
        return []


def _flush(stream: Any) -> None:
    """Flush a Python stream from a signal handler: the interrupted code may be inside a write to it."""
    with contextlib.suppress(Exception):
        stream.flush()


def _write(line: str) -> None:
    """One line on stderr without Python's buffers or locks (safe in a signal handler)."""
    with contextlib.suppress(OSError):
        os.write(2, (line + "\n").encode("utf-8", "replace"))
