"""The checkpoint stack as files: built once, memory-mapped read-only by every process that merges.

A search on one node runs several trials at once, each in its own process. Loading the stack in each
holds N copies of K x P numbers; the stack file holds one: `data.bin` ([K, P] rows in the storage dtype),
`base.bin` (the newest checkpoint, float32, for 16-bit delta stacks), `fixed.safetensors` (tensors copied
from the newest, never merged) and `stack.json` (shapes, dtypes, the tensor layout, the source files).
Every process maps `data.bin`, so its pages sit once in the page cache of the node; a stack larger than
host memory still merges, each merge reading the pages the cache cannot keep from the disk.

The folder is written under a temporary name and renamed when complete, so a reader never sees a partial
stack; `stack.json` records the source files' sizes and modification times, and a stack whose sources
changed is rebuilt rather than reused.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lcsc_ray.checkpoints import CheckpointFile
from lcsc_ray.errors import LcscError
from lcsc_ray.stack import STORAGE_DTYPES, CheckpointStack, numpy_storage_dtype

STACK_JSON = "stack.json"
_FORMAT = 1


def source_identity(files: Sequence[CheckpointFile]) -> list[list]:
    """(path, step, size, mtime) of each source file: what a reused stack file must still match."""
    identity = []
    for f in files:
        stat = f.path.stat()
        identity.append([str(f.path), f.step, stat.st_size, stat.st_mtime_ns])
    return identity


def write_stack_file(folder: str | Path, files: Sequence[CheckpointFile], *, ckpt_key: str | None = None,
                     strip_prefix: str | None = None, storage_dtype: torch.dtype = torch.float32,
                     trust_pickle: bool = False) -> Path:
    """Build the stack of `files` into `folder` (module docstring) and return it; a complete stack already
    there for the same source files and dtype is reused as it is."""
    folder = Path(folder)
    if is_current(folder, files, storage_dtype):
        return folder
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        stack = CheckpointStack.from_files(files, ckpt_key=ckpt_key, strip_prefix=strip_prefix, device="cpu",
                                           storage_dtype=storage_dtype, trust_pickle=trust_pickle,
                                           file=partial / "data.bin")
        payload = stack.to_payload()
        if payload["base"] is not None:
            payload["base"].tofile(partial / "base.bin")
        save_file({name: tensor.contiguous() for name, tensor in stack.fixed.items()}, str(partial / "fixed.safetensors"))
        _flush(partial / "data.bin")  # the rows are in data.bin's mapped pages: on disk before the manifest says so
        meta = {key: payload[key] for key in ("storage_dtype", "entries", "order", "files", "key_path", "metadata")}
        meta.update(format=_FORMAT, shape=list(stack.data.shape), sources=source_identity(stack.files))
        (partial / STACK_JSON).write_text(json.dumps(meta), encoding="utf-8")
        del stack, payload
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(partial, folder)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return folder


def _flush(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def is_current(folder: Path, files: Sequence[CheckpointFile], storage_dtype: torch.dtype) -> bool:
    """True when `folder` holds a complete stack of exactly these source files (unchanged) in this dtype."""
    try:
        meta = json.loads((folder / STACK_JSON).read_text(encoding="utf-8"))
        ordered = sorted(files, key=lambda f: f.step)
        return (meta.get("format") == _FORMAT and meta["storage_dtype"] == str(storage_dtype).removeprefix("torch.")
                and meta["sources"] == source_identity(ordered))
    except (OSError, ValueError, KeyError):
        return False


def read_stack_payload(folder: str | Path) -> dict:
    """The `CheckpointStack.to_payload()` form of a stack file, its arrays memory-mapped read-only, for
    `CheckpointStack.from_payload` (which uses a CPU mapping in place)."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / STACK_JSON).read_text(encoding="utf-8"))
        dtype = STORAGE_DTYPES[meta["storage_dtype"]]
        shape = tuple(meta["shape"])
        data = np.memmap(folder / "data.bin", dtype=numpy_storage_dtype(dtype), mode="r", shape=shape)
        base = np.memmap(folder / "base.bin", dtype=np.float32, mode="r", shape=(shape[1],)) \
            if (folder / "base.bin").is_file() else None
        fixed = load_file(str(folder / "fixed.safetensors"))
    except (OSError, ValueError, KeyError) as error:
        raise LcscError(f"{folder}: not a complete stack file ({error}); delete the folder and rerun to rebuild it") from None
    return {**{key: meta[key] for key in ("storage_dtype", "entries", "order", "files", "key_path", "metadata")},
            "data": data, "base": base,
            "fixed": {name: (t.float() if t.dtype == torch.bfloat16 else t).numpy() for name, t in fixed.items()},
            "fixed_dtypes": {name: str(t.dtype).removeprefix("torch.") for name, t in fixed.items()}}


def open_stack_file(folder: str | Path, device: str | torch.device = "cpu") -> CheckpointStack:
    """The stack in `folder`, mapped (CPU) or streamed from the mapping to `device`."""
    return CheckpointStack.from_payload(read_stack_payload(folder), device=device)
