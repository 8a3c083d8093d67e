"""`--storage s3://...` through the real CLI against a real S3 endpoint (moto's server on 127.0.0.1), with real
Ray: no mocks.

- A search writes everything to the bucket and nothing to the driver's working directory (an empty folder
  that stays empty); killed with SIGKILL mid-search and its local scratch copy deleted, `--resume` with the
  same URI downloads the experiment from the bucket, replays the finished evaluations recorded there and
  completes the full trial count, with results, report and export in the bucket.
- An endpoint nobody listens on, and credentials the endpoint refuses, are each one line naming --storage
  and exit status 2, before Ray starts.

The drivers share one Ray cluster for the module (`ray start --head`, joined with --address).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from cli_runs import FAST, driver_env, free_port, kill_session, run_driver, start_driver, wait_for
from object_storage import s3_bucket, with_credentials
from test_two_nodes import _start_node

from lcsc_ray.remote_storage import RemoteStorage


@pytest.fixture(scope="module")
def bucket():
    with s3_bucket() as made:
        yield made


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(address, env) of a one-node Ray cluster with two CPUs that every driver of this module joins."""
    temp_dir = Path("/tmp") / f"lcsc-s3-{os.getpid()}"  # short: Ray's socket paths must fit in 107 bytes
    env = with_credentials(driver_env(RAY_TMPDIR=str(temp_dir)))
    port = free_port()
    log = tmp_path_factory.mktemp("cluster") / "head.log"
    head = _start_node(["--head", f"--port={port}", "--include-dashboard=false",
                        f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}"],
                       temp_dir, env, log, cpus=2)
    try:
        wait_for(lambda: "Ray runtime started" in log.read_text(), 120, "the head node", head)
        yield f"{ray.util.get_node_ip_address()}:{port}", env
    finally:
        kill_session(head.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _records(bucket, prefix: str) -> int:
    return sum(key.endswith(".result.json") for key in bucket.keys(prefix))


def test_search_in_a_bucket_survives_kill_and_resumes_from_it(tiny_cm_run, tmp_path, bucket, cluster):
    address, env = cluster
    uri, name, num_trials = bucket.uri("searches"), "s3-resume", 16
    prefix = f"searches/{name}/"
    workdir = tmp_path / "workdir"  # the driver's working directory: must stay empty
    workdir.mkdir()
    args = ["--address", address, "--ckpt-dir", str(tiny_cm_run), "--num-trials", str(num_trials),
            "--storage", uri, "--name", name, *FAST]

    driver = start_driver(args, tmp_path / "first.log", env, cwd=workdir)
    try:
        wait_for(lambda: _records(bucket, prefix) >= 6, 240, "6 evaluations recorded in the bucket", driver, poll=0.2)
    finally:
        kill_session(driver.pid)  # kill -9: no last sync, no final stage
    assert not any(key.startswith(f"{prefix}final/") for key in bucket.keys(prefix))
    recorded = _records(bucket, prefix)
    scratch = RemoteStorage(uri).scratch  # the same cache folder as the driver's (conftest's LCSC_RAY_CACHE)
    assert (scratch / name).is_dir()
    shutil.rmtree(scratch)  # the resume must get the experiment from the bucket, not from this machine

    code = run_driver([*args, "--resume"], tmp_path / "resume.log", env, cwd=workdir)
    log = (tmp_path / "resume.log").read_text()
    assert code == 0, log[-3000:]
    assert f"experiment and results copied to {bucket.uri(f'searches/{name}')}" in log
    results = json.loads(bucket.read(f"{prefix}final/results.json"))
    assert results["search"]["trials_completed"] == num_trials and results["search"]["trials_errored"] == 0
    keys = set(bucket.keys(prefix))
    for wanted in ("lcsc_search.json", "tuner.pkl", "progress.png", "final/results.md", "final/report.html",
                   "final/lcsc_merged.safetensors", "final/samples_lcsc_winner.png"):
        assert prefix + wanted in keys, f"{wanted} is not in the bucket"
    assert _records(bucket, prefix) == num_trials
    replayed = 0
    for key in keys:
        if key.endswith("/result.json") and "/trial_" in key:
            replayed += sum(bool(json.loads(line).get("replayed")) for line in bucket.read(key).decode().splitlines()
                            if line.strip().startswith("{") and line.strip().endswith("}"))
    assert replayed >= 1 and recorded >= 6, "nothing recorded before the kill was replayed from the bucket"
    assert not list(workdir.iterdir()), f"the driver wrote to its working directory: {list(workdir.iterdir())}"


def _moto_with_authentication(port: int, log: Path) -> subprocess.Popen:
    """moto's server as its own process, checking credentials (it accepts any key otherwise)."""
    handle = open(log, "w")  # noqa: SIM115 - owned by the child
    moto = Path(sys.executable).parent / "moto_server"
    return subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)], stdout=handle,
                            stderr=subprocess.STDOUT, env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
                            start_new_session=True)


