"""The LCSC job behind `launch/tune_cm.py` and `launch/tune_dm.py`, readable top to bottom:

run folder → select checkpoints → reference statistics → coefficient space + baseline profiles → Ray →
Ray Tune search (Nevergrad) → held-out re-scoring of the finalists and every baseline → table, winner
export, results.json and plots.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray import tune

from lcsc_ray.checkpoints import CheckpointFile, discover_checkpoints, select_checkpoints
from lcsc_ray.cluster import start_ray
from lcsc_ray.errors import LcscError
from lcsc_ray.export import export_merged
from lcsc_ray.profiles import baseline_profiles
from lcsc_ray.reference_stats import ensure_reference_stats
from lcsc_ray.preflight import preflight
from lcsc_ray.run_folder import RUN_JSON, RunInfo, load_run
from lcsc_ray.scoring import ScoringSpec, cached_scorer, load_stack
from lcsc_ray.search.flags import HELDOUT_SEED_OFFSET, parse_args
from lcsc_ray.search.ray_compat import in_ray_job
from lcsc_ray.search.monitor import PROGRESS_PLOT, PROGRESS_PLOT_EVERY_S
from lcsc_ray.search.report import (ScoredCandidate, format_table, plot_best_so_far, plot_coefficients,
                                    write_results)
from lcsc_ray.search.trial import PENALTY_SCORE, LcscTrial
from lcsc_ray.search.tuner import ResultTable, TrialRecord, check_experiment, run_search
from lcsc_ray.training.demo import ensure_demo_run
from search_spaces.spaces import CoefficientSpace, build_space


def resolve_run_dir(args: argparse.Namespace, kind: str) -> tuple[Path, Path]:
    """(run folder with run.json, checkpoint folder). No --ckpt-dir: the embedded demo run, trained on
    first use so `python launch/tune_cm.py` works on a fresh machine."""
    if args.ckpt_dir is None:
        run_dir = ensure_demo_run(kind, quiet=args.quiet)
        return run_dir, load_run(run_dir).checkpoint_dir
    ckpt_dir = Path(args.ckpt_dir).expanduser().resolve()
    if not ckpt_dir.is_dir():
        raise LcscError(f"--ckpt-dir {ckpt_dir}: no such folder; point it at a training run or its checkpoints")
    for candidate in (ckpt_dir, ckpt_dir.parent):
        if (candidate / "run.json").is_file():
            run = load_run(candidate)
            return candidate, (run.checkpoint_dir if candidate == ckpt_dir else ckpt_dir)
    raise LcscError(f"--ckpt-dir {ckpt_dir}: no run.json here or in the parent folder; it says how to rebuild the "
                    "model (our training scripts write it; see README 'Your own checkpoints')")


def exclude_steps(files: list[CheckpointFile], steps: list[int]) -> list[CheckpointFile]:
    """The selection without the checkpoints at `--exclude-steps`; each listed step must be in the selection."""
    selected = {f.step for f in files}
    unknown = [step for step in steps if step not in selected]
    if unknown:
        raise LcscError(f"--exclude-steps {unknown[0]}: no selected checkpoint at that step (selected: "
                        f"{min(selected)}..{max(selected)}, {len(selected)} checkpoints)")
    return [f for f in files if f.step not in set(steps)]


def reference_stats_path(args: argparse.Namespace, run: RunInfo) -> Path:
    """--ref-stats, or statistics of the run's training data (computed once and cached)."""
    if args.ref_stats:
        return Path(args.ref_stats).expanduser().resolve()
    if "data" not in run.config:
        raise LcscError(f"{run.run_dir / RUN_JSON} names no training 'data' to compute reference statistics from; "
                        "pass --ref-stats FILE.npz (see launch/fid_stats.py) or add \"data\" to run.json")
    return ensure_reference_stats(run.config["data"], args.extractor, device=args.device,
                                  inception_weights=args.inception_weights)


def check_paths_in_ray_job(args: argparse.Namespace) -> None:
    """Inside `ray job submit` the working directory is Ray's temporary copy of the code, so a relative path
    would put results where nobody finds them (or read inputs from the copy): ask for absolute ones."""
    if not in_ray_job():
        return
    for flag, value in (("--storage", args.storage), ("--ckpt-dir", args.ckpt_dir), ("--out", args.out),
                        ("--ref-stats", args.ref_stats), ("--inception-weights", args.inception_weights)):
        if value and not Path(value).expanduser().is_absolute():
            raise LcscError(f"{flag} {value} is a relative path, and this search runs as a Ray Job, whose working "
                            "directory is a temporary copy of the code; give an absolute path on storage every node sees")


