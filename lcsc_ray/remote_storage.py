"""`--storage` on object storage (`s3://bucket/prefix?endpoint_override=...`, `gs://...`, any URI that
`pyarrow.fs.FileSystem.from_uri` reads), for clusters whose nodes share no file system.

Why a working copy: Ray Tune, the candidate store, the plots and the final folder are all written with
ordinary file operations (atomic renames, appends, folder moves), which object storage does not have. So
the driver keeps the experiment in a local scratch folder outside the working directory
(`<LCSC_RAY_CACHE>/remote-storage/<digest of the URI>/`) and a `Mirror` copies every file of it to the
bucket: at once after each atomic write (`lcsc_ray/atomic.py` calls `Mirror.upload`), and every
`MIRROR_PERIOD_S` for the files others write (Ray Tune's state and trial logs; less often once the scan of a
long search's many files would take more than `MIRROR_SHARE` of the driver's time), and a last time when the job
ends. Objects are PUT whole, so a reader of the bucket never sees half a file. A resumed search first
replaces the scratch copy with the bucket's (the bucket is the truth: another machine may have run it last).

Trial workers never see the driver's scratch folder: their candidate values travel in the trial config and
they write each finished evaluation's record straight to the bucket (`write_object`), which is what a
resumed search replays after the driver was killed.

Credentials come the usual way of each file system (for S3 the standard `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_DEFAULT_REGION` variables, profiles or instance roles), on
the driver and on every node.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import threading
import time
import urllib.parse
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO, Iterator

import pyarrow.fs as pafs

from lcsc_ray import atomic
from lcsc_ray.errors import LcscError
from lcsc_ray.paths import cache_dir

MIRROR_PERIOD_S = 1.0  # how stale the bucket's copy of Ray Tune's files may get while the search runs
MIRROR_SHARE = 0.05  # the most of the driver's time the periodic scan may take (it then runs less often)
SCRATCH = "remote-storage"  # inside the cache folder
UPLOAD_CHUNK = 16 << 20
_SKIPPED_FOLDERS = (".lcsc-partial",)  # atomic.STAGING: files that only count once moved into place
_FIX = ("check the URI (bucket, endpoint_override, scheme) and the credentials in the environment "
        "(AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for S3); see docs/SCALING.md")


def is_uri(value: object) -> bool:
    """Whether a flag's value names object storage rather than a local path."""
    return value is not None and "://" in str(value)


def file_uri_path(value: str) -> str | None:
    """The local path a `file://` URI names (`file:///data/x` -> `/data/x`), None for any other value: Ray Tune and
    pyarrow read `file://` as this machine's file system, so it is a path, not object storage."""
    if not str(value).startswith("file://"):
        return None
    parsed = urllib.parse.urlparse(str(value))
    if parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/") or parsed.query:
        raise LcscError(f"{value}: a file URI names an absolute path, as in file:///data/lcsc; or pass the path itself")
    return urllib.parse.unquote(parsed.path)


def _split(uri: str) -> tuple[str, str]:
    """(`scheme://path` without a trailing slash, `?query` or '')."""
    base, _, query = uri.partition("?")
    return base.rstrip("/"), f"?{query}" if query else ""


def child_uri(uri: str, *parts: str) -> str:
    """The URI of `parts` below `uri`, keeping its query (endpoint, scheme...)."""
    base, query = _split(uri)
    return "/".join([base, *parts]) + query


