"""`LcscNevergradSearch`: Ray Tune's `NevergradSearch` with the fixes LCSC needs (RAY-NOTES, Ray 2.60).

- Small trial configs at any K. Each suggested value (float64 [D]) is written once, atomically, to the
  candidate store `<experiment>/candidates/<index:06d>-<digest>.npy`, and the trial receives only
  `{"lcsc_candidate": <that file's absolute path>, "lcsc_label": "baseline:<name>" | "search",
  "lcsc_index": <suggestion number>}`. Ray keeps about six copies of every trial's config in
  `experiment_state-*.json` (config, evaluated params, experiment tag, last result...) and rewrites the
  file at each experiment checkpoint: a base64 value cost 36 KB per trial at K=400 (RAY-NOTES: ~48 KB
  with an array), a path costs the same at every K. The experiment folder is on storage every node sees
  (a multi-node requirement of Ray Tune anyway), so every trial worker can read the store.
  `<digest>` is a prefix of the SHA-256 of the value's bytes: `decode_candidate(config)` checks it, so a
  file that was damaged or replaced (e.g. re-suggested under the same index after a restore from an older
  searcher state) is an error, never a silently different α; files are never overwritten with another value.
- Warm starts. The baselines go through `points_to_evaluate` → `optimizer.suggest`, so they are the first
  trials, in order, and reach `optimizer.tell` as told-but-not-asked points; each gets its label.
- Restore. Trials the optimizer has never seen (a restarted trial with a new id, or a searcher state older
  than the trial) are rebuilt from the config in their result and told anyway; completions pop with a
  default; candidates in flight at the time of the saved state move to `_orphans`, which are told when
  they finish but do not count against the concurrency limit (so a trial Ray never resumes cannot hang
  the search, the ConcurrencyLimiter hazard in RAY-NOTES).
- Concurrency is enforced from the searcher's own live map (`max_concurrent`), not a ConcurrencyLimiter.
- A trial that errors is never told (Ray's contract): the trainable must report a penalised score instead.
"""

from __future__ import annotations

import glob
import hashlib
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from ray.tune.search.nevergrad import NevergradSearch

from lcsc_ray.atomic import atomic_write
from lcsc_ray.errors import LcscError

CANDIDATE_KEY = "lcsc_candidate"
LABEL_KEY = "lcsc_label"
INDEX_KEY = "lcsc_index"
SEARCH_LABEL = "search"
BASELINE_PREFIX = "baseline:"
CANDIDATES_DIR = "candidates"  # the candidate store, inside the experiment folder
DIGEST_CHARS = 16  # 64 bits of SHA-256: enough to tell values apart, short enough for six copies per trial


def _digest(value: np.ndarray) -> str:
    return hashlib.sha256(value.tobytes()).hexdigest()[:DIGEST_CHARS]


def save_candidate(candidates_dir: str | os.PathLike, index: int, label: str, value: np.ndarray) -> dict:
    """Write `value` (float64 [D]) to the candidate store and return the trial config that names it.

    The file name carries the suggestion index and the value's digest, so two different values never
    share a file and `decode_candidate` can verify what it reads.
    """
    value = np.ascontiguousarray(value, dtype="<f8")
    if value.ndim != 1:
        raise LcscError(f"a candidate value must be a vector, got shape {value.shape}")
    path = Path(candidates_dir).resolve() / f"{index:06d}-{_digest(value)}.npy"
    atomic_write(path, lambda tmp: np.save(tmp, value, allow_pickle=False))
    return {CANDIDATE_KEY: str(path), LABEL_KEY: label, INDEX_KEY: int(index)}


def decode_candidate(config: dict) -> tuple[np.ndarray, str]:
    """The trial's parametrization value (float64 [D]) and label from its Ray Tune `config`.

    The value is read from the candidate store file the config names and checked against the digest in
    its name. α itself is `space.to_coefficients(value)` with the space the search was started with.
    """
    try:
        path = Path(config[CANDIDATE_KEY])
        label = str(config[LABEL_KEY])
    except (KeyError, TypeError):
        raise LcscError(
            f"trial config lacks {CANDIDATE_KEY!r}/{LABEL_KEY!r}: the trial was not created by "
            f"LcscNevergradSearch (keys: {sorted(config)})"
        ) from None
    damaged = "the experiment folder is damaged: restore it from a copy or run the search again under another --name"
    try:
        value = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise LcscError(
            f"candidate file {path} is missing: the experiment's {CANDIDATES_DIR}/ folder was moved or deleted "
            "(put it back at that path), or this node does not see it (put --storage on storage every node mounts)"
        ) from None
    except (OSError, ValueError, EOFError) as error:
        raise LcscError(f"candidate file {path} is unreadable ({error}); {damaged}") from None
    expected = path.stem.rpartition("-")[2]
    if (not isinstance(value, np.ndarray) or value.dtype != np.dtype("<f8") or value.ndim != 1
            or _digest(value) != expected):
        raise LcscError(f"candidate file {path} does not hold the float64 vector with digest {expected} its trial "
                        f"was given; {damaged}")
    return value, label


