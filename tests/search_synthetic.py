"""A cheap synthetic objective for the search tests, importable by Ray workers (not defined in a test).

score = ‖α − α*‖² for a fixed α* (K = 6, affine space): smooth, with a known optimum away from every
baseline, so a working search measurably improves on its warm starts.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
from ray import tune

from lcsc_ray.search.searcher import CANDIDATE_KEY, INDEX_KEY, decode_candidate
from search_spaces import build_space

K = 6
SPACE = "affine"
TARGET = np.array([2.0, -1.0, 0.5, 0.0, -0.5, 0.0])  # Σ = 1, reachable in the affine space
BASELINES = {"newest": np.eye(K)[-1], "uniform": np.full(K, 1.0 / K)}


def objective(alpha: np.ndarray) -> float:
    return float(np.sum((alpha - TARGET) ** 2))


def synthetic_trainable(config: dict) -> None:
    value, label = decode_candidate(config)
    alpha = build_space(SPACE, K).to_coefficients(value)
    tune.report({"score": objective(alpha), "label": label, "failed": False})


def slow_trainable(config: dict) -> None:
    """The same objective, slow enough that a driver can be killed mid-search."""
    time.sleep(0.4)
    synthetic_trainable(config)


def crash_once_trainable(config: dict) -> None:
    """Kills its worker process the first time it sees trial 3 (a marker file next to the candidate store
    remembers it), as a node or worker dying under a trial does; every other call is `synthetic_trainable`."""
    marker = Path(config[CANDIDATE_KEY]).parent.parent / "crashed-once"
    if config[INDEX_KEY] == 3 and not marker.exists():
        marker.touch()
        os._exit(1)
    synthetic_trainable(config)


def main(storage: str, name: str, num_trials: int) -> None:
    """Run a search in its own process (with its own local Ray), for the SIGKILL/resume test."""
    import ray

    from lcsc_ray.search.tuner import run_search

    ray.init(num_cpus=1, include_dashboard=False)
    run_search(
        slow_trainable, build_space(SPACE, K), optimizer="lcsc-es", num_trials=num_trials, seed=3,
        warm_start=BASELINES, storage=storage, name=name, resources={"cpu": 1}, progress=False,
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
