"""Multi-fidelity search (ASHA or racing over rounds of samples) vs full fidelity, at equal samples generated.

    python benchmarks/multi_fidelity.py                          # both digits demo runs, search seeds 0,1,2
    python benchmarks/multi_fidelity.py --cm-run RUN_CM --dm-run RUN_DM --full-trials 60
    python benchmarks/multi_fidelity.py --kinds cm --schedulers asha,race --race-z 1

For each demo run and search seed, real Ray Tune searches with the run's preset (optimizer, space,
baselines, --fid-samples): fifo, every trial scores all samples; then each of `--schedulers` (asha: trials
grow through the rounds and the worse are stopped by successive halving; race: stopped once their predicted
full score less `--race-z` standard errors is above the best complete trial), with `--mf-factor` times the
trials. Along each search the best candidate so far (by
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

from demo_setup import demo_scoring_spec  # benchmarks/ is on sys.path: the script's own folder
from lcsc_ray.cluster import start_ray
from lcsc_ray.profiles import baseline_profiles
from lcsc_ray.scoring import CandidateScorer
from lcsc_ray.search.flags import HELDOUT_SEED_OFFSET
from lcsc_ray.search.trial import (FULL_FIDELITY_KEY, JACKKNIFE_BLOCKS, PENALTY_SCORE, LcscTrial, comparable_score,
                                   jackknife_se, round_schedule)
from lcsc_ray.search.tuner import ResultTable, run_search
from lcsc_ray.search.objective import SearchObjective
from search_spaces import load_preset
from search_spaces.spaces import build_space

matplotlib.use("Agg")
STAGE_KEYS = ("time_merge", "time_sample", "time_features", "time_statistics", "time_distance")
DEFAULT_ROUNDS = {"cm": [250, 500, 1000], "dm": [125, 250, 500]}


def setup_run(kind: str, run_dir: Path | None) -> dict:
    """The preset's scoring spec, space and baselines for one demo run."""
    preset = load_preset(f"digits-{kind}")
    spec = demo_scoring_spec(kind, run_dir, preset=preset, window=True, batch_size=500, threads=1)
    space = build_space(preset["space"], len(spec.files), bound=preset["bound"], sigma=preset.get("sigma"))
    baselines = baseline_profiles([f.step for f in spec.files], preset["ema"], preset.get("phema", ()))
    return {"kind": kind, "preset": preset, "spec": spec, "space": space, "baselines": baselines,
            "run_dir": spec.run_dir}


def search(setup: dict, storage: str, *, seed: int, scheduler: str, rounds: tuple[int, ...], num_trials: int,
           reduction_factor: float, race_z: float = 1.0, race_pair: bool = True) -> dict:
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
                       rounds=rounds, reduction_factor=reduction_factor, race_z=race_z,
                       race_pair=race_pair)
    wall = time.perf_counter() - start
    reports = [report for path in (Path(storage) / name / "candidates").glob("*.result.json")
               for report in json.loads(path.read_text())["rounds"]]
    return {"table": table, "wall": wall, "reports": reports}


def heldout_curve(table: ResultTable, scorer: CandidateScorer, cache: dict, heldout_samples: int,
                  complete_only: bool = False) -> np.ndarray:
    """[trials, 2]: samples generated so far and the held-out score of the best candidate so far (by search
    score; with `complete_only` among the trials that ran to full fidelity, the race's incumbent)."""
    points, best, spent = [], None, 0
    for row in table.rows:  # suggestion order; one trial at a time, so also completion order
        spent += int(row.metrics.get("num_samples", 0))
        eligible = not complete_only or row.metrics.get(FULL_FIDELITY_KEY, True)
        if eligible and not row.metrics.get("failed") and (best is None or row.score < best.score):
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


