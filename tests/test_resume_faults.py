"""Stopping, resuming and faults of the real job: `launch/tune_cm.py` drivers on the tiny CM run, real local Ray.

- Ctrl+C (SIGINT to the driver's process group, as a terminal sends it) and SIGTERM stop the search with
  exit status 130 (143 after SIGTERM) and the exact resume command, never a table or an export; the printed command resumes,
  and after a second stop finishes the budget. A second signal exits at once and the state stays resumable.
- kill -9 of the driver at five random points: the resumed search evaluates nothing that had finished (completed
  evaluations are replayed from the candidate store), the optimizer is told exactly the budget, and the
  driver's Ray processes do not outlive it; a new search under a taken name is refused.
- kill -9 of an ASHA search's driver mid-round: the resumed search replays recorded rounds and evaluates no
  round of any candidate twice.
- A trial process killed while the search runs is retried (`FailureConfig`) and the search completes.
- A checkpoint that gets NaN weights after the preflight read it (a flaky disk), so that only the workers see
  it, stops the search with one line naming the changed file and exit status 2; once restored, `--resume`
  completes.
- A stopped search resumed with another --sampler and --noise-seed is refused in one line before Ray starts
  (exit 2, nothing evaluated); resumed unchanged it completes (test_resume_identity.py walks every setting).
"""

from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Callable

import torch
from ray import tune
from safetensors.torch import load_file, save_file

from cli_runs import (FAST, TUNE_CM, driver_env, kill_session, last_line, run_driver, session_pids, start_driver,
                      trial_failures, wait_for)
from lcsc_ray.search.searcher import load_searcher

RAY_CORE = ("gcs_server", "raylet", "ray::")  # command lines of the processes a local Ray cluster runs
RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def _results(exp_dir: Path) -> dict:
    return json.loads((exp_dir / "final" / "results.json").read_text())


def _evaluations(exp_dir: Path) -> tuple[int, int]:
    """(evaluations, replays) among the results the driver received, over every trial folder of the experiment."""
    evaluated = replayed = 0
    for result in exp_dir.glob("trial_*/result.json"):
        for line in result.read_text().splitlines():
            record = json.loads(line) if line.strip() else {}
            if "score" in record:
                replayed += bool(record["replayed"])
                evaluated += not record["replayed"]
    return evaluated, replayed


def _records(exp_dir: Path) -> int:
    return len(list((exp_dir / "candidates").glob("*.result.json")))


def _resume_to_completion(args: list[str], tmp_path: Path, env: dict, exp_dir: Path, num_trials: int) -> None:
    """Run the search again with --resume; it must finish every trial with none errored."""
    code = run_driver([*args, "--resume"], tmp_path / "resume.log", env=env)
    assert code == 0, (tmp_path / "resume.log").read_text()[-3000:]
    results = _results(exp_dir)
    assert results["search"]["trials_completed"] == num_trials and results["search"]["trials_errored"] == 0


def _stop(driver: subprocess.Popen, exp_dir: Path, records: int, send: Callable[[int], None]) -> int:
    """Wait for `records` evaluated candidates, `send` the stop signal, return the driver's exit status."""
    try:
        wait_for(lambda: _records(exp_dir) >= records, 180, f"{records} evaluated candidates", driver, poll=0.05)
        send(driver.pid)
        return driver.wait(timeout=120)
    finally:
        kill_session(driver.pid)


def _assert_stopped(log: Path, exp_dir: Path, code: int, name: str, num_trials: int,
                    sig: int = signal.SIGINT) -> list[str]:
    """A stopped search: exit 128 + the signal, the stop line last, no table, no export, no traceback; returns
    the printed resume command's flags."""
    text, line = log.read_text(), last_line(log)
    assert code == 128 + sig, text[-3000:]
    assert line.startswith(f"stopped: search {name} stopped with ") and f"of {num_trials} trials completed" in line
    assert not (exp_dir / "final").exists(), "an interrupted search must not export or write results"
    assert "LCSC winner" not in text and "Traceback" not in text
    command = shlex.split(line.split("continue it with: ", 1)[1])
    assert command[0] in ("python", sys.executable) and command[1] == str(TUNE_CM) and "--resume" in command
    return command[2:]


