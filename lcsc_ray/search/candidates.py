"""The candidate store: every suggested coefficient value, and the score of every finished evaluation, on disk.

`<experiment>/candidates/<index:06d>-<digest>.npy` holds the value (float64 [D]) of suggestion number
`index`; `<digest>` is a prefix of the SHA-256 of its bytes, so a file that was damaged or replaced is an
error, never a silently different α, and two values never share a file. A trial config carries only that
path, its label and its index (a trial of several candidates, `batch_config`, carries one such entry per
candidate): Ray copies every config several times into the experiment state it rewrites
at each checkpoint, and a path costs the same at any K.

Next to a value, `<index:06d>-<digest>.result.json` is written (atomically) by the trial as soon as an
evaluation round finished, before Ray hears of it: `{"rounds": [...]}`, one entry per round of samples
(a single round unless the search runs multi-fidelity trials). The experiment state Ray saves lags behind by up to one
checkpoint period, so after a driver is killed these records are the only complete account of what was
evaluated: a resumed search replays them instead of evaluating the same candidate again.

With `--storage` on object storage (lcsc_ray/remote_storage.py) the store is the driver's scratch copy,
which trial workers on other nodes cannot see: a config then also carries the value itself (`VALUE_KEY`,
checked against the digest in the file name) and the URI of its record in the bucket (`RECORD_KEY`), where
the trial writes and reads the record directly.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from lcsc_ray.atomic import atomic_write, atomic_write_json
from lcsc_ray.errors import LcscError
from lcsc_ray.remote_storage import bucket_uri, child_uri, read_object, rebased, write_object
from lcsc_ray.storage import storage_error

CANDIDATE_KEY = "lcsc_candidate"
LABEL_KEY = "lcsc_label"
INDEX_KEY = "lcsc_index"
SEARCH_LABEL = "search"
BASELINE_PREFIX = "baseline:"
VALUE_KEY = "lcsc_value"  # remote storage only: the value as a list of floats
RECORD_KEY = "lcsc_record"  # remote storage only: the URI of the candidate's record in the bucket
BATCH_KEY = "lcsc_batch"  # a trial of several candidates: their configs, in suggestion order
CANDIDATES_DIR = "candidates"  # inside the experiment folder
RECORD_SUFFIX = ".result.json"
DIGEST_CHARS = 16  # 64 bits of SHA-256: enough to tell values apart, short enough for many copies per trial
_DAMAGED = "the experiment folder is damaged: restore it from a copy or run the search again under another --name"


def digest(value: np.ndarray) -> str:
    """The store's name for a float64 value: a prefix of the SHA-256 of its bytes."""
    return hashlib.sha256(np.ascontiguousarray(value, dtype="<f8").tobytes()).hexdigest()[:DIGEST_CHARS]


def save_candidate(candidates_dir: str | os.PathLike, index: int, label: str, value: np.ndarray) -> dict:
    """Write `value` (float64 [D]) to the store and return the trial config that names it (with the value and
    its record's URI when the store is mirrored to a bucket: module docstring)."""
    value = np.ascontiguousarray(value, dtype="<f8")
    if value.ndim != 1:
        raise LcscError(f"a candidate value must be a vector, got shape {value.shape}")
    path = rebased(Path(candidates_dir).resolve() / f"{index:06d}-{digest(value)}.npy")
    if not path.is_file():
        try:
            atomic_write(path, lambda tmp: np.save(tmp, value, allow_pickle=False))
        except OSError as error:
            problem = storage_error(path, error)
            if problem is None:
                raise
            raise problem from None
    config = {CANDIDATE_KEY: str(path), LABEL_KEY: label, INDEX_KEY: int(index)}
    remote_dir = bucket_uri(path.parent)
    if remote_dir is not None:
        config.update({VALUE_KEY: value.tolist(), RECORD_KEY: child_uri(remote_dir, path.stem + RECORD_SUFFIX)})
    return config


