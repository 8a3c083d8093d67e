"""Fréchet distance vs training step of a demo run: the newest raw checkpoint and the training EMA at every
n-th saved step, on the searched metric (fd_digits) and the independent one (fd_digits_indep). Shows whether
a recipe has converged (docs/TRAINING.md): the curve must flatten in the window the presets search.

    python benchmarks/training_curve.py --kind cm [--run RUN_DIR] [--every 10] [--samples 2000]

Prints a Markdown table and writes docs/training/<kind>_fd_vs_step.png. One noise seed per point, so
neighbouring points differ by sampling noise as well (about ±1.3 fd_digits at 5,000 samples).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

from demo_setup import demo_scoring_spec  # benchmarks/ is on sys.path: the script's own folder
from lcsc_ray.baseline_checkpoints import ExtraBaseline
from lcsc_ray.checkpoints import CheckpointFile
from lcsc_ray.errors import run_cli
from lcsc_ray.heldout import EvalPlan, HeldoutMetrics, candidate_samples
from lcsc_ray.images import new_figure, save_figure
from lcsc_ray.reference_stats import ensure_reference_stats
from lcsc_ray.run_folder import ema_checkpoint_path
from lcsc_ray.scoring import CandidateScorer
from lcsc_ray.training.demo import ensure_demo_run

SEED = 12345  # neither the search noise (0) nor the held-out noise seeds


def curve(run_dir: Path, kind: str, every: int, samples: int) -> list[dict[str, float]]:
    """Metrics of the raw checkpoint and the training EMA at every `every`-th saved step."""
    spec = demo_scoring_spec(kind, run_dir, device="cpu", threads=2, batch_size=1000)
    files = spec.files
    scorer = CandidateScorer(spec)
    metrics = HeldoutMetrics(EvalPlan(extractors=(("digits_indep", str(ensure_reference_stats("digits", "digits_indep"))),)),
                             scorer)
    rows = []
    for index in range(every - 1, len(files), every):
        step = files[index].step
        row: dict[str, float] = {"step": step}
        one_hot = np.zeros(len(files))
        one_hot[index] = 1.0
        ema = ExtraBaseline("ema", CheckpointFile(ema_checkpoint_path(run_dir, step), step, "safetensors"))
        for label, source in (("raw", one_hot), ("ema", ema)):
            scores = metrics.score(scorer, candidate_samples(scorer, source, None, seed=SEED, num_samples=samples))
            row[f"{label} fd_digits"], row[f"{label} fd_digits_indep"] = scores["fd_digits"], scores["fd_digits_indep"]
        rows.append(row)
        print(" ".join(f"{k}={v:.1f}" for k, v in row.items()), file=sys.stderr, flush=True)
    return rows


def plot(rows: list[dict[str, float]], path: Path, title: str) -> Path:
    fig, axes = new_figure(2, width=5)
    steps = [r["step"] for r in rows]
    for ax, metric in zip(axes[0], ("fd_digits", "fd_digits_indep")):
        for label in ("raw", "ema"):
            ax.plot(steps, [r[f"{label} {metric}"] for r in rows], marker="o", ms=3,
                    label="newest raw checkpoint" if label == "raw" else "training EMA")
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel(f"{metric} (lower is better)")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=("cm", "dm"), default="cm")
    parser.add_argument("--run", help="run folder; default: the demo run (trained on first use)")
    parser.add_argument("--every", type=int, default=10, help="every n-th saved checkpoint")
    parser.add_argument("--samples", type=int, default=2000, help="samples per point")
    parser.add_argument("--out", default=str(REPO / "docs" / "training"), help="folder of the plot")
    args = parser.parse_args(argv)
    run_dir = Path(args.run).resolve() if args.run else ensure_demo_run(args.kind, quiet=True)
    started = time.perf_counter()
    rows = curve(run_dir, args.kind, args.every, args.samples)
    path = plot(rows, Path(args.out) / f"{args.kind}_fd_vs_step.png", f"digits {args.kind.upper()} demo, "
                f"{args.samples} samples per point")
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(f"{row[k]:.0f}" if k == "step" else f"{row[k]:.1f}" for k in keys) + " |")
    print(f"\nplot: {path}; {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    run_cli(main)
