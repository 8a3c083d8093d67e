"""The search machinery: lcsc-es, optimizer building, LcscNevergradSearch and run_search on a real local Ray.

The Ray tests share one local Ray session per module and score a cheap synthetic objective
(`tests/search_synthetic.py`), so they exercise the real Tune/Nevergrad code paths in seconds.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import nevergrad as ng
import numpy as np
import pytest
import ray
from ray import tune
from ray.tune.search import Searcher

from lcsc_ray.errors import LcscError
from lcsc_ray.search.candidates import decode_candidate, save_candidate
from lcsc_ray.search.optimizers import build_optimizer
from lcsc_ray.search.searcher import LcscNevergradSearch, load_searcher
from lcsc_ray.search.tuner import run_search
from search_spaces import build_space
from cli_runs import trial_scores, wait_for
from search_synthetic import (BASELINES, GATE_INDEX, HOLD, HOLD_INDEX, K, RELEASE, SPACE, TARGET,
                              crash_once_trainable, gated_trainable, objective, synthetic_trainable)

REPO = Path(__file__).resolve().parents[1]


def _space():
    return build_space(SPACE, K)


def _loss(space, candidate) -> float:
    return objective(space.to_coefficients(candidate.value["alpha"]))


def _run_ask_tell(optimizer, space, steps: int, batch: int = 1) -> list[np.ndarray]:
    """Ask `batch` candidates before telling them (num_workers > 1 style); return the asked values."""
    asked = []
    for _ in range(steps):
        candidates = [optimizer.ask() for _ in range(batch)]
        for candidate in candidates:
            asked.append(candidate.value["alpha"].copy())
            optimizer.tell(candidate, _loss(space, candidate))
    return asked


# ----------------------------------------------------------------------------- lcsc-es and optimizer building

def test_lcsc_es_is_registered_seeded_and_keeps_the_mu_best():
    assert "lcsc-es" in ng.optimizers.registry
    space = _space()
    runs = [build_optimizer("lcsc-es", space.parametrization(), budget=60, num_workers=3, seed=7) for _ in range(2)]
    sequences = [_run_ask_tell(opt, space, 20, batch=3) for opt in runs]
    assert np.array_equal(np.array(sequences[0]), np.array(sequences[1]))  # same seed, same run
    other = build_optimizer("lcsc-es", space.parametrization(), budget=60, num_workers=3, seed=8)
    assert not np.array_equal(np.array(_run_ask_tell(other, space, 20, batch=3)), np.array(sequences[0]))
    population = runs[0].population
    assert len(population) == 8 and [m[0] for m in population] == sorted(m[0] for m in population)
    assert population[0][0] == pytest.approx(min(objective(space.to_coefficients(v)) for v in sequences[0]))


def test_lcsc_es_takes_warm_starts_and_improves_on_them():
    space = _space()
    optimizer = build_optimizer("lcsc-es", space.parametrization(), budget=200, num_workers=1, seed=0)
    for alpha in BASELINES.values():
        point = optimizer.parametrization.spawn_child(new_value={"alpha": space.to_value(alpha)})
        optimizer.tell(point, objective(alpha))
    assert optimizer.num_tell_not_asked == 2 and len(optimizer.population) == 2
    _run_ask_tell(optimizer, space, 150)
    best = optimizer.population[0][0]
    assert best < 0.3 * min(objective(a) for a in BASELINES.values())
    assert np.allclose(space.to_coefficients(optimizer.recommend().value["alpha"]), TARGET, atol=1.0)


def test_lcsc_es_pickles_mid_run_and_continues_identically():
    space = _space()
    optimizer = build_optimizer("lcsc-es", space.parametrization(), budget=60, num_workers=2, seed=1)
    _run_ask_tell(optimizer, space, 5, batch=2)
    clone = pickle.loads(pickle.dumps(optimizer))
    assert np.array_equal(np.array(_run_ask_tell(optimizer, space, 5, batch=2)),
                          np.array(_run_ask_tell(clone, space, 5, batch=2)))


def test_build_optimizer_names_and_guards(capsys):
    space = _space()
    assert build_optimizer("twopointsde", space.parametrization(), budget=10, num_workers=1, seed=0).name == "TwoPointsDE"
    with pytest.raises(LcscError, match="did you mean.*CMA"):
        build_optimizer("cmaa", space.parametrization(), budget=10, num_workers=1, seed=0)
    with pytest.raises(LcscError, match="Cobyla cannot be pickled"):
        build_optimizer("Cobyla", space.parametrization(), budget=10, num_workers=1, seed=0)
    ngopt = build_optimizer("NGOpt", space.parametrization(), budget=10, num_workers=1, seed=0)
    assert "using CMA" in capsys.readouterr().out and "CMA" in ngopt.name


# ----------------------------------------------------------------------------- searcher without Ray

def test_candidate_store_is_exact_small_and_checked(tmp_path):
    value = np.random.default_rng(0).normal(size=400)
    config = save_candidate(tmp_path / "candidates", 3, "search", value)
    decoded, label = decode_candidate(json.loads(json.dumps(config)))  # the config survives Ray's JSON state
    assert np.array_equal(decoded, value) and decoded.dtype == np.float64 and label == "search"
    assert config["lcsc_index"] == 3 and Path(config["lcsc_candidate"]).parent == (tmp_path / "candidates").resolve()
    # the config names the value, it does not hold it: the same size at K=400 as at K=2
    small = save_candidate(tmp_path / "candidates", 4, "search", value[:2])
    assert len(json.dumps(config)) == len(json.dumps(small)) < len(str(tmp_path)) + 120
    with pytest.raises(LcscError, match="lcsc_candidate"):
        decode_candidate({"alpha": value})


def test_candidate_store_damage_is_a_clear_error(tmp_path):
    value = np.linspace(-1.0, 1.0, 400)
    config = save_candidate(tmp_path / "candidates", 0, "search", value)
    path = Path(config["lcsc_candidate"])
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with pytest.raises(LcscError, match="unreadable.*damaged"):
        decode_candidate(config)
    np.save(path, value[::-1].copy())  # a readable file holding another value
    with pytest.raises(LcscError, match="does not hold.*damaged"):
        decode_candidate(config)
    np.save(path, value.astype(np.float32))  # the right numbers in the wrong dtype
    with pytest.raises(LcscError, match="does not hold"):
        decode_candidate(config)
    path.write_bytes(pickle.dumps(value))  # never unpickled
    with pytest.raises(LcscError, match="unreadable"):
        decode_candidate(config)
    path.unlink()
    with pytest.raises(LcscError, match="is missing.*every node"):
        decode_candidate(config)


def _searcher(experiment_dir, seed: int = 0, max_concurrent: int = 2) -> tuple[LcscNevergradSearch, object]:
    space = _space()
    optimizer = build_optimizer("lcsc-es", space.parametrization(), budget=50, num_workers=max_concurrent, seed=seed)
    warm = [(name, space.to_value(alpha)) for name, alpha in BASELINES.items()]
    searcher = LcscNevergradSearch(optimizer, experiment_dir=experiment_dir, warm_start=warm,
                                   max_concurrent=max_concurrent)
    return searcher, space


def _complete(searcher, space, trial_id, config):
    value, _ = decode_candidate(config)
    score = objective(space.to_coefficients(value))
    searcher.on_trial_complete(trial_id, {"score": score, "config": config})
    return score


def test_searcher_hands_out_baselines_first_and_tells_them_as_not_asked(tmp_path):
    searcher, space = _searcher(tmp_path)
    first, second = searcher.suggest("t0"), searcher.suggest("t1")
    assert searcher.suggest("t2") is None  # concurrency from the searcher's own live map
    assert (first["lcsc_label"], second["lcsc_label"]) == ("baseline:newest", "baseline:uniform")
    assert np.allclose(space.to_coefficients(decode_candidate(first)[0]), BASELINES["newest"])
    assert Path(first["lcsc_candidate"]).parent == tmp_path.resolve() / "candidates"
    _complete(searcher, space, "t0", first)
    _complete(searcher, space, "t1", second)
    assert searcher.optimizer.num_tell == 2 and searcher.optimizer.num_tell_not_asked == 2
    assert searcher.suggest("t2")["lcsc_label"] == "search"
    searcher.on_trial_complete("t2", None, error=True)  # errored: never told, slot freed
    assert searcher.optimizer.num_tell == 2 and searcher.suggest("t3") is not None


def test_searcher_tells_unknown_trials_rebuilt_from_their_config(tmp_path):
    searcher, space = _searcher(tmp_path)
    stranger = save_candidate(tmp_path / "candidates", 9, "search", space.to_value(TARGET))
    _complete(searcher, space, "never-suggested", stranger)
    assert searcher.optimizer.num_tell == 1 and searcher.told == [(9, "search", 0.0)]
    assert searcher.optimizer.population[0][0] == 0.0
    # Tune hands over a flattened result when it stops a trial itself
    flat = save_candidate(tmp_path / "candidates", 10, "search", space.to_value(BASELINES["uniform"]))
    searcher.on_trial_complete("also-unknown", {"score": 1.0, **{f"config/{k}": v for k, v in flat.items()}})
    assert searcher.told[-1] == (10, "search", 1.0) and searcher.optimizer.num_tell == 2


def test_searcher_ends_the_search_as_soon_as_its_budget_is_suggested(tmp_path):
    """Tune gets no trial count of its own, so the searcher's FINISHED ends the search; it must come while the
    last trial still runs (a None there let Tune block its loop for minutes asking for another trial)."""
    space = _space()
    optimizer = build_optimizer("CMA", space.parametrization(), budget=2, num_workers=1, seed=0)
    searcher = LcscNevergradSearch(optimizer, experiment_dir=tmp_path, max_concurrent=1, budget=2)
    first = searcher.suggest("a")
    assert searcher.suggest("b") is None  # concurrency
    _complete(searcher, space, "a", first)
    assert searcher.suggest("c")["lcsc_index"] == 1
    assert searcher.suggest("d") == Searcher.FINISHED  # "c" still runs


def test_searcher_save_restore_continues_identically(tmp_path):
    searcher, space = _searcher(tmp_path / "exp", seed=4)
    for i in range(6):
        _complete(searcher, space, f"t{i}", searcher.suggest(f"t{i}"))
    searcher.save(str(tmp_path / "state.pkl"))
    restored, _ = _searcher(tmp_path / "other", seed=99)  # another seed and folder: all must come from the file
    restored.restore(str(tmp_path / "state.pkl"))
    for i in range(8):
        original, copy = searcher.suggest(f"n{i}"), restored.suggest(f"n{i}")
        assert original == copy  # same index, label and candidate file (in the original store)
        _complete(searcher, space, f"n{i}", original)
        _complete(restored, space, f"n{i}", copy)
    assert searcher.told == restored.told
    assert not (tmp_path / "other").exists() and len(list((tmp_path / "exp" / "candidates").iterdir())) == 14


def test_restored_in_flight_trials_are_told_but_do_not_block_new_ones(tmp_path):
    searcher, space = _searcher(tmp_path, max_concurrent=1)
    in_flight = searcher.suggest("old")
    searcher.save(str(tmp_path / "state.pkl"))
    restored, _ = _searcher(tmp_path, max_concurrent=1)
    restored.restore(str(tmp_path / "state.pkl"))
    fresh = restored.suggest("new")  # a stale entry must not hang the search at max_concurrent
    assert fresh is not None and fresh["lcsc_label"] == "baseline:uniform"
    _complete(restored, space, "old", in_flight)  # the resumed trial finishes under its old id
    assert restored.told[0][:2] == (0, "baseline:newest") and restored.optimizer.num_tell_not_asked == 1


# ----------------------------------------------------------------------------- run_search on a real local Ray

@pytest.fixture(scope="module")
def local_ray():
    # Workers inherit the environment of the local Ray started here: let them import tests/search_synthetic.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
        ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def _search(storage, name, optimizer="lcsc-es", num_trials=12, trainable=synthetic_trainable, **kwargs):
    return run_search(
        trainable, _space(), optimizer=optimizer, num_trials=num_trials, seed=0, warm_start=BASELINES,
        storage=storage, name=name, max_concurrent=2, resources={"cpu": 1}, progress=False, **kwargs,
    )


def test_lcsc_es_search_runs_the_budget_and_tells_the_baselines(local_ray, tmp_path):
    table = _search(tmp_path, "es", num_trials=40)
    assert len(table.rows) == 40 and table.num_errored == 0
    assert [row.index for row in table.rows] == list(range(40))
    assert [row.label for row in table.rows[:2]] == ["baseline:newest", "baseline:uniform"]
    assert all(row.label == "search" for row in table.rows[2:])
    for name, alpha in BASELINES.items():
        assert np.allclose(table.baselines()[name].alpha, alpha)
        assert table.baselines()[name].score == pytest.approx(objective(alpha))
    # every completed trial was told, the baselines as told-but-not-asked points
    assert len(table.told) == 40 and table.num_tell_not_asked == 2
    # each exactly once; not necessarily the first two tells: at 2 concurrent trials, a search candidate asked
    # when one baseline finished can finish before the other baseline, whose actor is still starting
    assert sorted(label for _, label, _ in table.told if label != "search") == ["baseline:newest", "baseline:uniform"]
    assert table.rows[5].metrics["failed"] is False and "score" not in table.rows[5].metrics
    best = min(table.rows, key=lambda row: row.score)
    assert best.score == pytest.approx(objective(best.alpha))  # the reported score is the candidate's own
    assert best.score < 0.7 * min(objective(alpha) for alpha in BASELINES.values())
    assert np.isclose(best.alpha.sum(), 1.0)


def test_trial_that_errors_past_its_retries_is_rerun_and_the_budget_completes(local_ray, tmp_path, capsys):
    """max_failures=0: the worker dying under trial 3 puts it in ERROR; the search re-runs it once at the end."""
    table = _search(tmp_path, "crash", num_trials=10, trainable=crash_once_trainable, max_failures=0)
    assert (tmp_path / "crash" / "crashed-once").exists()
    assert len(table.rows) == 10 and table.num_errored == 0 and len(table.told) == 10
    assert sorted(row.index for row in table.rows) == list(range(10))
    assert "1 trial(s) of crash ended in error" in capsys.readouterr().out


@pytest.mark.parametrize("optimizer", ["TwoPointsDE", "CMA"])
def test_other_nevergrad_optimizers_run(local_ray, tmp_path, optimizer):
    table = _search(tmp_path, optimizer, optimizer=optimizer, num_trials=8)
    assert len(table.rows) == 8 and table.num_tell_not_asked == 2 and len(table.told) == 8


def test_existing_name_without_resume_is_an_error(local_ray, tmp_path):
    _search(tmp_path, "taken", num_trials=3)
    with pytest.raises(LcscError, match="exists in .*--resume"):
        _search(tmp_path, "taken", num_trials=3)
    with pytest.raises(LcscError, match="drop --resume"):
        _search(tmp_path, "absent", num_trials=3, resume=True)


def test_resume_rebuilds_a_search_whose_ray_state_is_corrupt(local_ray, tmp_path, capsys):
    """Ray would silently start afresh from a corrupt experiment state; the search is rebuilt in the same folder
    from its candidate store instead (Ray's files set aside), and a missing manifest is still refused."""
    _search(tmp_path, "damaged", num_trials=3)
    for state in (tmp_path / "damaged").glob("experiment_state-*.json"):
        state.write_text("{truncated")
    table = _search(tmp_path, "damaged", num_trials=3, resume=True)
    assert "rebuilding the search from its candidate store" in capsys.readouterr().out
    assert len(table.rows) == 3 and len(list((tmp_path / "damaged").glob("damaged-*/experiment_state-*.json"))) == 1
    (tmp_path / "damaged" / "lcsc_search.json").unlink()
    with pytest.raises(LcscError, match="lcsc_search.json is missing or corrupt"):
        _search(tmp_path, "damaged", num_trials=3, resume=True)


LARGE_K = 400


def large_k_trainable(config: dict) -> None:
    """‖value‖² of a K=400 candidate: cheap, and any K works (search_synthetic's objective is fixed at K=6)."""
    value, label = decode_candidate(config)
    tune.report({"score": float(np.sum(value ** 2)), "label": label, "failed": False})


def test_experiment_state_stays_small_at_large_k(local_ray, tmp_path):
    # Ray keeps ~6 copies of each trial's config in experiment_state-*.json and rewrites it at every experiment
    # checkpoint; with the value in the config (base64) this search measured 36 KB per trial. Now the config is
    # one path, and what is left (~11 KB) is Ray's own bookkeeping, measured the same at K=6 (metric windows,
    # pickled storage context, checkpoint manager).
    num_trials = 10
    table = run_search(
        large_k_trainable, build_space("affine", LARGE_K), optimizer="lcsc-es", num_trials=num_trials, seed=0,
        warm_start={"newest": np.eye(LARGE_K)[-1], "uniform": np.full(LARGE_K, 1.0 / LARGE_K)},
        storage=tmp_path, name="large_k", max_concurrent=2, resources={"cpu": 1}, progress=False,
    )
    assert len(table.rows) == num_trials and table.num_errored == 0 and len(table.told) == num_trials
    state = max((tmp_path / "large_k").glob("experiment_state-*.json"))  # names sort by time
    per_trial = state.stat().st_size / num_trials
    print(f"experiment state at K={LARGE_K}: {per_trial:.0f} bytes per trial")
    assert per_trial < 16_000
    assert np.allclose(table.baselines()["uniform"].alpha, 1.0 / LARGE_K)
    assert all(row.score == pytest.approx(float(np.sum(row.value ** 2))) for row in table.rows)
    assert len(list((tmp_path / "large_k" / "candidates").glob("*.npy"))) == num_trials


def _kill_gated_search(storage: Path, name: str, num_trials: int, told: int, resume: bool = False) -> None:
    """Run the gated search (`search_synthetic.main`) in its own process with its own Ray, and kill -9 it once
    its saved searcher has told `told` trials: Ray saves the experiment state, then the searcher state, so
    both saved files then cover them."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
           "TUNE_GLOBAL_CHECKPOINT_S": "0.5", "RAY_AUTH_MODE": "disabled"}
    driver = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "search_synthetic.py"), str(storage), name, str(num_trials),
         *(["resume"] if resume else [])],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )

    def saved_searcher_told_enough() -> bool:
        try:
            return len(load_searcher(storage / name).told) >= told
        except LcscError:  # no searcher state saved yet
            return False

    try:
        wait_for(saved_searcher_told_enough, 90, f"a saved searcher that told {told} trials", driver)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started, nothing else
        driver.wait()


def test_resume_after_sigkill_reaches_the_full_count(local_ray, tmp_path):
    num_trials = 14
    exp_dir = tmp_path / "killed"
    _kill_gated_search(tmp_path, "killed", num_trials, told=GATE_INDEX)
    before = trial_scores(exp_dir)
    assert len(before) == GATE_INDEX  # the gated trial was in flight, not finished, when the driver died
    (exp_dir / RELEASE).touch()
    table = _search(tmp_path, "killed", num_trials=num_trials, trainable=gated_trainable, resume=True)
    assert len(table.rows) == num_trials
    scores = {row.trial_id: row.score for row in table.rows}
    assert all(scores.get(trial_id) == pytest.approx(score) for trial_id, score in before.items())
    labels = [row.label for row in table.rows]
    assert labels.count("baseline:newest") == 1 and labels.count("baseline:uniform") == 1
    assert sorted(row.index for row in table.rows) == list(range(num_trials))
    assert len(load_searcher(exp_dir).told) >= num_trials - len(before)


def test_resume_when_the_experiment_state_and_the_searcher_state_are_of_different_moments(local_ray, tmp_path):
    """Tune saves its experiment state and the searcher's in separate files, one after the other; a driver
    killed between the two, or a bucket copy made between them, leaves one newer than the other. Both ways,
    the resumed search must end with exactly its budget: every index once, each candidate told once.
    Built from two real kills: the first leaves files that hold trials 0-4, the second (after a resume) files of
    trials 0-8; each case keeps one kind of file of the second kill only."""
    num_trials, name = 14, "ages"
    exp_dir, aside = tmp_path / name, tmp_path / "aside"
    _kill_gated_search(tmp_path, name, num_trials, told=GATE_INDEX)
    (exp_dir / HOLD).touch()
    (exp_dir / RELEASE).touch()
    _kill_gated_search(tmp_path, name, num_trials, told=HOLD_INDEX, resume=True)
    (exp_dir / HOLD).unlink()
    shutil.copytree(exp_dir, aside)
    newest = {pattern: max(exp_dir.glob(pattern)).name
              for pattern in ("experiment_state-*.json", "searcher-state-*.pkl", "search_gen_state-*.json")}
    cases = {"searcher state older": ("searcher-state-*.pkl", "search_gen_state-*.json"),
             "experiment state older": ("experiment_state-*.json",)}
    for case, older in cases.items():
        shutil.rmtree(exp_dir)
        shutil.copytree(aside, exp_dir)  # the same path: trial configs name their candidates by absolute path
        for pattern in older:
            (exp_dir / newest[pattern]).unlink()  # the first kill's file is now the newest of its kind
        # Tune stages a restored experiment's files in this Ray session under the first run's name and time:
        # the case before left its finished search there, which no driver of a new session would find.
        for staged in Path(ray._private.worker._global_node.get_session_dir_path()).glob(f"artifacts/*/{name}"):
            shutil.rmtree(staged)
        table = _search(tmp_path, name, num_trials=num_trials, trainable=gated_trainable, resume=True)
        assert [row.index for row in table.rows] == list(range(num_trials)), case
        labels = [row.label for row in table.rows]
        assert labels[:2] == ["baseline:newest", "baseline:uniform"] and set(labels[2:]) == {"search"}, case
        for row in table.rows:
            assert row.score == pytest.approx(objective(row.alpha)), case
        assert np.allclose(table.rows[0].alpha, BASELINES["newest"]), case
        assert sorted(index for index, _, _ in table.told) == list(range(num_trials)), case