@lru_cache(maxsize=8)
def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(file system, path) of `uri`, one file system object per URI and process (an S3 client is not free to
    build). Every file system object this module makes lives here, so that `_release_filesystems` can drop
    them all."""
    return pafs.FileSystem.from_uri(uri)


@atexit.register
def _release_filesystems() -> None:
    """At exit, destroy this process's file system objects while the S3 SDK still runs: pyarrow shuts the SDK
    down in its own exit hook, and an S3 client destroyed after that (by the interpreter's module teardown)
    crashes the process now and then with a segmentation fault. Exit hooks run last-registered first, and
    pyarrow registered its hook when this module imported `pyarrow.fs`, so this one runs before it."""
    _filesystem.cache_clear()


def _resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """The file system and path of an object's URI; the file system is shared by every object of a root."""
    base, query = _split(uri)
    scheme, _, path = base.partition("://")
    bucket = path.split("/", 1)[0]
    filesystem, _ = _filesystem(f"{scheme}://{bucket}{query}")
    return filesystem, path


def write_object(uri: str, data: bytes) -> None:
    """PUT `data` as the object at `uri` (whole, so a reader sees the old object or the new one)."""
    filesystem, path = _resolve(uri)
    with filesystem.open_output_stream(path) as stream:
        stream.write(data)


def read_object(uri: str) -> bytes | None:
    """The object at `uri`, or None when there is none."""
    filesystem, path = _resolve(uri)
    try:
        with filesystem.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError:
        return None


@dataclass(frozen=True)
class RemoteStorage:
    """A `--storage` URI and the driver's scratch copy of it."""

    uri: str

    @property
    def _fs(self) -> tuple[pafs.FileSystem, str]:
        try:
            return _resolve(self.uri)  # the file system its trials' record writes use too: one client per bucket
        except Exception as error:  # noqa: BLE001 - pyarrow raises several types for a bad URI
            raise LcscError(f"--storage {self.uri}: not a storage URI pyarrow can open ({_first_line(error)}); "
                            f"{_FIX}") from None

    @property
    def filesystem(self) -> pafs.FileSystem:
        return self._fs[0]

    @property
    def root(self) -> str:
        """The URI's path inside its file system (`bucket/prefix`)."""
        return self._fs[1].rstrip("/")

    @property
    def scratch(self) -> Path:
        """The driver's working copy of this storage, outside the working directory."""
        return cache_dir() / SCRATCH / hashlib.sha256(self.uri.encode()).hexdigest()[:16]

    def uri_of(self, *parts: str) -> str:
        return child_uri(self.uri, *parts)

    def check(self) -> None:
        """Before Ray starts: the bucket exists and a small object can be written and deleted there with the
        credentials of this environment; else one line naming --storage and what to do."""
        bucket = self.root.split("/", 1)[0]
        probe = f"{self.root}/.lcsc-probe-{os.getpid()}"
        try:
            if self.filesystem.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise LcscError(f"--storage {self.uri}: the bucket {bucket!r} does not exist (or these credentials "
                                f"cannot see it); create it first, or {_FIX}")
            with self.filesystem.open_output_stream(probe) as stream:
                stream.write(b"lcsc-ray write check\n")
            self.filesystem.delete_file(probe)
        except OSError as error:
            raise LcscError(f"--storage {self.uri}: cannot reach or write it ({_first_line(error)}); {_FIX}") from None

    def exists(self, *parts: str) -> bool:
        return self.filesystem.get_file_info("/".join([self.root, *parts])).type != pafs.FileType.NotFound

    def newest_experiment(self, prefix: str) -> str | None:
        """The newest `<prefix>*` experiment folder (names end in a timestamp), or None."""
        selector = pafs.FileSelector(self.root, allow_not_found=True)
        names = [info.base_name for info in self.filesystem.get_file_info(selector)
                 if info.type == pafs.FileType.Directory and info.base_name.startswith(prefix)]
        return max(names) if names else None

    def prepare(self, name: str, *, resume: bool) -> None:
        """Make the scratch copy of experiment `name` what the bucket holds: a new search must not find it in
        the bucket (and starts from an empty local copy); a resumed one is downloaded afresh."""
        exists = self.exists(name)
        if not resume and exists:
            raise LcscError(f"experiment {name} exists in {self.uri}; pass --resume to continue or choose another "
                            "--name")
        if resume and not exists:
            raise LcscError(f"no experiment {name} in {self.uri}; drop --resume to start it")
        local = self.scratch / name
        shutil.rmtree(local, ignore_errors=True)
        for stale in self.scratch.glob(f"{name}.*"):
            if stale.is_file():
                stale.unlink()
        if resume:
            self._download(name)

    def _download(self, name: str) -> None:
        for info in self.filesystem.get_file_info(pafs.FileSelector(self.root, recursive=True, allow_not_found=True)):
            relative = info.path[len(self.root) + 1:]
            if info.type != pafs.FileType.File or not (relative.startswith(f"{name}/") or
                                                       relative.startswith(f"{name}.")):
                continue
            target = self.scratch / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            with self.filesystem.open_input_stream(info.path) as stream, open(target, "wb") as sink:
                _copy(stream, sink)  # a partial copy is wiped by the next `prepare`, as the whole folder is


_ACTIVE: list["Mirror"] = []  # the driver's open mirrors (one per job)


def bucket_uri(path: Path) -> str | None:
    """The URI in the bucket of a local `path` inside a mirrored experiment (what a worker on another node
    uses instead), or None when no mirror covers it (a local --storage)."""
    for mirror in _ACTIVE:
        if mirror.covers(path):
            return mirror.storage.uri_of(*path.resolve().relative_to(mirror.storage.scratch).parts)
    return None


def rebased(path: Path) -> Path:
    """`path` moved into the scratch folder of the open mirror of the same storage when it names another
    scratch folder of it: a search resumed with another cache folder (another machine) restores a searcher
    that pickled the old driver's path of the candidate store."""
    for mirror in _ACTIVE:
        parts, scratch = path.parts, mirror.storage.scratch
        for i in range(len(parts) - 1):
            if parts[i] == SCRATCH and parts[i + 1] == scratch.name:
                return scratch.joinpath(*parts[i + 2:])
    return path


class Mirror:
    """Copies experiment `name` of a scratch folder (`<name>/` and `<name>.*`) to the bucket: single files at
    once (`upload`), the rest every `MIRROR_PERIOD_S` from a thread, and everything at `close`. Files that
    vanish locally (Ray state set aside, a folder replaced) are deleted from the bucket."""

    def __init__(self, storage: RemoteStorage, name: str) -> None:
        self.storage, self.name = storage, name
        self._sent: dict[Path, tuple[int, int]] = dict(self._files())  # what a resume downloaded
        self._period = MIRROR_PERIOD_S
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._error: str | None = None
        self._thread = threading.Thread(target=self._loop, name="lcsc storage mirror", daemon=True)
        self._thread.start()
        atomic.AFTER_WRITE.append(self.upload)
        _ACTIVE.append(self)

    def covers(self, path: Path) -> bool:
        try:
            relative = path.resolve().relative_to(self.storage.scratch)
        except ValueError:
            return False
        top = relative.parts[0] if relative.parts else ""
        return (top == self.name or top.startswith(f"{self.name}.")) and not _skipped(relative)

    def upload(self, path: Path) -> None:
        """PUT one file now (after an atomic write, so it is complete); a failure is retried by the next sync."""
        if self.covers(path):
            with self._lock:
                try:
                    self._put(path.resolve())
                except OSError as error:
                    self._error = _first_line(error)

    def sync(self) -> None:
        """Upload what changed since the last sync; delete from the bucket what was removed here."""
        with self._lock:
            began = time.monotonic()
            current = dict(self._files())
            self._period = max(MIRROR_PERIOD_S, (time.monotonic() - began) / MIRROR_SHARE)
            for path, signature in current.items():
                if self._sent.get(path) != signature:
                    self._put(path)
            for gone in [path for path in self._sent if path not in current]:
                del self._sent[gone]
                try:
                    self.storage.filesystem.delete_file(self._remote(gone))
                except FileNotFoundError:
                    pass

    def close(self) -> str | None:
        """Stop the thread and send the last changes; one line saying why when the bucket could not be written
        (the caller raises it unless the job already ends with another error), else None."""
        if self.upload in atomic.AFTER_WRITE:
            atomic.AFTER_WRITE.remove(self.upload)
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        self._stop.set()
        self._thread.join()
        try:
            self.sync()
        except OSError as error:
            self._error = _first_line(error)
        if self._error is None:
            return None
        return (f"--storage {self.storage.uri}: the experiment could not be copied there ({self._error}); its "
                f"local copy is in {self.storage.scratch / self.name}; {_FIX}")

    def _loop(self) -> None:
        """Sync every `MIRROR_PERIOD_S`, or less often when the scan of a sync takes more than `MIRROR_SHARE`
        of the time (`sync` sets the period): the scan stats every file of the experiment (one per candidate and record, thousands in a long
        search) in the driver's process, whose event loop must keep its CPU."""
        while not self._stop.wait(self._period):
            try:
                self.sync()
                self._error = None
            except OSError as error:  # a network hiccup: retried at the next period, reported at close
                self._error = _first_line(error)

    def _files(self) -> Iterator[tuple[Path, tuple[int, int]]]:
        """(path, signature) of every file to mirror: one `stat` each, folders read with `os.scandir` (a
        third of the time of a `pathlib` walk, which stats each path several times)."""
        scratch = self.storage.scratch
        folders = []
        for path in [scratch / self.name, *scratch.glob(f"{self.name}.*")]:
            if path.is_dir():
                folders.append(path)
            elif path.is_file() and not path.is_symlink() and not _temporary(path.name):
                yield path, _signature(path.stat())
        while folders:
            with os.scandir(folders.pop()) as entries:
                for entry in entries:
                    path = Path(entry.path)
                    if entry.is_dir(follow_symlinks=False):
                        if entry.name not in _SKIPPED_FOLDERS:
                            folders.append(path)
                    elif entry.is_file(follow_symlinks=False) and not _temporary(entry.name):
                        try:
                            stat = entry.stat(follow_symlinks=False)
                        except FileNotFoundError:  # removed meanwhile: the next sync sees what is there
                            continue
                        yield path, _signature(stat)

    def _remote(self, path: Path) -> str:
        return f"{self.storage.root}/{path.relative_to(self.storage.scratch).as_posix()}"

    def _put(self, path: Path) -> None:
        """PUT one file. A small file is read whole first and sent only if it did not change meanwhile: Ray Tune
        copies its state files into the experiment folder in place, and a copy read while being written would
        be a torn state in the bucket, which a resume after a kill would find (the next sync sends it whole).
        Larger files are ours, and written atomically (renamed into place), so they are streamed. Signatures
        come from the open file, so a file replaced meanwhile is sent as the version read, and the next sync
        sees the new one."""
        try:
            source = open(path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:  # removed meanwhile: the next sync sees what is there
            return
        with source:
            signature = _signature(os.fstat(source.fileno()))
            head = source.read(UPLOAD_CHUNK)
            if len(head) < UPLOAD_CHUNK and _signature(os.fstat(source.fileno())) != signature:
                return
            with self.storage.filesystem.open_output_stream(self._remote(path)) as stream:
                stream.write(head)
                _copy(source, stream)
        self._sent[path] = signature


def _copy(source: BinaryIO, sink: BinaryIO) -> None:
    """Copy in `UPLOAD_CHUNK` pieces, so an export of many GiB never sits in memory whole."""
    while chunk := source.read(UPLOAD_CHUNK):
        sink.write(chunk)


def _signature(stat: os.stat_result) -> tuple[int, int]:
    """What tells a file's versions apart: its size and modification time."""
    return stat.st_size, stat.st_mtime_ns


def _temporary(name: str) -> bool:
    """Temporary files of atomic writes: ours and Ray's start with '.' and hold 'tmp'."""
    return name.startswith(".") and "tmp" in name


def _skipped(relative: Path) -> bool:
    """Temporary files and staged results (`_SKIPPED_FOLDERS`)."""
    return _temporary(relative.name) or any(part in _SKIPPED_FOLDERS for part in relative.parts)


def _first_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:300] or type(error).__name__
