"""User-facing errors.

Every problem caused by the user's input (a file, a flag, a folder) is raised as `LcscError` with one line
that names the culprit and says what to do. The command-line entry points catch it, print
`error: <message>` to stderr and exit with status 2; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import Callable, NoReturn


class LcscError(Exception):
    """An input problem the user can fix; the message is one line naming the file/flag and the remedy."""


def exit_with(error: LcscError) -> NoReturn:
    """Print `error` as one line on stderr and exit with status 2."""
    message = " ".join(str(error).split())
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def run_cli(main: Callable[[], None]) -> None:
    """Run a CLI `main`, turning `LcscError` into a one-line message and a non-zero exit."""
    try:
        main()
    except LcscError as error:
        exit_with(error)
