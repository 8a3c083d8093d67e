"""The search's `ray_lcsc_*` metrics reach Prometheus (Debian's `prometheus` package) started on the config
Ray writes under `<temp dir>/session_latest/metrics/prometheus/prometheus.yml`, and every query of the shipped
Grafana dashboard (docs/grafana/lcsc_search_dashboard.json) is valid PromQL that returns data during a search.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from cli_runs import FAST, REPO, driver_env, free_port, kill_session, start_driver, wait_for
from lcsc_ray.search.trial import PENALTY_SCORE

DASHBOARD = REPO / "docs" / "grafana" / "lcsc_search_dashboard.json"
PROMETHEUS = shutil.which("prometheus")


def _query(port: int, expr: str) -> dict:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:  # a bad query answers 400 with the parse error
        return json.loads(error.read())
    except OSError:
        return {}


def _dashboard_queries(experiment: str) -> dict[str, str]:
    """panel title -> each PromQL expression of the dashboard, with its variables filled in."""
    queries = {}
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for i, target in enumerate(panel.get("targets", [])):
            expr = target["expr"].replace("$experiment", experiment).replace("$__rate_interval", "1m")
            queries[f"{panel['title']} #{i}"] = expr
    return queries


def test_dashboard_json_is_grafana_provisionable():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["panels"]
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"datasource", "experiment"}
    exprs = " ".join(_dashboard_queries("x").values())
    for metric in ("ray_lcsc_best_score", "ray_lcsc_trials_completed", "ray_lcsc_trial_stage_seconds_bucket"):
        assert metric in exprs


@pytest.mark.skipif(PROMETHEUS is None, reason="no prometheus binary (apt-get install prometheus)")
def test_prometheus_scrapes_the_search_metrics_with_rays_generated_config(tiny_cm_run, tmp_path):
    temp_dir = Path("/tmp") / f"lcsc-prom-{os.getpid()}"  # short: Ray's socket paths must fit in 107 bytes
    name, port = "scraped", free_port()
    # A budget far beyond what the checks need: the driver is stopped once they have passed.
    args = ["--ckpt-dir", str(tiny_cm_run), "--num-trials", "2000", "--storage", str(tmp_path / "storage"),
            "--name", name, "--dashboard-port", str(free_port()), *FAST]
    driver = start_driver(args, tmp_path / "driver.log", driver_env(RAY_TMPDIR=str(temp_dir)))
    prometheus = None
    try:
        # Ray's dashboard (its metrics module) writes the config at start; it points Prometheus at a file of the
        # nodes' metrics ports that Ray keeps up to date (file_sd_configs).
        config = wait_for(lambda: next(temp_dir.glob("**/session_latest/metrics/prometheus/prometheus.yml"), None),
                          120, "Ray's generated prometheus.yml", driver)
        with open(tmp_path / "prometheus.log", "w") as log:
            prometheus = subprocess.Popen(
                [PROMETHEUS, f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}",
                 f"--storage.tsdb.path={tmp_path / 'tsdb'}"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        def best_score():
            result = _query(port, f'ray_lcsc_best_score{{experiment="{name}"}}').get("data", {}).get("result")
            return float(result[0]["value"][1]) if result else None

        best = wait_for(best_score, 150, "ray_lcsc_best_score in Prometheus", driver, poll=2)
        assert 0 < best < PENALTY_SCORE

        # Every dashboard query parses and the rate panels have data once two scrapes of a counter exist.
        queries = _dashboard_queries(name)
        answers = {title: _query(port, expr) for title, expr in queries.items()}
        assert all(a.get("status") == "success" for a in answers.values()), answers

        def charted():
            empty = [title for title, expr in queries.items() if not _query(port, expr).get("data", {}).get("result")]
            return not empty or None

        wait_for(charted, 90, "data in every dashboard panel", driver, poll=2)
        assert driver.poll() is None, "the search should still be running"
    finally:
        for process in (prometheus, driver):
            if process is not None:
                kill_session(process.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)
