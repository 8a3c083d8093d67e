"""A scoring process keeps its freed buffers in the heap instead of faulting them in again at each evaluation.

Each check runs in a fresh Python process (the malloc settings are per process and cannot be undone) and
counts the minor page faults of allocating, filling and freeing a 48 MiB tensor, 40 times (the last 16 count).
The block is above glibc's largest dynamic mmap threshold (32 MiB), so with the defaults every round maps new
pages and faults all of them in."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import json, resource, sys, torch
{setup}
faults = []
for _ in range(40):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.empty(48 * 2 ** 20, dtype=torch.uint8)
    block.fill_(1)
    del block
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# With the settings, the block is still carved anew while the probe's own small allocations fragment the
# heap's free space; a free chunk that fits it formed within 5-9 rounds in 30 runs (CI once took 9 or more)
print(json.dumps(faults[-16:]))
"""
PAGES_PER_ROUND = 48 * 2 ** 20 // 4096

SCORER_SETUP = """
from lcsc_ray.checkpoints import discover_checkpoints
from lcsc_ray.reference_stats import ensure_reference_stats
from lcsc_ray.run_folder import load_run
from lcsc_ray.scoring import CandidateScorer, ScoringSpec
run = load_run(sys.argv[1])
spec = ScoringSpec(run_dir=sys.argv[1], files=tuple(discover_checkpoints(run.checkpoint_dir)), extractor="digits",
                   batch_size=100, threads=1, reference_stats=str(ensure_reference_stats("digits", "digits")))
CandidateScorer(spec).score([1.0 / len(spec.files)] * len(spec.files), seed=0, num_samples=100)
"""

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's")


def probe_faults(setup: str, *args: str) -> list[int]:
    proc = subprocess.run([sys.executable, "-c", PROBE.format(setup=setup), *args], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_retain_freed_memory_stops_the_faults_of_a_reused_block():
    default = probe_faults("")
    retained = probe_faults("from lcsc_ray.host_memory import retain_freed_memory\nassert retain_freed_memory()")
    assert min(default) > PAGES_PER_ROUND // 2, default  # the probe sees the faults it is meant to remove
    assert max(retained) < PAGES_PER_ROUND // 100, retained


def test_a_built_scorer_has_set_it_for_its_process(tiny_cm_run: Path):
    faults = probe_faults(SCORER_SETUP, str(tiny_cm_run))
    assert max(faults) < PAGES_PER_ROUND // 100, faults
