"""`cluster.start_ray` starting a local cluster: trial actors run without a runtime environment (so Ray can hand
them its idle workers), in workers that inherited the driver's environment and priority and imported the
trial's modules as they started."""

from __future__ import annotations

import os
import sys

import pytest
import ray
from ray import cloudpickle
from ray import tune

from lcsc_ray.cluster import TRIAL_MODULES, preload_fits, start_ray
from lcsc_ray.search import ray_compat
from lcsc_ray.search.tuner import run_search
from search_spaces.spaces import build_space


class _WorkerFacts(tune.Trainable):
    """Reports what its worker process has: runtime environment, environment variables, modules, folder."""

    def step(self) -> dict:
        return {"score": 0.0, "runtime_env": dict(ray.get_runtime_context().runtime_env),
                "chdir": os.environ.get("RAY_CHDIR_TO_TRIAL_DIR"), "cwd": os.getcwd(),
                "cache": os.environ.get("LCSC_RAY_CACHE"),
                "preloaded": [name for name in TRIAL_MODULES if name in sys.modules], "nice": os.nice(0),
                "done": True}


@pytest.fixture
def started_ray():
    if ray.is_initialized():
        ray.shutdown()
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    start_ray(None, dashboard=False, quiet=True)
    yield
    ray.shutdown()
    ray_compat.tune_actors_use_idle_workers(None)


def test_trial_actors_of_a_local_cluster_inherit_the_environment_and_the_imports(started_ray, tmp_path):
    table = run_search(_WorkerFacts, build_space("affine", 3), optimizer="CMA", num_trials=2, seed=0,
                       storage=tmp_path, name="facts", progress=False)
    assert len(table.rows) == 2
    for row in table.rows:
        facts = row.metrics
        assert not facts["runtime_env"], facts["runtime_env"]  # the default one: idle workers qualify
        assert facts["chdir"] == "0" and facts["cwd"] == os.getcwd()  # not moved into the trial folder
        assert facts["cache"] == os.environ["LCSC_RAY_CACHE"]  # the driver's environment, inherited
        assert facts["preloaded"] == list(TRIAL_MODULES)
        assert facts["nice"] == os.nice(0)  # the driver's priority, not Ray's default niceness 15 for workers


def test_preloading_is_kept_to_machines_where_a_worker_per_cpu_fits_in_a_tenth_of_the_memory():
    """Ray starts one idle worker per CPU; with torch and the trial's modules imported each holds ~375 MiB."""
    assert preload_fits(2, 24 << 30)  # this machine kind: 0.84 GiB of 24
    assert not preload_fits(8, 16 << 30)  # a laptop: 3.4 GiB would be a fifth of its memory
    assert not preload_fits(128, 256 << 30)  # a large node: 54 GiB of 256
    assert not preload_fits(2, None)  # memory unknown: no preloading
