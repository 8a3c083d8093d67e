"""Does LCSC's gain survive metrics the search never saw, over training seeds, and do options against
overfitting the searched metric help? (docs/RESULTS.md, "Over training seeds".)

For each training run given (one per training seed, same recipe), on the digits preset of its kind:
- every baseline the job has (newest, uniform, EMA profiles with the run's warm-up, post-hoc EMAs, the run's
  own training EMA) and the output-rescaled control (best baseline + clamp(a·x+b) fitted on the search noise);
- four variants of the search, each with the preset's optimizer, budget and samples, one trial at a time with
  the product's searcher and trial function (`LcscNevergradSearch`, `evaluate_candidate`, full fidelity):
    plain         the preset as it is: winner = best of the top-k finalists on held-out fd_digits
    select_indep  the same search, winner picked on held-out fd_digits_indep (touches the independent metric)
    penalty       told score = fd_digits + λ·(Σ|α| − 1) (--coef-penalty)
    fresh_noise   new search noise every G trials (--fresh-noise-every)
- held-out re-scoring of all of them on the job's held-out seeds with fd_digits (searched), fd_digits_indep
  (independent), fd_pixels (a metric no network takes part in: the untouched one for select_indep) and k-NN
  precision/recall on the independent features: the job's own `heldout` module.
One JSON per run in --out; `--summarize` prints the markdown tables of docs/RESULTS.md from them.

    python benchmarks/overfit_options.py --kind cm --run RUN_DIR --out docs/results/seeds   # one training seed
    python benchmarks/overfit_options.py --summarize --out docs/results/seeds
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lcsc_ray.atomic import atomic_write_json
from lcsc_ray.baseline_checkpoints import extra_baselines
from lcsc_ray.errors import run_cli
from lcsc_ray.heldout import EvalPlan, cached_metrics, candidate_samples, fit_output_affine
from lcsc_ray.profiles import baseline_profiles, run_ema_warmup
from lcsc_ray.reference_stats import ensure_reference_stats
from lcsc_ray.run_folder import load_run
from lcsc_ray.scoring import cached_scorer
from lcsc_ray.search.candidates import decode_candidate
from lcsc_ray.search.flags import HELDOUT_SEED_OFFSET
from lcsc_ray.search.objective import SearchObjective
from lcsc_ray.search.optimizers import build_optimizer
from lcsc_ray.search.report import ScoredCandidate, compare
from lcsc_ray.search.searcher import LcscNevergradSearch
from lcsc_ray.search.trial import evaluate_candidate
from search_spaces import build_space, load_preset

from demo_setup import demo_scoring_spec  # benchmarks/ is on sys.path: the script's own folder

NOISE_SEED = 0
COEF_PENALTY = 1.0  # λ: a unit of negative mass costs about what the CM's finalists differ by (fd_digits)
FRESH_NOISE_EVERY = 20  # about one generation of the presets' optimizers (CMA's population at K=40 is 14)
INDEP, SEARCHED, PIXELS = "fd_digits_indep", "fd_digits", "fd_pixels"
VARIANTS = ("plain", "select_indep", "penalty", "fresh_noise")


def build_setup(kind: str, run_dir: Path, threads: int, overrides: dict[str, int]) -> dict[str, Any]:
    """The preset's checkpoint window, scorer spec, space and baselines for `run_dir` (`overrides`: preset
    values to replace, for a quick check of the script)."""
    preset = {**load_preset(f"digits-{kind}"), **overrides}
    run = load_run(run_dir)
    spec = demo_scoring_spec(kind, run_dir, preset=preset, window=True, device="cpu", threads=threads)
    files = list(spec.files)
    space = build_space(preset["space"], len(files), bound=preset["bound"], sigma=preset.get("sigma"))
    profiles = baseline_profiles([f.step for f in files], preset["ema"], preset.get("phema", ()),
                                 run_ema_warmup(run.config))
    plan = EvalPlan(extractors=tuple((name, str(ensure_reference_stats(run.config["data"], name)))
                                     for name in ("digits_indep", "pixels")),
                    real_data=run.config["data"], pr_samples=preset["final_samples"])
    return {"preset": preset, "run": run, "files": files, "spec": spec, "space": space, "profiles": profiles,
            "plan": plan}


def search_variant(setup: dict[str, Any], objective: SearchObjective, optimizer_seed: int) -> list[dict[str, Any]]:
    """One search with `objective`; every evaluation as {index, label, alpha, score, distance}."""
    preset, space = setup["preset"], setup["space"]
    opt = build_optimizer(preset["optimizer"], space.parametrization(), budget=preset["num_trials"], num_workers=1,
                          seed=optimizer_seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lcsc-overfit-") as folder:
        searcher = LcscNevergradSearch(opt, experiment_dir=folder, warm_start=[
            (name, space.to_value(alpha)) for name, alpha in setup["profiles"].items()])
        for index in range(preset["num_trials"]):
            config = searcher.suggest(str(index))
            report = evaluate_candidate(config, scoring=setup["spec"], space=space, objective=objective,
                                        num_samples=preset["fid_samples"])
            searcher.on_trial_complete(str(index), report)
            value, label = decode_candidate(config)
            rows.append({"index": index, "label": label, "alpha": space.to_coefficients(value).tolist(),
                         "score": float(report["score"]), "failed": bool(report.get("failed")),
                         "distance": float(report.get(SEARCHED, report["score"]))})
    return rows


def finalists(rows: list[dict[str, Any]], top_k: int) -> list[dict[str, Any]]:
    """The job's rule: the best `top_k` searched, non-failed trials with distinct coefficients."""
    searched = sorted((r for r in rows if r["label"] == "search" and not r["failed"]), key=lambda r: r["score"])
    chosen, seen = [], set()
    for row in searched:
        key = np.round(row["alpha"], 12).tobytes()
        if key not in seen:
            seen.add(key)
            chosen.append(row)
        if len(chosen) == top_k:
            break
    return chosen


