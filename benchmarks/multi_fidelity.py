"""Multi-fidelity search (ASHA over rounds of samples) vs full fidelity, at equal numbers of generated samples.

    python benchmarks/multi_fidelity.py                          # both digits demo runs, search seeds 0,1,2
    python benchmarks/multi_fidelity.py --cm-run RUN_CM --dm-run RUN_DM --full-trials 60

For each demo run and search seed, two real Ray Tune searches with the run's preset (optimizer, space,
baselines, --fid-samples): fifo, every trial scores all samples; asha, trials grow through the rounds and
the worse are stopped, with `--mf-factor` times the trials. Along each search the best candidate so far (by
its search score, as the job picks finalists) is re-scored on held-out noise, which gives the curve
"best held-out score vs samples generated" (plot) and the samples the multi-fidelity search needed to reach
the full-fidelity search's final held-out score (target: at most 1/3).

It also prints the per-round overhead of multi-fidelity trials at this size: the jackknife distances of a
round and the extra Ray report, as a fraction of a round (target < 5%), against a baseline from the same run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from ray import tune

from lcsc_ray.checkpoints import discover_checkpoints, select_checkpoints
from lcsc_ray.cluster import start_ray
from lcsc_ray.profiles import baseline_profiles
from lcsc_ray.reference_stats import ensure_reference_stats
from lcsc_ray.run_folder import load_run
from lcsc_ray.scoring import CandidateScorer, ScoringSpec
from lcsc_ray.search.flags import HELDOUT_SEED_OFFSET
from lcsc_ray.search.trial import FULL_FIDELITY_KEY, PENALTY_SCORE, LcscTrial, round_schedule
from lcsc_ray.search.tuner import ResultTable, run_search
from lcsc_ray.training.demo import ensure_demo_run
from lcsc_ray.search.objective import SearchObjective
from search_spaces import load_preset
from search_spaces.spaces import build_space

matplotlib.use("Agg")
STAGE_KEYS = ("time_merge", "time_sample", "time_features", "time_statistics", "time_distance")
DEFAULT_ROUNDS = {"cm": [250, 500, 1000], "dm": [125, 250, 500]}


def setup_run(kind: str, run_dir: Path | None) -> dict:
    """The preset's scoring spec, space and baselines for one demo run."""
    preset = load_preset(f"digits-{kind}")
    run_dir = Path(run_dir).resolve() if run_dir else ensure_demo_run(kind, quiet=True)
    run = load_run(run_dir)
    files = tuple(select_checkpoints(discover_checkpoints(run.checkpoint_dir), window=preset.get("window"),
                                     interval=preset.get("interval", 1), max_count=None))
    options = {k: preset[k] for k in ("nfe",) if k in preset}
    spec = ScoringSpec(run_dir=str(run_dir), files=files, extractor=preset["extractor"],
                       reference_stats=str(ensure_reference_stats(run.config["data"], preset["extractor"])),
                       sampler=preset.get("sampler"), sampler_options=options, batch_size=500, threads=1)
    space = build_space(preset["space"], len(files), bound=preset["bound"], sigma=preset.get("sigma"))
    baselines = baseline_profiles([f.step for f in files], preset["ema"], preset.get("phema", ()))
    return {"kind": kind, "preset": preset, "spec": spec, "space": space, "baselines": baselines, "run_dir": run_dir}


def search(setup: dict, storage: str, *, seed: int, scheduler: str, rounds: tuple[int, ...], num_trials: int,
           reduction_factor: float) -> dict:
    """One search: its result table, wall seconds, and from the candidate store (which holds every round's
    report, where the table holds each trial's last) the seconds of each round's own work by stage."""
    trainable = tune.with_parameters(LcscTrial, scoring=setup["spec"], space=setup["space"],
                                     objective=SearchObjective(),
                                     num_samples=rounds[-1], rounds=rounds)
    name = f"{setup['kind']}-{scheduler}-{seed}"
    start = time.perf_counter()
    table = run_search(trainable, setup["space"], optimizer=setup["preset"]["optimizer"], num_trials=num_trials,
                       seed=seed, warm_start=setup["baselines"], storage=storage, name=name, max_concurrent=1,
                       resources={"cpu": 1}, progress=False, penalty=PENALTY_SCORE, scheduler=scheduler,
                       rounds=rounds, reduction_factor=reduction_factor)
    wall = time.perf_counter() - start
    reports = [report for path in (Path(storage) / name / "candidates").glob("*.result.json")
               for report in json.loads(path.read_text())["rounds"]]
    return {"table": table, "wall": wall, "reports": reports}


