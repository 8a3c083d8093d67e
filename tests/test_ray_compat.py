"""One test per private Ray behaviour `lcsc_ray/search/ray_compat.py` relies on, against the installed Ray, so an
upgrade that changes one of them fails here by name."""

from __future__ import annotations

import os
import sys
import time

from pathlib import Path

import numpy as np
import pytest
import ray
from ray import cloudpickle
from ray import tune
from ray.tune.execution.tune_controller import TuneController
from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler
from ray.tune.utils import flatten_dict

from lcsc_ray.search import ray_compat
from lcsc_ray.search.candidates import CANDIDATE_KEY, INDEX_KEY, LABEL_KEY, decode_candidate
from lcsc_ray.search.optimizers import build_optimizer
from lcsc_ray.search.searcher import LcscNevergradSearch
from lcsc_ray.search.tuner import KeepingFIFOScheduler, run_search
from search_spaces.spaces import build_space


@pytest.fixture(scope="module")
def local_ray():
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


class _Steps(tune.Trainable):
    """Reports a result without the metric first (as an input error does), then the metric, then stops."""

    def step(self) -> dict:
        if self.iteration == 0:
            return {"note": "no metric in this result"}
        return {"score": float(self.config["x"]), "done": True}


class _StopOnFirstResult(tune.Callback):
    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        ray_compat.interrupt_tune_run()


def test_version_check_names_the_tested_version(capsys, monkeypatch):
    assert ray_compat.check_ray_version() is (ray.__version__ == ray_compat.RAY_VERSION)
    monkeypatch.setattr(ray, "__version__", "9.9.9")
    assert ray_compat.check_ray_version() is False
    err = capsys.readouterr().err
    assert f"tested with Ray {ray_compat.RAY_VERSION}, this is Ray 9.9.9" in err and len(err.strip().splitlines()) == 1


def test_config_of_result_reads_nested_and_flattened_results():
    config = {CANDIDATE_KEY: "/x/000003-ab.npy", LABEL_KEY: "search", INDEX_KEY: 3}
    result = {"score": 1.0, "config": config}
    assert ray_compat.config_of_result(result) == config
    assert ray_compat.config_of_result(flatten_dict(result, delimiter="/")) == config


def test_run_config_of_a_fresh_and_a_restored_tuner(local_ray, tmp_path):
    tuner = tune.Tuner(_Steps, param_space={"x": tune.grid_search([1.0])},
                       tune_config=tune.TuneConfig(metric="score", mode="min"),
                       run_config=tune.RunConfig(name="compat", storage_path=str(tmp_path), verbose=0))
    assert ray_compat.run_config_of(tuner).name == "compat"
    ray_compat.allow_results_without_metric()  # the first result has no "score": Tune would raise without this
    grid = tuner.fit()
    assert [result.metrics["score"] for result in grid] == [1.0]
    restored = tune.Tuner.restore(str(tmp_path / "compat"), _Steps)
    assert ray_compat.run_config_of(restored).name == "compat"


def test_saved_trials_reads_the_trials_of_tunes_newest_experiment_state(local_ray, tmp_path):
    ray_compat.allow_results_without_metric()
    tuner = tune.Tuner(_Steps, param_space={"x": tune.grid_search([1.0, 2.0, 3.0])},
                       tune_config=tune.TuneConfig(metric="score", mode="min"),
                       run_config=tune.RunConfig(name="saved", storage_path=str(tmp_path), verbose=0,
                                                 checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False)))
    tuner.fit()
    experiment = tmp_path / "saved"
    assert ray_compat.EXPERIMENT_STATE_GLOB == TuneController.CKPT_FILE_TMPL.format("*")
    trials = ray_compat.saved_trials(experiment)
    assert sorted(trial.config["x"] for trial in trials) == [1.0, 2.0, 3.0]
    assert {trial.status for trial in trials} == {Trial.TERMINATED}
    assert all(trial.last_result["score"] == trial.config["x"] for trial in trials)
    assert len({trial.trial_id for trial in trials}) == 3
    newest = max(experiment.glob("experiment_state-*.json"))  # Tune restores from the newest by name
    newest.rename(experiment / "experiment_state-0000-00-00_00-00-00.json")  # now the oldest
    (experiment / "experiment_state-9999-99-99_99-99-99.json").write_text("{truncated")
    assert ray_compat.saved_trials(experiment) is None  # unreadable: the caller keeps its own state
    assert ray_compat.saved_trials(tmp_path) is None  # no experiment state at all


