"""Disk faults and inputs that change under a search, on real mounts (tmpfs, read-only) and the real job.

- A read-only or too small --storage, and a read-only --out, are refused in one line before Ray starts.
- A --storage that fills up during the search (another program writes a large file into it) stops the
  search with one line naming the folder and the resume command; with the disk still full and Ray's
  experiment state damaged (as a full disk leaves it), space is freed and `--resume` rebuilds the search
  from the candidate store: every candidate is evaluated exactly once over both runs, and the final results
  equal those of an uninterrupted search with the same seeds (one trial at a time: deterministic).
- A checkpoint truncated while the search runs stops it in one line naming the file (no Ray traceback);
  restored, `--resume` finishes, running the final stage alone (every trial had finished).

Mounting needs root (CI runs as root); where the kernel refuses, those tests skip and say why.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from cli_runs import REPO, driver_env, kill_session, last_line, run_driver, start_driver, wait_for

QUICK = ["--fid-samples", "200", "--final-samples", "200", "--top-k", "2", "--heldout-seeds", "2", "--quiet",
         "--no-dashboard"]


@contextlib.contextmanager
def tmpfs(folder: Path, size_mib: int, read_only: bool = False) -> Iterator[Path]:
    """A tmpfs of `size_mib` MiB mounted at `folder` (read-only if asked) for the duration; skip where mounting
    is refused."""
    folder.mkdir(parents=True, exist_ok=True)
    options = f"size={size_mib}m" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or 'mount failed'})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def _records(exp_dir: Path) -> dict[str, int]:
    """Record file -> modification time (ns) of every finished evaluation in the candidate store."""
    return {p.name: p.stat().st_mtime_ns for p in (exp_dir / "candidates").glob("*.result.json")}


def _evaluated(exp_dir: Path) -> tuple[int, int]:
    """(evaluations, replays) that the trials of the experiment's current Ray run reported."""
    evaluated = replayed = 0
    for result in exp_dir.glob("trial_*/result.json"):
        for line in result.read_text().splitlines():
            record = json.loads(line) if line.strip() else {}
            if "score" in record:
                replayed += bool(record.get("replayed"))
                evaluated += not record.get("replayed")
    return evaluated, replayed


def _continue_command(log: Path) -> list[str]:
    """The command the stopped driver printed, as the user would paste it (run from the repository)."""
    line = last_line(log)
    assert "continue with: " in line, line
    command = shlex.split(line.split("continue with: ", 1)[1].rstrip(")"))
    return [sys.executable, *command[1:]] if Path(command[0]).name.startswith("python") else command


def test_unwritable_or_too_small_outputs_are_refused_before_ray(tiny_cm_run, tmp_path):
    base = ["--ckpt-dir", str(tiny_cm_run), "--num-trials", "12", "--name", "x", *QUICK]
    cases = [("readonly", 16, True, "--storage", "cannot be written (Read-only file system)"),
             ("small", 8, False, "--storage", "MiB free, but this search needs about"),
             ("readonly_out", 16, True, "--out", "cannot be written (Read-only file system)")]
    for folder, size, read_only, flag, message in cases:
        with tmpfs(tmp_path / folder, size, read_only) as mount:
            where = ["--storage", str(mount)] if flag == "--storage" else \
                ["--storage", str(tmp_path / "storage"), "--out", str(mount / "final")]
            log = tmp_path / f"{folder}.log"
            assert run_driver([*base, *where], log) == 2, log.read_text()[-2000:]
            line = last_line(log)
            assert line.startswith(f"error: {flag} {mount}") and message in line, line
            assert "Started a local Ray" not in log.read_text() and "Traceback" not in log.read_text()