class LcscNevergradSearch(NevergradSearch):
    """NevergradSearch over `ng.p.Dict(alpha=Array)` with labelled warm starts, small configs and safe restore."""

    def __init__(
        self,
        optimizer,
        *,
        experiment_dir: str | os.PathLike,
        warm_start: Sequence[tuple[str, np.ndarray]] = (),
        metric: str = "score",
        mode: str = "min",
        max_concurrent: int = 1,
    ) -> None:
        """`optimizer`: a built Nevergrad optimizer (`build_optimizer`); `experiment_dir`: the Tune experiment
        folder, which holds the candidate store; `warm_start`: (name, value) pairs in the order they should
        run (values in the space's parametrization, `space.to_value(α)`)."""
        if max_concurrent < 1:
            raise LcscError(f"--max-concurrent must be at least 1, got {max_concurrent}")
        self._warm_labels = [f"{BASELINE_PREFIX}{name}" for name, _ in warm_start]
        self._max_concurrent = int(max_concurrent)
        # Absolute, and pickled with the searcher: a restored search keeps writing to the same store.
        self._candidates_dir = str(Path(experiment_dir).expanduser().resolve() / CANDIDATES_DIR)
        self._num_suggested = 0
        self._orphans: dict = {}
        # (index, label, loss) of every tell, in tell order: small, and lets callers check what was told.
        self.told: list[tuple[int, str, float]] = []
        super().__init__(
            optimizer=optimizer,
            metric=metric,
            mode=mode,
            points_to_evaluate=[{"alpha": np.asarray(value, dtype=np.float64)} for _, value in warm_start],
        )

    @property
    def optimizer(self):
        """The Nevergrad optimizer (its `num_tell`, `num_tell_not_asked`, `archive`...)."""
        return self._nevergrad_opt

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        self._max_concurrent = int(max_concurrent)
        return True

    def suggest(self, trial_id: str) -> dict | None:
        if len(self._live_trial_mapping) >= self._max_concurrent:
            return None
        candidate = self._nevergrad_opt.ask()  # suggestions (the warm starts) are popped first, in order
        index = self._num_suggested
        label = self._warm_labels[index] if index < len(self._warm_labels) else SEARCH_LABEL
        self._num_suggested += 1
        self._live_trial_mapping[trial_id] = (index, label, candidate)
        return save_candidate(self._candidates_dir, index, label, candidate.value["alpha"])

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        entry = self._live_trial_mapping.pop(trial_id, None) or self._orphans.pop(trial_id, None)
        if error or not result or self._metric not in result:
            return  # Ray's contract: errored trials are not told (the trainable reports penalties instead)
        if entry is None:
            # Tune hands the searcher a flattened result ("config/lcsc_label") when it stops a trial itself.
            config = result.get("config") or {k[7:]: v for k, v in result.items() if k.startswith("config/")}
            value, label = decode_candidate(config)
            candidate = self._nevergrad_opt.parametrization.spawn_child(new_value={"alpha": value})
            entry = (int(config.get(INDEX_KEY, -1)), label, candidate)
        index, label, candidate = entry
        loss = self._metric_op * float(result[self._metric])
        self._nevergrad_opt.tell(candidate, loss if not math.isnan(loss) else math.inf)
        self.told.append((index, label, loss))

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        self._orphans.update(self._live_trial_mapping)
        self._live_trial_mapping = {}


def load_searcher(experiment_path: str | os.PathLike) -> LcscNevergradSearch:
    """The searcher as last saved in an experiment folder (Ray writes `searcher-state-*.pkl` there).

    The file is the experiment's own pickle, the same one `Tuner.restore` loads; never point this at a
    folder from an untrusted source.
    """
    if not glob.glob(os.path.join(os.fspath(experiment_path), NevergradSearch.CKPT_FILE_TMPL.format("*"))):
        raise LcscError(f"no searcher state in {experiment_path}; is it a search experiment folder?")
    searcher = LcscNevergradSearch.__new__(LcscNevergradSearch)
    searcher.restore_from_dir(os.fspath(experiment_path))
    return searcher
