"""The experiments behind docs/RESULTS.md items 1-4, each built from the product's own paths.

Searches go through `lcsc_ray.search.job.run_job` (the code behind `launch/tune_cm.py`), so every number is
what a user of the tool would get. The optimizer comparison (item 4, 12,000 evaluations) drives the product's
searcher and trial function in a plain ask/tell loop instead (`ask_tell_search`): with one trial at a time
Tune only adds its per-trial scheduling (measured in item 5), not a different sequence of candidates. Configurations that are not searched (the 2-step base CM, the newest DM
checkpoint at other NFEs, the training EMA) are scored in this process with the same `CandidateScorer`,
the same reference statistics and the same held-out noise seed as the job's held-out re-scoring, so every
held-out number in the report is comparable with every other one of the same kind (CM or DM).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from demo_setup import demo_scoring_spec  # benchmarks/ is on sys.path: the script's own folder
from lcsc_ray.checkpoints import CheckpointFile, discover_checkpoints
from lcsc_ray.profiles import baseline_profiles
from lcsc_ray.run_folder import load_run
from lcsc_ray.scoring import cached_scorer
from lcsc_ray.search.job import HELDOUT_SEED_OFFSET, run_job
from lcsc_ray.search.optimizers import build_optimizer
from lcsc_ray.search.searcher import LcscNevergradSearch, decode_candidate
from lcsc_ray.search.objective import SearchObjective
from lcsc_ray.search.trial import evaluate_candidate
from search_spaces import build_space, load_preset

NOISE_SEED = 0  # search noise seed of every search here; held-out noise is NOISE_SEED + HELDOUT_SEED_OFFSET


@dataclass
class SearchRun:
    """One finished `run_job` search: its results.json content."""

    label: str
    results: dict[str, Any]

    @property
    def winner_heldout(self) -> float:
        return float(self.results["winner"]["heldout_score"])

    def baseline_heldout(self, name: str) -> float:
        return float(self.results["baselines"][name]["heldout_score"])


def search(kind: str, label: str, storage: Path, flags: Sequence[str]) -> SearchRun:
    """Run the LCSC job with `flags` (run_job's command-line flags) into `storage/label`, quietly, without
    the dashboard, with the fixed search noise seed; Ray is started once and reused (start_ray is a no-op
    when Ray is up)."""
    argv = ["--no-dashboard", "--quiet", "--storage", str(storage), "--name", label,
            "--noise-seed", str(NOISE_SEED), *map(str, flags)]
    return SearchRun(label, run_job(argv, kind))


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
        self.spec = demo_scoring_spec(kind, run_dir, files=tuple(files), sampler=sampler,
                                      sampler_options=sampler_options, device="cpu", threads=threads)
        self.scorer = cached_scorer(self.spec)  # shared with evaluate_candidate in this process
        self.final_samples = final_samples

    def score(self, alpha: Sequence[float] | np.ndarray) -> float:
        result = self.scorer.score(np.asarray(alpha, dtype=np.float64), seed=NOISE_SEED + HELDOUT_SEED_OFFSET,
                                   num_samples=self.final_samples)
        return float(result.score)


def training_ema_file(run_dir: Path) -> CheckpointFile:
    """The training EMA weights saved with the newest checkpoint (checkpoints_ema/, docs/ARCHITECTURE.md)."""
    return discover_checkpoints(load_run(run_dir).ema_dir)[-1]


def ask_tell_search(optimizer: str, seed: int, trials: int, num_samples: int, final_samples: int,
                    run_dir: Path) -> dict[str, Any]:
    """One search of `trials` candidates on the CM run `run_dir` (the digits-cm preset's space, its baselines
    first as the job warm-starts) with the product's `LcscNevergradSearch` and `evaluate_candidate`, one at a
    time, on one thread, without Tune. Returns the scores in tell order and the held-out score of the best candidate.
    Runs in a worker process of its own (item 4 runs two at a time)."""
    preset = load_preset("digits-cm")
    files = tuple(discover_checkpoints(load_run(run_dir).checkpoint_dir))
    heldout = HeldoutScorer(run_dir, files, kind="cm", final_samples=final_samples, sampler="onestep",
                            sampler_options={}, threads=1)
    spec = heldout.spec  # the search and the held-out re-scoring share one scorer (one stack) per process
    space = build_space(preset["space"], len(files), bound=preset["bound"], sigma=preset.get("sigma"))
    warm = baseline_profiles([f.step for f in files], preset["ema"], preset.get("phema", ()))
    opt = build_optimizer(optimizer, space.parametrization(), budget=trials, num_workers=1, seed=seed)
    told, best = [], (np.inf, None)
    with tempfile.TemporaryDirectory(prefix="lcsc-ask-tell-") as folder:
        searcher = LcscNevergradSearch(opt, experiment_dir=folder,
                                       warm_start=[(n, space.to_value(a)) for n, a in warm.items()])
        for index in range(trials):
            config = searcher.suggest(str(index))
            report = evaluate_candidate(config, scoring=spec, space=space,
                                        objective=SearchObjective(noise_seed=NOISE_SEED), num_samples=num_samples)
            searcher.on_trial_complete(str(index), report)
            told.append(float(report["score"]))
            if report["score"] < best[0]:
                best = (report["score"], space.to_coefficients(decode_candidate(config)[0]))
    return {"optimizer": optimizer, "seed": seed, "told": told, "heldout": heldout.score(best[1])}