def heldout_curve(table: ResultTable, scorer: CandidateScorer, cache: dict, heldout_samples: int) -> np.ndarray:
    """[trials, 2]: samples generated so far and the held-out score of the best candidate so far."""
    points, best, spent = [], None, 0
    for row in table.rows:  # suggestion order; one trial at a time, so also completion order
        spent += int(row.metrics.get("num_samples", 0))
        if not row.metrics.get("failed") and (best is None or row.score < best.score):
            best = row
        key = best.alpha.round(12).tobytes()
        if key not in cache:
            cache[key] = scorer.score(best.alpha, seed=HELDOUT_SEED_OFFSET, num_samples=heldout_samples).score
        points.append((spent, cache[key]))
    return np.array(points, dtype=np.float64)


def samples_to_reach(curve: np.ndarray, target: float) -> float:
    """The samples after which `curve` first reaches `target` (inf if never)."""
    reached = np.nonzero(curve[:, 1] <= target + 1e-12)[0]
    return float(curve[reached[0], 0]) if len(reached) else float("inf")


def overhead(full: dict, multi: dict) -> dict[str, float]:
    """Per-round overhead of multi-fidelity trials, from the two searches of one seed: the extra Ray cost of a
    report (the multi search's driver time per report beyond the full search's driver time per trial) and the
    jackknife distances of a round, against the mean seconds of a round's own work."""
    def driver_seconds(result: dict) -> float:  # wall time not spent in the trials' own stages
        return result["wall"] - sum(report.get(k, 0.0) for report in result["reports"] for k in STAGE_KEYS)

    per_trial = driver_seconds(full) / len(full["table"].rows)
    trials, rounds = len(multi["table"].rows), len(multi["reports"])
    scored = [report for report in multi["reports"] if not report.get("failed")]
    round_seconds = np.mean([sum(report.get(k, 0.0) for k in STAGE_KEYS if k != "time_merge") for report in scored])
    distance_seconds = np.mean([report.get("time_distance", 0.0) for report in scored])
    ray_per_report = max(0.0, (driver_seconds(multi) - per_trial * trials) / max(1, rounds - trials))
    return {"round_s": float(round_seconds), "distance_s": float(distance_seconds), "ray_per_report_s": ray_per_report,
            "driver_per_trial_s": per_trial, "fraction": float((distance_seconds + ray_per_report) / round_seconds)}