def test_ctrl_c_then_sigterm_stop_without_a_result_and_the_printed_command_resumes(tiny_cm_run, tmp_path):
    """Ctrl+C (SIGINT to the whole foreground group, as a terminal sends it) stops the search; its printed
    command resumes it; SIGTERM to the resumed driver alone (as `kill` or a scheduler sends it) stops it the
    same way; the command printed then finishes the budget."""
    storage, name, num_trials = tmp_path / "storage", "ctrlc", 30
    exp_dir = storage / name
    args = ["--ckpt-dir", str(tiny_cm_run), "--num-trials", str(num_trials), "--storage", str(storage),
            "--name", name, "--no-dashboard", *FAST]
    log = tmp_path / "first.log"
    code = _stop(start_driver(args, log), exp_dir, 8, lambda pid: os.killpg(pid, signal.SIGINT))
    resume = _assert_stopped(log, exp_dir, code, name, num_trials)

    log = tmp_path / "resumed.log"
    more = _records(exp_dir) + 6
    code = _stop(start_driver(resume, log), exp_dir, more, lambda pid: os.kill(pid, signal.SIGTERM))
    resume = _assert_stopped(log, exp_dir, code, name, num_trials, signal.SIGTERM)

    code = run_driver(resume, tmp_path / "resume.log")
    assert code == 0, (tmp_path / "resume.log").read_text()[-3000:]
    results = _results(exp_dir)
    assert results["search"]["trials_completed"] == num_trials and results["search"]["trials_errored"] == 0
    assert len(load_searcher(exp_dir).told) == num_trials


def test_a_second_stop_signal_exits_at_once_and_the_state_stays_resumable(tiny_cm_run, tmp_path):
    storage, name, num_trials = tmp_path / "storage", "twice", 30
    exp_dir = storage / name
    args = ["--ckpt-dir", str(tiny_cm_run), "--num-trials", str(num_trials), "--storage", str(storage),
            "--name", name, "--no-dashboard", *FAST]
    log = tmp_path / f"{name}.log"
    driver = start_driver(args, log)
    try:
        wait_for(lambda: _records(exp_dir) >= 6, 180, "6 evaluated candidates", driver, poll=0.05)
        # Back to back: a stopped driver ends within a fraction of a second, so a second signal sent after the
        # first one's line would often find it gone.
        os.kill(driver.pid, signal.SIGTERM)
        os.kill(driver.pid, signal.SIGINT)
        code = driver.wait(timeout=120)
    finally:
        kill_session(driver.pid)
    text = log.read_text()
    assert code in (128 + signal.SIGINT, 128 + signal.SIGTERM), text[-3000:]  # the signal handled first decides
    assert not (exp_dir / "final").exists()
    assert "Traceback" not in text, "a stop signal must never end in a traceback, not even during shutdown"
    # the second signal lands while Tune saves; the command that continues comes last
    assert "second stop signal: exiting now" in text and "continue it with: " in last_line(log), text[-3000:]
    assert tune.Tuner.can_restore(str(exp_dir)) and list(exp_dir.glob("experiment_state-*.json"))


def test_kill_9_at_five_random_points_then_resume_evaluates_nothing_twice(tiny_cm_run, tmp_path):
    storage, name, num_trials, concurrent = tmp_path / "storage", "killed", 30, 2
    exp_dir = storage / name
    args = ["--ckpt-dir", str(tiny_cm_run), "--num-trials", str(num_trials), "--storage", str(storage),
            "--name", name, "--no-dashboard", *FAST]
    assert FAST[FAST.index("--max-concurrent") + 1] == str(concurrent)
    env = driver_env(TUNE_GLOBAL_CHECKPOINT_S="30")  # Ray's saved state lags far behind the evaluations
    kills = 0
    for step, (first, last) in enumerate([(3, 5), (8, 10), (13, 15), (18, 20), (23, 25)]):
        driver = start_driver([*args, *(["--resume"] if step else [])], tmp_path / f"run{step}.log", env=env)
        try:
            target = random.randint(first, last)
            wait_for(lambda: _records(exp_dir) >= target, 180, f"{target} evaluated candidates", driver, poll=0.02)
            before_pids = session_pids(driver.pid)
            os.kill(driver.pid, signal.SIGKILL)  # the driver alone, as `kill -9 <pid>` would
            driver.wait()
            kills += 1
            # A local Ray dies with its driver: the GCS, raylet and workers notice and exit within seconds.
            core = {pid for pid, cmd in before_pids.items() if pid != driver.pid
                    and any(k in cmd for k in RAY_CORE) and not any(agent in cmd for agent in RAY_AGENTS)}
            assert core, f"no Ray processes found in the driver's session: {before_pids}"
            wait_for(lambda: not core & set(session_pids(driver.pid)), 60, "the killed driver's Ray processes to exit")
        finally:
            kill_session(driver.pid)  # Ray's two agents outlive their raylet for about a minute: stop them

    _resume_to_completion(args, tmp_path, env, exp_dir, num_trials)
    evaluated, replayed = _evaluations(exp_dir)
    assert replayed >= 1, "the kills landed after Ray's last saved state, so some evaluations must be replayed"
    assert evaluated <= num_trials + kills * concurrent, (evaluated, replayed)
    searcher = load_searcher(exp_dir)
    assert len(searcher.told) == searcher.optimizer.num_tell == num_trials
    assert sorted(index for index, _, _ in searcher.told) == list(range(num_trials))

    # A new search under the same name is refused before anything starts (no overwrite).
    code = run_driver(args, tmp_path / "again.log")
    assert code == 2
    assert last_line(tmp_path / "again.log").startswith(f"error: experiment {name} exists in ")
    assert "Started a local Ray" not in (tmp_path / "again.log").read_text()


