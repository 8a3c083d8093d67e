"""Regenerate docs/RESULTS.md and its plots (docs/results/*.png): does LCSC deliver on the embedded digits
runs, and how fast is the search? Every number in RESULTS.md is produced by this script.

    python benchmarks/run_all.py            # --quick (default): under an hour on 2 CPU cores
    python benchmarks/run_all.py --full     # bigger searches and more held-out samples: hours on 2 cores
    python benchmarks/run_all.py --smoke    # a few minutes: checks the script end to end, numbers meaningless

Items: (1) LCSC vs baselines (newest, uniform, EMA rates, EDM2 post-hoc EMAs, the training EMA) over 3 search
seeds on the digits CM and DM; (2) 1-step LCSC vs the 2-step base CM, and the smallest DM NFE at which LCSC
matches the newest checkpoint (and the best baseline) at the default NFE; (3) LCSC on the first 1/2, 1/4, 1/8
of the CM run vs the full run; (4) best search score vs trials for lcsc-es and three Nevergrad optimizers over
1,000 trials and 3 seeds each; (5) the speed benchmarks (merge_bench.py, fid_bench.py, trial_overhead.py,
sampling_bench.py) run as they are and their output copied in; (6) the output benchmarks/gpu_check.sh saved
on a GPU machine. Items 1-3 search through the product's job (`run_job`) on one local Ray session; item 4
drives the product's searcher in a plain loop, two searches at a time (repro_search.py). Held-out scores
everywhere use the job's held-out noise seed, so numbers of the same model kind compare across items.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]

import numpy as np

from lcsc_ray.atomic import atomic_write_text
from lcsc_ray.checkpoints import discover_checkpoints
from lcsc_ray.errors import run_cli
from lcsc_ray.images import new_figure, save_figure
from lcsc_ray.paths import cache_dir
from lcsc_ray.run_folder import load_run
from lcsc_ray.training.demo import ensure_demo_run
from repro_search import (HeldoutScorer, SearchRun, ask_tell_search, first_fraction_run, search,
                          training_ema_file)
from search_spaces import load_preset

# Sizes per mode. cm_trials/dm_trials: search budget (baselines included); *_final: held-out samples;
# search_flags: added to every search (smoke: small evaluations, so the script's paths are checked in seconds).
SETTINGS: dict[str, dict[str, Any]] = {
    "smoke": dict(seeds=[0], cm_trials=12, dm_trials=10, cm_final=300, dm_final=300, top_k=2, dm_nfes=[5],
                  fractions=[1 / 2], subset_trials=12, optimizers=["TwoPointsDE"], opt_seeds=[0], opt_trials=15,
                  opt_samples=200, midpoints=[10], merge=["--checkpoints", "4", "--repeats", "2"],
                  fid=["--repeats", "1"], overhead=["--trials", "10"], sampling=["--samples", "500", "--repeats", "1"],
                  search_flags=["--fid-samples", "200", "--rounds", "50,100", "--heldout-seeds", "2"]),
    "quick": dict(seeds=[0, 1, 2], cm_trials=150, dm_trials=60, cm_final=4000, dm_final=2000, top_k=3,
                  dm_nfes=[5, 7], fractions=[1 / 2, 1 / 4, 1 / 8], subset_trials=100,
                  optimizers=["TwoPointsDE", "CMA", "OnePlusOne"], opt_seeds=[0, 1, 2], opt_trials=1000,
                  opt_samples=1000, midpoints=[6, 8, 10, 12, 14], merge=["--checkpoints", "20", "--repeats", "5"],
                  fid=["--repeats", "1"], overhead=["--trials", "50"], sampling=[], search_flags=[]),
    "full": dict(seeds=[0, 1, 2], cm_trials=1000, dm_trials=150, cm_final=5000, dm_final=4000, top_k=5,
                 dm_nfes=[4, 5, 6, 7, 12], fractions=[1 / 2, 1 / 4, 1 / 8], subset_trials=400,
                 optimizers=["TwoPointsDE", "CMA", "OnePlusOne", "DiagonalCMA"], opt_seeds=[0, 1, 2], opt_trials=1000,
                 opt_samples=2000, midpoints=[4, 6, 8, 10, 12, 14, 16], merge=[], fid=[], overhead=[], sampling=[],
                 search_flags=[]),
}
DM_SEARCH_NFE = 9  # the digits-dm preset's NFE (the paper's reduced budget)
DM_DEFAULT_NFE = 15  # DPM-Solver++'s default in lcsc_ray/sampling/dm.py (the LCSC repo's default DM sampler)
GPU_CHECK_OUTPUT = "gpu_check.txt"  # written by benchmarks/gpu_check.sh next to the plots
TWO_STEP_GRID = 18  # CM multistep grid size (lcsc_ray/sampling/cm.py default, the CIFAR-10 setting)


def stats(values: list[float]) -> str:
    """mean ± sample std (min..max) of the per-seed values."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 1:
        return f"{arr[0]:.1f}"
    return f"{arr.mean():.1f} ± {arr.std(ddof=1):.1f} ({arr.min():.1f}..{arr.max():.1f})"


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- items