def test_unreachable_storage_and_refused_credentials_are_one_line_before_ray(tiny_cm_run, tmp_path, bucket):
    port = free_port()
    strict = _moto_with_authentication(port, tmp_path / "moto.log")
    env = with_credentials(driver_env())
    cases = {
        "unreachable": (f"s3://{bucket.name}/x?endpoint_override=http://127.0.0.1:{free_port()}&scheme=http", env),
        "credentials": (f"s3://{bucket.name}/x?endpoint_override=http://127.0.0.1:{port}&scheme=http",
                        {**env, "AWS_ACCESS_KEY_ID": "wrong", "AWS_SECRET_ACCESS_KEY": "wrong"}),
    }
    try:
        wait_for(lambda: "Running on" in (tmp_path / "moto.log").read_text(), 60, "moto with authentication", strict)
        drivers = {case: start_driver(["--ckpt-dir", str(tiny_cm_run), "--storage", uri, *FAST],
                                      tmp_path / f"{case}.log", case_env, cwd=tmp_path)
                   for case, (uri, case_env) in cases.items()}
        for case, driver in drivers.items():
            try:
                assert driver.wait(timeout=120) == 2
            finally:
                kill_session(driver.pid)
    finally:
        kill_session(strict.pid)
    for case, (uri, _) in cases.items():
        lines = [line for line in (tmp_path / f"{case}.log").read_text().splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"error: --storage {uri}: cannot reach or write it"), lines
        assert "AWS_ACCESS_KEY_ID" in lines[0]


def test_mirror_copies_an_experiment_to_the_bucket_and_a_resume_gets_it_back(bucket, tmp_path, monkeypatch):
    """The working copy and its mirror without Ray: atomic writes reach the bucket at once, other files at the
    next sync, temporary files and other experiments never, removed files are deleted; `prepare` refuses a
    new search over an existing experiment and downloads it for a resume."""
    from lcsc_ray.atomic import atomic_write_text
    from lcsc_ray.errors import LcscError
    from lcsc_ray.remote_storage import Mirror, read_object, rebased, write_object

    monkeypatch.setenv("LCSC_RAY_CACHE", str(tmp_path / "cache"))
    for variable, value in with_credentials({}).items():
        monkeypatch.setenv(variable, value)
    storage = RemoteStorage(bucket.uri("unit"))
    storage.check()
    storage.prepare("exp", resume=False)
    local = storage.scratch / "exp"
    mirror = Mirror(storage, "exp")
    try:
        atomic_write_text(local / "lcsc_search.json", "{}")
        assert bucket.read("unit/exp/lcsc_search.json") == b"{}"  # at once, not at the next sync
        (local / "trial_1").mkdir()
        (local / "trial_1" / "result.json").write_text("{}\n")
        (local / ".tmp_experiment_state").write_text("half")
        (storage.scratch / "other").mkdir()
        (storage.scratch / "other" / "x").write_text("not this experiment")
        mirror.sync()
        files = {key for key in bucket.keys("unit/") if not key.endswith("/")}
        assert files == {"unit/exp/lcsc_search.json", "unit/exp/trial_1/result.json"}
        (local / "trial_1" / "result.json").unlink()
        mirror.sync()
        assert "unit/exp/trial_1/result.json" not in bucket.keys("unit/")
        old = tmp_path / "elsewhere" / "remote-storage" / storage.scratch.name / "exp" / "candidates" / "a.npy"
        assert rebased(old) == local / "candidates" / "a.npy"
    finally:
        assert mirror.close() is None
    write_object(storage.uri_of("exp", "candidates", "r.result.json"), b'{"rounds": []}')
    assert read_object(storage.uri_of("exp", "candidates", "r.result.json")) == b'{"rounds": []}'
    assert read_object(storage.uri_of("exp", "missing")) is None
    with pytest.raises(LcscError, match="experiment exp exists in s3://"):
        storage.prepare("exp", resume=False)
    shutil.rmtree(storage.scratch)
    storage.prepare("exp", resume=True)
    assert (local / "lcsc_search.json").read_text() == "{}" and (local / "candidates" / "r.result.json").is_file()
    with pytest.raises(LcscError, match="no experiment nope in s3://"):
        storage.prepare("nope", resume=True)


def test_s3_clients_are_gone_before_pyarrow_shuts_the_sdk_down_at_exit(bucket):
    """An S3 client destroyed after pyarrow's exit hook has shut the AWS SDK down crashes the interpreter now
    and then (a test run once ended in a segmentation fault after every test had passed). The hook below is
    registered after pyarrow's and before the module's own, so it runs between the two: at that moment the
    process may hold no S3 client any more."""
    script = f"""
import atexit, sys
import pyarrow.fs
def just_before_pyarrow_finalizes():
    from lcsc_ray import remote_storage
    print("clients left:", remote_storage._filesystem.cache_info().currsize, flush=True)
atexit.register(just_before_pyarrow_finalizes)
from lcsc_ray.remote_storage import RemoteStorage, read_object, write_object
storage = RemoteStorage({bucket.uri("exit")!r})
storage.check()
write_object(storage.uri_of("x"), b"1")
assert read_object(storage.uri_of("x")) == b"1"
"""
    done = subprocess.run([sys.executable, "-c", script], env=with_credentials(dict(os.environ)),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "clients left: 0" in done.stdout, done.stdout + done.stderr