def _round_evaluations(exp_dir: Path) -> tuple[Counter, int]:
    """(evaluations per (candidate index, round), replayed rounds) among the results the drivers received."""
    evaluated, replayed = Counter(), 0
    for result in exp_dir.glob("trial_*/result.json"):
        for line in result.read_text().splitlines():
            record = json.loads(line) if line.strip() else {}
            if "score" in record:
                replayed += bool(record["replayed"])
                evaluated[record["config"]["lcsc_index"], record["round"]] += not record["replayed"]
    return evaluated, replayed


def test_kill_9_mid_round_of_an_asha_search_then_resume_evaluates_no_round_twice(tiny_cm_run, tmp_path):
    """Multi-fidelity trials record every round: after a kill -9 a resumed trial replays the rounds it had
    finished, regenerates their samples silently and evaluates only the rest; stopped trials stay told."""
    storage, name, num_trials = tmp_path / "storage", "asha", 16
    exp_dir = storage / name
    args = ["--ckpt-dir", str(tiny_cm_run), "--num-trials", str(num_trials), "--storage", str(storage),
            "--name", name, "--no-dashboard", *FAST, "--scheduler", "asha", "--rounds", "50,100"]
    env = driver_env(TUNE_GLOBAL_CHECKPOINT_S="30")
    driver = start_driver(args, tmp_path / "first.log", env=env)
    try:
        wait_for(lambda: _records(exp_dir) >= random.randint(5, 8), 180, "evaluated candidates", driver, poll=0.02)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
    finally:
        kill_session(driver.pid)
    _resume_to_completion(args, tmp_path, env, exp_dir, num_trials)
    evaluated, replayed = _round_evaluations(exp_dir)
    assert replayed >= 1, "the kill landed after Ray's last saved state, so some rounds must be replayed"
    assert max(evaluated.values()) == 1, [key for key, count in evaluated.items() if count > 1]
    assert any(round_ < 3 for (index, round_) in evaluated) and any(round_ == 3 for _, round_ in evaluated)
    searcher = load_searcher(exp_dir)
    assert sorted(index for index, _, _ in searcher.told) == list(range(num_trials))


def test_killed_trial_process_is_retried(tiny_cm_run, tmp_path):
    storage, name, num_trials = tmp_path / "storage", "crash", 16
    exp_dir = storage / name
    # 2,000 samples per evaluation: a trial runs long enough (about a second) to be caught mid-evaluation.
    args = ["--ckpt-dir", str(tiny_cm_run), "--num-trials", str(num_trials), "--storage", str(storage),
            "--name", name, "--no-dashboard", "--max-failures", "2", *FAST, "--fid-samples", "2000"]
    log = tmp_path / "crash.log"
    driver = start_driver(args, log)
    try:
        def busy_trial_actor() -> int | None:
            # Ray titles a worker `ray::<Class>.<method>()` while it runs a task: this one is evaluating.
            busy = [pid for pid, cmd in session_pids(driver.pid).items()
                    if cmd.startswith("ray::") and ".train" in cmd]
            return busy[0] if busy else None

        victim = wait_for(busy_trial_actor, 180, "a trial actor evaluating a candidate", driver, poll=0.05)
        os.kill(victim, signal.SIGKILL)
        code = driver.wait(timeout=240)
    finally:
        kill_session(driver.pid)
    assert code == 0, log.read_text()[-3000:]
    results = _results(exp_dir)
    assert results["search"]["trials_completed"] == num_trials and results["search"]["trials_errored"] == 0
    assert sum(trial_failures(exp_dir).values()) >= 1, "the killed trial should have been retried"


