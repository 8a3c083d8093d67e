"""Argparse `type=` functions that check a number's range while the command line is parsed.

A flag out of range (`--num-trials 0`, `--fid-samples 1`, `--bound -1`) must fail before anything runs, not
after Ray started or a run was loaded; argparse then prints `argument --num-trials: must be >= 1, got 0` and
exits with status 2, like the input errors of the rest of the code.
"""

from __future__ import annotations

import argparse
import math
import operator
from collections.abc import Callable


def _ranged(convert: Callable[[str], int | float], minimum: float, inclusive: bool) -> Callable[[str], int | float]:
    """A `type` converting with `convert` and accepting only finite values >= (or >) `minimum`."""
    relation = ">=" if inclusive else ">"
    holds = operator.ge if inclusive else operator.gt
    kind = "an integer" if convert is int else "a number"

    def parse(text: str) -> int | float:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {kind} {relation} {minimum:g}, got {text!r}") from None
        if not (math.isfinite(value) and holds(value, minimum)):
            raise argparse.ArgumentTypeError(f"must be {relation} {minimum:g}, got {text}")
        return value

    parse.__name__ = f"{kind} {relation} {minimum:g}"
    parse.checks_range = True  # type: ignore[attr-defined]  # presets' numbers are checked with it too (flags.py)
    return parse


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An integer flag of at least `minimum` (counts >= 1, sample counts >= 2, seeds >= 0)."""
    return _ranged(int, minimum, inclusive=True)


def float_at_least(minimum: float) -> Callable[[str], float]:
    """A finite number of at least `minimum` (a penalty >= 0)."""
    return _ranged(float, minimum, inclusive=True)


def float_above(minimum: float) -> Callable[[str], float]:
    """A finite number strictly above `minimum` (a bound > 0, a reduction factor > 1)."""
    return _ranged(float, minimum, inclusive=False)