def oracle_race_samples(table: ResultTable, curve: np.ndarray, first_round: int) -> tuple[float, int]:
    """A lower bound for any racing rule on this full-fidelity search: the samples it would have needed to
    reach its own final held-out score had every trial that did not improve the best search score so far
    cost only the first round, and every improvement the full count (it must be measured to become the
    best). Also the number of such improvements up to that trial."""
    reached = int(np.nonzero(curve[:, 1] <= curve[-1, 1] + 1e-12)[0][0])
    spent, improvements, best = 0.0, 0, float("inf")
    for row in table.rows[:reached + 1]:
        full = int(row.metrics.get("num_samples", 0))
        if not row.metrics.get("failed") and row.score < best:
            best, improvements, spent = row.score, improvements + 1, spent + full
        else:
            spent += min(first_round, full)
    return spent, improvements


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


def calibrate(setup: dict, rounds: tuple[int, ...], per_scale: int, seed: int = 0) -> None:
    """How well a round predicts the full-sample distance, and what the race's rule would decide, on the
    baselines and `per_scale` random candidates at each of 3 mutation scales around the initial value (all on
    search noise 0): per round the mean and spread of (comparable score / full distance − 1), and over all
    ordered pairs of candidates the share of stops of a candidate that was in fact better than the one it is
    compared with ("false stops") and of one more than 10% worse ("power"), paired and unpaired, per z."""
    space, scorer, rng = setup["space"], CandidateScorer(setup["spec"]), np.random.default_rng(seed)
    alphas = list(setup["baselines"].values())
    for scale in (0.3, 0.6, 1.0):
        alphas += [space.to_coefficients(space.init_value() + rng.normal(0, scale * space.sigma, space.dimension))
                   for _ in range(per_scale)]
    runs = [list(scorer.score_rounds(alpha, seed=0, rounds=rounds, blocks=JACKKNIFE_BLOCKS)) for alpha in alphas]
    full = np.array([run[-1].score for run in runs])
    first, second = np.nonzero(~np.eye(len(runs), dtype=bool))  # candidate `first` against incumbent `second`
    truth = full[first] - full[second]
    print(f"calibration: {len(runs)} candidates, rounds {rounds}")
    for k, n in enumerate(rounds[:-1]):
        comp = np.array([comparable_score(run[k], rounds[-1]) for run in runs])
        blocks = np.array([run[k].leave_out for run in runs])
        error = comp / full - 1
        unpaired_se = np.array([jackknife_se(b) for b in blocks])
        paired_se = np.array([jackknife_se(blocks[i] - blocks[j]) for i, j in zip(first, second)])
        line = (f"  {n} samples: comparable vs full {error.mean():+.1%} mean, {error.std():.1%} spread, above for "
                f"{(error > 0).mean():.0%}; jackknife SE {np.median(unpaired_se / full):.1%} unpaired, "
                f"{np.median(paired_se / full[second]):.1%} paired")
        for z in (0.0, 1.0, 2.0):
            for name, stop in (("paired", comp[first] - comp[second] > z * paired_se),
                               ("unpaired", comp[first] - z * unpaired_se[first] > full[second])):
                line += (f"\n    z={z:g} {name}: false stops {stop[truth < 0].mean():.1%}, power "
                         f"{stop[truth > 0.1 * full[second]].mean():.0%}")
        print(line, flush=True)