def test_a_checkpoint_that_goes_bad_mid_search_stops_with_one_line_and_resume_finishes(tiny_cm_run, tmp_path):
    """A checkpoint that gets NaN weights after the preflight read it (a flaky disk) is a file that changed
    under the search: the workers compare it with what the driver recorded before Ray started, and stop the
    search with one line naming it (its NaN weights are never merged); restored, --resume finishes."""
    run = tmp_path / "run"
    shutil.copytree(tiny_cm_run, run)
    victim = sorted((run / "checkpoints").glob("*.safetensors"))[5]
    good = victim.read_bytes()
    state = load_file(victim)
    tensor = next(k for k, v in state.items() if v.is_floating_point())
    state[tensor] = torch.full_like(state[tensor], float("nan"))
    damaged = victim.with_name(".damaged")
    save_file(state, damaged)
    storage, name, num_trials = tmp_path / "storage", "nan", 10
    args = ["--ckpt-dir", str(run), "--num-trials", str(num_trials), "--storage", str(storage), "--name", name,
            "--no-dashboard", *FAST]
    log = tmp_path / "nan.log"
    driver = start_driver(args, log)
    try:  # damaged once the preflight has read every checkpoint (a flaky disk): only the workers see it
        wait_for(lambda: "preflight:" in log.read_text(), 120, "the preflight's line", driver, poll=0.05)
        os.replace(damaged, victim)
        code = driver.wait(timeout=240)
    finally:
        kill_session(driver.pid)
    message = last_line(log)
    assert code == 2, log.read_text()[-3000:]
    assert message.startswith(f"error: checkpoint {victim} was rewritten since the search started") or \
        message.startswith(f"error: checkpoint {victim} changed since the search started"), message
    assert "--resume" in message
    assert "Traceback" not in log.read_text(), "worker tracebacks stay in the experiment's logs"
    assert not (storage / name / "final").exists()
    assert sum(trial_failures(storage / name).values()) == 0, "an input error is not retried as a lost worker"

    victim.write_bytes(good)
    code = run_driver([*args, "--resume"], tmp_path / "resume.log")
    assert code == 0, (tmp_path / "resume.log").read_text()[-3000:]
    results = _results(storage / name)
    assert results["search"]["trials_completed"] == num_trials and results["search"]["trials_errored"] == 0
    assert results["search"]["trials_failed"] == 0


def test_resume_with_other_settings_is_refused_before_ray_and_unchanged_completes(tiny_cm_run, tmp_path):
    storage, name, num_trials = tmp_path / "storage", "identity", 20
    exp_dir = storage / name
    args = ["--ckpt-dir", str(tiny_cm_run), "--num-trials", str(num_trials), "--storage", str(storage),
            "--name", name, "--no-dashboard", *FAST]
    log = tmp_path / "first.log"
    code = _stop(start_driver(args, log), exp_dir, 6, lambda pid: os.killpg(pid, signal.SIGINT))
    resume = _assert_stopped(log, exp_dir, code, name, num_trials)
    records = _records(exp_dir)

    log = tmp_path / "changed.log"
    code = run_driver([*resume, "--sampler", "multistep", "--noise-seed", "3"], log)
    text = log.read_text()
    assert code == 2, text[-3000:]
    assert last_line(log) == (f"error: --resume {name}: this experiment was started with --sampler onestep "
                              "--noise-seed 0, not --sampler multistep --noise-seed 3; rerun with the original "
                              "values or start a new --name")
    assert "Started a local Ray" not in text and "Traceback" not in text
    assert _records(exp_dir) == records, "a refused resume evaluates nothing"

    _resume_to_completion(resume, tmp_path, driver_env(), exp_dir, num_trials)
    assert len(load_searcher(exp_dir).told) == num_trials
