"""Ray Tune overhead of the LCSC search: trials/s of the real search vs a plain Python loop doing the same
evaluations (same candidates, same scorer, same threads) in one process, measured in the same run.

    python benchmarks/trial_overhead.py                     # the embedded demo run at its evaluation size
    python benchmarks/trial_overhead.py --ckpt-dir RUN --trials 60 --fid-samples 1000

Both sides include building the scorer (stack, model, extractor, √Σ_ref) once; Ray's own start is not
timed. Prints the per-candidate time of both, the overhead fraction (1 - loop/ray; target <= 10%) with one
candidate per trial and with `--candidates-per-trial` candidates per trial, and the candidates/s with 1 and
2 concurrent trials (the scaling on this machine). Then the driver's ceiling: candidates/s of the same
search machinery (our searcher, candidate store, monitor, Tune's loop) around a trainable that does nothing,
at 1, 2, 4, 8, 16 and 32 concurrent trials, one candidate per trial and batched, printed as a curve with
each rate's ratio to the 1-concurrent rate (target >= 50 per second at 8 and 32), and around a trainable
that does a real demo trial's bookkeeping without its scoring (`BookkeepingTrial`: the candidate file read,
the store's record read and written, the same report) at 8 concurrent trials (target >= 20 per second).

How the ceiling is measured: the trials do nothing, so they need no CPU of their own; each asks for
`--ceiling-cpus` (default 0.01) of a CPU, so 32 of them fit on a 2-core machine and the core count does not
cap the concurrency. The cores still run the driver, Ray's own processes and the trial actors' round trips,
which is what is measured. Two rates per point: `wall` (candidates over the whole search, Tune's start
and the actors' start-up included) and `steady` (candidates per second from the first completion after
the last actor was set up to the last completion, from the times the trials report: what the driver
sustains once its actors run). `--ceiling-only` skips the demo measurements.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


import numpy as np
import ray
from ray import tune

import torch

from lcsc_ray import scoring as scoring_module
from lcsc_ray.checkpoints import discover_checkpoints
from lcsc_ray.cluster import start_ray
from lcsc_ray.profiles import baseline_profiles
from lcsc_ray.reference_stats import ensure_reference_stats
from lcsc_ray.run_folder import load_run
from lcsc_ray.evaluator import EvalResult
from lcsc_ray.scoring import CandidateScorer, ScoringSpec
from lcsc_ray.search.candidates import INDEX_KEY, candidate_configs
from lcsc_ray.search.trial import PENALTY_SCORE, LcscTrial
from lcsc_ray.search.tuner import run_search
from lcsc_ray.training.demo import ensure_demo_run
from lcsc_ray.search.objective import SearchObjective
from search_spaces import load_preset
from search_spaces.spaces import build_space


CEILING_CONCURRENCY = (1, 2, 4, 8, 16, 32)
BOOKKEEPING_CONCURRENCY = 8
CEILING_TARGET = 50.0  # candidates/s at 8 and at 32 concurrent trials that do nothing
BOOKKEEPING_TARGET = 20.0  # candidates/s at 8 concurrent trials with a demo trial's bookkeeping
FINISHED_KEY = "finished_at"  # wall-clock time a trial reports with each candidate, for the steady rate
STARTED_KEY = "actor_started_at"  # wall-clock time the trial's actor was set up, reported with each candidate


class TrivialTrial(tune.Trainable):
    """A trial that reports a score for each of its candidates at once: what is left is the driver's own work."""

    def setup(self, config: dict) -> None:
        self.started_at = time.time()

    def step(self) -> dict:
        reports = [{"score": float(config[INDEX_KEY] ** 2), FINISHED_KEY: time.time(), STARTED_KEY: self.started_at}
                   for config in candidate_configs(self.config)]
        return {"score": min(r["score"] for r in reports), "batch": reports, "done": True}

    def reset_config(self, new_config: dict) -> bool:
        self.config = new_config
        return True


class StubScorer:
    """Stands in for `CandidateScorer` in `BookkeepingTrial`: a score and the stage timings of a real one,
    computed in no time, so the trial keeps its bookkeeping and loses only its scoring."""

    metric_name = "fd_digits"
    device = torch.device("cpu")

    def score(self, alpha: np.ndarray, *, seed: int, num_samples: int) -> EvalResult:
        return EvalResult(score=float(np.dot(alpha, alpha)), metric_name=self.metric_name, num_samples=num_samples,
                          timings=dict.fromkeys(("sample", "features", "statistics", "distance", "merge"), 0.0))

    def score_rounds(self, alpha: np.ndarray, *, seed: int, rounds, blocks: int = 1):
        for count in rounds:
            yield self.score(alpha, seed=seed, num_samples=count)


class BookkeepingTrial(LcscTrial):
    """`LcscTrial` with its worker's scorer replaced by `StubScorer`: every candidate file read, store record
    read and written and every report key of a real demo trial, without the sampling and the distance."""

    def setup(self, config: dict, **kwargs) -> None:
        super().setup(config, **kwargs)
        stub_scorer(self.scoring)
        self.started_at = time.time()

    def step(self) -> dict:
        report = super().step()
        for entry in report.get("batch") or [report]:
            entry[FINISHED_KEY], entry[STARTED_KEY] = time.time(), self.started_at
        return report


def stub_scorer(spec: ScoringSpec) -> None:
    """Make `StubScorer` this worker's cached scorer for `spec` (the cache `cached_scorer` keeps per worker)."""
    scoring_module._SCORERS.clear()
    scoring_module._SCORERS[repr(spec)] = StubScorer()