def heldout(setup: dict[str, Any], candidate: ScoredCandidate, seeds: list[int]) -> None:
    """The job's held-out metrics of one candidate on every seed, in place."""
    scorer = cached_scorer(setup["spec"])
    metrics = cached_metrics(setup["plan"], scorer)
    candidate.heldout = [metrics.score(scorer, candidate_samples(scorer, candidate.source, candidate.transform,
                                                                 seed=seed, num_samples=setup["preset"]["final_samples"]))
                         for seed in seeds]


def run_one(kind: str, run_dir: Path, out: Path, threads: int, overrides: dict[str, int]) -> Path:
    """Everything for one training run; writes out/<kind>-<run name>.json."""
    started = time.perf_counter()
    torch.set_num_threads(threads)
    setup = build_setup(kind, run_dir, threads, overrides)
    preset, spec = setup["preset"], setup["spec"]
    seeds = [NOISE_SEED + HELDOUT_SEED_OFFSET + i for i in range(preset["heldout_seeds"])]
    scorer = cached_scorer(spec)

    candidates = [ScoredCandidate(name, "baseline", None, alpha=alpha) for name, alpha in setup["profiles"].items()]
    candidates += [ScoredCandidate(b.name, "baseline", None, checkpoint=b)
                   for b in extra_baselines(setup["run"], setup["files"])]
    for c in candidates:
        c.search_score = _search_score(scorer, c, preset["fid_samples"])
    best = min(candidates, key=lambda c: c.search_score)
    affine, control_score = fit_output_affine(scorer, best.source, seed=NOISE_SEED, num_samples=preset["fid_samples"])
    candidates.append(ScoredCandidate(f"rescaled {best.name} (control)", "control", control_score, alpha=best.alpha,
                                      checkpoint=best.checkpoint, transform=affine))
    print(f"[{kind} {run_dir.name}] baselines scored; best {best.name} {best.search_score:.2f}, control "
          f"{control_score:.2f} (a={affine.a:.3f}, b={affine.b:+.3f}) at {time.perf_counter() - started:.0f} s",
          flush=True)

    searches = {"plain": SearchObjective(NOISE_SEED),
                "penalty": SearchObjective(NOISE_SEED, coef_penalty=COEF_PENALTY),
                "fresh_noise": SearchObjective(NOISE_SEED, fresh_noise_every=FRESH_NOISE_EVERY)}
    search_rows = {}
    for variant, objective in searches.items():
        search_rows[variant] = search_variant(setup, objective, optimizer_seed=0)
        for i, row in enumerate(finalists(search_rows[variant], preset["top_k"])):
            candidates.append(ScoredCandidate(f"{variant} rank {i + 1}", variant, row["score"],
                                              alpha=np.asarray(row["alpha"]), trial=row["index"]))
        print(f"[{kind} {run_dir.name}] search {variant} done at {time.perf_counter() - started:.0f} s", flush=True)

    for c in candidates:
        heldout(setup, c, seeds)
    print(f"[{kind} {run_dir.name}] held-out done at {time.perf_counter() - started:.0f} s", flush=True)
    payload = {"kind": kind, "run": str(run_dir), "training_seed": setup["run"].config["training"]["seed"],
               "steps": [f.step for f in setup["files"]], "heldout_seeds": seeds,
               "settings": {"coef_penalty": COEF_PENALTY, "fresh_noise_every": FRESH_NOISE_EVERY,
                            **{k: preset[k] for k in ("optimizer", "num_trials", "fid_samples", "final_samples",
                                                      "top_k")}},
               "control": {"a": affine.a, "b": affine.b, "base": best.name},
               "candidates": [{"name": c.name, "kind": c.kind, "search_score": c.search_score,
                               "alpha": None if c.alpha is None else np.asarray(c.alpha).tolist(),
                               "heldout": c.heldout} for c in candidates],
               "searches": {v: [{k: r[k] for k in ("index", "label", "score", "distance")} for r in rows]
                            for v, rows in search_rows.items()},
               "seconds": time.perf_counter() - started}
    path = out / f"{kind}-{run_dir.name}.json"
    atomic_write_json(path, payload)
    print(f"wrote {path}")
    return path