def resume_command(argv: list[str] | None, kind: str, name: str, storage: Path) -> str:
    """The exact command that continues this search: the same flags, plus --resume and the experiment."""
    args = list(sys.argv[1:] if argv is None else argv)
    for flag, value in (("--name", name), ("--storage", str(storage))):
        if flag not in args:
            args += [flag, value]
    if "--resume" not in args:
        args.append("--resume")
    return shlex.join(["python", f"launch/tune_{kind}.py", *args])


def experiment_name(args: argparse.Namespace, kind: str, storage: Path) -> str:
    """The --name, or a fresh timestamped one; with --resume and no --name the newest experiment."""
    if args.name:
        return args.name
    if args.resume:
        existing = sorted((p for p in storage.glob(f"lcsc-{kind}-*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
        if not existing:
            raise LcscError(f"--resume: no lcsc-{kind}-* experiment in {storage}; pass --name and --storage of the search")
        return existing[-1].name
    return f"lcsc-{kind}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _resources(args: argparse.Namespace) -> dict[str, float]:
    resources = {"cpu": float(args.cpus_per_trial)}
    if args.gpus_per_trial:
        resources["gpu"] = float(args.gpus_per_trial)
    return resources


@ray.remote(max_retries=2)
def _heldout_score(spec: ScoringSpec, payload: dict | None, alpha: np.ndarray, seed: int, num_samples: int) -> dict:
    """Held-out score of one candidate on a Ray worker (the scorer is cached per worker process)."""
    result = cached_scorer(spec, payload).score(alpha, seed=seed, num_samples=num_samples)
    return {"score": float(result.score), "metric_name": result.metric_name}


@ray.remote
def _export(spec: ScoringSpec, payload: dict | None, alpha: np.ndarray, out_path: str, metrics: dict,
            grids: dict[str, np.ndarray], seed: int) -> str:
    """Export the merged winner where the stack already lives (a worker), in the inputs' format, and write
    a sample grid (held-out noise) for each profile in `grids` next to it, so the gain can be seen."""
    scorer = cached_scorer(spec, payload)
    exported = export_merged(scorer.stack, alpha, out_path, metrics=metrics)
    for name, grid_alpha in grids.items():
        scorer.write_samples(grid_alpha, Path(out_path).parent / f"samples_{name}.png", seed=seed)
    return str(exported)


def run_job(argv: list[str] | None, kind: str) -> dict[str, Any]:
    """Run the whole LCSC job for a CM (`kind="cm"`) or DM run; returns what results.json holds."""
    args = parse_args(argv, kind)
    check_paths_in_ray_job(args)  # before any path is resolved against the job's temporary working directory
    started = time.perf_counter()

    run_dir, ckpt_dir = resolve_run_dir(args, kind)
    run = load_run(run_dir)
    files = select_checkpoints(discover_checkpoints(ckpt_dir, args.ckpt_pattern), window=args.window,
                               interval=args.interval or 1, max_count=args.max_checkpoints)
    files = exclude_steps(files, args.exclude_steps)
    steps = [f.step for f in files]
    shown = steps if len(steps) <= 8 else [*steps[:4], "...", *steps[-3:]]
    print(f"checkpoints: {len(files)} from {ckpt_dir}, steps {', '.join(map(str, shown))}")

    ref_stats = reference_stats_path(args, run)
    space = build_space(args.space, len(files), bound=args.bound, sigma=args.sigma)
    baselines = baseline_profiles(steps, args.ema, args.phema or ())

    sampler_flags = {"nfe": args.nfe, "steps": args.grid_steps, "ts": args.ts, "order": args.order}
    sampler_options = {k: v for k, v in sampler_flags.items() if v is not None}
    spec = ScoringSpec(
        run_dir=str(run_dir), files=tuple(files), reference_stats=str(ref_stats), extractor=args.extractor,
        ckpt_key=args.ckpt_key, strip_key_prefix=args.strip_key_prefix, stack_dtype=args.stack_dtype,
        sampler=args.sampler, sampler_options=sampler_options, inception_weights=args.inception_weights,
        batch_size=args.batch_size, device=args.device, threads=max(1, int(args.cpus_per_trial)),
    )

    storage = Path(args.storage).expanduser().resolve()
    name = experiment_name(args, kind, storage)
    check_experiment(storage, name, resume=args.resume)  # before Ray starts: fail fast, never overwrite
    print(preflight(spec, run).summary())  # every input checked before an experiment folder exists
    output = Path(args.out).expanduser().resolve() if args.out else storage / name / "final"
    url = start_ray(args.address, dashboard=not args.no_dashboard, dashboard_host=args.dashboard_host,
                    dashboard_port=args.dashboard_port, quiet=args.quiet)
    if url:
        print(f"Ray dashboard: {url}")
    payload = ray.put(load_stack(spec).to_payload()) if args.stack_via_object_store else None

    trainable = tune.with_parameters(LcscTrial, scoring=spec, space=space, seed=args.noise_seed,
                                     num_samples=args.fid_samples, stack_payload=payload)
    print(f"search: {args.num_trials} trials, optimizer {args.optimizer}, space {space.name} (K={len(files)}), "
          f"{args.fid_samples} samples per evaluation; experiment {storage / name}")
    print(f"live plot of the search: {storage / name / PROGRESS_PLOT} (redrawn at most every "
          f"{PROGRESS_PLOT_EVERY_S:.0f} s)")
    table = run_search(
        trainable, space, optimizer=args.optimizer, num_trials=args.num_trials, seed=args.seed,
        warm_start=baselines, storage=storage, name=name, resume=args.resume,
        max_concurrent=args.max_concurrent, resources=_resources(args), max_failures=args.max_failures,
        progress=not args.quiet, penalty=PENALTY_SCORE, resume_hint=resume_command(argv, kind, name, storage),
    )
    search_seconds = time.perf_counter() - started
    return finish(args, table, space, baselines, steps, spec, payload, output, search_seconds)


def finish(args: argparse.Namespace, table: ResultTable, space: CoefficientSpace, baselines: dict[str, np.ndarray],
           steps: list[int], spec: ScoringSpec, payload: Any, output: Path, search_seconds: float) -> dict[str, Any]:
    """After the search: held-out re-scoring of the finalists and every baseline (the best of many noisy
    evaluations is biased low: docs/METHOD.md, Held-out re-scoring), the table, the export, results and plots."""
    started = time.perf_counter()
    searched_baselines = {name: row.score for name, row in table.baselines().items()}
    candidates = [ScoredCandidate(name, "baseline", alpha, searched_baselines.get(name))
                  for name, alpha in baselines.items()]
    candidates += [ScoredCandidate(f"search rank {i + 1} (trial {row.index})", "lcsc", row.alpha, row.score, trial=row.index)
                   for i, row in enumerate(pick_finalists(table, args.top_k))]
    heldout_seed = args.noise_seed + HELDOUT_SEED_OFFSET
    metric_name = rescore_heldout(candidates, spec, payload, args, heldout_seed)
    winner, best = print_verdict(candidates, metric_name, args)
    output.mkdir(parents=True, exist_ok=True)
    exported = export_best(best, winner, candidates, baselines, spec, payload, args, output, metric_name, heldout_seed)
    results = build_results(args, table, space, steps, spec, candidates, winner, best, exported, metric_name,
                            heldout_seed, timings={"search_seconds": search_seconds,
                                                   "final_seconds": time.perf_counter() - started,
                                                   "median_trial_stage_seconds": _median_stage_times(table)})
    write_results(output / "results.json", results)
    plot_best_so_far(output / "best_score_vs_trial.png", [r.score for r in table.rows], metric_name=metric_name,
                     penalty=PENALTY_SCORE, baselines=searched_baselines)
    plot_coefficients(output / "coefficients_vs_step.png", steps,
                      {"LCSC winner": winner.alpha, **{n: a for n, a in baselines.items() if n.startswith(("ema", "phema"))}})
    print(f"results: {output / 'results.json'}; merged checkpoint: {exported}; plots and sample grids in {output}")
    return results


def pick_finalists(table: ResultTable, top_k: int) -> list[TrialRecord]:
    """The `top_k` best searched (not baseline, not failed) trials with distinct coefficients, best first."""
    searched = [row for row in table.rows if not row.label.startswith("baseline:") and not row.metrics.get("failed")]
    finalists, seen = [], set()
    for row in sorted(searched, key=lambda r: r.score):
        key = row.alpha.round(12).tobytes()
        if key not in seen:
            seen.add(key)
            finalists.append(row)
        if len(finalists) == top_k:
            break
    if not finalists:
        raise LcscError(f"no search trial of {table.experiment_path} completed without failure; see the trial errors "
                        "there (lower --bound or check the sampler flags)")
    return finalists


def rescore_heldout(candidates: list[ScoredCandidate], spec: ScoringSpec, payload: Any, args: argparse.Namespace,
                    seed: int) -> str:
    """Score every candidate on the held-out noise, on Ray workers (in place); returns the metric's name."""
    resources = dict(num_cpus=args.cpus_per_trial, num_gpus=args.gpus_per_trial or 0)
    print(f"held-out scoring: {len(candidates)} candidates x {args.final_samples} samples (noise seed {seed})")
    heldout = ray.get([_heldout_score.options(name=f"lcsc held-out score: {c.name}", **resources)
                       .remote(spec, payload, c.alpha, seed, args.final_samples) for c in candidates])
    for candidate, result in zip(candidates, heldout):
        candidate.heldout_score = result["score"]
    return heldout[0]["metric_name"]


def print_verdict(candidates: list[ScoredCandidate], metric_name: str,
                  args: argparse.Namespace) -> tuple[ScoredCandidate, ScoredCandidate]:
    """Print the table and which baselines the LCSC winner beats; (the winner, the best candidate overall).

    The best overall is what gets exported: a baseline when the search found nothing better, which the user
    must hear rather than receive a worse model labelled as the winner."""
    baselines = [c for c in candidates if c.kind == "baseline"]
    lcsc = [c for c in candidates if c.kind == "lcsc"]
    winner = min(lcsc, key=lambda c: c.heldout_score)
    winner.name = f"LCSC winner (trial {winner.trial})"
    rows = baselines + [winner] + [c for c in lcsc if c is not winner]
    print(format_table(rows, metric_name, search_samples=args.fid_samples, final_samples=args.final_samples))
    beaten = [c.name for c in baselines if winner.heldout_score < c.heldout_score]
    unbeaten = sorted({c.name for c in baselines} - set(beaten))
    print(f"LCSC winner beats {len(beaten)}/{len(baselines)} baselines on held-out noise"
          + (f" (not: {', '.join(unbeaten)})" if unbeaten else ""))
    best = min(candidates, key=lambda c: c.heldout_score)
    if best is not winner:
        print(f"no searched candidate beat {best.name} on held-out noise: exporting {best.name} "
              "(try more --num-trials, another --optimizer or --space)")
    return winner, best


def export_best(best: ScoredCandidate, winner: ScoredCandidate, candidates: list[ScoredCandidate],
                baselines: dict[str, np.ndarray], spec: ScoringSpec, payload: Any, args: argparse.Namespace,
                output: Path, metric_name: str, seed: int) -> str:
    """Export `best` in the inputs' format, with sample grids of the winner, the newest checkpoint and the best
    baseline on held-out noise beside it; returns the exported path."""
    merged_name = "lcsc_merged" + spec.files[-1].path.suffix if spec.files[-1].path.is_file() else "lcsc_merged"
    best_baseline = min((c for c in candidates if c.kind == "baseline"), key=lambda c: c.heldout_score)
    grids = {"lcsc_winner": winner.alpha, "newest": baselines["newest"],
             f"best_baseline_{best_baseline.name}": best_baseline.alpha}
    return ray.get(_export.options(name=f"lcsc export: {best.name}", num_cpus=args.cpus_per_trial).remote(
        spec, payload, best.alpha, str(output / merged_name), {metric_name: best.heldout_score}, grids, seed))


def build_results(args: argparse.Namespace, table: ResultTable, space: CoefficientSpace, steps: list[int],
                  spec: ScoringSpec, candidates: list[ScoredCandidate], winner: ScoredCandidate,
                  best: ScoredCandidate, exported: str, metric_name: str, heldout_seed: int,
                  timings: dict[str, Any]) -> dict[str, Any]:
    """What results.json holds: settings, trial counts, every baseline, the winner, the export, timings."""
    beaten = [c.name for c in candidates if c.kind == "baseline" and winner.heldout_score < c.heldout_score]
    return {
        "metric": metric_name,
        "search": {"samples": args.fid_samples, "noise_seed": args.noise_seed, "optimizer": args.optimizer,
                   "space": args.space, "bound": args.bound, "sigma": space.sigma, "seed": args.seed,
                   "trials_completed": len(table.rows),
                   "trials_failed": sum(bool(r.metrics.get("failed")) for r in table.rows),
                   "trials_errored": table.num_errored, "experiment": table.experiment_path},
        "heldout": {"samples": args.final_samples, "noise_seed": heldout_seed},
        "steps": steps,
        "checkpoints": [str(f.path) for f in spec.files],
        "baselines": {c.name: {"alpha": c.alpha, "search_score": c.search_score, "heldout_score": c.heldout_score}
                      for c in candidates if c.kind == "baseline"},
        "winner": {"alpha": winner.alpha, "steps": steps, "trial": winner.trial, "search_score": winner.search_score,
                   "heldout_score": winner.heldout_score, "beats": beaten},
        "exported": {"name": best.name, "kind": best.kind, "alpha": best.alpha, "heldout_score": best.heldout_score,
                     "checkpoint": exported},
        "finalists": [{"trial": c.trial, "search_score": c.search_score, "heldout_score": c.heldout_score}
                      for c in candidates if c.kind == "lcsc"],
        "timings": timings,
    }


def _median_stage_times(table: ResultTable) -> dict[str, float]:
    stages: dict[str, list[float]] = {}
    for row in table.rows:
        for key, value in row.metrics.items():
            if key.startswith("time_"):
                stages.setdefault(key[5:], []).append(float(value))
    return {stage: float(np.median(values)) for stage, values in stages.items()}