def item1_baselines(cfg: dict, storage: Path, plots: Path) -> tuple[str, dict[str, list[SearchRun]], dict[str, float]]:
    """LCSC vs baselines over the search seeds, CM (one step) and DM (DPM-Solver++ at 9 NFE)."""
    runs: dict[str, list[SearchRun]] = {"cm": [], "dm": []}
    training_ema: dict[str, float] = {}
    text = ["## 1. LCSC vs baselines (held-out fd_digits, lower is better)\n"]
    fig, axes = new_figure(2)
    for col, kind in enumerate(("cm", "dm")):
        trials, final = cfg[f"{kind}_trials"], cfg[f"{kind}_final"]
        run_dir = cfg["runs"][kind]
        for seed in cfg["seeds"]:
            runs[kind].append(search(kind, f"item1-{kind}-s{seed}", storage, [
                "--ckpt-dir", run_dir, "--num-trials", trials, "--final-samples", final, "--top-k", cfg["top_k"], "--seed", seed, *cfg["search_flags"]]))
        # the job scores the run's saved training EMA as a baseline of its own (`training_ema`)
        names = [n for n in runs[kind][0].results["baselines"] if n != "training_ema"]
        training_ema[kind] = float(np.mean([r.baseline_heldout("training_ema") for r in runs[kind]]))
        rows = [[name, stats([r.baseline_heldout(name) for r in runs[kind]])] for name in names]
        rows.append(["training EMA (decay 0.999, saved by the run)", f"{training_ema[kind]:.1f}"])
        winners = [r.winner_heldout for r in runs[kind]]
        rows.append(["**LCSC winner**", f"**{stats(winners)}**"])
        best_baseline = min(min(r.baseline_heldout(n) for n in names) for r in runs[kind][:1])
        best_baseline = min(best_baseline, training_ema[kind])
        beats = sum(w < best_baseline for w in winners)
        sampler_text = "one-step sampling" if kind == "cm" else f"DPM-Solver++ {DM_SEARCH_NFE} NFE"
        res = runs[kind][0].results
        text.append(f"### {kind.upper()} ({sampler_text}; K={len(res['steps'])} checkpoints, {trials} trials per "
                    f"seed incl. baselines, optimizer {res['search']['optimizer']} (the preset's), search "
                    f"{res['search']['samples']} samples, held-out {final} samples, top-{cfg['top_k']} re-scored; "
                    f"seeds {cfg['seeds']})\n")
        text.append(md_table(["candidate", "held-out fd_digits: mean ± std (min..max) over seeds"], rows))
        text.append(f"\nLCSC winner beats the best baseline ({best_baseline:.1f}) in {beats}/{len(winners)} seeds. "
                    f"Mean search time per seed {np.mean([r.results['timings']['search_seconds'] for r in runs[kind]]):.0f} s, "
                    f"held-out re-scoring {np.mean([r.results['timings']['final_seconds'] for r in runs[kind]]):.0f} s.\n")
        ax = axes[0][col]
        labels = names + ["train EMA", "LCSC"]
        values = [[r.baseline_heldout(n) for r in runs[kind]] for n in names] + [[training_ema[kind]], winners]
        ax.bar(range(len(labels)), [np.mean(v) for v in values], color=["tab:gray"] * (len(labels) - 1) + ["tab:red"])
        for i, v in enumerate(values):
            ax.scatter([i] * len(v), v, color="k", s=10, zorder=3)
        ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("held-out fd_digits (log, lower is better)")
        ax.set_title(f"digits {kind.upper()} ({sampler_text}); dots: seeds")
        shutil.copy(Path(res["search"]["experiment"]) / "final" / "coefficients_vs_step.png", plots / f"item1_{kind}_coefficients_seed{cfg['seeds'][0]}.png")
    save_figure(fig, plots / "item1_baselines.png")
    text.append("![LCSC vs baselines](results/item1_baselines.png)\n")
    text.append("Winner coefficients of the first seed: ![CM](results/item1_cm_coefficients_seed%d.png) "
                "![DM](results/item1_dm_coefficients_seed%d.png)\n" % (cfg["seeds"][0], cfg["seeds"][0]))
    return "\n".join(text), runs, training_ema