def _search_score(scorer, candidate: ScoredCandidate, num_samples: int) -> float:
    """A baseline's searched metric on the search noise (a profile or a checkpoint file alike)."""
    batches = candidate_samples(scorer, candidate.source, None, seed=NOISE_SEED, num_samples=num_samples)
    return float(scorer.evaluator.evaluate(iter(batches)).score)


# ---- summary ----------------------------------------------------------------------------------------------

def load_candidates(path: Path) -> tuple[dict[str, Any], dict[str, ScoredCandidate]]:
    data = json.loads(path.read_text())
    rows = {}
    for c in data["candidates"]:
        rows[c["name"]] = ScoredCandidate(c["name"], c["kind"], c["search_score"], heldout=c["heldout"])
    return data, rows


def winner(rows: dict[str, ScoredCandidate], variant: str) -> ScoredCandidate:
    """The variant's winner: select_indep picks plain's finalists on the independent distance."""
    pool = [c for c in rows.values() if c.kind == ("plain" if variant == "select_indep" else variant)]
    return min(pool, key=lambda c: c.mean(INDEP if variant == "select_indep" else SEARCHED))


def summarize(out: Path) -> str:
    lines = []
    for kind in ("cm", "dm"):
        paths = sorted(out.glob(f"{kind}-*.json"))
        if not paths:
            continue
        per_seed = sorted((load_candidates(p) for p in paths), key=lambda pair: pair[0]["training_seed"])
        lines.append(f"### {kind.upper()}: {len(paths)} training seeds "
                     f"({', '.join(str(d['training_seed']) for d, _ in per_seed)})\n")
        lines.append(_main_table(kind, per_seed))
        lines.append(_variant_table(per_seed))
    return "\n".join(lines)


def _fmt(values: list[float]) -> str:
    arr = np.asarray(values)
    return f"{arr.mean():.2f} ± {arr.std(ddof=1):.2f}" if len(arr) > 1 else f"{arr[0]:.2f}"


