"""Progress that reads well on a terminal and in a log file.

On a terminal a stage shows tqdm's live bar. When output goes to a file, a CI log or `ray job logs`, the
same bar is written as plain lines (no carriage returns), at most one every `LINE_INTERVAL_S` seconds, so a
long stage leaves a readable trail instead of one line holding thousands of overwritten updates.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import IO

from tqdm import tqdm

LINE_INTERVAL_S = 15.0  # seconds between two plain progress lines when output is not a terminal


class _Lines:
    """A text stream adapter for tqdm: each refresh becomes one plain line (carriage returns dropped)."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable: Iterable | None = None, *, desc: str, total: int | None = None, unit: str = "it",
             initial: int = 0, disable: bool = False, stream: IO[str] | None = None) -> tqdm:
    """A tqdm bar over `iterable` on a terminal; plain lines at most every LINE_INTERVAL_S s elsewhere."""
    stream = stream or sys.stderr
    if stream.isatty():
        return tqdm(iterable, desc=desc, total=total, unit=unit, initial=initial, disable=disable, file=stream)
    return tqdm(iterable, desc=desc, total=total, unit=unit, initial=initial, disable=disable, file=_Lines(stream),
                mininterval=LINE_INTERVAL_S, maxinterval=LINE_INTERVAL_S, ascii=True, ncols=100)
