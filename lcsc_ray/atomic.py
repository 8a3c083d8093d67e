"""Atomic file writes: write to a temporary file in the same folder, fsync, then rename over the target.

A crash or SIGKILL therefore leaves either the old file or the complete new one, never a truncated file
(results, exported checkpoints, statistics and training checkpoints all go through here).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from lcsc_ray import stopping

STAGING = ".lcsc-partial"  # the folder `staged` writes in
# Called with each target once it is in place: a remote --storage copies the file to its bucket at once
# (lcsc_ray/remote_storage.py); empty otherwise.
AFTER_WRITE: list[Callable[[Path], None]] = []


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `target`; on success it is fsynced and renamed onto `target`.

    The temporary name keeps the target's suffix so writers that dispatch on it (np.savez, safetensors,
    matplotlib) behave as for the real name.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".tmp{target.suffix}", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions of a new file
        os.replace(tmp, target)
        for hook in AFTER_WRITE:
            hook(target)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def staged(target: str | os.PathLike, *, last: str) -> Iterator[Path]:
    """An empty hidden folder inside `target` for files that must appear in `target` together: what the block
    writes there is moved in at its end (`commit_staged`, `last` last: the file whose presence says the rest
    is there); a block that raises (a stop, an error) leaves nothing of it behind, and what a killed run left
    is removed the next time."""
    staging = Path(target) / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with stopping.discarded_on_stop(staging):
        try:
            yield staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        commit_staged(staging, last=last)


def commit_staged(staging: Path, *, last: str) -> None:
    """Move every entry of `staging` into its parent folder, `last` last (the file whose presence says the
    rest is there), replacing what is in the way, then remove `staging`. A stop signal waits for the end of
    the moves (lcsc_ray/stopping.py), so the files appear together or, stopped before, not at all."""
    target = staging.parent
    with stopping.deferred():
        for entry in sorted(staging.iterdir(), key=lambda entry: entry.name == last):
            destination = target / entry.name
            if destination.is_dir() and not destination.is_symlink():
                shutil.rmtree(destination)
            elif entry.is_dir() and destination.exists():
                destination.unlink()
            os.replace(entry, destination)
        staging.rmdir()


def _umask() -> int:
    """The process umask (reading it requires setting it; restored at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(target: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call `write(tmp_path)` and move the result onto `target` atomically; return `target`."""
    with atomic_path(target) as tmp:
        write(tmp)
    return Path(target)


def atomic_write_text(target: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `target` atomically."""
    return atomic_write(target, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(target: str | os.PathLike, obj: Any) -> Path:
    """Write `obj` as indented JSON to `target` atomically."""
    return atomic_write_text(target, json.dumps(obj, indent=2, sort_keys=False) + "\n")
