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

from lcsc_ray.search.candidates import CANDIDATE_KEY, INDEX_KEY, decode_candidate
from search_spaces import build_space

K = 6
SPACE = "affine"
TARGET = np.array([2.0, -1.0, 0.5, 0.0, -0.5, 0.0])  # Σ = 1, reachable in the affine space
BASELINES = {"newest": np.eye(K)[-1], "uniform": np.full(K, 1.0 / K)}
GATE_INDEX = 4  # gated_trainable: trials 0..3 run at once, later ones wait for the RELEASE file
RELEASE = "release"
HOLD_INDEX = 8  # gated_trainable: trials from 8 on also wait while a HOLD file exists
HOLD = "hold"
GATE_TIMEOUT_S = 120.0


def objective(alpha: np.ndarray) -> float:
    return float(np.sum((alpha - TARGET) ** 2))


def synthetic_trainable(config: dict) -> None:
    value, label = decode_candidate(config)
    alpha = build_space(SPACE, K).to_coefficients(value)
    tune.report({"score": objective(alpha), "label": label, "failed": False})


def experiment_dir(config: dict) -> Path:
    """The experiment folder of the trial with `config` (the candidate store lies in it)."""
    return Path(config[CANDIDATE_KEY]).parent.parent


def gated_trainable(config: dict) -> None:
    """The same objective, but trials from index `GATE_INDEX` on wait until the experiment folder holds a
    `RELEASE` file, and those from `HOLD_INDEX` on also while it holds a `HOLD` file: a test can kill the
    driver at known points of the search, then release the rest."""
    folder, deadline = experiment_dir(config), time.monotonic() + GATE_TIMEOUT_S
    while ((config[INDEX_KEY] >= GATE_INDEX and not (folder / RELEASE).exists())
           or (config[INDEX_KEY] >= HOLD_INDEX and (folder / HOLD).exists())):
        if time.monotonic() > deadline:
            raise TimeoutError(f"trial {config[INDEX_KEY]} was not released within {GATE_TIMEOUT_S} s")
        time.sleep(0.05)
    synthetic_trainable(config)


def crash_once_trainable(config: dict) -> None:
    """Kills its worker process the first time it sees trial 3 (a marker file next to the candidate store
    remembers it), as a node or worker dying under a trial does; every other call is `synthetic_trainable`."""
    marker = experiment_dir(config) / "crashed-once"
    if config[INDEX_KEY] == 3 and not marker.exists():
        marker.touch()
        os._exit(1)
    synthetic_trainable(config)


def main(storage: str, name: str, num_trials: int, resume: bool = False) -> None:
    """Run (or resume) a search in its own process (with its own local Ray), for the SIGKILL/resume tests."""
    import ray

    from lcsc_ray.search.tuner import run_search

    ray.init(num_cpus=1, include_dashboard=False)
    run_search(
        gated_trainable, build_space(SPACE, K), optimizer="lcsc-es", num_trials=num_trials, seed=0,  # as resumed
        warm_start=BASELINES, storage=storage, name=name, resources={"cpu": 1}, progress=False, resume=resume,
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), resume=sys.argv[4:] == ["resume"])