def test_quiet_tune_console_leaves_tunes_lines_out(local_ray, tmp_path, capfd, monkeypatch):
    ray_compat.allow_results_without_metric()

    def run(name: str) -> str:
        tune.Tuner(_Steps, param_space={"x": tune.grid_search([1.0])},
                   tune_config=tune.TuneConfig(metric="score", mode="min"),
                   run_config=tune.RunConfig(name=name, storage_path=str(tmp_path), verbose=0)).fit()
        return capfd.readouterr().out

    monkeypatch.delenv("RAY_AIR_NEW_OUTPUT", raising=False)
    assert "Configuration for experiment" in run("loud")  # what this test exists to notice going away
    ray_compat.quiet_tune_console()
    assert run("quiet").strip() == ""


def test_interrupt_tune_run_ends_the_loop_with_the_trials_unfinished(local_ray, tmp_path):
    ray_compat.allow_results_without_metric()
    seen = []

    class Count(tune.Callback):
        def on_experiment_end(self, trials, **info) -> None:
            # Tune marks the trials it stops at the end TERMINATED too; only a final score tells they finished.
            seen.extend(trial.status == Trial.TERMINATED and "score" in trial.last_result for trial in trials)

    tuner = tune.Tuner(_Steps, param_space={"x": tune.grid_search(list(np.arange(4.0)))},
                       tune_config=tune.TuneConfig(metric="score", mode="min"),
                       run_config=tune.RunConfig(name="stop", storage_path=str(tmp_path), verbose=0,
                                                 callbacks=[_StopOnFirstResult(), Count()]))
    tuner.fit()  # returns normally: only the trial states tell that the run was stopped
    assert seen and sum(seen) < 4
    assert tune.Tuner.can_restore(str(tmp_path / "stop"))


