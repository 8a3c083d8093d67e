"""What the preflight costs next to one trial, at the demo size and at CIFAR-10 size, measured in the same run.

    python benchmarks/preflight_cost.py [--demo-run RUN] [--cifar-checkpoints 10] [--cifar-samples 500]

The preflight reads every selected checkpoint in full (zip CRCs of `.pt` files, NaN/Inf, every tensor's shape
against the newest; a small thread pool), builds the network, sampler and extractor, and samples two images; a
trial merges, samples `--fid-samples` images and scores them. Both are timed after a warm-up (the median of
`--repeats`); the reading of the checkpoints is also shown on its own, with the pool and with one thread. Each
run is measured as saved (safetensors) and re-saved as zip-format `.pt` files, whose records are read against
their CRC-32 too. The CIFAR-size run is the presets' U-Net with random weights and a random-weight InceptionV3
(timings only, no FID); its trial is measured at `--cifar-samples` and, since sampling and features scale
linearly in the sample count, also projected to the preset's 5,000.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

import lcsc_ray.preflight as preflight_module
from demo_setup import demo_scoring_spec
from gpu_probe import CIFAR_UNET, write_run
from lcsc_ray.checkpoints import discover_checkpoints
from lcsc_ray.preflight import preflight
from lcsc_ray.reference_stats import ReferenceStats, save_reference_stats
from lcsc_ray.run_folder import load_run
from lcsc_ray.scoring import CandidateScorer, ScoringSpec

CIFAR_PRESET_SAMPLES = 5000


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: imports, caches, first allocations
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def as_pt_run(run_dir: Path, folder: Path) -> Path:
    """A copy of the run at `run_dir` (its run.json) whose checkpoints are re-saved as zip-format `.pt` files."""
    (folder / "checkpoints").mkdir(parents=True)
    shutil.copy(run_dir / "run.json", folder / "run.json")
    for file in discover_checkpoints(load_run(run_dir).checkpoint_dir):
        torch.save(load_file(file.path), folder / "checkpoints" / file.path.with_suffix(".pt").name)
    return folder


def reading_seconds(spec: ScoringSpec, threads: int, repeats: int) -> float:
    """The preflight's time reading the checkpoints (the median of `repeats` after a warm-up) with `threads`."""
    run = load_run(spec.run_dir)
    chosen, preflight_module.VERIFY_THREADS = preflight_module.VERIFY_THREADS, threads
    try:
        preflight(spec, run)
        return float(np.median([preflight(spec, run).checkpoint_seconds for _ in range(repeats)]))
    finally:
        preflight_module.VERIFY_THREADS = chosen


def measure(spec: ScoringSpec, samples: int, repeats: int) -> tuple[float, float, float, float]:
    """(preflight s, of it reading the checkpoints s, that reading with one thread s, trial s at `samples`)."""
    run = load_run(spec.run_dir)
    preflight_s = median_seconds(lambda: preflight(spec, run), repeats)
    pooled = reading_seconds(spec, preflight_module.VERIFY_THREADS, repeats)
    single = reading_seconds(spec, 1, repeats)
    scorer = CandidateScorer(spec)
    alpha = np.full(len(spec.files), 1.0 / len(spec.files))
    trial_s = median_seconds(lambda: scorer.score(alpha, seed=0, num_samples=samples), repeats)
    return preflight_s, pooled, single, trial_s


def with_pt_files(spec: ScoringSpec, folder: Path) -> ScoringSpec:
    """`spec` on a `.pt` copy of its run (`as_pt_run`)."""
    copy = as_pt_run(Path(spec.run_dir), folder)
    return replace(spec, run_dir=str(copy), files=tuple(discover_checkpoints(copy / "checkpoints")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-run", help="a digits CM run folder; default: the embedded demo (trained on first use)")
    parser.add_argument("--demo-samples", type=int, default=2000, help="samples per demo trial (the digits-cm preset)")
    parser.add_argument("--cifar-checkpoints", type=int, default=10)
    parser.add_argument("--cifar-samples", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    demo_spec = demo_scoring_spec("cm", args.demo_run, device="cpu", threads=1)
    rows = [("demo (digits CM)", len(demo_spec.files), args.demo_samples,
             *measure(demo_spec, args.demo_samples, args.repeats))]

    with tempfile.TemporaryDirectory() as tmp:
        pt_spec = with_pt_files(demo_spec, Path(tmp) / "demo-pt")
        rows.append(("  the same as .pt files", len(pt_spec.files), args.demo_samples,
                     *measure(pt_spec, args.demo_samples, args.repeats)))
        folder = write_run(Path(tmp) / "run", args.cifar_checkpoints, CIFAR_UNET)
        stats = Path(tmp) / "ref.npz"
        dim = 2048
        save_reference_stats(stats, ReferenceStats(np.zeros(dim), np.eye(dim),
                                                   {"extractor": "inception-random", "dataset": "random"}))
        cifar_spec = ScoringSpec(run_dir=str(folder), files=tuple(discover_checkpoints(folder / "checkpoints")),
                                 reference_stats=str(stats), extractor="inception-random", sampler="multistep",
                                 sampler_options={"steps": 18, "ts": [0, 10]}, batch_size=100, device="cpu", threads=1)
        *times, trial_s = measure(cifar_spec, args.cifar_samples, 1)
        rows.append(("CIFAR-10 size (2-step CM)", len(cifar_spec.files), args.cifar_samples, *times, trial_s))
        rows.append(("  projected to the preset", len(cifar_spec.files), CIFAR_PRESET_SAMPLES, *times,
                     trial_s * CIFAR_PRESET_SAMPLES / args.cifar_samples))
        pt_spec = with_pt_files(cifar_spec, Path(tmp) / "cifar-pt")
        *times, trial_s = measure(pt_spec, args.cifar_samples, 1)
        rows.append(("  the same as .pt files", len(pt_spec.files), args.cifar_samples, *times, trial_s))

    threads = preflight_module.VERIFY_THREADS
    print(f"{'run':<28} {'K':>4} {'samples':>8} {'preflight s':>12} {'reading s':>10} {'1 thread s':>11} "
          f"{'trial s':>9} {'preflight/trial':>16}   (reading: up to {threads} threads)")
    for name, k, samples, preflight_s, reading_s, single_s, trial_s in rows:
        print(f"{name:<28} {k:>4} {samples:>8} {preflight_s:>12.3f} {reading_s:>10.3f} {single_s:>11.3f} "
              f"{trial_s:>9.3f} {preflight_s / trial_s:>16.3f}")


if __name__ == "__main__":
    main()
