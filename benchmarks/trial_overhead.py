"""Ray Tune overhead of the LCSC search: trials/s of the real search vs a plain Python loop doing the same
evaluations (same candidates, same scorer, same threads) in one process, measured in the same run.

    python benchmarks/trial_overhead.py                     # the embedded demo run at its evaluation size
    python benchmarks/trial_overhead.py --ckpt-dir RUN --trials 60 --fid-samples 1000

Both sides include building the scorer (stack, model, extractor, √Σ_ref) once; Ray's own start is not
timed. Prints the per-candidate time of both, the overhead fraction (1 - loop/ray; target <= 10%) with one
candidate per trial and with `--candidates-per-trial` candidates per trial, and the candidates/s with 1 and
2 concurrent trials (the scaling on this machine). Then the driver's ceiling: candidates/s of the same
search machinery (our searcher, candidate store, monitor) around a trainable that does nothing, with 1, 2, 4
and 8 concurrent trials, one candidate per trial and batched (target >= 20 per second).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


import numpy as np
import ray
from ray import tune

from lcsc_ray.checkpoints import discover_checkpoints
from lcsc_ray.cluster import start_ray
from lcsc_ray.profiles import baseline_profiles
from lcsc_ray.reference_stats import ensure_reference_stats
from lcsc_ray.run_folder import load_run
from lcsc_ray.scoring import CandidateScorer, ScoringSpec
from lcsc_ray.search.candidates import INDEX_KEY, candidate_configs
from lcsc_ray.search.trial import PENALTY_SCORE, LcscTrial
from lcsc_ray.search.tuner import run_search
from lcsc_ray.training.demo import ensure_demo_run
from lcsc_ray.search.objective import SearchObjective
from search_spaces import load_preset
from search_spaces.spaces import build_space


class TrivialTrial(tune.Trainable):
    """A trial that reports a score for each of its candidates at once: what is left is the driver's own work."""

    def step(self) -> dict:
        reports = [{"score": float(config[INDEX_KEY] ** 2)} for config in candidate_configs(self.config)]
        return {"score": min(r["score"] for r in reports), "batch": reports, "done": True}

    def reset_config(self, new_config: dict) -> bool:
        self.config = new_config
        return True


def driver_ceiling(space, storage: str, trials: int, batch: int) -> dict[int, float]:
    """Candidates/s of the search around `TrivialTrial` at 1, 2, 4 and 8 concurrent trials of `batch`
    candidates (a tenth of a CPU each, so the CPU count does not cap the concurrency)."""
    rates = {}
    for concurrent in (1, 2, 4, 8):
        start = time.perf_counter()
        run_search(TrivialTrial, space, optimizer="CMA", num_trials=trials, seed=0, storage=storage,
                   name=f"ceiling-{concurrent}-{batch}", max_concurrent=concurrent, resources={"cpu": 0.1},
                   progress=False, candidates_per_trial=batch)
        rates[concurrent] = trials / (time.perf_counter() - start)
    return rates


def main() -> None:
    preset = load_preset("digits-cm")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt-dir", help="training run folder (default: the embedded demo run)")
    parser.add_argument("--trials", type=int, default=100, help="candidates per measurement")
    parser.add_argument("--fid-samples", type=int, default=preset["fid_samples"], help="samples per evaluation")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--candidates-per-trial", type=int, default=8, help="the batched search's batch size")
    args = parser.parse_args()

    run_dir = Path(args.ckpt_dir).resolve() if args.ckpt_dir else ensure_demo_run("cm")
    run = load_run(run_dir)
    files = tuple(discover_checkpoints(run.checkpoint_dir))
    stats = ensure_reference_stats(run.config["data"], preset["extractor"])
    spec = ScoringSpec(run_dir=str(run_dir), files=files, reference_stats=str(stats), extractor=preset["extractor"],
                       batch_size=args.batch_size, threads=1)
    space = build_space(preset["space"], len(files), bound=preset["bound"])
    baselines = baseline_profiles([f.step for f in files], [0.99, 0.999])
    print(f"run {run_dir}: K={len(files)}, {args.fid_samples} samples per evaluation, {args.trials} candidates")

    # Plain loop: build the same scorer in this process (as each Ray worker does once) and evaluate the same
    # kind of candidates (baselines, then random points of the space around them), one thread like one trial.
    rng = np.random.default_rng(0)
    alphas = list(baselines.values())
    while len(alphas) < args.trials:
        alphas.append(space.to_coefficients(space.init_value() + rng.normal(0, space.sigma, space.dimension)))
    start = time.perf_counter()
    scorer = CandidateScorer(spec)
    for alpha in alphas:
        scorer.score(alpha, seed=0, num_samples=args.fid_samples)
    loop_seconds = (time.perf_counter() - start) / len(alphas)

    start_ray(None, dashboard=False, quiet=True)
    trainable = tune.with_parameters(LcscTrial, scoring=spec, space=space, objective=SearchObjective(),
                                     num_samples=args.fid_samples)
    per_candidate, batch = {}, args.candidates_per_trial
    with tempfile.TemporaryDirectory() as storage:
        for concurrent, per_trial in ((1, 1), (2, 1), (1, batch)):
            start = time.perf_counter()
            table = run_search(trainable, space, optimizer="lcsc-es", num_trials=args.trials, seed=0,
                               warm_start=baselines, storage=storage, name=f"overhead-{concurrent}-{per_trial}",
                               max_concurrent=concurrent, resources={"cpu": 1}, progress=False,
                               penalty=PENALTY_SCORE, candidates_per_trial=per_trial)
            wall = time.perf_counter() - start
            assert len(table.rows) == args.trials
            per_candidate[concurrent, per_trial] = wall / args.trials
            evaluate = np.median([sum(row.metrics.get(f"time_{stage}", 0) for stage in
                                      ("sample", "features", "statistics", "distance", "merge")) for row in table.rows])
            print(f"ray tune, {concurrent} concurrent, {per_trial} candidate(s) per trial: {wall:.1f} s for "
                  f"{args.trials} candidates = {args.trials / wall:.2f} candidates/s (median in-trial evaluation "
                  f"{evaluate * 1e3:.0f} ms)")
        ceilings = {per_trial: driver_ceiling(space, storage, args.trials, per_trial) for per_trial in (1, batch)}
    ray.shutdown()
    print(f"plain loop: {loop_seconds * 1e3:.0f} ms per candidate = {1 / loop_seconds:.2f} candidates/s")
    for per_trial in (1, batch):
        seconds = per_candidate[1, per_trial]
        print(f"overhead of Ray Tune at 1 concurrent trial, {per_trial} candidate(s) per trial: "
              f"{1 - loop_seconds / seconds:.1%} of trial time (target <= 10%); ray/loop time ratio "
              f"{seconds / loop_seconds:.2f}x; Ray's cost per trial {(seconds - loop_seconds) * per_trial * 1e3:.0f} ms")
    print(f"scaling 1 -> 2 concurrent trials: {per_candidate[1, 1] / per_candidate[2, 1]:.2f}x candidates/s")
    for per_trial, ceiling in ceilings.items():
        print(f"driver ceiling, {per_trial} candidate(s) per trial (a trainable that does nothing): "
              + ", ".join(f"{c} concurrent {rate:.1f}/s" for c, rate in ceiling.items())
              + f"; best {max(ceiling.values()):.1f} candidates/s (target >= 20)")


if __name__ == "__main__":
    main()
