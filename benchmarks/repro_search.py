"""The experiments behind docs/RESULTS.md items 1-4 (issue 7), each built from the product's own paths.

Searches go through `lcsc_ray.search.job.run_job` (the code behind `launch/tune_cm.py`), so every number is
what a user of the tool would get; configurations that are not searched (the 2-step base CM, the newest DM
checkpoint at other NFEs, the training EMA) are scored in this process with the same `CandidateScorer`,
the same reference statistics and the same held-out noise seed as the job's held-out re-scoring, so every
held-out number in the report is comparable with every other one of the same kind (CM or DM).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lcsc_ray.checkpoints import CheckpointFile, discover_checkpoints
from lcsc_ray.reference_stats import ensure_reference_stats
from lcsc_ray.run_folder import load_run
from lcsc_ray.scoring import CandidateScorer, ScoringSpec
from lcsc_ray.search.job import HELDOUT_SEED_OFFSET, run_job
from lcsc_ray.search.searcher import load_searcher
from search_spaces import load_preset

NOISE_SEED = 0  # search noise seed of every search here; held-out noise is NOISE_SEED + HELDOUT_SEED_OFFSET


@dataclass
class SearchRun:
    """One finished `run_job` search: its results.json content and the search-noise score the optimizer
    was told after each trial, in the order it was told (what 'best score vs trials' is drawn from)."""

    label: str
    results: dict[str, Any]
    told: list[float]

    @property
    def winner_heldout(self) -> float:
        return float(self.results["winner"]["heldout_score"])

    def baseline_heldout(self, name: str) -> float:
        return float(self.results["baselines"][name]["heldout_score"])

    @property
    def best_so_far(self) -> np.ndarray:
        return np.minimum.accumulate(np.asarray(self.told, dtype=np.float64))


def search(kind: str, label: str, storage: Path, flags: Sequence[str]) -> SearchRun:
    """Run the LCSC job with `flags` (run_job's command-line flags) into `storage/label`, quietly, without
    the dashboard, with the fixed search noise seed; Ray is started once and reused (start_ray is a no-op
    when Ray is up)."""
    argv = ["--no-dashboard", "--quiet", "--storage", str(storage), "--name", label,
            "--noise-seed", str(NOISE_SEED), *map(str, flags)]
    results = run_job(argv, kind)
    told = [float(loss) for _, _, loss in load_searcher(results["search"]["experiment"]).told]
    return SearchRun(label, results, told)


def first_fraction_run(run_dir: Path, fraction: float, folder: Path) -> tuple[Path, int]:
    """A run folder holding only the first `fraction` of `run_dir`'s checkpoints (by training step), as if
    training had stopped there: a copy of run.json plus symlinks, so nothing is duplicated. Returns the
    folder and the newest step it holds."""
    files = discover_checkpoints(load_run(run_dir).checkpoint_dir)
    keep = files[:max(2, int(round(len(files) * fraction)))]
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "checkpoints").mkdir(parents=True)
    shutil.copy2(run_dir / "run.json", folder / "run.json")
    for file in keep:
        (folder / "checkpoints" / file.path.name).symlink_to(file.path.resolve())
    return folder, keep[-1].step


class HeldoutScorer:
    """Held-out scores of fixed coefficient vectors under any sampler, in this process: the job's scorer
    with the job's held-out noise seed and sample count, for configurations that are not searched."""

    def __init__(self, run_dir: Path, files: Sequence[CheckpointFile], *, kind: str, final_samples: int,
                 sampler: str, sampler_options: dict[str, Any], threads: int = 2) -> None:
        run = load_run(run_dir)
        preset = load_preset(f"digits-{kind}")
        self.spec = ScoringSpec(
            run_dir=str(run_dir), files=tuple(files), extractor=preset["extractor"],
            reference_stats=str(ensure_reference_stats(run.config["data"], preset["extractor"])),
            sampler=sampler, sampler_options=sampler_options, device="cpu", threads=threads)
        self.scorer = CandidateScorer(self.spec)
        self.final_samples = final_samples

    def score(self, alpha: Sequence[float] | np.ndarray) -> float:
        result = self.scorer.score(np.asarray(alpha, dtype=np.float64), seed=NOISE_SEED + HELDOUT_SEED_OFFSET,
                                   num_samples=self.final_samples)
        return float(result.score)


def training_ema_file(run_dir: Path) -> CheckpointFile:
    """The training EMA weights saved with the newest checkpoint (checkpoints_ema/, docs/ARCHITECTURE.md)."""
    return discover_checkpoints(load_run(run_dir).ema_dir)[-1]
