"""User-facing errors and how the command-line entry points end.

Every problem caused by the user's input (a file, a flag, a folder) is raised as `LcscError` with one line
that names the culprit and says what to do; the entry points print `error: <message>` to stderr and exit
with status 2. A search stopped by Ctrl+C or SIGTERM ends with `SearchInterrupted` (the resume command) and
status 130, the shell's code for "stopped by a signal". Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import signal
import sys
from typing import Any, Callable, NoReturn

INPUT_ERROR_STATUS = 2
INTERRUPTED_STATUS = 130


class LcscError(Exception):
    """An input problem the user can fix; the message is one line naming the file/flag and the remedy."""


class SearchInterrupted(LcscError):
    """The user stopped a search before its budget was reached; the message says how to continue it."""


def exit_with(error: LcscError) -> NoReturn:
    """Print `error` as one line on stderr and exit with status 2 (130 for an interrupted search)."""
    message = " ".join(str(error).split())
    if isinstance(error, SearchInterrupted):
        print(f"stopped: {message}", file=sys.stderr, flush=True)
        raise SystemExit(INTERRUPTED_STATUS)
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(INPUT_ERROR_STATUS)


def _terminate_as_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run_cli(main: Callable[[], object]) -> None:
    """Run a CLI `main`: `LcscError` becomes its one line and exit status; SIGTERM is treated as Ctrl+C, and a
    Ctrl+C outside the search loop (which handles its own) exits with status 130 without a traceback."""
    signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    try:
        main()
    except LcscError as error:
        exit_with(error)
    except KeyboardInterrupt:
        print("\nstopped: interrupted by a signal; rerun the same command to continue (with --resume for a search "
              "that had started)", file=sys.stderr, flush=True)
        raise SystemExit(INTERRUPTED_STATUS) from None