def item2_fewer_steps(cfg: dict, storage: Path, plots: Path, item1: dict[str, list[SearchRun]]) -> str:
    """(a) 1-step LCSC vs the 2-step base CM (the paper's CD claim); (b) the DM NFE at which LCSC matches the
    newest checkpoint at the default NFE (the paper: 15 -> 9)."""
    text = ["## 2. Fewer sampling steps\n"]
    run_dir = cfg["runs"]["cm"]
    newest_file = discover_checkpoints(load_run(run_dir).checkpoint_dir)[-1]
    ema_file = training_ema_file(run_dir)
    rows, best_two = [], None
    for ts in ([0, t] for t in cfg["midpoints"]):
        options = {"steps": TWO_STEP_GRID, "ts": ts}
        newest, ema = (HeldoutScorer(run_dir, [file], kind="cm", final_samples=cfg["cm_final"], sampler="multistep",
                                     sampler_options=options).score([1.0]) for file in (newest_file, ema_file))
        sigma = _karras_sigma(run_dir, ts[1])
        rows.append([f"ts={ts[0]},{ts[1]} (σ₂={sigma:.3f})", f"{newest:.1f}", f"{ema:.1f}"])
        best_two = min(best_two or np.inf, newest, ema)
    winners = [r.winner_heldout for r in item1["cm"]]
    one_newest = item1["cm"][0].baseline_heldout("newest")
    text.append(f"### CM: 1-step LCSC vs the 2-step base (multistep sampler, {TWO_STEP_GRID}-point Karras grid, "
                f"held-out {cfg['cm_final']} samples)\n")
    text.append(md_table(["2-step base, grid indices", "newest checkpoint", "training EMA"], rows))
    verdict = "beats" if np.mean(winners) < best_two else "does not beat"
    text.append(f"\n1-step newest: {one_newest:.1f}; **1-step LCSC winner: {stats(winners)}** vs best 2-step base "
                f"{best_two:.1f} (best over the midpoints and both base models): 1-step LCSC {verdict} the 2-step base "
                f"on the mean over seeds ({sum(w < best_two for w in winners)}/{len(winners)} seeds).\n")

    run_dir = cfg["runs"]["dm"]
    files = discover_checkpoints(load_run(run_dir).checkpoint_dir)
    first = item1["dm"][0]
    base_name = min(first.results["baselines"], key=first.baseline_heldout)  # the best baseline of item 1
    profiles = {"newest": first.results["baselines"]["newest"]["alpha"], base_name: first.results["baselines"][base_name]["alpha"]}
    nfes = sorted(set(cfg["dm_nfes"]) | {DM_SEARCH_NFE, DM_DEFAULT_NFE})
    scored = {n: {name: HeldoutScorer(run_dir, files, kind="dm", final_samples=cfg["dm_final"], sampler="dpmsolver++",
                                      sampler_options={"nfe": n}).score(alpha) for name, alpha in profiles.items()}
              for n in nfes}
    lcsc_at = {DM_SEARCH_NFE: first.winner_heldout}
    for n in cfg["dm_nfes"]:
        if n != DM_SEARCH_NFE:
            lcsc_at[n] = search("dm", f"item2-dm-nfe{n}", storage, [
                "--ckpt-dir", run_dir, "--nfe", n, "--num-trials", cfg["dm_trials"], "--final-samples", cfg["dm_final"],
                "--top-k", cfg["top_k"], "--seed", cfg["seeds"][0], *cfg["search_flags"]]).winner_heldout
    text.append(f"### DM: DPM-Solver++ NFE (held-out {cfg['dm_final']} samples; LCSC searched at each NFE with the "
                f"digits-dm preset, seed {cfg['seeds'][0]}, {cfg['dm_trials']} trials; `{base_name}` is item 1's best "
                "baseline)\n")
    text.append(md_table(["NFE", "newest checkpoint", f"{base_name}", "LCSC (searched at this NFE)"],
                         [[n, f"{scored[n]['newest']:.1f}", f"{scored[n][base_name]:.1f}",
                           f"{lcsc_at[n]:.1f}" if n in lcsc_at else "-"] for n in nfes]))
    for name in profiles:
        target = scored[DM_DEFAULT_NFE][name]
        matched = [n for n in sorted(lcsc_at) if lcsc_at[n] <= target]
        itself = [n for n in nfes if scored[n][name] <= target]
        text.append(f"\nTarget: {name} at the default {DM_DEFAULT_NFE} NFE = {target:.1f}. Smallest searched NFE at "
                    f"which LCSC matches it: **{matched[0] if matched else 'none of ' + str(sorted(lcsc_at))}**; "
                    f"smallest NFE at which {name} itself matches it: {itself[0]}.")
    text.append("\n(The paper: LCSC at 9 NFE matches the newest checkpoint at 15.) Note the digits DM's newest raw "
                "checkpoint is noisy enough that fewer solver steps can score better than more: compare the columns, "
                "not only the targets.\n")
    target = scored[DM_DEFAULT_NFE]["newest"]
    fig, axes = new_figure(2)
    ax = axes[0][0]
    ax.bar(["1-step newest", "2-step base (best)", "1-step LCSC"], [one_newest, best_two, np.mean(winners)],
           color=["tab:gray", "tab:blue", "tab:red"])
    ax.scatter([2] * len(winners), winners, color="k", s=10, zorder=3)
    ax.set_ylabel("held-out fd_digits")
    ax.set_title("digits CM: 1-step LCSC vs 2-step base")
    ax = axes[0][1]
    ax.plot(nfes, [scored[n]["newest"] for n in nfes], "o-", color="tab:gray", label="newest")
    ax.plot(nfes, [scored[n][base_name] for n in nfes], "o-", color="tab:blue", label=base_name)
    ax.plot(sorted(lcsc_at), [lcsc_at[n] for n in sorted(lcsc_at)], "o-", color="tab:red", label="LCSC (searched at NFE)")
    ax.axhline(target, ls="--", color="k", lw=1, label=f"newest @ {DM_DEFAULT_NFE} NFE")
    ax.set_yscale("log")
    ax.set_xlabel("NFE (DPM-Solver++)")
    ax.set_ylabel("held-out fd_digits (log)")
    ax.set_title("digits DM: score vs NFE")
    ax.legend(fontsize=8)
    save_figure(fig, plots / "item2_fewer_steps.png")
    text.append("![fewer steps](results/item2_fewer_steps.png)\n")
    return "\n".join(text)


