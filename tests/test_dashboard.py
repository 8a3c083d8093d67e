"""The Ray dashboard and the live search metrics of a real `launch/tune_cm.py` driver.

One search runs with the dashboard bound to this machine's own (non-loopback) address, token
authentication on (Ray 2.60's default for a new local cluster, with a known token so no file under ~/.ray is
written) and a free port. While it runs, the test checks what a user sees: the warning and the URL with the
token hint, the REST API (401 without the token, answers with it), the trial actors, and the
`ray.util.metrics` values the driver's `SearchMonitor` exports at the node's metrics endpoint.
"""

from __future__ import annotations

import json
import re
import secrets
import urllib.error
import urllib.request

import pytest
import ray

from cli_runs import FAST, driver_env, free_port, kill_session, start_driver, wait_for
from lcsc_ray.cluster import dashboard_auth_mode, is_loopback
from lcsc_ray.search.trial import PENALTY_SCORE


def _get(url: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")
    except OSError:
        return 0, ""


def _metric(text: str, name: str, experiment: str) -> float | None:
    """Value of the Prometheus sample `name{...experiment="<experiment>"...}` in a /metrics page."""
    for line in text.splitlines():
        if line.startswith(name + "{") and f'experiment="{experiment}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return None


def test_is_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.0.2.2") and not is_loopback("example.org")


def test_dashboard_rest_api_and_live_metrics_during_a_search(tiny_cm_run, tmp_path):
    host = ray.util.get_node_ip_address()
    if is_loopback(host):
        pytest.skip("this machine has no non-loopback address")
    port, token, name = free_port(), secrets.token_hex(32), "watched"
    log = tmp_path / "driver.log"
    env = driver_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    # A budget far beyond what the checks need: the driver is stopped once they have passed.
    args = ["--ckpt-dir", str(tiny_cm_run), "--num-trials", "2000", "--storage", str(tmp_path / "storage"),
            "--name", name, "--dashboard-host", host, "--dashboard-port", str(port), *FAST]
    args.remove("--quiet")  # the URL and the token hint are printed unless --quiet
    driver = start_driver(args, log, env)
    try:
        url = wait_for(lambda: re.search(r"^Ray dashboard: (\S+)$", log.read_text(), re.M), 180,
                       "the dashboard URL", driver).group(1)
        text = log.read_text()
        assert url == f"http://{host}:{port}"
        assert f"warning: the Ray dashboard will listen on {host}:{port}" in text
        assert "`ray get-auth-token`" in text  # the token hint, since token authentication is on
        assert dashboard_auth_mode(url) == "token"

        status, _ = _get(f"{url}/api/version")
        assert status == 401
        status, body = _get(f"{url}/api/version", token)
        assert status == 200 and json.loads(body)["ray_version"] == ray.__version__

        def running_trial_actor():
            status, body = _get(f"{url}/api/v0/actors?detail=true", token)
            actors = json.loads(body)["data"]["result"]["result"] if status == 200 else []
            return [a for a in actors if a["class_name"] == "LcscTrial" and a["state"] == "ALIVE"]

        actor = wait_for(running_trial_actor, 120, "an ALIVE trial actor in /api/v0/actors", driver)[0]
        assert actor["pid"] > 0

        status, body = _get(f"{url}/nodes?view=summary", token)
        metrics_port = json.loads(body)["data"]["summary"][0]["raylet"]["metricsExportPort"]
        metrics_url = f"http://{host}:{metrics_port}/metrics"

        def exported():  # the driver's ray.util.metrics reach the node's Prometheus endpoint (every ~10 s)
            page = _get(metrics_url)[1]
            done = _metric(page, "ray_lcsc_trials_completed", name)
            return page if done and done >= 2 else None

        page = wait_for(exported, 120, "lcsc metrics at the node's /metrics endpoint", driver)
        best = _metric(page, "ray_lcsc_best_score", name)
        assert best is not None and 0 < best < PENALTY_SCORE
        for stage in ("merge", "sample", "features", "distance"):
            assert re.search(rf'^ray_lcsc_trial_stage_seconds_count{{[^}}]*stage="{stage}"[^}}]*}} [1-9]', page, re.M)
        assert driver.poll() is None, "the search should still be running"
    finally:
        kill_session(driver.pid)