def _pid_trainable(config: dict) -> None:
    """A worker's first trial waits (up to a minute) until a trial has started in a second worker process, then
    it reports its pid: with concurrency working this passes at once; without it the lone actor waits once."""
    experiment = Path(config[CANDIDATE_KEY]).parent.parent
    marker = experiment / f"running-{os.getpid()}"
    if not marker.exists():
        marker.touch()
        deadline = time.monotonic() + 60
        while len(list(experiment.glob("running-*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    tune.report({"score": float(np.sum(decode_candidate(config)[0] ** 2)), "worker_pid": os.getpid()})


def test_allow_pending_trials_lets_max_concurrent_trials_run_in_as_many_actors(local_ray, tmp_path):
    space = build_space("affine", 3)
    table = run_search(_pid_trainable, space, optimizer="CMA", num_trials=12, seed=0, storage=tmp_path, name="two",
                       max_concurrent=2, resources={"cpu": 1}, progress=False)
    assert len(table.rows) == 12 and len({row.metrics["worker_pid"] for row in table.rows}) == 2
    assert os.environ["TUNE_MAX_PENDING_TRIALS_PG"] == "2"


class _PidTrial(tune.Trainable):
    """Reports its worker's pid; resettable, so Tune may reuse its actor for the next trial."""

    def step(self) -> dict:
        return {"score": float(np.sum(decode_candidate(self.config)[0] ** 2)), "worker_pid": os.getpid(), "done": True}

    def reset_config(self, new_config: dict) -> bool:
        self.config = new_config
        return True


def test_keep_trial_actors_reuses_one_actor_per_concurrent_trial(local_ray, tmp_path):
    space = build_space("affine", 3)
    table = run_search(_PidTrial, space, optimizer="CMA", num_trials=24, seed=0, storage=tmp_path, name="reuse",
                       max_concurrent=4, resources={"cpu": 0.1}, progress=False)
    assert len(table.rows) == 24 and len(table.told) == 24
    assert len({row.metrics["worker_pid"] for row in table.rows}) <= 4  # Tune alone kept one: about 20 workers


def test_in_ray_job_reads_the_variable_the_job_supervisor_sets(monkeypatch):
    from ray.dashboard.modules.job import job_supervisor

    assert job_supervisor.RAY_JOB_CONFIG_JSON_ENV_VAR == "RAY_JOB_CONFIG_JSON_ENV_VAR"
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert not ray_compat.in_ray_job()
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    assert ray_compat.in_ray_job()


def _score_trainable(config: dict) -> None:
    tune.report({"score": float(np.sum(decode_candidate(config)[0] ** 2))})


def test_json_trial_logs_only_keeps_result_json_and_drops_csv_and_tensorboard(local_ray, tmp_path):
    space = build_space("affine", 3)
    run_search(_score_trainable, space, optimizer="CMA", num_trials=2, seed=0, storage=tmp_path, name="logs",
               progress=False)
    trial_dirs = list((tmp_path / "logs").glob("trial_*"))
    assert len(trial_dirs) == 2 and os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] == "1"
    for trial_dir in trial_dirs:
        names = {path.name for path in trial_dir.iterdir()}
        assert {"params.json", "result.json"} <= names, names
        assert "progress.csv" not in names and not any(name.startswith("events.out") for name in names), names


class _Plain(tune.Trainable):
    def step(self) -> dict:
        return {"done": True}


@pytest.fixture
def tune_actor_env_restored():
    yield
    ray_compat.tune_actors_use_idle_workers(None)


def test_tune_actors_use_idle_workers_leaves_the_runtime_env_out_only_when_the_cluster_has_it(tune_actor_env_restored):
    from ray.tune.execution.class_cache import _ActorClassCache

    wanted = ray_compat.tune_actor_env_vars()
    assert wanted["PL_DISABLE_FORK"] == "1"  # Tune's default, set on every trial actor through a runtime env
    ray_compat.tune_actors_use_idle_workers(None)  # an existing cluster: Tune's behaviour
    assert _ActorClassCache().get(_Plain)._default_options["runtime_env"] == {"env_vars": wanted}
    ray_compat.tune_actors_use_idle_workers({**wanted, "OTHER": "x"})  # a local cluster that has them all
    assert not _ActorClassCache().get(_Plain)._default_options.get("runtime_env")
    ray_compat.tune_actors_use_idle_workers({**wanted, "PL_DISABLE_FORK": "0"})  # one differs: Tune sets it
    assert _ActorClassCache().get(_Plain)._default_options["runtime_env"] == {"env_vars": wanted}


class _ComparingFIFO(KeepingFIFOScheduler):
    """The product's FIFO scheduler, recording at each of Tune's requests its choice, Tune's own FIFO choice
    over every trial of the experiment, and how many trials were pending."""

    def __init__(self) -> None:
        super().__init__()
        self.choices: list[tuple[object, object, int]] = []

    def choose_trial_to_run(self, tune_controller):
        ours = super().choose_trial_to_run(tune_controller)
        tunes = FIFOScheduler.choose_trial_to_run(self, tune_controller)
        pending = sum(trial.status == Trial.PENDING for trial in tune_controller.get_trials())
        self.choices.append((ours, tunes, pending))
        return ours


class _XTrial(tune.Trainable):
    """Reports its config's x; resettable, so Tune may reuse its actor for the next trial."""

    def step(self) -> dict:
        return {"score": float(self.config["x"]), "done": True}

    def reset_config(self, new_config: dict) -> bool:
        self.config = new_config
        return True


def test_choose_trial_to_run_takes_the_trial_tunes_fifo_choice_takes(local_ray, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNE_MAX_PENDING_TRIALS_PG", "8")  # several pending trials to choose from
    scheduler = _ComparingFIFO()
    tuner = tune.Tuner(_XTrial, param_space={"x": tune.grid_search(list(range(16)))},
                       tune_config=tune.TuneConfig(metric="score", mode="min", scheduler=scheduler,
                                                   max_concurrent_trials=2, reuse_actors=True),
                       run_config=tune.RunConfig(storage_path=str(tmp_path), name="fifo", verbose=0,
                                                 checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False)))
    results = tuner.fit()
    assert len(results) == 16 and not results.errors
    assert all(ours is tunes for ours, tunes, _ in scheduler.choices)
    assert max(pending for _, _, pending in scheduler.choices) >= 2  # a choice among several pending trials
    assert sum(ours is not None for ours, _, _ in scheduler.choices) >= 16