def _karras_sigma(run_dir: Path, index: int) -> float:
    """σ at `index` of the TWO_STEP_GRID-point Karras grid of the run (lcsc_ray/precond.py)."""
    from lcsc_ray.sampling import build_sampler

    sampler = build_sampler(load_run(run_dir), "multistep", steps=TWO_STEP_GRID, ts=[0, index])
    return float(sampler.sigmas[1])


def item3_training_cost(cfg: dict, storage: Path, plots: Path, work: Path, item1: dict[str, list[SearchRun]],
                        training_ema: dict[str, float]) -> str:
    """LCSC on the first 1/2, 1/4, 1/8 of the CM run's checkpoints vs the full run's newest and EMAs."""
    run_dir = cfg["runs"]["cm"]
    full = item1["cm"][0]
    full_newest = full.baseline_heldout("newest")
    full_best_ema = min([v["heldout_score"] for n, v in full.results["baselines"].items()
                         if n.startswith(("ema", "phema"))] + [training_ema["cm"]])
    rows, points = [], []
    for fraction in cfg["fractions"]:
        folder, last_step = first_fraction_run(run_dir, fraction, work / f"first-{fraction:.4f}")
        run = search("cm", f"item3-cm-frac{fraction:.4f}", storage, [
            "--ckpt-dir", folder, "--num-trials", cfg["subset_trials"], "--final-samples", cfg["cm_final"],
            "--top-k", cfg["top_k"], "--seed", cfg["seeds"][0], *cfg["search_flags"]])
        points.append((fraction, run.baseline_heldout("newest"), run.winner_heldout))
        rows.append([f"1/{round(1 / fraction)} (steps ≤ {last_step}, K={len(run.results['steps'])})",
                     f"{run.baseline_heldout('newest'):.1f}", f"{run.winner_heldout:.1f}",
                     "yes" if run.winner_heldout <= full_newest else "no",
                     "yes" if run.winner_heldout <= full_best_ema else "no"])
    match_newest = [f for f, _, w in points if w <= full_newest]
    match_ema = [f for f, _, w in points if w <= full_best_ema]
    steps_total = full.results["steps"][-1]
    text = ["## 3. Training-cost reduction (CM, one step)\n",
            f"Full run ({steps_total} iterations): newest {full_newest:.1f}, best EMA (EMA and post-hoc EMA profiles, training EMA) "
            f"{full_best_ema:.1f}. LCSC searched on the first part only ({cfg['subset_trials']} trials, seed "
            f"{cfg['seeds'][0]}, held-out {cfg['cm_final']} samples):\n",
            md_table(["training used", "its newest", "LCSC on it", "≤ full newest?", "≤ full best EMA?"], rows),
            f"\nSmallest fraction whose LCSC matches the full run's newest: "
            f"**{'1/%d (%.0fx less training)' % (round(1 / min(match_newest)), 1 / min(match_newest)) if match_newest else 'none tried'}**; "
            f"matches its best EMA: **{'1/%d' % round(1 / min(match_ema)) if match_ema else 'none tried'}** "
            "(the paper: 23x on CIFAR-10 CM).\n"]
    fig, axes = new_figure()
    ax = axes[0][0]
    fr = [p[0] for p in points]
    ax.plot(fr, [p[1] for p in points], "o-", color="tab:gray", label="newest of the shortened run")
    ax.plot(fr, [p[2] for p in points], "o-", color="tab:red", label="LCSC on the shortened run")
    ax.axhline(full_newest, ls="--", color="k", lw=1, label="full run newest")
    ax.axhline(full_best_ema, ls=":", color="tab:blue", lw=1.5, label="full run best EMA")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("fraction of the training run used")
    ax.set_ylabel("held-out fd_digits (log)")
    ax.set_title("digits CM: training-cost reduction")
    ax.legend(fontsize=8)
    save_figure(fig, plots / "item3_training_cost.png")
    text.append("![training cost](results/item3_training_cost.png)\n")
    return "\n".join(text)


