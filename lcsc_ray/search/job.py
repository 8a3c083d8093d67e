"""The LCSC job behind `launch/tune_cm.py` and `launch/tune_dm.py`, readable top to bottom:

run folder → select checkpoints → reference statistics → coefficient space + baseline profiles → Ray →
Ray Tune search (Nevergrad) → held-out re-scoring of the finalists and every baseline → table, winner
export, results.json and plots.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray import tune

from lcsc_ray.checkpoints import discover_checkpoints, select_checkpoints
from lcsc_ray.cluster import start_ray
from lcsc_ray.errors import LcscError
from lcsc_ray.export import export_merged
from lcsc_ray.profiles import baseline_profiles
from lcsc_ray.reference_stats import ensure_reference_stats
from lcsc_ray.run_folder import load_run
from lcsc_ray.scoring import ScoringSpec, cached_scorer
from lcsc_ray.search.report import (ScoredCandidate, format_table, plot_best_so_far, plot_coefficients,
                                    write_results)
from lcsc_ray.search.trial import PENALTY_SCORE, LcscTrial
from lcsc_ray.search.tuner import ResultTable, check_experiment, run_search
from lcsc_ray.stack import STORAGE_DTYPES, CheckpointStack
from lcsc_ray.training.demo import ensure_demo_run
from search_spaces import load_preset
from search_spaces.spaces import CoefficientSpace, build_space

HELDOUT_SEED_OFFSET = 1_000_003  # held-out noise seed = search noise seed + this (any fixed, distinct value)


def build_parser(kind: str) -> argparse.ArgumentParser:
    """Flags shared by tune_cm.py and tune_dm.py; a preset (`--preset`) supplies the defaults."""
    model = "consistency model" if kind == "cm" else "diffusion model"
    parser = argparse.ArgumentParser(
        description=f"LCSC: search coefficients that linearly combine the saved checkpoints of one {model} "
        "training run so the merged model scores a lower Fréchet distance; Nevergrad optimizers on Ray Tune. "
        f"With no arguments: trains the embedded digits {kind.upper()} demo run on first use and searches it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    g = parser.add_argument_group("what to search")
    g.add_argument("--preset", default=f"digits-{kind}", help="preset name or JSON file from search_spaces/presets; "
                   "its values are the defaults of the flags below")
    g.add_argument("--ckpt-dir", help="training run folder (with run.json and checkpoints/) or a folder of "
                   "checkpoints whose run.json is in it or its parent; default: the embedded demo run (trained on first use). "
                   "On a cluster it must be a path every node sees (shared storage), or use --stack-via-object-store")
    g.add_argument("--ckpt-pattern", help="regex with one group capturing the step in checkpoint names")
    g.add_argument("--ckpt-key", help="sub-dict of .pt checkpoints holding the state dict (model, ema, ...)")
    g.add_argument("--window", type=int, help="only checkpoints from the last WINDOW training iterations")
    g.add_argument("--interval", type=int, help="keep every INTERVAL-th saved checkpoint")
    g.add_argument("--max-checkpoints", type=int, help="keep at most this many (the newest)")
    g.add_argument("--stack-dtype", choices=sorted(STORAGE_DTYPES), default="float32",
                   help="storage dtype of the stack (16-bit ones store differences from the newest checkpoint)")
    g.add_argument("--stack-via-object-store", action="store_true",
                   help="load the stack once in the driver and ship it to workers through Ray's object store")
    g = parser.add_argument_group("how to score")
    g.add_argument("--extractor", help="feature extractor: 'inception' (FID) or 'digits' (fd_digits)")
    g.add_argument("--inception-weights", help="path of pt_inception-2015-12-05-6726825d.pth for FID")
    g.add_argument("--ref-stats", help="reference statistics .npz (pytorch-fid format); default: computed "
                   "from the run's training data and cached")
    g.add_argument("--sampler", help="CM: onestep | multistep; DM: dpmsolver++ | ddim | heun")
    g.add_argument("--nfe", type=int, help="network evaluations per sample (DM samplers)")
    g.add_argument("--steps", type=int, help="CM multistep: number of points on the Karras grid")
    g.add_argument("--ts", type=lambda s: [int(t) for t in s.split(",")], help="CM multistep grid indices, e.g. 0,10,17")
    g.add_argument("--fid-samples", type=int, help="samples per search evaluation (fixed search noise)")
    g.add_argument("--final-samples", type=int, help="samples per held-out evaluation of finalists and baselines")
    g.add_argument("--batch-size", type=int, default=500, help="sampling/feature batch size")
    g.add_argument("--noise-seed", type=int, default=0, help="seed of the fixed search noise; held-out noise "
                   f"uses this + {HELDOUT_SEED_OFFSET}")
    g = parser.add_argument_group("how to search")
    g.add_argument("--num-trials", type=int, help="search budget: evaluated candidates, baselines included")
    g.add_argument("--optimizer", help="'lcsc-es' (the paper's evolutionary search) or any Nevergrad optimizer name")
    g.add_argument("--space", help="coefficient space: full | affine | grouped:G")
    g.add_argument("--bound", type=float, help="coefficients are searched in [-bound, bound]")
    g.add_argument("--sigma", type=float, help="mutation scale of the searched value per coordinate "
                   "(default 1/sqrt(dimension): one mutation moves α by about 1 in Euclidean norm); smaller "
                   "values search closer to the baselines")
    g.add_argument("--ema", type=lambda s: [float(b) for b in s.split(",")],
                   help="EMA decays (per training iteration) used as baselines, comma separated; pick rates whose "
                   "half-life fits inside the checkpoint window")
    g.add_argument("--phema", type=lambda s: [float(w) for w in s.split(",") if w.strip()],
                   help="widths σ_rel of EDM2 power-function (post-hoc) EMAs used as baselines, comma separated "
                   "(e.g. 0.05,0.1; a fraction of the training time); empty string for none")
    g.add_argument("--top-k", type=int, help="search finalists re-scored on held-out noise")
    g.add_argument("--seed", type=int, default=0, help="optimizer seed")
    g = parser.add_argument_group("where and on what")
    g.add_argument("--storage", default="lcsc_results", help="Ray Tune storage folder (shared storage on a cluster)")
    g.add_argument("--name", help="experiment name; default: lcsc-<kind>-<date-time>, or the newest one with --resume")
    g.add_argument("--output", help="folder for results.json, plots and the merged checkpoint; "
                   "default: <storage>/<name>/final")
    g.add_argument("--resume", action="store_true", help="continue the experiment --name in --storage")
    g.add_argument("--address", help="existing Ray cluster ('auto' or host:port); default: start a local one")
    g.add_argument("--cpus-per-trial", type=float, default=1, help="CPUs per trial (also its torch threads)")
    g.add_argument("--gpus-per-trial", type=float, default=0, help="GPUs per trial (fractional packs trials onto a GPU)")
    g.add_argument("--max-concurrent", type=int, default=1,
                   help="trials running at once (raise it with more cores or GPUs; on 2 CPU cores a second "
                   "concurrent trial measured no faster, see benchmarks/trial_overhead.py)")
    g.add_argument("--max-failures", type=int, default=2, help="retries of a trial whose process or node died")
    g.add_argument("--device", default="auto", help="torch device for trials: auto | cpu | cuda")
    g.add_argument("--dashboard-host", default="127.0.0.1", help="Ray dashboard bind address (no authentication: "
                   "keep loopback unless you know who can reach it)")
    g.add_argument("--dashboard-port", type=int, default=8265, help="Ray dashboard port")
    g.add_argument("--no-dashboard", action="store_true", help="do not start the Ray dashboard")
    g.add_argument("--quiet", action="store_true", help="less console output")
    del add
    return parser


def apply_preset(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Fill every flag the user left unset from the preset; the preset's keys are flag names."""
    preset = load_preset(args.preset)
    dests = {action.dest for action in parser._actions}
    for key, value in preset.items():
        dest = key.replace("-", "_")
        if dest in dests and getattr(args, dest, None) is None:
            setattr(args, dest, value)
    return args


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
    return {"score": float(result.score), "metric_name": result.metric_name, "timings": result.timings}


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
    parser = build_parser(kind)
    args = apply_preset(parser.parse_args(argv), parser)
    started = time.perf_counter()

    run_dir, ckpt_dir = resolve_run_dir(args, kind)
    run = load_run(run_dir)
    files = select_checkpoints(discover_checkpoints(ckpt_dir, args.ckpt_pattern), window=args.window,
                               interval=args.interval or 1, max_count=args.max_checkpoints)
    steps = [f.step for f in files]
    shown = steps if len(steps) <= 8 else [*steps[:4], "...", *steps[-3:]]
    print(f"checkpoints: {len(files)} from {ckpt_dir}, steps {', '.join(map(str, shown))}")

    ref_stats = Path(args.ref_stats).expanduser().resolve() if args.ref_stats else \
        ensure_reference_stats(run.config["data"], args.extractor, inception_weights=args.inception_weights)
    space = build_space(args.space, len(files), bound=args.bound, sigma=args.sigma)
    baselines = baseline_profiles(steps, args.ema, args.phema or ())

    sampler_options = {k: v for k, v in {"nfe": args.nfe, "steps": args.steps, "ts": args.ts}.items() if v is not None}
    spec = ScoringSpec(
        run_dir=str(run_dir), files=tuple(files), reference_stats=str(ref_stats), extractor=args.extractor,
        ckpt_key=args.ckpt_key, stack_dtype=args.stack_dtype, sampler=args.sampler, sampler_options=sampler_options,
        inception_weights=args.inception_weights, batch_size=args.batch_size, device=args.device,
        threads=max(1, int(args.cpus_per_trial)),
    )

    storage = Path(args.storage).expanduser().resolve()
    name = experiment_name(args, kind, storage)
    check_experiment(storage, name, resume=args.resume)  # before Ray starts: fail fast, never overwrite
    output = Path(args.output).expanduser().resolve() if args.output else storage / name / "final"
    url = start_ray(args.address, dashboard=not args.no_dashboard, dashboard_host=args.dashboard_host,
                    dashboard_port=args.dashboard_port, quiet=args.quiet)
    if url:
        print(f"Ray dashboard: {url}")
    payload = None
    if args.stack_via_object_store:
        payload = ray.put(CheckpointStack.from_files(files, ckpt_key=args.ckpt_key).to_payload())

    trainable = tune.with_parameters(LcscTrial, scoring=spec, space=space, seed=args.noise_seed,
                                     num_samples=args.fid_samples, stack_payload=payload)
    print(f"search: {args.num_trials} trials, optimizer {args.optimizer}, space {space.name} (K={len(files)}), "
          f"{args.fid_samples} samples per evaluation; experiment {storage / name}")
    table = run_search(
        trainable, space, optimizer=args.optimizer, num_trials=args.num_trials, seed=args.seed,
        warm_start=baselines, storage=storage, name=name, resume=args.resume,
        max_concurrent=args.max_concurrent, resources=_resources(args), max_failures=args.max_failures,
        progress=not args.quiet, penalty=PENALTY_SCORE,
    )
    if table.input_error:
        raise LcscError(f"{table.input_error} (search stopped; fix this, then continue with --resume --name {name} "
                        f"--storage {storage})")
    search_seconds = time.perf_counter() - started
    return finish(args, table, space, baselines, steps, spec, payload, output, search_seconds)


