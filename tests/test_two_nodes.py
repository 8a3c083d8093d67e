"""A two-node Ray cluster on this machine (`ray start --head` + `ray start --address`, one CPU each), the
search run against it with `--address`, and the second node killed mid-search: the trials it was running
are retried on the head (`FailureConfig`) and the search finishes with the full trial count.

Each node runs in its own session under a private temp dir, so the test stops exactly what it started.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import ray

from cli_runs import (FAST, driver_env, free_port, kill_session, session_pids, start_driver, trial_scores,
                      wait_for)

RAY_CLI = str(Path(sys.executable).parent / "ray")


def _start_node(args: list[str], temp_dir: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    handle = open(log, "w")  # noqa: SIM115 - owned by the child
    return subprocess.Popen([RAY_CLI, "start", "--block", "--num-cpus=1", f"--temp-dir={temp_dir}",
                             "--disable-usage-stats", *args],
                            stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def test_search_survives_losing_the_second_node(tiny_cm_run, tmp_path):
    temp_dir = Path("/tmp") / f"lcsc-2n-{os.getpid()}"  # short: Ray's socket paths must fit in 107 bytes
    env = driver_env(RAY_TMPDIR=str(temp_dir))
    ip = ray.util.get_node_ip_address()
    gcs_port = free_port()
    address = f"{ip}:{gcs_port}"
    head = _start_node(["--head", f"--port={gcs_port}", "--include-dashboard=false",
                        f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}"],
                       temp_dir, env, tmp_path / "head.log")
    worker = None
    driver = None
    try:
        wait_for(lambda: "Ray runtime started" in (tmp_path / "head.log").read_text(), 120, "the head node", head)
        worker = _start_node([f"--address={address}", f"--dashboard-agent-listen-port={free_port()}",
                              f"--metrics-export-port={free_port()}"], temp_dir, env, tmp_path / "worker.log")
        wait_for(lambda: "Ray runtime started" in (tmp_path / "worker.log").read_text(), 120, "the second node",
                 worker)

        storage, name, num_trials = tmp_path / "storage", "two-nodes", 30
        exp_dir = storage / name
        args = ["--address", address, "--ckpt-dir", str(tiny_cm_run), "--num-trials", str(num_trials),
                "--storage", str(storage), "--name", name, "--max-failures", "3", *FAST, "--fid-samples", "2000"]
        driver = start_driver(args, tmp_path / "driver.log", env)

        def trial_actor_on_second_node() -> bool:  # a trial actor lives on the second node's raylet
            return len(trial_scores(exp_dir)) >= 1 and any(
                cmd.startswith(("ray::LcscTrial", "ray::ResourceTrainable")) for cmd in session_pids(worker.pid).values())

        wait_for(trial_actor_on_second_node, 180, "a trial actor on the second node", driver, poll=0.05)
        kill_session(worker.pid)  # the second node's raylet, agents and workers, at once
        code = driver.wait(timeout=300)
        assert code == 0, (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        for process in (driver, worker, head):
            if process is not None:
                kill_session(process.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)
    results = json.loads((exp_dir / "final" / "results.json").read_text())
    assert results["search"]["trials_completed"] == num_trials and results["search"]["trials_errored"] == 0
