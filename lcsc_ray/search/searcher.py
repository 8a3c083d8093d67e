"""`LcscNevergradSearch`: Ray Tune's `NevergradSearch` with the fixes LCSC needs (RAY-NOTES, Ray 2.60).

- Compact trial configs. The trial receives `{"lcsc_value": <base64 of the float64 value bytes>,
  "lcsc_label": "baseline:<name>" | "search", "lcsc_index": <suggestion number>}` instead of a numpy array:
  Ray rewrites every trial's config into the experiment state at each checkpoint. base64 is exact and
  4.3 KB at K=400, but Ray keeps about six copies per trial (config, unresolved config, evaluated params,
  experiment tag, last result), measured 36 KB per trial in `experiment_state-*.json` (RAY-NOTES: ~48 KB
  with an array). For large K prefer `grouped:G`. `decode_candidate(config)` reverses the encoding.
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

import base64
import glob
import math
import os
from typing import Sequence

import numpy as np
from ray.tune.search.nevergrad import NevergradSearch

from lcsc_ray.errors import LcscError

VALUE_KEY = "lcsc_value"
LABEL_KEY = "lcsc_label"
INDEX_KEY = "lcsc_index"
SEARCH_LABEL = "search"
BASELINE_PREFIX = "baseline:"


def encode_value(value: np.ndarray) -> str:
    """Exact, compact text form of a float64 vector (base64 of its little-endian bytes)."""
    return base64.b64encode(np.ascontiguousarray(value, dtype="<f8").tobytes()).decode("ascii")


def decode_candidate(config: dict) -> tuple[np.ndarray, str]:
    """The trial's parametrization value (float64 [D]) and label from its Ray Tune `config`.

    α itself is `space.to_coefficients(value)` with the space the search was started with.
    """
    try:
        raw = base64.b64decode(config[VALUE_KEY], validate=True)
        label = str(config[LABEL_KEY])
    except (KeyError, TypeError, ValueError):
        raise LcscError(
            f"trial config lacks a valid {VALUE_KEY!r}/{LABEL_KEY!r}: the trial was not created by "
            f"LcscNevergradSearch (keys: {sorted(config)})"
        ) from None
    return np.frombuffer(raw, dtype="<f8").astype(np.float64), label


class LcscNevergradSearch(NevergradSearch):
    """NevergradSearch over `ng.p.Dict(alpha=Array)` with labelled warm starts, compact configs and safe restore."""

    def __init__(
        self,
        optimizer,
        *,
        warm_start: Sequence[tuple[str, np.ndarray]] = (),
        metric: str = "score",
        mode: str = "min",
        max_concurrent: int = 1,
    ) -> None:
        """`optimizer`: a built Nevergrad optimizer (`build_optimizer`); `warm_start`: (name, value) pairs in
        the order they should run (values in the space's parametrization, `space.to_value(α)`)."""
        if max_concurrent < 1:
            raise LcscError(f"--max-concurrent must be at least 1, got {max_concurrent}")
        self._warm_labels = [f"{BASELINE_PREFIX}{name}" for name, _ in warm_start]
        self._max_concurrent = int(max_concurrent)
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
        return {VALUE_KEY: encode_value(candidate.value["alpha"]), LABEL_KEY: label, INDEX_KEY: index}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        entry = self._live_trial_mapping.pop(trial_id, None) or self._orphans.pop(trial_id, None)
        if error or not result or self._metric not in result:
            return  # Ray's contract: errored trials are not told (the trainable reports penalties instead)
        if entry is None:
            config = result.get("config") or {}
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
