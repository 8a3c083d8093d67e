"""Input files a Ray worker would otherwise open on the driver's disk, carried to it through Ray's object store.

On a cluster without a shared file system (`--storage` on object storage, docs/SCALING.md) a worker node
cannot open the reference statistics, the Inception weights, the run's baseline checkpoint files or a
pickled network snapshot (NVlabs runs) by the driver's paths. The driver reads them once (`pack`) into the stack payload it already puts in the object
store (`SHIPPED_KEY`), and a worker writes each to its own cache under a content digest (`local_path`) and
opens that copy instead: the same bytes under the same file name, so readers that dispatch on the suffix
behave the same. Paths that were not shipped are returned unchanged.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

from lcsc_ray.atomic import atomic_write
from lcsc_ray.paths import cache_dir

SHIPPED_KEY = "shipped_files"  # in the stack payload: resolved driver path -> bytes


def pack(paths: Iterable[str | os.PathLike | None]) -> dict[str, bytes]:
    """The bytes of each existing file of `paths` (None and folders skipped), by resolved path."""
    files = {}
    for path in paths:
        if path is not None and Path(path).is_file():
            files[str(Path(path).resolve())] = Path(path).read_bytes()
    return files


def local_path(files: dict[str, bytes] | None, path: str | os.PathLike | None) -> str | None:
    """This node's copy of a shipped file (written once per content), else `path` as it was."""
    if path is None or not files:
        return None if path is None else str(path)
    data = files.get(str(Path(path).resolve()))
    if data is None:
        return str(path)
    target = cache_dir() / "shipped" / hashlib.sha256(data).hexdigest()[:16] / Path(path).name
    if not target.is_file():
        atomic_write(target, lambda tmp: tmp.write_bytes(data))
    return str(target)


def local_run_config(files: dict[str, bytes] | None, config: dict | None) -> dict | None:
    """A carried run.json whose pickled network snapshot (`model.snapshot`, NVlabs runs) is this node's copy."""
    snapshot = ((config or {}).get("model") or {}).get("snapshot")
    if not files or snapshot is None:
        return config
    return {**config, "model": {**config["model"], "snapshot": local_path(files, snapshot)}}
