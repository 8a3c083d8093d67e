"""Where a search writes, checked: before Ray starts (writable, enough free space) and while it runs.

A search that runs out of disk or loses write access half-way must stop like a first Ctrl+C (Tune saves
its state, the driver prints the resume command), not crash inside Ray's bookkeeping: the watchdog stops it
while `MIN_FREE_BYTES` are still free, which leaves room for that last save. Write errors inside a trial
(`storage_error`) become the same one-line stop.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path

from lcsc_ray.errors import LcscError

MIN_FREE_BYTES = 64 << 20  # the search stops when less is free: room for Ray's last save of its state
# Bytes one trial leaves on disk (its candidate value and record, Ray's trial folder and its share of the
# experiment state), measured on the digits demo's experiments and rounded up.
TRIAL_BYTES = 48 << 10
# OS errors that mean "the storage cannot take writes now": the user frees space or restores access.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.0f} MiB"


def existing_ancestor(path: Path) -> Path:
    """`path` or its nearest existing parent (where a folder still to be created would live)."""
    path = path.expanduser().absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def probe_write(folder: Path) -> OSError | None:
    """Create, write and delete a small file in `folder` (created if missing); the OSError that stopped it."""
    probe = folder / f".lcsc-write-probe-{uuid.uuid4().hex[:8]}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as handle:
            handle.write(b"lcsc")
            handle.flush()
            os.fsync(handle.fileno())
        probe.unlink()
    except OSError as error:
        return error
    return None


def check_output_folder(folder: Path, flag: str, needed_bytes: int = 0) -> None:
    """Before anything runs: `folder` can be created and written, and its file system has `needed_bytes`
    (plus the watchdog's margin) free; else one line naming the flag, the folder and what to do."""
    error = probe_write(folder)
    if error is not None:
        raise LcscError(f"{flag} {folder}: cannot be written ({error.strerror or error}); choose a folder you can "
                        "write to (and that every node sees, on a cluster)")
    free = shutil.disk_usage(existing_ancestor(folder)).free
    if free < needed_bytes + MIN_FREE_BYTES:
        raise LcscError(f"{flag} {folder}: {_mib(free)} free, but this search needs about {_mib(needed_bytes)} "
                        f"plus {_mib(MIN_FREE_BYTES)} of headroom; free space there or choose another folder")


def storage_problem(folder: Path) -> str | None:
    """Why the search cannot go on writing to `folder` (too little free space, or a failed write), or None;
    cheap enough to ask every few seconds."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError as error:
        return f"{folder}: cannot be read ({error.strerror or error})"
    if free < MIN_FREE_BYTES:
        return (f"{folder}: only {_mib(free)} free (the search stops below {_mib(MIN_FREE_BYTES)}, so its state "
                "can still be saved)")
    error = probe_write(folder)
    if error is not None:
        return f"{folder}: cannot be written ({error.strerror or error})"
    return None


def storage_error(path: Path | str, error: OSError) -> LcscError | None:
    """The one-line stop for an OSError writing `path` when it means the storage is full or read-only
    (`STORAGE_ERRNOS`), else None (a different failure, handled where it happened)."""
    if error.errno not in STORAGE_ERRNOS:
        return None
    return LcscError(f"{path}: cannot be written ({error.strerror or error}); free space or restore write access "
                     "there")