def plot(curves: dict, path: Path) -> None:
    figure = Figure(figsize=(11, 4.2))
    axes = figure.subplots(1, len(curves), squeeze=False)[0]
    styles = {"fifo": ("-", "full fidelity"), "asha": ("--", "ASHA"), "race": (":", "race")}
    for ax, (kind, by_seed) in zip(axes, curves.items()):
        for seed, by_scheduler in by_seed.items():
            for scheduler, curve in by_scheduler.items():
                style, label = styles.get(scheduler, ("-.", scheduler))
                ax.step(curve[:, 0], curve[:, 1], where="post", color=f"C{seed}", linestyle=style,
                        label=f"{label}, seed {seed}")
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
    parser.add_argument("--schedulers", default="asha,race", help="multi-fidelity schedulers to compare, comma separated")
    parser.add_argument("--race-z", type=float, default=1.0, help="race: standard errors of the bound")
    parser.add_argument("--race-unpaired", action="store_true",
                        help="race: bound each round's own prediction against the incumbent's full score, "
                        "instead of the difference to the incumbent at the same round")
    parser.add_argument("--rounds", help="sample counts of the rounds before the last (default: CM 250,500,1000; "
                        "DM 125,250,500)")
    parser.add_argument("--heldout-samples", type=int, default=2000, help="samples of each held-out re-scoring")
    parser.add_argument("--plot", default="multi_fidelity.png",
                        help="where the plot goes (docs/results/ holds the documented ones: name them to replace)")
    parser.add_argument("--json", help="also write the numbers here")
    parser.add_argument("--calibrate", type=int, metavar="N", help="instead: score the baselines and 3N random "
                        "candidates at every round (CM rounds 125,250,500,1000) and print how well each round "
                        "predicts the full distance and what the race's rule decides, paired and unpaired")
    args = parser.parse_args()
    if args.calibrate:
        for kind in args.kinds.split(","):
            setup = setup_run(kind, getattr(args, f"{kind}_run"))
            calibrate(setup, round_schedule([int(n) for n in args.rounds.split(",")] if args.rounds else
                                            [125, 250, 500, 1000], int(setup["preset"]["fid_samples"]), "asha"),
                      args.calibrate)
        return

    start_ray(None, dashboard=False, quiet=True)
    curves, summary = {}, {}
    for kind in args.kinds.split(","):
        setup = setup_run(kind, getattr(args, f"{kind}_run"))
        fid = int(setup["preset"]["fid_samples"])
        rounds = round_schedule([int(n) for n in args.rounds.split(",")] if args.rounds else DEFAULT_ROUNDS[kind],
                                fid, "asha")
        scorer, cache = CandidateScorer(setup["spec"]), {}
        schedulers = args.schedulers.split(",")
        print(f"digits {kind}: {setup['run_dir']}, K={setup['space'].num_checkpoints}, optimizer "
              f"{setup['preset']['optimizer']}, {fid} samples; rounds {rounds}, {len(setup['baselines'])} baselines; "
              f"{', '.join(schedulers)} against fifo (race z {args.race_z}"
              f"{', unpaired' if args.race_unpaired else ', paired'})", flush=True)
        curves[kind], summary[kind] = {}, []
        for seed in map(int, args.seeds.split(",")):
            with tempfile.TemporaryDirectory() as storage:
                full = search(setup, storage, seed=seed, scheduler="fifo", rounds=(fid,), num_trials=args.full_trials,
                              reduction_factor=args.reduction_factor)
                multis = {name: search(setup, storage, seed=seed, scheduler=name, rounds=rounds,
                                       num_trials=int(args.full_trials * args.mf_factor),
                                       reduction_factor=args.reduction_factor, race_z=args.race_z,
                                       race_pair=not args.race_unpaired)
                          for name in schedulers}
            full_curve = heldout_curve(full["table"], scorer, cache, args.heldout_samples)
            budget, target = full_curve[-1, 0], full_curve[-1, 1]
            curves[kind][seed] = {"fifo": full_curve}
            oracle, improvements = oracle_race_samples(full["table"], full_curve, rounds[0])
            first_reach = samples_to_reach(full_curve, target)
            print(f"  seed {seed}: full fidelity {args.full_trials} trials, {budget:,.0f} samples -> held-out "
                  f"{target:.3f} (first reached after {first_reach:,.0f} samples); an oracle race over its trials "
                  f"({improvements} improvements at {fid}, the rest at {rounds[0]}) would need {oracle:,.0f} "
                  f"({oracle / budget:.2f}x)", flush=True)
            for name, multi in multis.items():
                multi_curve = heldout_curve(multi["table"], scorer, cache, args.heldout_samples)
                needed = samples_to_reach(multi_curve, target)
                complete_curve = heldout_curve(multi["table"], scorer, cache, args.heldout_samples, complete_only=True)
                needed_complete = samples_to_reach(complete_curve, target)
                third_complete = complete_curve[complete_curve[:, 0] <= budget / 3, 1]
                at_budget = multi_curve[multi_curve[:, 0] <= budget, 1].min()
                third = multi_curve[multi_curve[:, 0] <= budget / 3, 1]
                at_third = float(third.min()) if len(third) else float("nan")
                at_trials = multi_curve[min(args.full_trials, len(multi_curve)) - 1, 1]  # the same number of trials
                stopped = sum(not row.metrics.get(FULL_FIDELITY_KEY, True) for row in multi["table"].rows)
                cost = overhead(full, multi)
                row = {"scheduler": name, "seed": seed, "full_samples": budget, "full_heldout": target,
                       "full_first_reach": first_reach, "oracle_race_samples": oracle,
                       "oracle_race_improvements": improvements,
                       "multi_samples_to_reach": needed, "fraction": needed / budget,
                       "complete_samples_to_reach": needed_complete, "complete_fraction": needed_complete / budget,
                       "complete_heldout_at_third_budget": float(third_complete.min()) if len(third_complete)
                       else float("nan"), "complete_curve": complete_curve.tolist(),
                       "multi_heldout_at_full_budget": float(at_budget), "multi_heldout_at_third_budget": at_third,
                       "multi_heldout_at_full_trials": float(at_trials), "multi_samples_at_full_trials":
                           float(multi_curve[min(args.full_trials, len(multi_curve)) - 1, 0]),
                       "multi_trials": len(multi["table"].rows), "multi_stopped": stopped,
                       "multi_samples": float(multi_curve[-1, 0]), "multi_final_heldout": float(multi_curve[-1, 1]),
                       "full_wall_s": full["wall"], "multi_wall_s": multi["wall"], "multi_curve": multi_curve.tolist(),
                       "full_curve": full_curve.tolist(),
                       **{f"overhead_{k}": v for k, v in cost.items()}}
                summary[kind].append(row)
                curves[kind][seed][name] = multi_curve
                print(f"    {name}: reached it after {needed:,.0f} samples ({needed / budget:.2f}x; taking the best "
                      f"complete trial so far: {needed_complete:,.0f}, {needed_complete / budget:.2f}x, held-out "
                      f"{row['complete_heldout_at_third_budget']:.3f} at a third of the samples), held-out "
                      f"{at_budget:.3f} at the full search's samples, {at_third:.3f} at a third of them "
                      f"({at_trials:.3f} after its {args.full_trials} trials, "
                      f"{row['multi_samples_at_full_trials']:,.0f} samples); {stopped}/{len(multi['table'].rows)} "
                      f"trials stopped; per-round overhead {cost['fraction']:.1%} of a {cost['round_s'] * 1e3:.0f} ms "
                      f"round (distances {cost['distance_s'] * 1e3:.1f} ms, Ray per report "
                      f"{cost['ray_per_report_s'] * 1e3:.1f} ms)", flush=True)
        for name in schedulers:
            fractions = [r["fraction"] for r in summary[kind] if r["scheduler"] == name]
            complete = [r["complete_fraction"] for r in summary[kind] if r["scheduler"] == name]
            print(f"digits {kind} {name}: samples to reach the full-fidelity held-out score, median over seeds "
                  f"{np.median(fractions):.2f}x of full fidelity, worst {max(fractions):.2f}x (best complete trial: "
                  f"median {np.median(complete):.2f}x, worst {max(complete):.2f}x; target <= 0.33x)", flush=True)
    plot(curves, Path(args.plot))
    print(f"plot: {args.plot}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