def item4_search_efficiency(cfg: dict, plots: Path) -> str:
    """Best search score vs trials for lcsc-es and Nevergrad optimizers on the CM run, same search noise, every
    (optimizer, seed) a search of its own; two run at a time in worker processes (one thread each)."""
    budget, samples = cfg["opt_trials"], cfg["opt_samples"]
    jobs = [(o, seed) for o in ["lcsc-es", *cfg["optimizers"]] for seed in cfg["opt_seeds"]]
    runs: dict[str, list[dict[str, Any]]] = {}
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(ask_tell_search, o, seed, budget, samples, cfg["cm_final"], cfg["runs"]["cm"]) for o, seed in jobs]
        for future in futures:
            result = future.result()
            result["best"] = np.minimum.accumulate(result["told"])
            runs.setdefault(result["optimizer"], []).append(result)
            print(f"[run_all] item 4: {result['optimizer']} seed {result['seed']}: best {result['best'][-1]:.1f}", flush=True)
    target = float(np.mean([r["best"][-1] for r in runs["lcsc-es"]]))

    def reach(r: dict[str, Any]) -> int | None:
        return int(np.argmax(r["best"] <= target)) + 1 if r["best"][-1] <= target else None

    rows, firsts = [], {}
    for optimizer, seed_runs in runs.items():
        reached = [n for n in map(reach, seed_runs) if n is not None]
        firsts[optimizer] = np.median([reach(r) or budget + 1 for r in seed_runs])
        checkpoints = [n for n in (100, 300) if n < budget]
        rows.append([optimizer, *[stats([r["best"][n - 1] for r in seed_runs]) for n in checkpoints],
                     stats([r["best"][-1] for r in seed_runs]), stats([r["heldout"] for r in seed_runs]),
                     f"{len(reached)}/{len(seed_runs)} seeds" + (f", median trial {int(np.median(reached))}" if reached else "")])
    first = " = ".join(o for o, n in firsts.items() if n == min(firsts.values()))  # ties listed together
    baselines = 2 + len(load_preset("digits-cm")["ema"]) + len(load_preset("digits-cm")["phema"])
    text = ["## 4. Search efficiency (CM, one step, same search noise for all)\n",
            f"{budget} trials per optimizer and seed (seeds {cfg['opt_seeds']}; the first {baselines} trials of each are "
            f"the digits-cm preset's baselines), {samples} samples per evaluation, held-out score of each search's best "
            f"candidate on {cfg['cm_final']} samples. Target: lcsc-es's best search score after {budget} trials, mean "
            f"over seeds = {target:.1f}.\n",
            md_table(["optimizer", *[f"best after {n}" for n in (100, 300) if n < budget], f"best after {budget}",
                      "its held-out score", "reaches the target"], rows),
            f"\nFirst to reach the target (median trial over seeds, a seed that never reaches it counts as "
            f"{budget + 1}): **{first}** ({'trial %d' % min(firsts.values()) if min(firsts.values()) <= budget else 'never'}).\n",
            "![search efficiency](results/item4_search_efficiency.png)\n"]
    fig, axes = new_figure()
    ax = axes[0][0]
    for i, (optimizer, seed_runs) in enumerate(runs.items()):
        for j, r in enumerate(seed_runs):
            ax.plot(np.arange(1, len(r["best"]) + 1), r["best"], color=f"C{i}", lw=1.2, alpha=0.8,
                    label=optimizer if j == 0 else None)
    ax.axhline(target, ls="--", color="k", lw=1, label=f"lcsc-es after {budget} (mean)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("trials (told to the optimizer)")
    ax.set_ylabel("best search fd_digits so far (log)")
    ax.set_title(f"digits CM: search efficiency, {len(cfg['opt_seeds'])} seeds each")
    ax.legend(fontsize=8)
    save_figure(fig, plots / "item4_search_efficiency.png")
    return "\n".join(text)


def item5_speed(cfg: dict) -> str:
    """The speed benchmarks, run as they are (subprocesses, before this process starts Ray)."""
    text = ["## 5. Speed (the existing benchmarks' own output)\n"]
    for script, flags, what in (
            ("merge_bench.py", cfg["merge"], "merge GB/s vs a same-run roofline, vs naive reload, low-precision error"),
            ("fid_bench.py", cfg["fid"], "Fréchet distance time vs pytorch-fid; feature throughput"),
            ("trial_overhead.py", [*cfg["overhead"], "--ckpt-dir", str(cfg["runs"]["cm"])],
             "Ray Tune trial overhead vs a plain loop; 1 vs 2 concurrent trials"),
            ("sampling_bench.py", cfg["sampling"], "sampling FLOP rate vs a same-run matmul peak")):
        command = [sys.executable, str(REPO / "benchmarks" / script), *flags]
        start = time.perf_counter()
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1800)
        output = proc.stdout.strip() if proc.returncode == 0 else \
            f"FAILED (exit {proc.returncode}):\n{proc.stdout.strip()}\n{proc.stderr.strip()[-3000:]}"
        lines = [l for l in output.splitlines() if not l.startswith(("│", "╭", "╰", "├", "View detailed", "To visualize"))]
        text.append(f"### `python benchmarks/{script} {' '.join(flags)}`: {what} ({time.perf_counter() - start:.0f} s)\n")
        text.append("```\n" + "\n".join(lines) + "\n```\n")
        print(f"[run_all] {script}: exit {proc.returncode}", flush=True)
    return "\n".join(text)


