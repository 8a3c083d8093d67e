"""The whole LCSC search through Ray Tune on one device, with 1, 2 and 4 trials sharing it; run by
benchmarks/gpu_check.sh.

    python benchmarks/gpu_search_check.py                  # cuda: CIFAR-10-sized run, 1 / 0.5 / 0.25 GPU per trial
    python benchmarks/gpu_search_check.py --device cpu --model tiny --checkpoints 6 --trials 6 --samples 8 \
            --final-samples 8 --reference-images 32 --shares 1,0.5    # the same steps in a few minutes on a CPU

In a temporary folder, then through the commands a user types:
1. a CIFAR-10-sized run folder (run.json + K checkpoints of a random U-Net, each save perturbed by ~1%:
   gpu_probe.write_run; the presets' CIFAR-size U-Net, or a tiny one) and an .npz of random 3x32x32 uint8
   images. Writing the checkpoints directly rather than with launch/train_cm.py keeps the check inside its
   time limit: training saves (and fsyncs) optimizer state with every checkpoint, ~20 GB for K=40;
2. `launch/fid_stats.py` on the images: the reference statistics (their metadata names the extractor);
3. `launch/tune_cm.py --preset cifar10-cm` once per share of the device: `--gpus-per-trial S` and
   `--max-concurrent 1/S` on a GPU; on the CPU a share is of `--cpus` cores (`--cpus-per-trial S*cpus`).
Each search keeps the same small budget (trials, samples, held-out re-scoring, export), so the lines differ
only in how many trials share the device.

Printed per search: trials completed (failed) of the budget, seconds of the search phase (from tune_cm's
"search:" line to its "held-out" line, worker start included) and to the first trial result, trials/s and
the ratio to one trial at a time, the peak GPU memory of each trial worker (`gpu_peak_mib` in the trials'
results, n/a when they do not report it), the seconds of held-out re-scoring plus export, and the median
seconds per trial of each scoring stage (results.json `timings.median_trial_stage_seconds`).

Inception: the FID weights when torch hub's cache holds them; otherwise `--extractor inception-random`, the
same network with random weights, whose Fréchet distance is reported as fd_inception_random, not FID. Either
way a briefly trained model scored against random images measures nothing: only the times matter here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpu_probe import CIFAR_UNET, write_run  # benchmarks/ is on sys.path: the script's own folder
from lcsc_ray.features.inception import hub_weights_path
from lcsc_ray.reference_stats import load_reference_stats

REPO = Path(__file__).resolve().parents[1]

TINY_UNET = {"in_channels": 3, "channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attention": False,
             "dropout": 0.0}
MODELS = {"cifar": CIFAR_UNET, "tiny": TINY_UNET}


@dataclass
class Search:
    """One tune_cm.py run and what its files say."""

    share: float
    concurrent: int
    results: dict  # results.json
    trials: list[dict]  # the last result row of every trial in the experiment
    search_seconds: float  # tune_cm's "search:" line to its "held-out" line
    first_result_seconds: float | None  # "search:" line to the first trial result (whole seconds: Ray's timestamp)

    @property
    def trials_per_second(self) -> float:
        return self.results["search"]["trials_completed"] / self.search_seconds

    def peak_gpu_mib(self) -> str:
        """Peak GPU memory of each trial worker (the max over a worker's trials: the peak is per process)."""
        peaks: dict[int, float] = {}
        for row in self.trials:
            if row.get("gpu_peak_mib") is not None:
                peaks[row["pid"]] = max(peaks.get(row["pid"], 0.0), float(row["gpu_peak_mib"]))
        if not peaks:
            return "n/a"
        return f"{max(peaks.values()):.0f} max of {len(peaks)}" if len(peaks) > 1 else f"{max(peaks.values()):.0f}"


def run(cmd: list[str], log: Path, marks: tuple[str, ...] = ()) -> dict[str, float]:
    """Run `cmd` with its output in `log`; return the wall-clock time at which each line prefix in `marks`
    first appeared. On failure, print the end of the log and exit: the caller's later steps need this one."""
    seen: dict[str, float] = {}
    with open(log, "w") as out, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                                 cwd=REPO) as proc:
        for line in proc.stdout:
            out.write(line)
            for mark in marks:
                if line.startswith(mark) and mark not in seen:
                    seen[mark] = time.time()
    if proc.returncode != 0:
        tail = log.read_text()[-4000:]
        sys.exit(f"failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    missing = [m for m in marks if m not in seen]
    if missing:
        sys.exit(f"{' '.join(cmd)}: no line starting with {missing} in {log}; the timing marks of this check moved")
    return seen


def trial_rows(experiment: Path) -> list[dict]:
    """The last reported row of each trial (Ray Tune's result.json: one JSON object per line)."""
    rows = []
    for path in sorted(experiment.glob("*/result.json")):
        lines = path.read_text().splitlines()
        if lines:
            rows.append(json.loads(lines[-1]))
    return rows


def prepare(args: argparse.Namespace, tmp: Path) -> tuple[Path, Path, str]:
    """Run folder, images and reference statistics; returns (run folder, statistics, extractor name)."""
    start = time.perf_counter()
    run_dir = write_run(tmp / "run", args.checkpoints, MODELS[args.model])
    print(f"run: {args.checkpoints} checkpoints of a random {args.model} U-Net, 3x32x32 "
          f"({time.perf_counter() - start:.0f} s)")
    data = tmp / "images.npz"
    np.savez(data, images=np.random.default_rng(0).integers(0, 256, (args.reference_images, 3, 32, 32), np.uint8))

    real = hub_weights_path().is_file()
    extractor = "inception" if real else "inception-random"
    stats = tmp / "reference.npz"
    start = time.perf_counter()
    run([sys.executable, "launch/fid_stats.py", "--data", str(data), "--extractor", extractor, "--out", str(stats),
         "--device", args.device, "--batch-size", str(args.batch_size)], tmp / "fid_stats.log")
    meta = load_reference_stats(stats).meta
    print(f"reference statistics: {meta['num_samples']} random images, extractor {meta['extractor']}, metric "
          f"{meta['metric_name']} ({time.perf_counter() - start:.0f} s)")
    if real:
        print("Inception has the FID weights; the FIDs below still measure nothing (random model, random images)")
    else:
        print(f"Inception has RANDOM weights ({hub_weights_path()} not found): the metric is {meta['metric_name']}, "
              "a Fréchet distance of random-weight Inception features, not FID; times are those of FID")
    return run_dir, stats, extractor


def search(args: argparse.Namespace, run_dir: Path, stats: Path, extractor: str, share: float, tmp: Path) -> Search:
    """One `launch/tune_cm.py` search with `share` of the device per trial."""
    concurrent = round(1 / share)
    name = f"share-{share:g}"
    if args.device == "cpu":
        resources = ["--cpus-per-trial", f"{share * args.cpus:g}", "--gpus-per-trial", "0"]
    else:
        resources = ["--cpus-per-trial", "1", "--gpus-per-trial", f"{share:g}"]
    cmd = [sys.executable, "launch/tune_cm.py", "--preset", "cifar10-cm", "--ckpt-dir", str(run_dir),
           "--ref-stats", str(stats), "--extractor", extractor, "--num-trials", str(args.trials),
           "--fid-samples", str(args.samples), "--final-samples", str(args.final_samples),
           *(["--heldout-seeds", str(args.heldout_seeds)] if args.heldout_seeds is not None else []),
           "--batch-size", str(args.batch_size), "--top-k", "2", "--ema", "0.999", "--device", args.device,
           *resources, "--max-concurrent", str(concurrent), "--storage", str(tmp / "storage"), "--name", name,
           "--no-dashboard", "--quiet"]
    marks = run(cmd, tmp / f"{name}.log", marks=("search:", "held-out"))
    results = json.loads((tmp / "storage" / name / "final" / "results.json").read_text())
    trials = trial_rows(Path(results["search"]["experiment"]))
    stamps = [row["timestamp"] for row in trials if "timestamp" in row]
    first = min(stamps) - marks["search:"] if stamps else None
    return Search(share, concurrent, results, trials, marks["held-out"] - marks["search:"], first)


def row(searched: Search, baseline: Search) -> str:
    """One summary line; the stage columns follow results.json's stage names."""
    done = searched.results["search"]
    stages = searched.results["timings"]["median_trial_stage_seconds"]
    first = "n/a" if searched.first_result_seconds is None else f"{max(searched.first_result_seconds, 0):.0f}"
    return (f"{searched.share:<10g} {searched.concurrent:<10d} "
            f"{done['trials_completed']:>3d}/{done['trials_failed']:<6d}{searched.search_seconds:>9.1f} {first:>8} "
            f"{searched.trials_per_second:>9.2f} "
            f"{searched.trials_per_second / baseline.trials_per_second:>7.2f}x {searched.peak_gpu_mib():>16} "
            f"{searched.results['timings']['final_seconds']:>9.1f}  "
            + " ".join(f"{stage} {seconds:.3f}" for stage, seconds in stages.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--model", choices=sorted(MODELS), default="cifar", help="U-Net size (cifar: the presets' "
                        "CIFAR-10 U-Net)")
    parser.add_argument("--checkpoints", type=int, default=40, help="K: checkpoints in the run")
    parser.add_argument("--trials", type=int, default=24, help="search budget of every search, baselines included")
    parser.add_argument("--samples", type=int, default=256, help="samples per trial")
    parser.add_argument("--final-samples", type=int, default=512, help="samples per held-out re-scoring")
    parser.add_argument("--heldout-seeds", type=int, default=None, help="held-out noise seeds of the re-scoring "
                        "(default: tune_cm's)")
    parser.add_argument("--reference-images", type=int, default=1024, help="random images behind the statistics")
    parser.add_argument("--batch-size", type=int, default=256, help="sampling and feature batch size")
    parser.add_argument("--shares", default=None, help="device share per trial, comma separated; the concurrent "
                        "trials are 1/share (default: 1,0.5,0.25 on cuda, 1,0.5 on cpu)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="on the CPU: cores the shares split")
    args = parser.parse_args()
    shares = [float(s) for s in (args.shares or ("1,0.5,0.25" if args.device == "cuda" else "1,0.5")).split(",")]
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("--device cuda: torch sees no CUDA device; use --device cpu")
        print(f"device: {torch.cuda.get_device_name(0)}")

    with tempfile.TemporaryDirectory(prefix="lcsc-search-check-") as name:
        tmp = Path(name)
        run_dir, stats, extractor = prepare(args, tmp)
        print(f"each search: launch/tune_cm.py --preset cifar10-cm, {args.trials} trials (3 of them baselines) x "
              f"{args.samples} samples, held-out re-scoring of the baselines and the best 2 x {args.final_samples} "
              "samples, export")
        unit = "gpus/trial" if args.device == "cuda" else f"share of {args.cpus} cpus"
        print(f"share = {unit}; search s = tune_cm's search start to its held-out step (worker start included), "
              f"to 1st s = to the first trial result; scaling = trials/s over trials/s at share {shares[0]:g}; "
              "heldout s = held-out re-scoring + export")
        print(f"{'share':<10} {'concurrent':<10} {'done/failed':<10}{'search s':>9} {'to 1st s':>8} {'trials/s':>9} "
              f"{'scaling':>8} {'peak GPU MiB/wkr':>16} {'heldout s':>9}  median s per trial")
        done: list[Search] = []
        for share in shares:  # a line per search as it ends: a time limit loses only the searches not yet run
            done.append(search(args, run_dir, stats, extractor, share, tmp))
            print(row(done[-1], done[0]), flush=True)
        print(f"metric: {done[0].results['metric']}")


if __name__ == "__main__":
    main()
