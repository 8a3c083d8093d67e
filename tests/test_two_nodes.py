"""A Ray cluster on this machine (`ray start --head` + `ray start --address`), the search run against it
with `--address`, and a node killed while it runs a trial: that trial is retried on another node
(`FailureConfig`) and the search finishes with the full trial count.

The head has no CPUs and two worker nodes one each, so trials only run where a node can be killed without
taking the cluster down, and whichever node the busy trial actor lands on is the one killed (Tune may keep
reusing one actor for every trial, so waiting for a trial on a chosen node can wait in vain).

Each node runs in its own session under a private temp dir, so the test stops exactly what it started.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import ray

from cli_runs import (FAST, driver_env, free_port, kill_session, session_pids, start_driver, trial_failures,
                      wait_for)

RAY_CLI = str(Path(sys.executable).parent / "ray")


def _start_node(args: list[str], temp_dir: Path, env: dict[str, str], log: Path, cpus: int = 1,
                prefix: tuple[str, ...] = ()) -> subprocess.Popen:
    """`ray start --block` in a session of its own (`prefix`: a command that runs it, e.g. in a mount namespace)."""
    handle = open(log, "w")  # noqa: SIM115 - owned by the child
    return subprocess.Popen([*prefix, RAY_CLI, "start", "--block", f"--num-cpus={cpus}", f"--temp-dir={temp_dir}",
                             "--disable-usage-stats", *args],
                            stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def test_search_survives_losing_a_node_mid_trial(tiny_cm_run, tmp_path):
    temp_dir = Path("/tmp") / f"lcsc-2n-{os.getpid()}"  # short: Ray's socket paths must fit in 107 bytes
    env = driver_env(RAY_TMPDIR=str(temp_dir))
    ip = ray.util.get_node_ip_address()
    gcs_port = free_port()
    address = f"{ip}:{gcs_port}"
    head = _start_node(["--head", f"--port={gcs_port}", "--include-dashboard=false",
                        f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}"],
                       temp_dir, env, tmp_path / "head.log", cpus=0)
    workers: list[subprocess.Popen] = []
    driver = None
    try:
        wait_for(lambda: "Ray runtime started" in (tmp_path / "head.log").read_text(), 120, "the head node", head)
        for i in range(2):
            log = tmp_path / f"worker{i}.log"
            workers.append(_start_node([f"--address={address}", f"--dashboard-agent-listen-port={free_port()}",
                                        f"--metrics-export-port={free_port()}"], temp_dir, env, log))
            wait_for(lambda: "Ray runtime started" in log.read_text(), 120, f"worker node {i}", workers[-1])

        storage, name, num_trials = tmp_path / "storage", "two-nodes", 30
        exp_dir = storage / name
        args = ["--address", address, "--ckpt-dir", str(tiny_cm_run), "--num-trials", str(num_trials),
                "--storage", str(storage), "--name", name, "--max-failures", "3", *FAST, "--fid-samples", "2000"]
        driver = start_driver(args, tmp_path / "driver.log", env)

        def running_trial() -> tuple[subprocess.Popen, int] | None:
            """(node, pid) of a trial actor executing a trial right now: Ray titles a worker
            `ray::<Class>.<method>` while it runs a method and `ray::<Class>` between calls, and only a trial
            that is running when its node dies is failed and retried (an idle actor's death is not counted)."""
            return next(((node, pid) for node in workers for pid, cmd in session_pids(node.pid).items()
                         if cmd.startswith("ray::LcscTrial.train")), None)

        node, pid = wait_for(running_trial, 180, "a trial running on a worker node", driver, poll=0.02)
        os.kill(pid, signal.SIGKILL)  # first the busy actor, before its step can finish
        kill_session(node.pid)  # then the rest of its node: raylet, agents and workers
        code = driver.wait(timeout=300)
        assert code == 0, (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        for process in (driver, *workers, head):
            if process is not None:
                kill_session(process.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)
    results = json.loads((exp_dir / "final" / "results.json").read_text())
    assert results["search"]["trials_completed"] == num_trials and results["search"]["trials_errored"] == 0
    assert sum(trial_failures(exp_dir).values()) >= 1, "no trial was retried after its node died"


def test_search_on_a_worker_node_that_cannot_see_the_drivers_folders(tiny_cm_run, tmp_path):
    """A cluster without a shared file system: `--storage s3://...` (moto's S3 server on 127.0.0.1), a head
    node with no CPUs, and one worker node started under `unshare --mount` with empty tmpfs mounted over the
    driver's cache folder (`LCSC_RAY_CACHE`: the scratch copy of the experiment with its candidate store, the
    reference statistics, the digits extractor's weights) and over the checkpoint run folder. Every trial, the
    held-out scoring and the export run on that node: the stack and the reference statistics reach it through
    Ray's object store, candidate values in the trial configs, and the records go to the bucket.

    Not isolated on one machine: Ray's temp dir (the nodes' sockets and session logs; nothing of the search is
    there) and the Python environment with the code, which every node of a real cluster installs too."""
    from object_storage import s3_bucket, with_credentials

    from lcsc_ray.paths import cache_dir
    from lcsc_ray.remote_storage import SCRATCH

    hidden = [cache_dir(), Path(tiny_cm_run)]
    temp_dir = Path("/tmp") / f"lcsc-2i-{os.getpid()}"
    env = with_credentials(driver_env(RAY_TMPDIR=str(temp_dir)))
    ip = ray.util.get_node_ip_address()
    gcs_port = free_port()
    address = f"{ip}:{gcs_port}"
    mounts = " && ".join(f'mount -t tmpfs tmpfs "${i + 1}"' for i in range(len(hidden)))
    isolate = ("unshare", "--mount", "sh", "-c", f'{mounts} && shift {len(hidden)} && exec "$@"', "isolate",
               *map(str, hidden))
    processes: list[subprocess.Popen] = []
    with s3_bucket() as bucket:
        try:
            processes.append(_start_node(["--head", f"--port={gcs_port}", "--include-dashboard=false",
                                          f"--dashboard-agent-listen-port={free_port()}",
                                          f"--metrics-export-port={free_port()}"],
                                         temp_dir, env, tmp_path / "head.log", cpus=0))
            wait_for(lambda: "Ray runtime started" in (tmp_path / "head.log").read_text(), 120, "the head node",
                     processes[0])
            processes.append(_start_node([f"--address={address}", f"--dashboard-agent-listen-port={free_port()}",
                                          f"--metrics-export-port={free_port()}"], temp_dir, env,
                                         tmp_path / "worker.log", cpus=2, prefix=isolate))
            worker = processes[-1]
            wait_for(lambda: "Ray runtime started" in (tmp_path / "worker.log").read_text(), 120,
                     "the isolated worker node", worker)
            raylet = next(pid for pid, cmd in session_pids(worker.pid).items() if "raylet" in cmd.split(" ")[0])
            seen_by_worker = Path(f"/proc/{raylet}/root") / str(cache_dir()).lstrip("/")
            assert not (seen_by_worker / SCRATCH).exists() and not any(
                (Path(f"/proc/{raylet}/root") / str(tiny_cm_run).lstrip("/")).iterdir()), "the worker sees the folders"

            name, num_trials = "isolated", 12
            args = ["--address", address, "--ckpt-dir", str(tiny_cm_run), "--num-trials", str(num_trials),
                    "--storage", bucket.uri("runs"), "--name", name, *FAST]
            driver = start_driver(args, tmp_path / "driver.log", env)
            processes.append(driver)
            code = driver.wait(timeout=300)
            assert code == 0, (tmp_path / "driver.log").read_text()[-3000:]
            assert not (seen_by_worker / SCRATCH).exists(), "the driver's scratch copy leaked to the worker node"
            assert (seen_by_worker / "shipped").is_dir(), "the worker did not get the driver's input files via Ray"
        finally:
            for process in reversed(processes):
                kill_session(process.pid)
            shutil.rmtree(temp_dir, ignore_errors=True)
        results = json.loads(bucket.read(f"runs/{name}/final/results.json"))
    assert results["search"]["trials_completed"] == num_trials and results["search"]["trials_errored"] == 0
    assert (cache_dir() / SCRATCH).is_dir()  # the driver kept its working copy on its own disk