def _main_table(kind: str, per_seed: list) -> str:
    """Item 7: newest / training EMA / best EMA profile / best post-hoc EMA / control / LCSC (plain), per seed."""
    header = "| training seed | row | fd_digits (searched) | fd_digits_indep | fd_pixels | precision | recall |"
    out = [header, "|" + "---|" * 7]
    for data, rows in per_seed:
        chosen = {"newest": rows["newest"], "training EMA": rows["training_ema"]}
        emas = [c for n, c in rows.items() if n.startswith("ema")]
        phemas = [c for n, c in rows.items() if n.startswith("phema")]
        chosen["best EMA profile"] = min(emas, key=lambda c: c.mean(SEARCHED))
        if phemas:
            chosen["best post-hoc EMA"] = min(phemas, key=lambda c: c.mean(SEARCHED))
        chosen["rescaled control"] = next(c for c in rows.values() if c.kind == "control")
        chosen["LCSC (preset)"] = winner(rows, "plain")
        for label, c in chosen.items():
            name = f"{label} ({c.name})" if label.startswith("best") else label
            out.append(f"| {data['training_seed']} | {name} | {c.mean(SEARCHED):.2f} | {c.mean(INDEP):.2f} | "
                       f"{c.mean(PIXELS):.3f} | {c.mean('precision_digits_indep'):.3f} | "
                       f"{c.mean('recall_digits_indep'):.3f} |")
    return "\n".join(out) + "\n"


def _variant_table(per_seed: list) -> str:
    """Item 6: per variant, paired Δ (winner − reference) on held-out seeds, averaged per training seed; the
    mean ± sd over training seeds and how many seeds the winner beats the reference beyond 2 SE."""
    out = ["| variant | metric | winner | Δ vs training EMA | beats / ties / loses (seeds) | Δ vs control | "
           "beats / ties / loses | Δ vs plain |", "|" + "---|" * 8]
    for variant in VARIANTS:
        for metric in (SEARCHED, INDEP, PIXELS, "recall_digits_indep", "precision_digits_indep"):
            lower = not metric.startswith(("precision", "recall"))
            cells, counts = {}, {}
            for ref in ("training_ema", "control", "plain"):
                diffs, verdicts = [], []
                for _, rows in per_seed:
                    w = winner(rows, variant)
                    r = (winner(rows, "plain") if ref == "plain" else
                         next(c for c in rows.values() if c.kind == "control") if ref == "control" else rows[ref])
                    comparison = compare(r, w, metric, lower_is_better=lower)
                    diffs.append(-comparison.diff)  # winner − reference
                    verdicts.append(comparison.verdict)
                cells[ref] = _fmt(diffs)
                counts[ref] = "/".join(str(verdicts.count(v)) for v in ("beats", "ties", "loses to"))
            values = [winner(rows, variant).mean(metric) for _, rows in per_seed]
            out.append(f"| {variant} | {metric} | {_fmt(values)} | {cells['training_ema']} | {counts['training_ema']} "
                       f"| {cells['control']} | {counts['control']} | {cells['plain'] if variant != 'plain' else '-'} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=("cm", "dm"))
    parser.add_argument("--run", help="training run folder (one training seed of the digits demo recipe)")
    parser.add_argument("--out", required=True, help="folder for the per-run JSON files")
    parser.add_argument("--threads", type=int, default=1)
    for flag in ("num_trials", "fid_samples", "final_samples", "heldout_seeds", "top_k"):
        parser.add_argument(f"--{flag.replace('_', '-')}", type=int, help="replace the preset's value (quick checks)")
    parser.add_argument("--summarize", action="store_true", help="print the tables from the JSON files in --out")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.summarize:
        print(summarize(out))
        return
    if not (args.kind and args.run):
        parser.error("--kind and --run are needed unless --summarize")
    out.mkdir(parents=True, exist_ok=True)
    overrides = {k: getattr(args, k) for k in ("num_trials", "fid_samples", "final_samples", "heldout_seeds", "top_k")
                 if getattr(args, k) is not None}
    run_one(args.kind, Path(args.run).resolve(), out, args.threads, overrides)


if __name__ == "__main__":
    run_cli(main)