def steady_rate(finished: list[float], started: list[float]) -> float | None:
    """Candidates per second between the first completion after the last actor started and the last
    completion: the rate once every actor runs (None when too few candidates were measured in that span)."""
    times = sorted(t for t in finished if t > max(started))
    if len(times) < 10 or times[-1] <= times[0]:
        return None
    return (len(times) - 1) / (times[-1] - times[0])


def ceiling_point(trainable, space, storage: str, *, trials: int, batch: int, concurrent: int, cpus: float,
                  name: str) -> tuple[float, float | None]:
    """(wall, steady) candidates/s of one search of `trials` candidates around `trainable`."""
    start = time.perf_counter()
    table = run_search(trainable, space, optimizer="CMA", num_trials=trials, seed=0, storage=storage, name=name,
                       max_concurrent=concurrent, resources={"cpu": cpus}, progress=False,
                       candidates_per_trial=batch)
    wall = trials / (time.perf_counter() - start)
    assert len(table.rows) == trials and len(table.told) == trials, "every candidate told exactly once"
    return wall, steady_rate([row.metrics[FINISHED_KEY] for row in table.rows],
                             [row.metrics[STARTED_KEY] for row in table.rows])


def driver_ceiling(space, storage: str, *, trials: int, batch: int, cpus: float,
                   concurrency=CEILING_CONCURRENCY) -> dict[int, tuple[float, float | None]]:
    """(wall, steady) candidates/s of the search around `TrivialTrial` at each concurrency, with `batch`
    candidates per trial and `cpus` of a CPU per trial (module docstring)."""
    return {concurrent: ceiling_point(TrivialTrial, space, storage, trials=trials, batch=batch, concurrent=concurrent,
                                      cpus=cpus, name=f"ceiling-{concurrent}-{batch}")
            for concurrent in concurrency}


def print_curve(title: str, curve: dict[int, tuple[float, float | None]], target: float) -> None:
    """One line per concurrency: wall and steady rates and their ratios to the 1-concurrent rates."""
    print(f"{title} (target >= {target:.0f} candidates/s):")
    base_wall, base_steady = curve.get(1, (None, None))
    for concurrent, (wall, steady) in curve.items():
        wall_ratio = f" ({wall / base_wall:.2f}x of 1)" if base_wall else ""
        steady_text = "-" if steady is None else f"{steady:.1f}/s"
        if steady is not None and base_steady:
            steady_text += f" ({steady / base_steady:.2f}x of 1)"
        print(f"  {concurrent:>2} concurrent: wall {wall:.1f}/s{wall_ratio}, steady {steady_text}")


def ceiling_report(space, storage: str, args: argparse.Namespace, spec: ScoringSpec | None) -> None:
    """Measure and print the driver's ceiling curves and, given a scoring spec, the bookkeeping rate."""
    for per_trial in (1, args.candidates_per_trial):
        curve = driver_ceiling(space, storage, trials=args.ceiling_trials, batch=per_trial, cpus=args.ceiling_cpus)
        print_curve(f"driver ceiling, {per_trial} candidate(s) per trial, a trainable that does nothing, "
                    f"{args.ceiling_cpus:g} CPU per trial, {args.ceiling_trials} candidates", curve, CEILING_TARGET)
    if spec is None:
        return
    trainable = tune.with_parameters(BookkeepingTrial, scoring=spec, space=space, objective=SearchObjective(),
                                     num_samples=args.fid_samples)
    for per_trial in (1, args.candidates_per_trial):
        point = ceiling_point(trainable, space, storage, trials=args.ceiling_trials, batch=per_trial,
                              concurrent=BOOKKEEPING_CONCURRENCY, cpus=args.ceiling_cpus, name=f"bookkeeping-{per_trial}")
        print_curve(f"demo trials' bookkeeping without their scoring, {per_trial} candidate(s) per trial",
                    {BOOKKEEPING_CONCURRENCY: point}, BOOKKEEPING_TARGET)


def main() -> None:
    preset = load_preset("digits-cm")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt-dir", help="training run folder (default: the embedded demo run)")
    parser.add_argument("--trials", type=int, default=100, help="candidates per measurement")
    parser.add_argument("--fid-samples", type=int, default=preset["fid_samples"], help="samples per evaluation")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--candidates-per-trial", type=int, default=8, help="the batched search's batch size")
    parser.add_argument("--ceiling-trials", type=int, default=400, help="candidates per point of the ceiling curve")
    parser.add_argument("--ceiling-cpus", type=float, default=0.01, help="CPUs each do-nothing trial asks for")
    parser.add_argument("--ceiling-only", action="store_true", help="only the driver's ceiling and bookkeeping rates")
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
    if args.ceiling_only:
        start_ray(None, dashboard=False, quiet=True)
        with tempfile.TemporaryDirectory() as storage:
            ceiling_report(space, storage, args, spec)
        ray.shutdown()
        return

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
        ceiling_report(space, storage, args, spec)
    ray.shutdown()
    print(f"plain loop: {loop_seconds * 1e3:.0f} ms per candidate = {1 / loop_seconds:.2f} candidates/s")
    for per_trial in (1, batch):
        seconds = per_candidate[1, per_trial]
        print(f"overhead of Ray Tune at 1 concurrent trial, {per_trial} candidate(s) per trial: "
              f"{1 - loop_seconds / seconds:.1%} of trial time (target <= 10%); ray/loop time ratio "
              f"{seconds / loop_seconds:.2f}x; Ray's cost per trial {(seconds - loop_seconds) * per_trial * 1e3:.0f} ms")
    print(f"scaling 1 -> 2 concurrent trials: {per_candidate[1, 1] / per_candidate[2, 1]:.2f}x candidates/s")


if __name__ == "__main__":
    main()
