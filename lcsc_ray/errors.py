"""User-facing errors and how the command-line entry points end.

Every problem caused by the user's input (a file, a flag, a folder) is raised as `LcscError` with one line
that names the culprit and says what to do; the entry points print `error: <message>` to stderr and exit
with status 2. Ctrl+C and SIGTERM stop a command within seconds, in any phase, with status 130 or 143 and a
last line that holds the command to continue (lcsc_ray/stopping.py); a search stopped in its loop ends with
`SearchInterrupted`, which says how many trials it completed. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, NoReturn

from lcsc_ray import stopping

INPUT_ERROR_STATUS = 2
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # terminal colour codes in Ray's task tracebacks
_trace_folder: list[Path] = []  # where `keep_trace` writes (set once the experiment is known)


class LcscError(Exception):
    """An input problem the user can fix; the message is one line naming the file/flag and the remedy."""


class SearchInterrupted(LcscError):
    """The user stopped a search before its budget was reached; the message says how to continue it."""


def exit_with(error: LcscError) -> NoReturn:
    """Print `error` as one line on stderr and exit with status 2 (130 or 143 for a stopped search)."""
    raise SystemExit(report(error))


def report(error: LcscError) -> int:
    """Print `error` as one line on stderr; the exit status it calls for. An input problem raised inside a Ray
    task arrives wrapped (Ray's RayTaskError subclasses it, and its text is the task's traceback in terminal
    colours): the line is the original error's and names the file that keeps the task's trace. A stopped
    search inside a command ends the process here (lcsc_ray/stopping.py)."""
    cause = getattr(error, "cause", None)
    trace = None
    if isinstance(cause, LcscError):
        trace = keep_trace(getattr(error, "traceback_str", "") or str(error))
        error = cause
    message = " ".join(str(error).split()) + (f" (the Ray task's full trace: {trace})" if trace else "")
    if isinstance(error, SearchInterrupted):
        if stopping.owns_process():  # also stops the local Ray cluster this driver started
            stopping.exit_stopped(stopping.received(), f"stopped: {message}")
        print(f"stopped: {message}", file=sys.stderr, flush=True)
        return stopping.status(stopping.received())
    print(f"error: {message}", file=sys.stderr, flush=True)
    return INPUT_ERROR_STATUS


def keep_traces_in(folder: Path | None) -> None:
    """Write the traces of errors raised in Ray tasks into `folder` (the experiment's) from now on; None: the
    temporary folder."""
    _trace_folder[:] = [] if folder is None else [folder]


def keep_trace(trace: str) -> Path | None:
    """Write a Ray task's trace, without terminal colour codes, to a new file (in the folder `keep_traces_in`
    named, else the temporary folder); its path, or None when it cannot be written."""
    text = ANSI_ESCAPE.sub("", trace)
    try:
        folder = _trace_folder[0] if _trace_folder else Path(tempfile.gettempdir())
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f"error-{time.strftime('%Y%m%d-%H%M%S')}-", suffix=".txt", dir=folder)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        return Path(name)
    except OSError:
        return None


def run_cli(main: Callable[[], object]) -> None:
    """Run a CLI `main`: `LcscError` becomes its one line and exit status; Ctrl+C and SIGTERM stop it as
    lcsc_ray/stopping.py describes (the default line says to rerun the same command; the search job names
    the exact command that continues it)."""
    same = shlex.join([*stopping.entry_point(), *sys.argv[1:]])
    with stopping.handling(lambda: same):
        status = _status_of(main)
    stopping.end(status)  # a command that started a local Ray cluster ends here, with the cluster
    if status:
        raise SystemExit(status)


def _status_of(main: Callable[[], object]) -> int:
    """Run `main`; its exit status, the line of an input error or a stop printed."""
    try:
        main()
    except LcscError as error:
        return report(error)
    except KeyboardInterrupt:  # a signal the handlers could not take (`main` ran outside the main thread)
        print(f"\n{stopping.stop_line(signal.SIGINT)}", file=sys.stderr, flush=True)
        return stopping.status(signal.SIGINT)
    return 0