def item6_gpu(plots: Path) -> str:
    """The GPU check's output as `benchmarks/gpu_check.sh` saved it (it needs a CUDA machine, so it is run there,
    not by this script), or how to produce it."""
    saved = plots / GPU_CHECK_OUTPUT
    text = ["## 6. GPU check (`bash benchmarks/gpu_check.sh`)\n"]
    if saved.is_file():
        text.append(f"Output of the last GPU run, saved by the script to `docs/results/{GPU_CHECK_OUTPUT}` (its own date, "
                    "commit and GPU are in its first lines):\n")
        text.append("```\n" + saved.read_text().strip() + "\n```\n")
    else:
        text.append(f"Not run yet: no GPU was available where this report was made. On a CUDA machine, "
                    f"`bash benchmarks/gpu_check.sh` (about 8 minutes on one H100) saves its output to "
                    f"`docs/results/{GPU_CHECK_OUTPUT}`; rerun this script and it appears here.\n")
    return "\n".join(text)


# ---------------------------------------------------------------------------------------------------- report


def describe_run(path: Path) -> str:
    """Which run a report used: the embedded demo (by name) or the user's folder, with its size."""
    files = discover_checkpoints(load_run(path).checkpoint_dir)
    where = f"embedded demo `{path.name}`" if path.parent == cache_dir() / "runs" else f"`{path}`"
    return f"{where} ({len(files)} checkpoints, steps {files[0].step}..{files[-1].step})"


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()