def test_a_disk_that_fills_mid_search_stops_it_and_resume_rebuilds_from_the_store(tiny_cm_run, tmp_path):
    num_trials = 100  # trials take a fraction of a second: enough left to fill the disk and be stopped
    args = ["--ckpt-dir", str(tiny_cm_run), "--num-trials", str(num_trials), "--max-concurrent", "1", *QUICK]
    reference = tmp_path / "reference"
    assert run_driver([*args, "--storage", str(reference), "--name", "full"], tmp_path / "reference.log") == 0
    expected = json.loads((reference / "full" / "final" / "results.json").read_text())

    with tmpfs(tmp_path / "disk", 128) as storage:
        exp_dir = storage / "full"
        log = tmp_path / "first.log"
        driver = start_driver([*args, "--storage", str(storage), "--name", "full"], log)
        filler = storage / "filler.bin"
        try:
            wait_for(lambda: len(_records(exp_dir)) >= 5, 180, "5 evaluated candidates", driver, poll=0.05)
            free = shutil.disk_usage(storage).free
            with open(filler, "wb") as handle:  # another program fills the disk, leaving 16 MiB
                handle.truncate(0)
                handle.write(b"\0" * max(0, free - (16 << 20)))
            code = driver.wait(timeout=120)
        finally:
            kill_session(driver.pid)
        text = log.read_text()
        assert code == 2, text[-3000:]
        line = last_line(log)
        assert line.startswith(f"error: storage {exp_dir}: only ") and "MiB free" in line, line
        assert "Traceback" not in text and "\x1b[" not in text
        before = _records(exp_dir)
        assert 5 <= len(before) < num_trials
        for state in exp_dir.glob("experiment_state-*.json"):  # what a full disk does to Ray's last save
            state.write_text(state.read_text()[: len(state.read_text()) // 2])
        filler.unlink()
        command = _continue_command(log)
        resumed = tmp_path / "resume.log"
        done = subprocess.run(command, cwd=REPO, env=driver_env(), stdout=open(resumed, "w"),
                              stderr=subprocess.STDOUT, timeout=600, start_new_session=True)
        assert done.returncode == 0, resumed.read_text()[-3000:]
        assert "rebuilding the search from its candidate store" in resumed.read_text()
        after = _records(exp_dir)
        assert len(after) == num_trials and all(after[name] == mtime for name, mtime in before.items())
        # The rebuilt run replayed every recorded evaluation and evaluated only the rest.
        assert _evaluated(exp_dir) == (num_trials - len(before), len(before))
        results = json.loads((exp_dir / "final" / "results.json").read_text())
    assert results["winner"]["alpha"] == expected["winner"]["alpha"]
    assert results["winner"]["heldout_score"] == pytest.approx(expected["winner"]["heldout_score"], rel=1e-6)


def test_a_checkpoint_truncated_mid_search_stops_it_in_one_line_and_resume_finishes(tiny_cm_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_cm_run, run)
    middle = sorted((run / "checkpoints").glob("*.safetensors"))[5]
    saved = middle.read_bytes()
    storage = tmp_path / "storage"
    exp_dir = storage / "changed"
    args = ["--ckpt-dir", str(run), "--num-trials", "12", "--max-concurrent", "1", "--storage", str(storage),
            "--name", "changed", *QUICK]
    log = tmp_path / "first.log"
    driver = start_driver(args, log)
    try:
        wait_for(lambda: len(_records(exp_dir)) >= 2, 180, "2 evaluated candidates", driver, poll=0.05)
        middle.write_bytes(saved[: len(saved) // 2])  # a flaky disk or a careless copy truncates it
        code = driver.wait(timeout=300)
    finally:
        kill_session(driver.pid)
    text = log.read_text()
    assert code == 2, text[-3000:]
    line = last_line(log)
    assert f"checkpoint {middle} changed since the search started" in line, line
    assert "Traceback" not in text and "\x1b[" not in text and "ray::" not in line
    middle.write_bytes(saved)  # restored as it was (a new modification time, the same content)
    resumed = tmp_path / "resume.log"
    assert run_driver([*args, "--resume"], resumed) == 0, resumed.read_text()[-3000:]
    results = json.loads((exp_dir / "final" / "results.json").read_text())
    assert results["search"]["trials_completed"] == 12
    assert _evaluated(exp_dir)[0] == 12  # the final stage ran alone: no trial evaluated again


def test_resume_with_a_larger_budget_evaluates_only_the_new_candidates(tiny_cm_run, tmp_path):
    storage = tmp_path / "storage"
    exp_dir = storage / "grow"
    args = ["--ckpt-dir", str(tiny_cm_run), "--max-concurrent", "1", "--storage", str(storage), "--name", "grow",
            *QUICK]
    assert run_driver([*args, "--num-trials", "12"], tmp_path / "first.log") == 0
    before = _records(exp_dir)
    log = tmp_path / "grow.log"
    assert run_driver([*args, "--num-trials", "16", "--resume"], log) == 0, log.read_text()[-3000:]
    assert "growing the budget of grow from 12 to 16 trials" in log.read_text()
    after = _records(exp_dir)
    assert len(after) == 16 and all(after[name] == mtime for name, mtime in before.items())
    assert _evaluated(exp_dir) == (4, 12)
    results = json.loads((exp_dir / "final" / "results.json").read_text())
    assert results["search"]["trials_completed"] == 16
