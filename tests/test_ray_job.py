"""The search as a Ray Job: `ray start --head` on loopback, `ray job submit --working-dir . -- python
launch/tune_cm.py --address auto ...`, and the job read back through the Jobs API (`JobSubmissionClient`).

- A submitted search SUCCEEDS; its job log (what the dashboard's Jobs page and `ray job logs` show) holds the
  search's progress lines and final table, and results.json is written.
- `ray job stop` on a running search acts like Ctrl+C: Ray 2.60 sends SIGTERM to the driver (and its
  children), waits `RAY_JOB_STOP_WAIT_TIME_S` (default 3 s) and then sends SIGKILL. The driver turns SIGTERM
  into Tune's graceful stop, so the log ends with the `stopped: search NAME stopped with ...` line and the
  printed resume command, run as a plain driver against the same head, completes the budget.

The head runs in its own session under a private short temp dir, so the test stops exactly what it started.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from cli_runs import REPO, driver_env, free_port, kill_session, run_driver, trial_scores, wait_for

RAY_CLI = str(Path(sys.executable).parent / "ray")
VENV_BIN = str(Path(sys.executable).parent)
# The working dir Ray zips and uploads to the cluster: the code only (.gitignore'd paths are skipped too).
EXCLUDES = [".venv", ".git", "lcsc_results", "runs", "outputs", "**/__pycache__", ".pytest_cache", "docs/*.png"]
# The wait of `ray job stop` between its SIGTERM and its SIGKILL, read from the head's environment. Ray's
# default of 3 s is too short here: the driver needs 5-10 s on 2 cores to stop and print the resume command.
STOP_WAIT_S = "60"
JOB_FLAGS = ["--fid-samples", "200", "--final-samples", "200", "--top-k", "2", "--max-concurrent", "2"]


class Head(NamedTuple):
    client: Any  # ray.job_submission.JobSubmissionClient
    url: str  # the dashboard, which serves the Jobs API
    env: dict[str, str]  # the head's environment, also right for a driver on this machine
    temp_dir: Path


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A one-node Ray cluster on loopback with the dashboard (and so the Jobs API)."""
    from ray.job_submission import JobSubmissionClient

    logs = tmp_path_factory.mktemp("head")
    temp_dir = Path("/tmp") / f"lcsc-job-{os.getpid()}"  # short: Ray's socket paths must fit in 107 bytes
    gcs_port, dashboard_port = free_port(), free_port()
    # The venv first on PATH (as after `source .venv/bin/activate`), so the job's `python` is the project's.
    env = driver_env(RAY_TMPDIR=str(temp_dir), RAY_JOB_STOP_WAIT_TIME_S=STOP_WAIT_S,
                     PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}")
    log = logs / "head.log"
    with open(log, "w") as handle:
        node = subprocess.Popen(
            [RAY_CLI, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--num-cpus=2",
             f"--temp-dir={temp_dir}", "--disable-usage-stats", f"--ray-client-server-port={free_port()}",
             f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}"],
            stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard_port}"
    try:
        wait_for(lambda: "Ray runtime started" in log.read_text(), 120, "the head node", node)

        def jobs_api():
            try:
                with urllib.request.urlopen(f"{url}/api/version", timeout=5) as response:
                    return response.status == 200
            except OSError:
                return False

        wait_for(jobs_api, 60, "the dashboard's REST API", node, poll=0.5)
        yield Head(JobSubmissionClient(url), url, env, temp_dir)
    finally:
        kill_session(node.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(url: str, env: dict[str, str], job_id: str, search: list[str], log: Path, wait: bool) -> subprocess.Popen:
    """`ray job submit` from the repository root, as a user types it; returns the CLI process."""
    runtime_env = {"excludes": EXCLUDES, "env_vars": {"LCSC_RAY_CACHE": os.environ["LCSC_RAY_CACHE"],
                                                      "TUNE_GLOBAL_CHECKPOINT_S": "1"}}
    command = [RAY_CLI, "job", "submit", "--address", url, "--submission-id", job_id, "--working-dir", ".",
               "--runtime-env-json", json.dumps(runtime_env), *([] if wait else ["--no-wait"]),
               "--", "python", "launch/tune_cm.py", "--address", "auto", *search]
    handle = open(log, "w")  # noqa: SIM115 - owned by the child
    return subprocess.Popen(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def test_submitted_search_succeeds_with_its_log_in_the_jobs_api(head, tiny_cm_run, tmp_path):
    from ray.job_submission import JobStatus

    client, url, env = head.client, head.url, head.env
    storage, name, num_trials = tmp_path / "storage", "as-a-job", 12
    search = ["--ckpt-dir", str(tiny_cm_run), "--num-trials", str(num_trials), "--storage", str(storage),
              "--name", name, *JOB_FLAGS]
    started = time.monotonic()
    cli = _submit(url, env, "lcsc-job-ok", search, tmp_path / "submit.log", wait=True)
    try:
        assert cli.wait(timeout=240) == 0, (tmp_path / "submit.log").read_text()[-3000:]
    finally:
        kill_session(cli.pid)
    print(f"submitted search of {num_trials} trials took {time.monotonic() - started:.1f} s")
    assert client.get_job_status("lcsc-job-ok") == JobStatus.SUCCEEDED
    info = client.get_job_info("lcsc-job-ok")
    assert info.driver_exit_code == 0 and info.entrypoint.startswith("python launch/tune_cm.py --address auto")
    logs = client.get_job_logs("lcsc-job-ok")
    assert f"[lcsc] {name}: {num_trials}/{num_trials} trials, best score" in logs, logs[-3000:]
    assert "LCSC winner" in logs and "results: " in logs, logs[-3000:]
    assert "Ray dashboard: " in logs
    # `ray job submit` without --no-wait tails the same log to the user's terminal.
    assert f"[lcsc] {name}: {num_trials}/{num_trials} trials" in (tmp_path / "submit.log").read_text()
    results = json.loads((storage / name / "final" / "results.json").read_text())
    assert results["search"]["trials_completed"] == num_trials and results["search"]["trials_errored"] == 0
    # The uploaded working dir, as unpacked on the node: the code, not the venv or results.
    unpacked = list((head.temp_dir / "session_latest" / "runtime_resources" / "working_dir_files").glob("*/"))
    assert len(unpacked) == 1 and (unpacked[0] / "launch" / "tune_cm.py").is_file()
    size = sum(path.stat().st_size for path in unpacked[0].rglob("*") if path.is_file())
    assert size < 5 * 2**20 and not (unpacked[0] / ".venv").exists(), f"{size} bytes uploaded"


def test_ray_job_stop_is_ctrl_c_and_the_search_resumes(head, tiny_cm_run, tmp_path):
    from ray.job_submission import JobStatus

    client, url, env, temp_dir = head.client, head.url, head.env, head.temp_dir
    storage, name, num_trials = tmp_path / "storage", "job-stopped", 60
    exp_dir = storage / name
    search = ["--ckpt-dir", str(tiny_cm_run), "--num-trials", str(num_trials), "--storage", str(storage),
              "--name", name, *JOB_FLAGS]
    cli = _submit(url, env, "lcsc-job-stop", search, tmp_path / "submit.log", wait=False)
    assert cli.wait(timeout=120) == 0, (tmp_path / "submit.log").read_text()[-3000:]
    wait_for(lambda: len(trial_scores(exp_dir)) >= 6, 180, "6 trial results of the submitted search", poll=0.1)
    assert client.get_job_status("lcsc-job-stop") == JobStatus.RUNNING

    started = time.monotonic()
    assert client.stop_job("lcsc-job-stop")  # what `ray job stop` and the Jobs page's Stop button call
    wait_for(lambda: client.get_job_status("lcsc-job-stop") == JobStatus.STOPPED, 120, "status STOPPED", poll=0.1)
    stop_seconds = time.monotonic() - started
    # The job supervisor's own log says whether the driver exited within the wait or was SIGKILLed.
    supervisor = (temp_dir / "session_latest" / "logs" / "jobs" / "supervisor-lcsc-job-stop.log").read_text()
    assert "Job lcsc-job-stop has been terminated gracefully with SIGTERM" in supervisor
    assert "force-killed with SIGKILL" not in supervisor
    logs = client.get_job_logs("lcsc-job-stop")
    lines = [line for line in logs.splitlines() if line.strip()]
    stopped = next((line for line in reversed(lines) if line.startswith("stopped: ")), None)
    print(f"stopped gracefully {stop_seconds:.1f} s after stop_job; last log lines:\n" + "\n".join(lines[-4:]))
    assert stopped is not None and stopped.startswith(f"stopped: search {name} stopped with "), logs[-3000:]
    assert f"of {num_trials} trials completed" in stopped
    assert not (exp_dir / "final").exists(), "a stopped search must not export or write results"

    command = shlex.split(stopped.split("continue it with: ", 1)[1])
    assert command[:2] == ["python", "launch/tune_cm.py"] and "--resume" in command and "auto" in command
    # The printed command, run on the head node as a plain driver: `--address auto` finds the head there
    # (through the head's temp dir, here RAY_TMPDIR; /tmp/ray by default).
    code = run_driver(command[2:], tmp_path / "resume.log", env=env, timeout=240)
    resumed = (tmp_path / "resume.log").read_text()
    assert code == 0, resumed[-3000:]
    assert "Connecting to existing Ray cluster" in resumed
    results = json.loads((exp_dir / "final" / "results.json").read_text())
    assert results["search"]["trials_completed"] == num_trials and results["search"]["trials_errored"] == 0