def code_version() -> str:
    """The commit the run starts from, and whether tracked files differ from it. Taken before anything is
    written: the run rewrites the tracked report and plots itself, which must not count as a change."""
    dirty = " (plus uncommitted changes in the working tree)" if git("status", "--porcelain", "--untracked-files=no") else ""
    return git("rev-parse", "HEAD") + dirty


def machine_header(mode: str, runs: dict[str, Path], version: str, started: _dt.datetime, seconds: float) -> str:
    import nevergrad
    import ray
    import torch

    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor() or "unknown CPU") if Path("/proc/cpuinfo").exists() else platform.processor()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return "\n".join([
        "# LCSC-Ray: reproduction results",
        "",
        f"Generated by `python benchmarks/run_all.py --{mode}` — do not edit by hand; rerun the command.",
        "",
        f"- date: {started:%Y-%m-%d %H:%M} (local), whole run {seconds / 60:.1f} min",
        f"- commit: {version}",
        f"- machine: {cpu}, {os.cpu_count()} CPU cores, {memory:.0f} GiB RAM, no GPU used; Python "
        f"{platform.python_version()}, torch {torch.__version__}, ray {ray.__version__}, nevergrad {nevergrad.__version__}",
        "- metric: fd_digits, the Fréchet distance on a small digits classifier's features (not FID: no Inception "
        "on 8x8 digits); search scores use the fixed search noise, held-out scores a different noise seed "
        "(docs/METHOD.md, \"Held-out re-scoring\").",
        f"- mode `{mode}`: " + ", ".join(f"{k}={v}" for k, v in SETTINGS[mode].items()),
        "- training runs: " + "; ".join(f"{kind.upper()} {describe_run(path)}" for kind, path in runs.items()),
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick", help="default sizes (under an hour on 2 cores)")
    mode.add_argument("--full", dest="mode", action="store_const", const="full", help="bigger searches and more held-out samples (hours on 2 cores)")
    mode.add_argument("--smoke", dest="mode", action="store_const", const="smoke",
                      help="tiny sizes to check the script; numbers meaningless")
    parser.add_argument("--out", default=str(REPO / "docs" / "RESULTS.md"), help="report path; plots go to results/ next to it")
    parser.add_argument("--workdir", help="scratch folder for searches (default: a temp folder, deleted at the end)")
    parser.add_argument("--skip-speed", action="store_true", help="leave item 5 out")
    for kind in ("cm", "dm"):
        parser.add_argument(f"--{kind}-run", help=f"a digits {kind.upper()} training run folder (launch/train_{kind}.py) to "
                            f"use instead of the embedded demo run, which is trained on first use")
    args = parser.parse_args()
    mode_name = args.mode or "quick"
    cfg = dict(SETTINGS[mode_name])
    cfg["runs"] = {kind: Path(getattr(args, f"{kind}_run")).resolve() if getattr(args, f"{kind}_run")
                   else ensure_demo_run(kind) for kind in ("cm", "dm")}
    output = Path(args.out).resolve()
    plots = output.parent / "results"
    plots.mkdir(parents=True, exist_ok=True)
    work = Path(args.workdir).resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="lcsc-run-all-"))
    storage = work / "storage"
    version = code_version()
    started, t0 = _dt.datetime.now(), time.perf_counter()
    sections: list[str] = []
    timings: list[tuple[str, float]] = []

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        print(f"[run_all] {name} ...", flush=True)
        value = fn()
        timings.append((name, time.perf_counter() - start))
        print(f"[run_all] {name} done in {timings[-1][1]:.0f} s", flush=True)
        return value

    speed = "" if args.skip_speed else timed("5 speed", lambda: item5_speed(cfg))
    text1, item1, training_ema = timed("1 baselines", lambda: item1_baselines(cfg, storage, plots))
    sections.append(text1)
    sections.append(timed("2 fewer steps", lambda: item2_fewer_steps(cfg, storage, plots, item1)))
    sections.append(timed("3 training cost", lambda: item3_training_cost(cfg, storage, plots, work, item1, training_ema)))
    sections.append(timed("4 search efficiency", lambda: item4_search_efficiency(cfg, plots)))
    if speed:
        sections.append(speed)
    sections.append(item6_gpu(plots))
    import ray

    ray.shutdown()
    sections.append("## Time per item of this run\n\n" + md_table(["item", "minutes"], [[n, f"{s / 60:.1f}"] for n, s in timings]))
    header = machine_header(mode_name, cfg["runs"], version, started, time.perf_counter() - t0)
    atomic_write_text(output, header + "\n" + "\n\n".join(sections) + "\n")
    print(f"[run_all] wrote {output} and plots in {plots} ({(time.perf_counter() - t0) / 60:.1f} min)")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    run_cli(main)
