"""The commands the search prints for the user to paste: continue a stopped search, or start a new one.

A printed command must work where the user pastes it, which may be another folder than the one the search
started in: it names the entry point that was used (`lcsc-tune-cm`, or `python /absolute/launch/tune_cm.py`;
in a Ray Job, whose folder is a temporary copy of the code, `python launch/tune_cm.py` to submit again from
the project's folder), gives every path flag as an absolute path, and otherwise keeps the user's own flags
as typed.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from lcsc_ray import stopping
from lcsc_ray.search.ray_compat import in_ray_job

# Flags whose value is a path; --preset only when it names a file (else it is a bundled preset's name).
PATH_FLAGS = ("--ckpt-dir", "--storage", "--out", "--ref-stats", "--inception-weights", "--run-json", "--code-dir",
              "--preset")
REPO = Path(__file__).resolve().parents[2]


def entry_point(kind: str) -> list[str]:
    """The words that start `kind`'s search the way this one was started (module docstring)."""
    script = REPO / "launch" / f"tune_{kind}.py"
    if in_ray_job():
        return ["python", f"launch/tune_{kind}.py"]
    fallback = [stopping.python_command(), str(script)] if script.is_file() else [f"lcsc-tune-{kind}"]
    return stopping.entry_point((f"lcsc-tune-{kind}", f"tune_{kind}.py"), fallback)


def continue_command(argv: Sequence[str] | None, kind: str, name: str | None = None, storage: Path | str | None = None,
                     *, resume: bool = False) -> str:
    """The exact command that continues this search: the user's flags with absolute paths, plus `--name` and
    `--storage` of the experiment when known, and `--resume` once the experiment exists."""
    args = absolute_paths(sys.argv[1:] if argv is None else argv)
    if name is not None:
        args = with_flag(args, "--name", name)
    if storage is not None:
        args = with_flag(args, "--storage", str(storage))
    if resume and "--resume" not in args:
        args.append("--resume")
    return shlex.join([*entry_point(kind), *args])


def new_search_command(argv: Sequence[str] | None, kind: str, name: str, storage: Path | str, exclude_step: int) -> str:
    """A new search like this one without the checkpoint at `exclude_step` (added to --exclude-steps), under a
    new --name: a resumed search keeps the selection it started with, so it cannot leave a checkpoint out."""
    args = absolute_paths(sys.argv[1:] if argv is None else argv)
    args = [arg for arg in args if arg != "--resume"]
    excluded = [value for value in flag_values(args, "--exclude-steps") if value]
    steps = ",".join([*excluded, str(exclude_step)])
    args = with_flag(args, "--exclude-steps", steps)
    args = with_flag(with_flag(args, "--name", f"{name}-without-{exclude_step}"), "--storage", str(storage))
    return shlex.join([*entry_point(kind), *args])


def absolute_paths(argv: Sequence[str]) -> list[str]:
    """`argv` with the value of every path flag (`PATH_FLAGS`, as `--name value` or `--name=value`) absolute."""
    args, index = [], 0
    while index < len(argv):
        flag, equals, value = argv[index].partition("=")
        if flag in PATH_FLAGS and equals:
            args.append(f"{flag}={_absolute(flag, value)}")
        elif flag in PATH_FLAGS and index + 1 < len(argv):
            args += [flag, _absolute(flag, argv[index + 1])]
            index += 1
        else:
            args.append(argv[index])
        index += 1
    return args


def _absolute(flag: str, value: str) -> str:
    """The path `value` as an absolute path (`~` expanded, symbolic links kept as the user named them)."""
    path = Path(value).expanduser()
    if (flag == "--preset" and not path.is_file()) or "://" in value:  # a preset's name; a storage URI
        return value
    return os.path.abspath(path)


def flag_values(argv: Sequence[str], flag: str) -> list[str]:
    """Every value `flag` has in `argv` (`FLAG value` or `FLAG=value`)."""
    values = []
    for index, arg in enumerate(argv):
        if arg == flag and index + 1 < len(argv):
            values.append(argv[index + 1])
        elif arg.startswith(flag + "="):
            values.append(arg.split("=", 1)[1])
    return values


def with_flag(argv: Sequence[str], flag: str, value: str) -> list[str]:
    """`argv` with `flag` set to `value` once: every earlier occurrence is removed, the new one appended."""
    args, index = [], 0
    while index < len(argv):
        if argv[index] == flag:
            index += 2
            continue
        if not argv[index].startswith(flag + "="):
            args.append(argv[index])
        index += 1
    return [*args, flag, value]