def _load_value(path: Path) -> np.ndarray:
    """The value stored at `path`, checked against the digest in its name."""
    try:
        value = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise LcscError(
            f"candidate file {path} is missing: the experiment's {CANDIDATES_DIR}/ folder was moved or deleted "
            "(put it back at that path), or this node does not see it (put --storage on storage every node mounts)"
        ) from None
    except (OSError, ValueError, EOFError) as error:
        raise LcscError(f"candidate file {path} is unreadable ({error}); {_DAMAGED}") from None
    expected = path.stem.rpartition("-")[2]
    if (not isinstance(value, np.ndarray) or value.dtype != np.dtype("<f8") or value.ndim != 1
            or digest(value) != expected):
        raise LcscError(f"candidate file {path} does not hold the float64 vector with digest {expected} its trial "
                        f"was given; {_DAMAGED}")
    return value


def decode_candidate(config: dict) -> tuple[np.ndarray, str]:
    """The trial's parametrization value (float64 [D]) and label from its Ray Tune `config`."""
    try:
        path = Path(config[CANDIDATE_KEY])
        label = str(config[LABEL_KEY])
    except (KeyError, TypeError):
        raise LcscError(
            f"trial config lacks {CANDIDATE_KEY!r}/{LABEL_KEY!r}: the trial was not created by "
            f"LcscNevergradSearch (keys: {sorted(config)})"
        ) from None
    if VALUE_KEY in config:
        value = np.asarray(config[VALUE_KEY], dtype="<f8")
        if value.ndim != 1 or digest(value) != path.stem.rpartition("-")[2]:
            raise LcscError(f"the value in the trial config of {path.name} does not match its digest; {_DAMAGED}")
        return value, label
    return _load_value(path), label


def batch_config(configs: list[dict]) -> dict:
    """The config of a trial that evaluates several candidates (`--candidates-per-trial`): the first one's keys
    (its index and label name the trial in the dashboard and the progress plot) and all of them under
    `BATCH_KEY`."""
    return {**configs[0], BATCH_KEY: list(configs)} if len(configs) > 1 else configs[0]


def candidate_index(config: dict) -> int:
    """The suggestion index in a candidate's config (-1 for a config from outside the searcher)."""
    return int(config.get(INDEX_KEY, -1))


def candidate_configs(config: dict) -> list[dict]:
    """The candidates' own configs of a trial config, one for a single-candidate trial."""
    return list(config[BATCH_KEY]) if BATCH_KEY in config else [config]


def _record_path(candidate_path: str | os.PathLike) -> Path:
    path = Path(candidate_path)
    return path.with_name(path.stem + RECORD_SUFFIX)


def save_record(config: dict, rounds: list[dict[str, Any]]) -> None:
    """Record the rounds evaluated so far of the trial's candidate (each a score or a penalty) next to its
    value; rewritten after every round, so a killed driver loses at most the round in progress. A full or
    read-only storage raises LcscError (the trial stops the search with it)."""
    if RECORD_KEY in config:
        try:
            write_object(config[RECORD_KEY], json.dumps({"rounds": rounds}, indent=2).encode() + b"\n")
        except OSError as error:
            raise LcscError(f"the record {config[RECORD_KEY]} could not be written ({' '.join(str(error).split())}); "
                            "check the bucket and this node's credentials, then continue with --resume") from None
        return
    path = _record_path(config[CANDIDATE_KEY])
    try:
        atomic_write_json(path, {"rounds": rounds})
    except OSError as error:
        problem = storage_error(path, error)
        if problem is None:
            raise
        raise problem from None


def load_record(config: dict) -> list[dict[str, Any]]:
    """The recorded rounds of the trial's candidate, in order; empty when none finished."""
    path = _record_path(config[CANDIDATE_KEY])
    try:
        if RECORD_KEY in config:
            data = read_object(config[RECORD_KEY])
            return [] if data is None else list(json.loads(data)["rounds"])
        return list(json.loads(path.read_text(encoding="utf-8"))["rounds"])
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError):
        return []  # a record is written atomically; an unreadable one is treated as never written


def recorded_values(candidates_dir: str | os.PathLike) -> dict[int, np.ndarray]:
    """Suggestion index -> value of every candidate whose evaluation was recorded (e.g. by a driver that was
    then killed before Ray saved its state)."""
    values = {}
    for record in sorted(rebased(Path(candidates_dir)).glob(f"*{RECORD_SUFFIX}")):
        index = int(record.name.split("-", 1)[0])
        values.setdefault(index, _load_value(record.with_name(record.name.removesuffix(RECORD_SUFFIX) + ".npy")))
    return values
