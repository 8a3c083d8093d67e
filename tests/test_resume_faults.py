"""Resume and faults of the real job: `launch/tune_cm.py` drivers on the tiny CM run, real local Ray.

- SIGKILL of the driver mid-search, then `--resume`: the full trial count, nothing finished before the kill
  lost, and the driver's Ray processes do not outlive it; a new search under a taken name is refused.
- A trial process killed while the search runs is retried (`FailureConfig`) and the search completes.
- A truncated checkpoint found by the workers stops the search with one line and exit code 2; once the
  file is restored, `--resume` completes the search.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from cli_runs import (FAST, kill_session, last_line, run_driver, session_pids, start_driver,
                      trial_failures, trial_scores, wait_for)

RAY_CORE = ("gcs_server", "raylet", "ray::")  # command lines of the processes a local Ray cluster runs
RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def _results(exp_dir: Path) -> dict:
    return json.loads((exp_dir / "final" / "results.json").read_text())


def test_sigkill_driver_then_resume_keeps_every_trial(tiny_cm_run, tmp_path):
    storage, name, num_trials = tmp_path / "storage", "killed", 40
    exp_dir = storage / name
    args = ["--ckpt-dir", str(tiny_cm_run), "--num-trials", str(num_trials), "--storage", str(storage),
            "--name", name, "--no-dashboard", *FAST]
    driver = start_driver(args, tmp_path / "first.log")
    try:
        wait_for(lambda: len(trial_scores(exp_dir)) >= 8, 180, "8 trial results in the experiment folder", driver)
        before_pids = session_pids(driver.pid)
        os.kill(driver.pid, signal.SIGKILL)  # the driver alone, as `kill -9 <pid>` would
        driver.wait()
        before = trial_scores(exp_dir)
        assert 8 <= len(before) < num_trials, "the kill must land mid-search"
        # A local Ray dies with its driver: the GCS, raylet and workers notice and exit within seconds.
        core = {pid for pid, cmd in before_pids.items() if pid != driver.pid and any(k in cmd for k in RAY_CORE)
                and not any(agent in cmd for agent in RAY_AGENTS)}
        assert core, f"no Ray processes found in the driver's session: {before_pids}"
        wait_for(lambda: not core & set(session_pids(driver.pid)), 60, "the killed driver's Ray processes to exit")
    finally:
        kill_session(driver.pid)  # Ray 2.60's two agents outlive their raylet for about a minute: stop them

    code = run_driver([*args, "--resume"], tmp_path / "resume.log")
    assert code == 0, (tmp_path / "resume.log").read_text()[-3000:]
    results = _results(exp_dir)
    assert results["search"]["trials_completed"] == num_trials
    assert results["search"]["trials_errored"] == 0
    after = trial_scores(exp_dir)
    assert len(after) == num_trials
    for trial_id, score in before.items():  # every pre-kill trial is still there, with its score
        assert after[trial_id] == pytest.approx(score)
    # The table is built from all trials: the finalists are the best of the pre- and post-kill trials.
    finalists = sorted(f["search_score"] for f in results["finalists"])
    assert finalists[0] == pytest.approx(min(s for s in after.values() if s < 1e5))
    for name_, baseline in results["baselines"].items():
        if baseline["search_score"] is not None:
            assert any(baseline["search_score"] == pytest.approx(s) for s in after.values()), name_

    # A new search under the same name is refused before anything starts (no overwrite).
    code = run_driver(args, tmp_path / "again.log")
    assert code == 2
    assert last_line(tmp_path / "again.log").startswith(f"error: experiment {name} exists in ")
    assert "--resume" in last_line(tmp_path / "again.log")
    assert "Started a local Ray" not in (tmp_path / "again.log").read_text()
    assert trial_scores(exp_dir) == after


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


def test_corrupt_checkpoint_stops_the_search_and_resume_finishes(tiny_cm_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_cm_run, run)
    victim = sorted((run / "checkpoints").glob("*.safetensors"))[5]
    good = victim.read_bytes()
    # The driver only lists checkpoint files; the workers are the first to open them, as on a cluster where
    # a file goes bad on shared storage after the search started.
    victim.write_bytes(good[:100])
    storage, name, num_trials = tmp_path / "storage", "corrupt", 10
    args = ["--ckpt-dir", str(run), "--num-trials", str(num_trials), "--storage", str(storage), "--name", name,
            "--no-dashboard", "--max-failures", "0", *FAST]
    code = run_driver(args, tmp_path / "corrupt.log")
    message = last_line(tmp_path / "corrupt.log")
    assert code == 2, (tmp_path / "corrupt.log").read_text()[-3000:]
    assert message.startswith(f"error: {victim}: unreadable or truncated safetensors file")
    assert f"--resume --name {name} --storage {storage}" in message
    assert not (storage / name / "final").exists()

    victim.write_bytes(good)
    code = run_driver([*args, "--resume"], tmp_path / "resume.log")
    assert code == 0, (tmp_path / "resume.log").read_text()[-3000:]
    results = _results(storage / name)
    assert results["search"]["trials_completed"] == num_trials and results["search"]["trials_errored"] == 0