def finish(args: argparse.Namespace, table: ResultTable, space: CoefficientSpace, baselines: dict[str, np.ndarray],
           steps: list[int], spec: ScoringSpec, payload: Any, output: Path, search_seconds: float) -> dict[str, Any]:
    """Held-out re-scoring (LCSC-NOTES §1: the best of many noisy evaluations is biased low), the table,
    the exported winner, results.json and the plots."""
    started = time.perf_counter()
    searched = [row for row in table.rows if not row.label.startswith("baseline:") and not row.metrics.get("failed")]
    finalists, seen = [], set()
    for row in sorted(searched, key=lambda r: r.score):
        key = row.alpha.round(12).tobytes()
        if key not in seen:
            seen.add(key)
            finalists.append(row)
        if len(finalists) == args.top_k:
            break
    if not finalists:
        raise LcscError(f"no search trial of {table.experiment_path} completed without failure; see the trial errors "
                        "there (lower --bound or check the sampler flags)")
    searched_baselines = table.baselines()
    candidates = [ScoredCandidate(name, "baseline", alpha, searched_baselines[name].score if name in searched_baselines else None)
                  for name, alpha in baselines.items()]
    candidates += [ScoredCandidate(f"search rank {i + 1} (trial {row.index})", "lcsc", row.alpha, row.score, trial=row.index)
                   for i, row in enumerate(finalists)]
    heldout_seed = args.noise_seed + HELDOUT_SEED_OFFSET
    task = _heldout_score.options(num_cpus=args.cpus_per_trial, num_gpus=args.gpus_per_trial or 0)
    print(f"held-out scoring: {len(candidates)} candidates x {args.final_samples} samples (noise seed {heldout_seed})")
    heldout = ray.get([task.remote(spec, payload, c.alpha, heldout_seed, args.final_samples) for c in candidates])
    for candidate, result in zip(candidates, heldout):
        candidate.heldout_score, candidate.timings = result["score"], result["timings"]
    lcsc = [c for c in candidates if c.kind == "lcsc"]
    winner = min(lcsc, key=lambda c: c.heldout_score)
    winner.name = f"LCSC winner (trial {winner.trial})"
    rows = [c for c in candidates if c.kind == "baseline"] + [winner] + [c for c in lcsc if c is not winner]
    metric_name = heldout[0]["metric_name"]
    print(format_table(rows, metric_name, search_samples=args.fid_samples, final_samples=args.final_samples))
    beaten = [c.name for c in candidates if c.kind == "baseline" and winner.heldout_score < c.heldout_score]
    print(f"LCSC winner beats {len(beaten)}/{len(baselines)} baselines on held-out noise"
          + (f" (not: {', '.join(sorted(set(baselines) - set(beaten)))})" if len(beaten) < len(baselines) else ""))
    # Export the best held-out candidate overall: a baseline when the search found nothing better, which the
    # user must hear rather than receive a worse model labelled as the winner.
    best = min(candidates, key=lambda c: c.heldout_score)
    if best is not winner:
        print(f"no searched candidate beat {best.name} on held-out noise: exporting {best.name} "
              "(try more --num-trials, another --optimizer or --space)")

    output.mkdir(parents=True, exist_ok=True)
    merged_name = "lcsc_merged" + spec.files[-1].path.suffix if spec.files[-1].path.is_file() else "lcsc_merged"
    best_baseline = min((c for c in candidates if c.kind == "baseline"), key=lambda c: c.heldout_score)
    grids = {"lcsc_winner": winner.alpha, "newest": baselines["newest"],
             f"best_baseline_{best_baseline.name}": best_baseline.alpha}
    exported = ray.get(_export.options(num_cpus=args.cpus_per_trial).remote(
        spec, payload, best.alpha, str(output / merged_name), {metric_name: best.heldout_score}, grids, heldout_seed))
    final_seconds = time.perf_counter() - started
    stage_times = _median_stage_times(table)
    results = {
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
                      for c in lcsc],
        "timings": {"search_seconds": search_seconds, "final_seconds": final_seconds,
                    "median_trial_stage_seconds": stage_times},
    }
    write_results(output / "results.json", results)
    plot_best_so_far(output / "best_score_vs_trial.png", [r.score for r in table.rows], metric_name=metric_name,
                     penalty=PENALTY_SCORE, baselines={n: r.score for n, r in searched_baselines.items()})
    plot_coefficients(output / "coefficients_vs_step.png", steps,
                      {"LCSC winner": winner.alpha, **{n: a for n, a in baselines.items() if n.startswith(("ema", "phema"))}})
    print(f"results: {output / 'results.json'}; merged checkpoint: {exported}; plots and sample grids in {output}")
    return results


def _median_stage_times(table: ResultTable) -> dict[str, float]:
    stages: dict[str, list[float]] = {}
    for row in table.rows:
        for key, value in row.metrics.items():
            if key.startswith("time_"):
                stages.setdefault(key[5:], []).append(float(value))
    return {stage: float(np.median(values)) for stage, values in stages.items()}
