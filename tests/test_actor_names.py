"""What a user watching a running search sees without reading the driver's output: the trial actors in the
Ray dashboard (our class name, a repr with the trial index, label and stage; read through the State API,
which serves the dashboard's Actors page) and the `progress.png` the driver keeps redrawing in the experiment
folder. One real `launch/tune_cm.py` driver with a large budget serves both tests and is stopped after them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import pytest
from ray.util.state import list_actors

from cli_runs import FAST, free_port, kill_session, start_driver, wait_for
from lcsc_ray.search.monitor import PROGRESS_PLOT, PROGRESS_PLOT_EVERY_S

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPR = re.compile(r"^LcscTrial\(trial \d+, (baseline:\S+|search), (setup|loading stack|scoring|idle|replay), "
                  r"last score \S+\)$")


@pytest.fixture(scope="module")
def watched_search(tiny_cm_run, tmp_path_factory) -> Iterator[tuple[str, Path, Path]]:
    """(dashboard URL, experiment folder, driver log) of a search that runs until the module's tests end."""
    tmp = tmp_path_factory.mktemp("watched")
    log, exp_dir = tmp / "driver.log", tmp / "storage" / "watched"
    args = ["--ckpt-dir", str(tiny_cm_run), "--num-trials", "2000", "--storage", str(exp_dir.parent),
            "--name", exp_dir.name, "--dashboard-host", "127.0.0.1", "--dashboard-port", str(free_port()), *FAST]
    args.remove("--quiet")  # the dashboard URL is printed unless --quiet
    driver = start_driver(args, log)
    try:
        url = wait_for(lambda: re.search(r"^Ray dashboard: (\S+)$", log.read_text(), re.M), 180,
                       "the dashboard URL", driver).group(1)
        yield url, exp_dir, log
        assert driver.poll() is None, "the search should still be running"
    finally:
        kill_session(driver.pid)


def test_trial_actors_carry_our_class_name_and_a_readable_repr(watched_search):
    url, _, _ = watched_search

    def trial_actors():
        actors = list_actors(address=url, filters=[("state", "=", "ALIVE")], detail=True,
                             raise_on_missing_output=False)
        return [a for a in actors if a.class_name == "LcscTrial"]

    actors = wait_for(trial_actors, 120, "an ALIVE LcscTrial actor in the State API")
    for actor in actors:
        assert REPR.match(actor.repr_name), actor.repr_name
    every_class = {a.class_name for a in list_actors(address=url, detail=True, raise_on_missing_output=False)}
    assert not any("<locals>" in name or "ResourceTrainable" in name for name in every_class), every_class


def test_progress_plot_is_announced_written_and_redrawn(watched_search):
    _, exp_dir, log = watched_search
    path = exp_dir / PROGRESS_PLOT
    assert f"live plot of the search: {path}" in log.read_text()
    wait_for(path.is_file, 120, f"{path}")
    assert path.read_bytes()[:8] == PNG_MAGIC
    first = path.stat().st_mtime_ns
    wait_for(lambda: path.stat().st_mtime_ns != first, PROGRESS_PLOT_EVERY_S + 30, f"{path} redrawn", poll=1.0)
    assert path.read_bytes()[:8] == PNG_MAGIC
