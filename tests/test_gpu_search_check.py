"""The GPU check's search step (benchmarks/gpu_search_check.py) end to end on the CPU at a tiny size, so that
GPU time is spent measuring rather than debugging: the same run folder, reference statistics, tune_cm.py
searches and summary, with the device split into CPU shares instead of GPU fractions; and the random-weight
Inception it uses when the FID weights are absent."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lcsc_ray.errors import LcscError
from lcsc_ray.features import build_extractor

REPO = Path(__file__).resolve().parents[1]
STAGES = ("merge", "sample", "features", "statistics", "distance")
NUMBER = r"\d+(?:\.\d+)?"


def test_search_check_runs_every_share_on_cpu_and_prints_the_summary(tmp_path):
    # An empty torch hub folder: no FID weights, so the check must take (and say it takes) random Inception.
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch")}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_search_check.py"), "--device", "cpu", "--model", "tiny",
         "--checkpoints", "4", "--trials", "4", "--samples", "4", "--final-samples", "4", "--heldout-seeds", "2",
         "--reference-images", "16",
         "--batch-size", "4", "--shares", "1,0.5", "--cpus", "2"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "extractor inception-random, metric fd_inception_random" in out  # the statistics' metadata
    assert "RANDOM weights" in out and "not FID" in out
    rows = {}
    for line in out.splitlines():
        match = re.match(rf"({NUMBER}) +(\d+) +(\d+)/(\d+) +({NUMBER}) +(\d+|n/a) +({NUMBER}) +({NUMBER})x +n/a +"
                         rf"({NUMBER})  (.*)$", line)
        if match:
            rows[match[1]] = match
    assert set(rows) == {"1", "0.5"}, out
    for share, concurrent in (("1", "1"), ("0.5", "2")):
        row = rows[share]
        assert row[2] == concurrent and row[3] == "4", row[0]  # the whole budget of 4 trials completed
        assert float(row[5]) > 0 and float(row[7]) > 0 and float(row[9]) > 0, row[0]
        stages = dict(re.findall(rf"(\w+) ({NUMBER})", row[10]))
        assert set(STAGES) <= set(stages), row[0]
    assert rows["1"][8] == "1.00"  # the scaling ratio is relative to one trial at a time


def test_random_inception_is_deterministic_and_never_called_fid():
    first, second = build_extractor("inception-random"), build_extractor("inception-random")
    assert (first.name, first.metric_name, first.dim) == ("inception-random", "fd_inception_random", 2048)
    assert first.identity == second.identity and "seed0" in first.identity
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    features = first(images)
    assert torch.equal(features, second(images))  # the statistics' process and the trials' agree
    assert features.isfinite().all() and 1e-3 < features.abs().mean() < 1e3  # O(1): fine for float32 statistics
    with pytest.raises(LcscError, match="random weights"):
        build_extractor("inception-random", inception_weights="weights.pth")
