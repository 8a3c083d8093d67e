"""The reproduction report generator (benchmarks/run_all.py) end to end on tiny real runs, and the GPU check's
behaviour on a machine without a GPU. The report's numbers are meaningless at these sizes; what is checked is
that every item runs through the product's paths and lands in the report with its plots."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ITEMS = ["## 1. LCSC vs baselines", "## 2. Fewer sampling steps", "## 3. Training-cost reduction",
         "## 4. Search efficiency", "## 6. GPU check"]
PLOTS = ["item1_baselines.png", "item1_cm_coefficients_seed0.png", "item1_dm_coefficients_seed0.png",
         "item2_fewer_steps.png", "item3_training_cost.png", "item4_search_efficiency.png"]


def test_run_all_smoke_writes_every_item_with_plots(tiny_cm_run, tiny_dm_run, tmp_path):
    report = tmp_path / "docs" / "RESULTS.md"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run_all.py"), "--smoke", "--skip-speed", "--cm-run",
         str(tiny_cm_run), "--dm-run", str(tiny_dm_run), "--out", str(report), "--workdir", str(tmp_path / "work")],
        cwd=tmp_path, capture_output=True, text=True, timeout=900, env=os.environ.copy())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = report.read_text()
    positions = [text.index(item) for item in ITEMS]
    assert positions == sorted(positions)
    assert re.search(r"- commit: [0-9a-f]{40}", text)
    assert f"CM `{tiny_cm_run}` (12 checkpoints, steps 5..60)" in text
    # Item 1 lists every baseline of the preset, the post-hoc EMAs included, with a held-out number each.
    for name in ("newest", "uniform", "ema_0.998", "phema_0.1", "**LCSC winner**"):
        rows = [line for line in text.splitlines() if line.startswith(f"| {name} |")]
        assert len(rows) == 2 and all(re.search(r"\| \**\d+\.\d", row) for row in rows), name
    # Item 4 compares lcsc-es with the Nevergrad optimizer over the same trial budget.
    assert re.search(r"\| lcsc-es \| [\d.]+ \| [\d.]+ \|", text) and re.search(r"\| TwoPointsDE \| [\d.]+ \|", text)
    assert "Not run yet: no GPU" in text
    for name in PLOTS:
        assert (report.parent / "results" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_run_all_includes_the_saved_gpu_check_output(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import run_all

    assert "Not run yet" in run_all.item6_gpu(tmp_path)
    (tmp_path / run_all.GPU_CHECK_OUTPUT).write_text("=== lcsc-ray GPU check, 2026-01-01\nH100, 80 GiB\n=== done: 0 step(s) failed\n")
    text = run_all.item6_gpu(tmp_path)
    assert "H100, 80 GiB" in text and "Not run yet" not in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_check_refuses_without_cuda_and_keeps_the_last_output(tmp_path):
    (tmp_path / "benchmarks").mkdir()
    shutil.copy(REPO / "benchmarks" / "gpu_check.sh", tmp_path / "benchmarks")
    saved = tmp_path / "docs" / "results" / "gpu_check.txt"
    saved.parent.mkdir(parents=True)
    saved.write_text("output of an earlier GPU run\n")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(tmp_path / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 2
    assert "torch sees no CUDA device" in proc.stdout + proc.stderr
    assert saved.read_text() == "output of an earlier GPU run\n"
    assert sorted(p.name for p in saved.parent.iterdir()) == ["gpu_check.txt"]
