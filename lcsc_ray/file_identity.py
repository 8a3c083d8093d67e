"""Files identified by what they hold, and files that must not change while a search reads them.

`content_digest` names a checkpoint or statistics file by its size and its first and last MiB: a moved or
copied run folder is the same run, a retrained one in the same folder is not, and no gigabytes of weights
are read to tell. `FileStamp` is what the driver records of every selected checkpoint before Ray starts
(size, modification time, digest); a worker about to read the checkpoints compares them (`check_unchanged`),
so a file replaced, truncated or deleted under a running search stops it with one line naming the file
instead of mixing weights of another run into its scores.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lcsc_ray.errors import LcscError

DIGEST_CHARS = 16
SAMPLED_BYTES = 1 << 20  # a file is identified by its size and its first and last MiB


def content_digest(path: Path) -> str:
    """sha256 of a file's size and its first and last MiB (a folder: of each of its files, by relative name).

    Identifies a checkpoint or statistics file by what it holds, so a moved or copied run folder is the same
    run and a retrained one in the same folder is not, without reading gigabytes of weights at every start."""
    path = Path(path)
    if path.is_file():  # the driver digests each checkpoint twice (identity, stamps): read it once
        stat = path.stat()
        return _file_digest(str(path), stat.st_size, stat.st_mtime_ns)
    return _digest(path)


@functools.lru_cache(maxsize=4096)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """`_digest` of a file, cached while its size and modification time stay the same."""
    return _digest(Path(path))


def _digest(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    try:
        for file in files:
            size = file.stat().st_size
            digest.update(f"{file.relative_to(path) if file != path else ''}:{size}:".encode())
            with open(file, "rb") as handle:
                digest.update(handle.read(SAMPLED_BYTES))
                if size > SAMPLED_BYTES:
                    handle.seek(max(SAMPLED_BYTES, size - SAMPLED_BYTES))
                    digest.update(handle.read())
    except OSError as error:
        raise LcscError(f"{error.filename or path}: cannot be read ({error.strerror}); check the file") from None
    return digest.hexdigest()[:DIGEST_CHARS]


@dataclass(frozen=True)
class FileStamp:
    """A checkpoint as the search started with it: path, size, modification time and `content_digest`."""

    path: str
    size: int
    mtime_ns: int
    digest: str


def stamp(path: Path) -> FileStamp:
    """`path`'s stamp now (LcscError naming it when it cannot be read)."""
    try:
        stat = Path(path).stat()
    except OSError as error:
        raise LcscError(f"{path}: cannot be read ({error.strerror}); check the file") from None
    return FileStamp(str(path), stat.st_size, stat.st_mtime_ns, content_digest(path))


def check_unchanged(stamps: Sequence[FileStamp]) -> None:
    """Raise LcscError naming the first file that is gone or differs from its stamp (size or modification time
    first, which costs nothing; the digest when those match but the file was rewritten in place)."""
    for recorded in stamps:
        path = Path(recorded.path)
        remedy = ("restore it as it was, then continue with --resume (or start a new --name to search the "
                  "changed run)")
        try:
            stat = path.stat()
        except OSError:
            raise LcscError(f"checkpoint {path} is gone since the search started; {remedy}") from None
        if stat.st_size != recorded.size:
            raise LcscError(f"checkpoint {path} changed since the search started ({recorded.size:,} bytes, now "
                            f"{stat.st_size:,}); {remedy}")
        if stat.st_mtime_ns != recorded.mtime_ns and content_digest(path) != recorded.digest:
            raise LcscError(f"checkpoint {path} was rewritten since the search started (other content); {remedy}")