def plot(curves: dict, path: Path) -> None:
    figure = Figure(figsize=(11, 4.2))
    axes = figure.subplots(1, len(curves), squeeze=False)[0]
    for ax, (kind, by_seed) in zip(axes, curves.items()):
        for seed, (full, multi) in by_seed.items():
            color = f"C{seed}"
            ax.step(full[:, 0], full[:, 1], where="post", color=color, label=f"full fidelity, seed {seed}")
            ax.step(multi[:, 0], multi[:, 1], where="post", color=color, linestyle="--",
                    label=f"multi-fidelity (ASHA), seed {seed}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("samples generated by the search")
        ax.set_ylabel("held-out fd_digits of the best candidate so far")
        ax.set_title(f"digits {kind.upper()}")
        ax.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cm-run", help="digits CM run folder (default: the demo run, trained on first use)")
    parser.add_argument("--dm-run", help="digits DM run folder (default: the demo run, trained on first use)")
    parser.add_argument("--kinds", default="cm,dm", help="which demos, comma separated")
    parser.add_argument("--seeds", default="0,1,2", help="search seeds, comma separated")
    parser.add_argument("--full-trials", type=int, default=40, help="trials of each full-fidelity search")
    parser.add_argument("--mf-factor", type=float, default=3.0, help="multi-fidelity trials = this x --full-trials")
    parser.add_argument("--reduction-factor", type=float, default=3.0, help="ASHA keeps the best 1/factor per rung")
    parser.add_argument("--heldout-samples", type=int, default=2000, help="samples of each held-out re-scoring")
    parser.add_argument("--plot", default="docs/results/multi_fidelity.png", help="where the plot goes")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()

    start_ray(None, dashboard=False, quiet=True)
    curves, summary = {}, {}
    for kind in args.kinds.split(","):
        setup = setup_run(kind, getattr(args, f"{kind}_run"))
        fid = int(setup["preset"]["fid_samples"])
        rounds = round_schedule(DEFAULT_ROUNDS[kind], fid, "asha")
        scorer, cache = CandidateScorer(setup["spec"]), {}
        print(f"digits {kind}: {setup['run_dir']}, K={setup['space'].num_checkpoints}, optimizer "
              f"{setup['preset']['optimizer']}, {fid} samples; rounds {rounds}, {len(setup['baselines'])} baselines",
              flush=True)
        curves[kind], summary[kind] = {}, []
        for seed in map(int, args.seeds.split(",")):
            with tempfile.TemporaryDirectory() as storage:
                full = search(setup, storage, seed=seed, scheduler="fifo", rounds=(fid,), num_trials=args.full_trials,
                              reduction_factor=args.reduction_factor)
                multi = search(setup, storage, seed=seed, scheduler="asha", rounds=rounds,
                               num_trials=int(args.full_trials * args.mf_factor), reduction_factor=args.reduction_factor)
            full_curve = heldout_curve(full["table"], scorer, cache, args.heldout_samples)
            multi_curve = heldout_curve(multi["table"], scorer, cache, args.heldout_samples)
            budget, target = full_curve[-1, 0], full_curve[-1, 1]
            needed = samples_to_reach(multi_curve, target)
            at_budget = multi_curve[multi_curve[:, 0] <= budget, 1].min()
            at_trials = multi_curve[min(args.full_trials, len(multi_curve)) - 1, 1]  # the same number of trials
            stopped = sum(not row.metrics.get(FULL_FIDELITY_KEY, True) for row in multi["table"].rows)
            cost = overhead(full, multi)
            row = {"seed": seed, "full_samples": budget, "full_heldout": target, "multi_samples_to_reach": needed,
                   "fraction": needed / budget, "multi_heldout_at_full_budget": float(at_budget),
                   "multi_heldout_at_full_trials": float(at_trials), "multi_samples_at_full_trials":
                       float(multi_curve[min(args.full_trials, len(multi_curve)) - 1, 0]),
                   "multi_trials": len(multi["table"].rows), "multi_stopped": stopped,
                   "multi_samples": float(multi_curve[-1, 0]), "multi_final_heldout": float(multi_curve[-1, 1]),
                   "full_wall_s": full["wall"], "multi_wall_s": multi["wall"], **{f"overhead_{k}": v for k, v in cost.items()}}
            summary[kind].append(row)
            curves[kind][seed] = (full_curve, multi_curve)
            print(f"  seed {seed}: full fidelity {args.full_trials} trials, {budget:,.0f} samples -> held-out "
                  f"{target:.3f}; multi-fidelity reached it after {needed:,.0f} samples ({needed / budget:.2f}x), "
                  f"held-out {at_budget:.3f} at the full search's samples ({at_trials:.3f} after its "
                  f"{args.full_trials} trials, {row['multi_samples_at_full_trials']:,.0f} samples); "
                  f"{stopped}/{len(multi['table'].rows)} trials "
                  f"stopped; per-round overhead {cost['fraction']:.1%} of a {cost['round_s'] * 1e3:.0f} ms round "
                  f"(distances {cost['distance_s'] * 1e3:.1f} ms, Ray per report {cost['ray_per_report_s'] * 1e3:.1f} ms)",
                  flush=True)
        fractions = [r["fraction"] for r in summary[kind]]
        print(f"digits {kind}: samples to reach the full-fidelity held-out score, median over seeds "
              f"{np.median(fractions):.2f}x of full fidelity (target <= 0.33x)", flush=True)
    plot(curves, Path(args.plot))
    print(f"plot: {args.plot}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
