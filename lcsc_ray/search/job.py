"""The LCSC job behind `launch/tune_cm.py` and `launch/tune_dm.py`, readable top to bottom:

run folder → select checkpoints → reference statistics → coefficient space + baseline profiles → Ray →
Ray Tune search (Nevergrad) → held-out re-scoring of the finalists and every baseline → table, winner
export, results.json and plots.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import shutil
import tempfile
import textwrap
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray import tune

from lcsc_ray.baseline_checkpoints import ExtraBaseline, edm2_width_snapshots, extra_baselines
from lcsc_ray.checkpoints import CheckpointFile, format_steps, select_checkpoints
from lcsc_ray.cluster import start_ray
from lcsc_ray.data import dataset_exists
from lcsc_ray import stopping
from lcsc_ray.errors import LcscError, keep_traces_in
from lcsc_ray.export import export_merged, exported_dtype
from lcsc_ray.heldout import (EvalPlan, OutputAffine, cached_metrics, candidate_samples, fit_output_affine)
from lcsc_ray.images import write_sample_grid
from lcsc_ray.profiles import baseline_profiles, run_ema_warmup
from lcsc_ray.progress import progress
from lcsc_ray.remote_storage import Mirror, RemoteStorage, file_uri_path, is_uri
from lcsc_ray.shipped_files import SHIPPED_KEY, local_path, pack
from lcsc_ray.stack import STORAGE_DTYPES, CheckpointStack, available_host_bytes
from lcsc_ray.stack_file import open_stack_file, write_stack_file
from lcsc_ray.storage import TRIAL_BYTES, check_output_folder, existing_ancestor
from lcsc_ray.file_identity import stamp
from lcsc_ray.reference_stats import ensure_reference_stats
from lcsc_ray.preflight import DETECTION_FLAGS, check_detection_flags, check_trial_budget, preflight
from lcsc_ray.run_folder import RUN_JSON, RunInfo
from lcsc_ray.run_formats import ResolvedRun, resolve_from_args
from lcsc_ray.run_formats.nvlabs import reference_stats_from_pickle
from lcsc_ray.sampling import sampler_options
from lcsc_ray.atomic import atomic_write_json, staged
from lcsc_ray.scoring import ScoringSpec, cached_scorer, load_stack, spec_run
from lcsc_ray.search.flags import HELDOUT_SEED_OFFSET, parse_args
from lcsc_ray.search.commands import continue_command, new_search_command
from lcsc_ray.search.identity import SearchInputs, check_identity, identity_record
from lcsc_ray.search.ray_compat import in_ray_job
from lcsc_ray.search.monitor import PROGRESS_PLOT, PROGRESS_PLOT_EVERY_S
from lcsc_ray.search.objective import SearchObjective
from lcsc_ray.search.report import (SIGNIFICANCE_SE, ScoredCandidate, compare, format_compact_table, format_table,
                                    plot_best_so_far, plot_coefficients, write_results, write_results_md)
from lcsc_ray.search.report_html import write_report_html
from lcsc_ray.search.trial import PENALTY_SCORE, LcscTrial
from lcsc_ray.search.tuner import MANIFEST, ResultTable, TrialRecord, check_experiment, run_search
from lcsc_ray.training.demo import ensure_demo_run
from search_spaces.spaces import CoefficientSpace, build_space


def resolve_run_dir(args: argparse.Namespace, kind: str) -> ResolvedRun:
    """The run to search and its checkpoints (lcsc_ray/run_formats): our run folder, a run of another code base
    (detected, or described by --run-json). No --ckpt-dir: the embedded demo run, trained on first use so
    `python launch/tune_cm.py` works on a fresh machine."""
    if args.ckpt_dir is None:
        return resolve_from_args(args, ensure_demo_run(kind, quiet=args.quiet))
    resolved = resolve_from_args(args, args.ckpt_dir)
    run = resolved.run
    if resolved.carried_config is not None and run.kind != kind:
        raise LcscError(f"--ckpt-dir {args.ckpt_dir}: a {run.kind.upper()} run (convention {run.convention.name}); "
                        f"search it with launch/tune_{run.kind}.py")
    return resolved


def save_run_json(resolved: ResolvedRun, storage: Path, name: str) -> Path | None:
    """Keep the run.json of a detected or --run-json run next to the search's experiment folder, as
    `<storage>/<name>.run.json` (never in the user's run folder; the experiment folder itself belongs to Ray
    Tune and must not exist before a new search)."""
    if resolved.carried_config is None:
        return None
    path = storage / f"{name}.run.json"
    atomic_write_json(path, resolved.carried_config)
    print(f"run.json of this search: {path} (edit it and pass it back with --run-json)")
    return path


def exclude_steps(files: list[CheckpointFile], steps: list[int]) -> list[CheckpointFile]:
    """The selection without the checkpoints at `--exclude-steps`; each listed step must be in the selection."""
    selected = {f.step for f in files}
    unknown = [step for step in steps if step not in selected]
    if unknown:
        raise LcscError(f"--exclude-steps {unknown[0]}: no selected checkpoint at that step (selected: "
                        f"{min(selected)}..{max(selected)}, {len(selected)} checkpoints)")
    return [f for f in files if f.step not in set(steps)]


def detection_flags(args: argparse.Namespace) -> dict[str, object]:
    """The values of the flags that describe a detected run (`DETECTION_FLAGS`), by flag."""
    return {flag: getattr(args, flag.removeprefix("--").replace("-", "_")) for flag in DETECTION_FLAGS}


def reference_stats_path(args: argparse.Namespace, run: RunInfo) -> Path:
    """--ref-stats (an EDM2 reference .pkl is converted once, with --trust-pickle), or statistics of the run's
    training data (computed once and cached)."""
    if args.ref_stats:
        path = Path(args.ref_stats).expanduser().resolve()
        return reference_stats_from_pickle(path, args.trust_pickle) if path.suffix == ".pkl" else path
    if "data" not in run.config:
        source = run.run_dir / RUN_JSON if run.format == "ours" else f"the {run.format} run {run.run_dir}"
        raise LcscError(f"{source} names no training 'data' to compute reference statistics from; "
                        "pass --ref-stats FILE.npz (see launch/fid_stats.py) or add \"data\" to run.json")
    return ensure_reference_stats(run.config["data"], args.extractor, device=args.device,
                                  inception_weights=args.inception_weights)


PATH_FLAGS = ("--storage", "--ckpt-dir", "--out", "--ref-stats", "--inception-weights")  # flags naming a path


def _attribute(flag: str) -> str:
    """argparse's attribute for a flag (`--ckpt-dir` -> `ckpt_dir`)."""
    return flag.removeprefix("--").replace("-", "_")


def check_uris(args: argparse.Namespace) -> None:
    """Only --storage may be a URI of object storage (lcsc_ray/remote_storage.py); a `file://` URI, on any of
    the path flags, is taken as the path it names. The inputs are read by the driver, which ships what workers
    need through Ray (docs/SCALING.md), so they are local paths; a path library would turn `s3://bucket/x` into
    a local folder named `s3:`, so such a URI is refused before anything runs."""
    for flag in PATH_FLAGS:
        value = getattr(args, _attribute(flag))
        try:
            path = None if value is None else file_uri_path(value)
        except LcscError as error:
            raise LcscError(f"{flag} {error}") from None
        if path is not None:
            setattr(args, _attribute(flag), path)
    for flag in PATH_FLAGS[1:]:
        value = getattr(args, _attribute(flag))
        if is_uri(value):
            raise LcscError(f"{flag} {value}: only --storage may be a URI; copy this input to the driver's disk "
                            "and pass its path (the driver ships it to the workers; docs/SCALING.md)")
    if is_uri(args.storage) and args.stack_file:
        raise LcscError(f"--stack-file with --storage {args.storage}: the stack file is a memory-mapped file every "
                        "node must see; with object storage drop --stack-file (the stack goes through Ray's object "
                        "store)")


def check_paths_in_ray_job(args: argparse.Namespace) -> None:
    """Inside `ray job submit` the working directory is Ray's temporary copy of the code, so a relative path
    would put results where nobody finds them (or read inputs from the copy): ask for absolute ones."""
    if not in_ray_job():
        return
    for flag in PATH_FLAGS:
        value = getattr(args, _attribute(flag))
        if value and not is_uri(value) and not Path(value).expanduser().is_absolute():
            raise LcscError(f"{flag} {value} is a relative path, and this search runs as a Ray Job, whose working "
                            "directory is a temporary copy of the code; give an absolute path on storage every node sees")


def experiment_name(args: argparse.Namespace, kind: str, storage: Path, remote: RemoteStorage | None = None) -> str:
    """The --name, or a fresh timestamped one; with --resume and no --name the newest experiment (in the
    bucket for a remote --storage)."""
    if args.name:
        return args.name
    if args.resume and remote is not None:
        newest = remote.newest_experiment(f"lcsc-{kind}-")
        if newest is None:
            raise LcscError(f"--resume: no lcsc-{kind}-* experiment in {remote.uri}; pass --name and --storage of the search")
        return newest
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


_MIRRORS: list[Mirror] = []  # the job's copy of a remote --storage, closed (last files sent) when it ends


def run_job(argv: list[str] | None, kind: str) -> dict[str, Any]:
    """Run the whole LCSC job for a CM (`kind="cm"`) or DM run; returns what results.json holds (and, with a
    remote --storage, `storage`: the experiment's URI). With a remote --storage, whatever ends the job, the
    last files of its experiment reach the bucket."""
    try:
        results = _run_job(argv, kind)
    except BaseException:
        while _MIRRORS:  # the job's own error (or stop) is what the user must see
            _MIRRORS.pop().close()
        raise
    problems = [problem for problem in (mirror.close() for mirror in _MIRRORS) if problem]
    _MIRRORS.clear()
    if problems:
        raise LcscError(problems[0])
    if is_uri(results.get("storage")):
        print(f"experiment and results copied to {results['storage']}")
    return results


def _run_job(argv: list[str] | None, kind: str) -> dict[str, Any]:
    args = parse_args(argv, kind)
    check_uris(args)
    remote = RemoteStorage(args.storage) if is_uri(args.storage) else None
    if remote is not None:
        remote.check()  # reachable, credentials work: one line before anything is trained, loaded or started
    check_paths_in_ray_job(args)  # before any path is resolved against the job's temporary working directory
    stopping.set_phase("the run's checks", command=lambda: continue_command(argv, kind))
    objective = SearchObjective(noise_seed=args.noise_seed, fresh_noise_every=args.fresh_noise_every,
                                coef_penalty=args.coef_penalty)  # checks its flags before any training or loading
    started = time.perf_counter()

    resolved = resolve_run_dir(args, kind)
    run = resolved.run
    check_detection_flags(detection_flags(args), None if resolved.detected is not None else
                          args.run_json if resolved.from_run_json_flag else str(run.run_dir / RUN_JSON))
    files = select_checkpoints(resolved.files, window=args.window, interval=args.interval or 1,
                               max_count=args.max_checkpoints)
    files = exclude_steps(files, args.exclude_steps)
    steps = [f.step for f in files]
    print(f"checkpoints: {len(files)} from {run.checkpoint_dir} ({resolved.trajectory}), steps "
          f"{format_steps(steps)}; format {run.format}, convention {run.convention.name}")

    baselines = profile_baselines(args, resolved, steps)
    if not args.resume:  # a resumed search keeps the budget it started with
        check_trial_budget(args.num_trials, list(baselines))
    ref_stats = reference_stats_path(args, run)
    space = build_space(args.space, len(files), bound=args.bound, sigma=args.sigma)

    spec = ScoringSpec(
        run_dir=str(run.run_dir), files=tuple(files), reference_stats=str(ref_stats), extractor=args.extractor,
        ckpt_key=args.ckpt_key, strip_key_prefix=args.strip_key_prefix, stack_dtype=args.stack_dtype,
        sampler=args.sampler, sampler_options=sampler_options(args), inception_weights=args.inception_weights,
        batch_size=args.batch_size, device=args.device, threads=max(1, int(args.cpus_per_trial)),
        run_config=resolved.carried_config, trust_pickle=args.trust_pickle,
    )

    # A remote --storage is worked on in a local scratch copy that a Mirror keeps copying to the bucket
    # (lcsc_ray/remote_storage.py); `where` is what the user passed, for every command and line printed.
    storage = remote.scratch if remote is not None else Path(args.storage).expanduser().resolve()
    where = args.storage if remote is not None else storage
    name = experiment_name(args, kind, storage, remote)
    if remote is not None:
        remote.prepare(name, resume=args.resume)  # the bucket's copy of the experiment, or refused
        _MIRRORS.append(Mirror(remote, name))
    manifest = check_experiment(storage, name, resume=args.resume)  # before Ray starts: fail fast, never overwrite
    stopping.set_phase(f"the checks before search {name}", command=lambda: continue_command(
        argv, kind, name, where, resume=(storage / name / MANIFEST).is_file()))  # --resume once it exists
    keep_traces_in(storage / name)
    rounds = LcscTrial.round_schedule(args.rounds, args.fid_samples, args.scheduler)
    identity = identity_record(SearchInputs(
        args=args, run_dir=run.run_dir, files=files, trajectory=resolved.trajectory, run_config=run.config,
        reference_stats=ref_stats, space=space, rounds=rounds, objective=objective))
    if manifest is not None:
        check_identity(name, manifest, identity)  # before Ray starts: a resume never mixes other settings' scores
    output = Path(args.out).expanduser().resolve() if args.out else storage / name / "final"
    check_output_folder(storage, "--storage")  # writable before anything is written there
    preview = storage / f"{name}.preview.png" if args.dry_run else None
    stamps = tuple(stamp(f.path) for f in files)  # before the preflight reads them: any later change is caught
    report = preflight(spec, run, preview=preview, sample_counts={"--fid-samples": args.fid_samples,
                                                                   "--final-samples": args.final_samples})
    print("\n".join([*report.warnings, report.summary()]))  # every input checked before an experiment folder exists
    check_space(args, storage, output, report.num_params, len(files))
    spec = replace(spec, file_stamps=stamps)  # what every later reader compares
    if remote is not None and spec.run_config is None:  # workers on other nodes cannot read run_dir/run.json
        spec = replace(spec, run_config=run.config)
    save_run_json(resolved, storage, name)
    if args.dry_run:
        print(f"dry run: stopped before Ray; samples of the newest checkpoint: {preview}")
        return {"dry_run": True, "format": run.format, "convention": run.convention.name, "steps": steps,
                "trajectory": resolved.trajectory, "preview": str(preview)}
    plan = eval_plan(args, run)  # the final evaluation's extractors and data: checked (and cached) before the search
    if args.stack_file:
        spec = replace(spec, stack_file=str(build_stack_file(spec, storage / f"{name}.stack")))
    stopping.set_phase("Ray start-up")
    url = start_ray(args.address, dashboard=not args.no_dashboard, dashboard_host=args.dashboard_host,
                    dashboard_port=args.dashboard_port, quiet=args.quiet)
    if url:
        print(f"Ray dashboard: {url}")
    payload = None
    if args.stack_via_object_store or remote is not None:  # no shared disk: the stack and input files go via Ray
        payload = load_stack(spec).to_payload()
        if remote is not None:
            payload[SHIPPED_KEY] = pack([spec.reference_stats, spec.inception_weights, plan.inception_weights,
                                         (run.config.get("model") or {}).get("snapshot"),
                                         *(stats for _, stats in plan.extractors),
                                         *(b.file.path for b in extra_baselines(run, spec.files, args.phema or ()))])
        payload = ray.put(payload)

    trainable = tune.with_parameters(LcscTrial, scoring=spec, space=space, objective=objective,
                                     num_samples=args.fid_samples, stack_payload=payload, rounds=rounds)
    batches = (f" candidates in Ray Tune trials of {args.candidates_per_trial}" if args.candidates_per_trial > 1
               else " trials")
    print(f"search: {args.num_trials}{batches}, optimizer {args.optimizer}, space {space.name} (K={len(files)}), "
          f"{args.fid_samples} samples per evaluation"
          f"{'' if len(rounds) == 1 else f' in rounds of {rounds} (ASHA stops the worse)'}; experiment "
          f"{remote.uri_of(name) if remote is not None else storage / name}")
    if objective.describe():
        print(f"search objective: {objective.describe()}")
    print(f"live plot of the search: {storage / name / PROGRESS_PLOT} (redrawn at most every "
          f"{PROGRESS_PLOT_EVERY_S:.0f} s)")
    table = run_search(
        trainable, space, optimizer=args.optimizer, num_trials=args.num_trials, seed=args.seed,
        warm_start=baselines, storage=storage, name=name, resume=args.resume,
        max_concurrent=args.max_concurrent, resources=_resources(args), max_failures=args.max_failures,
        progress=not args.quiet, penalty=PENALTY_SCORE, resume_hint=continue_command(argv, kind, name, where, resume=True),
        new_search_hint=lambda step: new_search_command(argv, kind, name, where, step),
        scheduler=args.scheduler, rounds=rounds, reduction_factor=args.reduction_factor, objective=objective,
        candidates_per_trial=args.candidates_per_trial, identity=identity,
    )
    search_seconds = time.perf_counter() - started
    if remote is not None:  # what results.json and the report name: the experiment in the bucket
        table.experiment_path = remote.uri_of(name)
    results = finish(args, table, space, baselines, steps, spec, payload, plan, output, search_seconds,
                     ship_back=remote is not None)
    return {**results, "storage": remote.uri_of(name)} if remote is not None else results


def finish(args: argparse.Namespace, table: ResultTable, space: CoefficientSpace, baselines: dict[str, np.ndarray],
           steps: list[int], spec: ScoringSpec, payload: Any, plan: EvalPlan, output: Path,
           search_seconds: float, ship_back: bool = False) -> dict[str, Any]:
    """After the search: every baseline (the run's own baseline checkpoints included), the output-rescaled
    control and the finalists re-scored on several held-out noise seeds with the searched metric and metrics
    the search never saw (the best of many noisy evaluations is biased low: docs/METHOD.md, Held-out
    re-scoring), the table and verdict, the export, results and plots. `ship_back`: the export's worker sends
    its files back rather than writing them (a worker node that cannot see the driver's folders)."""
    started = time.perf_counter()
    run = spec_run(spec)
    searched_baselines = {name: row.score for name, row in table.baselines().items()}
    candidates = [ScoredCandidate(name, "baseline", searched_baselines.get(name), alpha=alpha)
                  for name, alpha in baselines.items()]
    stopping.set_phase("the scoring of the run's baseline checkpoints" + AFTER_SEARCH)
    candidates += score_extra_baselines(extra_baselines(run, spec.files, args.phema or ()), spec, payload, args)
    stopping.set_phase("the control fit" + AFTER_SEARCH)
    candidates.append(fit_control(candidates, spec, payload, args))
    candidates += [ScoredCandidate(f"search rank {i + 1} (trial {row.index})", "lcsc", row.score, alpha=row.alpha,
                                   trial=row.index) for i, row in enumerate(pick_finalists(table, args.top_k))]
    seeds = heldout_seeds(args)
    stopping.set_phase("held-out scoring" + AFTER_SEARCH)
    metric_name = rescore_heldout(candidates, spec, payload, args, plan, seeds)
    verdict = print_verdict(candidates, metric_name, args)
    winner, best, deciding = verdict.winner, verdict.best, verdict.deciding
    # Everything of the final folder is written into a staging folder and moved in at once at the end, so
    # a stop in any phase leaves results.json, the export and its sidecar together or none of them.
    stopping.set_phase("the export" + AFTER_SEARCH)
    with staged(output, last="results.json") as staging:
        written = export_best(best, winner, candidates, baselines, spec, payload, args, staging, metric_name, seeds[0],
                              ship_back=ship_back)
        exported = str(output / Path(written).relative_to(staging))
        stopping.set_phase("the final plots" + AFTER_SEARCH)
        results = build_results(args, table, space, steps, spec, candidates, winner, best, exported, metric_name,
                                seeds, deciding, timings={"search_seconds": search_seconds,
                                                          "final_seconds": time.perf_counter() - started,
                                                          "median_trial_stage_seconds": _median_stage_times(table)})
        write_results(staging / "results.json", results)
        plot_best_so_far(staging / "best_score_vs_trial.png", [r.score for r in table.rows], metric_name=metric_name,
                         penalty=PENALTY_SCORE, baselines={c.name: c.search_score for c in candidates
                                                           if c.kind != "lcsc" and c.search_score is not None})
        plot_coefficients(staging / "coefficients_vs_step.png", steps,
                          {"LCSC winner": winner.alpha, **{n: a for n, a in baselines.items() if n.startswith(("ema", "phema"))}})
        write_results_md(staging / "results.md", verdict.lines, verdict.table)
        write_report_html(staging / "report.html", title=f"LCSC search {table.experiment_path}", verdict=verdict.lines,
                          table=verdict.table, plots=[staging / "best_score_vs_trial.png",
                                                      staging / "coefficients_vs_step.png"],
                          grids=[(title, staging / f"samples_{name}.png") for name, title in
                                 (("lcsc_winner", "LCSC winner"), ("newest", "newest checkpoint"),
                                  ("best_baseline", "best baseline"), ("control", "control (rescaled)"))])
        stopping.set_phase("moving the results into place")
    print(f"results: {output / 'results.json'}; exported checkpoint: {exported}; plots and sample grids in {output}")
    return results


CONSOLE_COLUMNS = 120  # the final block's width: the verdict lines wrap, the compact table fits
AFTER_SEARCH = " after the search (its trials are saved; the final stage starts over when it continues)"


def heldout_seeds(args: argparse.Namespace) -> list[int]:
    """The held-out noise seeds: `--heldout-seeds` consecutive seeds from search seed + HELDOUT_SEED_OFFSET."""
    return [args.noise_seed + HELDOUT_SEED_OFFSET + i for i in range(args.heldout_seeds)]


def eval_plan(args: argparse.Namespace, run: RunInfo) -> EvalPlan:
    """What the held-out evaluation measures besides the searched metric: each `--eval-extractors` with its
    reference statistics of the run's data (computed once and cached), and precision/recall against the run's
    training images when run.json names them. Built before Ray starts, so what it lacks is said (and its
    statistics are computed) before the search rather than after it."""
    data = run.config.get("data")
    if data is not None and not dataset_exists(data):
        print(f"note: the run's training data {data!r} is not readable here: no precision/recall"
              + (f" and no {','.join(args.eval_extractors)}" if args.eval_extractors else ""))
        data = None
    elif args.eval_extractors and data is None:
        print(f"note: --eval-extractors {','.join(args.eval_extractors)} skipped: the run names no training data "
              "to compute their reference statistics from")
    extractors = tuple((name, str(ensure_reference_stats(data, name, device=args.device,
                                                          inception_weights=args.inception_weights)))
                       for name in (args.eval_extractors if data is not None else ()))
    return EvalPlan(extractors=extractors, real_data=data, pr_samples=args.pr_samples,
                    inception_weights=args.inception_weights)


def check_space(args: argparse.Namespace, storage: Path, output: Path, num_params: int, num_checkpoints: int) -> None:
    """Before Ray: --storage and --out can be written and hold what the search will write there (each trial's
    candidate, record and Tune files; the stack file; the export, plots and grids of the final folder)."""
    export = num_params * 4 + (16 << 20)  # the merged weights at most float32, plus plots, grids and results
    trials = args.num_trials * (num_checkpoints * 8 + TRIAL_BYTES)
    stack = num_checkpoints * num_params * (2 if args.stack_dtype != "float32" else 4) if args.stack_file else 0
    # The final folder inside the experiment, or elsewhere on the same file system, takes from the same space.
    inside = output.is_relative_to(storage)
    shared = inside or existing_ancestor(output).stat().st_dev == existing_ancestor(storage).stat().st_dev
    check_output_folder(storage, "--storage", trials + stack + (export if shared else 0))
    if not inside:  # probed on its own: a read-only mount of the same file system shares its device number
        check_output_folder(output, "--out", 0 if shared else export)


def build_stack_file(spec: ScoringSpec, folder: Path) -> Path:
    """Write (or reuse) the experiment's stack file and print where the stack lives, its size and one merge's
    time measured here, so a user sees before the search what the page cache must hold."""
    started = time.perf_counter()
    write_stack_file(folder, spec.files, ckpt_key=spec.ckpt_key, strip_prefix=spec.strip_key_prefix,
                     storage_dtype=STORAGE_DTYPES[spec.stack_dtype], trust_pickle=spec.trust_pickle)
    built = time.perf_counter() - started
    stack = open_stack_file(folder)
    started = time.perf_counter()
    stack.merged_state_dict(np.full(stack.num_checkpoints, 1.0 / stack.num_checkpoints))
    merge = time.perf_counter() - started
    host = available_host_bytes()
    print(f"stack file: {stack.num_checkpoints} x {stack.num_params:,} {spec.stack_dtype} = "
          f"{stack.nbytes / 2**30:.2f} GiB in {folder} (ready in {built:.1f} s), mapped read-only by every trial; "
          f"one merge {merge:.2f} s on this machine's CPU"
          + (f"; larger than the {host / 2**30:.1f} GiB of available memory, so merges read from disk"
             if host is not None and stack.nbytes > host else ""))
    return folder


def profile_baselines(args: argparse.Namespace, resolved: ResolvedRun, steps: list[int]) -> dict[str, np.ndarray]:
    """The coefficient baselines (and warm starts): newest, uniform, and the ema_*/phema_* profiles, which
    assume raw training weights, so they are left out for a trajectory of EMA weights (an EMA of EMAs is not
    what their names say). EDM2's post-hoc EMA is then reconstructed its own way (baseline_checkpoints.py)."""
    if not resolved.holds_ema:
        return baseline_profiles(steps, args.ema, args.phema or (), run_ema_warmup(resolved.run.config))
    print(f"note: the {resolved.trajectory} checkpoints are EMA weights, so the ema_*/phema_* profiles over them "
          "(which assume raw weights) are not baselines; the run's other saved trajectories are"
          + (", and EDM2's post-hoc EMA is reconstructed from its snapshots" if edm2_width_snapshots(resolved.run)
             else ""))
    return baseline_profiles(steps, (), ())


def score_extra_baselines(extra: list[ExtraBaseline], spec: ScoringSpec, payload: Any,
                          args: argparse.Namespace) -> list[ScoredCandidate]:
    """The run's baseline checkpoint files (its training EMA...), scored on the search noise with the search's
    samples, so their search score sits beside every trial's; they are not coefficient vectors, so the
    optimizer is not told them (the EMA profiles rebuilt from the raw checkpoints are its warm starts)."""
    if not extra:
        return []
    resources = _task_resources(args)
    scores = ray.get([_score_candidate.options(name=f"lcsc search-noise score: {b.name}", **resources).remote(
        spec, payload, EvalPlan(), b, None, args.noise_seed, args.fid_samples) for b in extra])
    candidates = [ScoredCandidate(b.name, "baseline", next(iter(s.values())), checkpoint=b) for b, s in zip(extra, scores)]
    print("baseline checkpoints of the run, search score: "
          + ", ".join(f"{c.name} {c.search_score:.4f}" for c in candidates))
    return candidates


def fit_control(candidates: list[ScoredCandidate], spec: ScoringSpec, payload: Any,
                args: argparse.Namespace) -> ScoredCandidate:
    """The output-rescaled best baseline: the baseline with the best search score, its samples corrected by
    x -> clamp(a·x + b) with (a, b) fitted to the searched metric on the search noise. A control, never
    exported: it shows how much of LCSC's gain a trivial output fix would give (metric gaming check)."""
    scored = [c for c in candidates if c.search_score is not None and c.search_score < PENALTY_SCORE]
    base = min(scored, key=lambda c: c.search_score)
    affine, score = ray.get(_fit_affine.options(name=f"lcsc control fit: {base.name}", **_task_resources(args)).remote(
        spec, payload, base.source, args.noise_seed, args.fid_samples))
    print(f"control: {base.name} samples rescaled by clamp({affine.a:.3f}·x {affine.b:+.3f}): search score "
          f"{base.search_score:.4f} -> {score:.4f}")
    return ScoredCandidate(f"rescaled {base.name} (control)", "control", score, alpha=base.alpha,
                           checkpoint=base.checkpoint, transform=affine)


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
                    plan: EvalPlan, seeds: list[int]) -> str:
    """Score every candidate on every held-out seed, one Ray task per (candidate, seed), in place; returns the
    searched metric's name."""
    print(f"held-out scoring: {len(candidates)} candidates x {len(seeds)} noise seed{'s' if len(seeds) > 1 else ''} x "
          f"{args.final_samples} samples"
          + (f"; also {', '.join(name for name, _ in plan.extractors)}" if plan.extractors else "")
          + ("; precision/recall against the training images" if plan.real_data else ""))
    started = time.perf_counter()
    resources = _task_resources(args)
    futures = [[_score_candidate.options(name=f"lcsc held-out score: {c.name}", **resources).remote(
        spec, payload, plan, c.source, c.transform, seed, args.final_samples) for seed in seeds] for c in candidates]
    pending = [ref for row in futures for ref in row]
    with progress(total=len(pending), desc="held-out scoring", unit="score", disable=args.quiet) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            bar.update(len(done))
    for candidate, row in zip(candidates, futures):
        candidate.heldout = ray.get(row)
    print(f"held-out scoring took {time.perf_counter() - started:.0f} s")
    return next(iter(candidates[0].heldout[0]))


@dataclass
class Verdict:
    """What the final comparison decided, and its lines and full table for the files that keep them."""

    winner: ScoredCandidate
    best: ScoredCandidate
    deciding: str
    lines: list[str]
    table: str


def print_verdict(candidates: list[ScoredCandidate], metric_name: str,
                  args: argparse.Namespace) -> Verdict:
    """Print, per metric, which baselines the LCSC winner beats, ties or loses to (paired over the held-out
    seeds, |Δ| > 2 SE), then a table that fits 120 columns (the searched metric and the first one the search
    never saw); returns the winner, the candidate to use, the metric that chose it, and the verdict lines and
    full table for results.md and report.html.

    The winner is the finalist with the best mean searched metric (or, with `--select-on independent`, the
    first independent distance). The candidate to use (exported) is the
    best of the winner and the baselines on the first metric the search never saw when there is one, else on
    the searched metric: a baseline when the search found nothing better, which the user must hear rather than
    receive a worse model labelled as the winner."""
    baselines = [c for c in candidates if c.kind == "baseline"]
    controls = [c for c in candidates if c.kind == "control"]
    lcsc = [c for c in candidates if c.kind == "lcsc"]
    metrics = list(lcsc[0].heldout[0])
    distances = [m for m in metrics if not m.startswith(("precision_", "recall_"))]
    selection = distances[1] if args.select_on == "independent" and len(distances) > 1 else metric_name
    winner = min(lcsc, key=lambda c: c.mean(selection))
    winner.name = f"LCSC winner (trial {winner.trial})"
    lines = []
    if selection != metric_name:
        lines.append(f"winner picked among the finalists on held-out {selection} (--select-on independent)")
    rows = baselines + controls + [winner] + [c for c in lcsc if c is not winner]
    table = format_table(rows, winner, metric_name, other_metrics=metrics[1:], search_samples=args.fid_samples,
                         final_samples=args.final_samples, seeds=len(winner.heldout))
    if len(winner.heldout) == 1:
        lines.append("one held-out seed: no error bars, so every comparison is reported as a tie; pass --heldout-seeds 3 "
              "or more to tell differences from noise")
    for metric in distances:
        verdicts = {c.name: compare(c, winner, metric).verdict for c in baselines + controls}
        summary = ", ".join(f"{verdict} {len([v for v in verdicts.values() if v == verdict])}"
                            for verdict in ("beats", "ties", "loses to"))
        unbeaten = [name for name, verdict in verdicts.items() if verdict != "beats"]
        role = ("searched" if metric == metric_name else
                "never searched; picked the winner" if metric == selection else "never searched")
        lines.append(f"LCSC winner on held-out {metric} ({role}): {summary} of {len(verdicts)} baselines and "
                     "controls" + (f" (not beaten: {', '.join(unbeaten)})" if unbeaten else ""))
    if selection != metric_name and len(distances) < 3:
        lines.append(f"note: {selection} picked the winner, so every distance in this table took part in the search or the "
              f"selection; add another --eval-extractors entry (e.g. pixels) for one that neither touched")
    best_baseline = min(baselines, key=lambda c: c.mean(metric_name))
    for metric in distances[1:]:
        if compare(best_baseline, winner, metric_name).verdict == "beats" and \
                compare(best_baseline, winner, metric).verdict != "beats":
            lines.append(f"caution: the LCSC winner beats the best baseline ({best_baseline.name}) on the searched "
                  f"{metric_name} but not on {metric}, which the search never saw: the gain may fit the search's "
                  "feature network rather than the data")
    deciding = distances[1] if len(distances) > 1 else metric_name
    best = min(baselines + [winner], key=lambda c: c.mean(deciding))
    if best is winner:
        lines.append(f"use: the LCSC winner (lowest held-out {deciding} of the winner and the baselines; exported)")
    else:
        lines.append(f"use: {best.name}, not the LCSC winner: it has the lowest held-out {deciding} (exported; the winner "
              f"{compare(best, winner, deciding).verdict} it, paired over {len(winner.heldout)} seeds)")
    for control in controls:
        if compare(control, winner, deciding).verdict != "beats":
            lines.append(f"note: {control.name} is not beaten on {deciding}: much of the gain is an output-scale "
                  f"correction (clamp({control.transform.a:.3f}·x {control.transform.b:+.3f}))")
    print("\n".join(textwrap.fill(line, CONSOLE_COLUMNS, subsequent_indent="  ") for line in lines))
    print(format_compact_table(rows, winner, metric_name, distances[1] if len(distances) > 1 else None))
    return Verdict(winner, best, deciding, lines, table)


def export_best(best: ScoredCandidate, winner: ScoredCandidate, candidates: list[ScoredCandidate],
                baselines: dict[str, np.ndarray], spec: ScoringSpec, payload: Any, args: argparse.Namespace,
                output: Path, metric_name: str, seed: int, ship_back: bool = False) -> str:
    """Export `best` in the inputs' format, with titled sample grids (`GRID_FILES`) of the winner, the newest
    checkpoint, the best baseline and the control on the first held-out noise seed beside it; returns the
    exported path."""
    merged_name = "lcsc_merged" + spec.files[-1].path.suffix if spec.files[-1].path.is_file() else "lcsc_merged"
    best_baseline = min((c for c in candidates if c.kind == "baseline"), key=lambda c: c.mean(metric_name))
    grids = {"lcsc_winner": (winner.alpha, None, winner.name), "newest": (baselines["newest"], None, "newest checkpoint"),
             "best_baseline": (best_baseline.source, None, f"best baseline: {best_baseline.name}")}
    grids.update({"control": (c.source, c.transform, c.name) for c in candidates if c.kind == "control"})
    metrics = {metric: best.mean(metric) for metric in best.heldout[0]}
    exported = ray.get(_export_candidate.options(name=f"lcsc export: {best.name}", num_cpus=args.cpus_per_trial)
                       .remote(spec, payload, best.source, str(output / merged_name), metrics, grids, seed, ship_back))
    if ship_back:  # (path on the driver, {file relative to `output`: bytes})
        exported, files = exported
        for relative, data in files.items():
            (output / relative).parent.mkdir(parents=True, exist_ok=True)
            (output / relative).write_bytes(data)
    print(f"export: {best.name} in {exported_dtype(exported)} (each tensor in its checkpoints' majority dtype, "
          "else float32)")
    return exported


def build_results(args: argparse.Namespace, table: ResultTable, space: CoefficientSpace, steps: list[int],
                  spec: ScoringSpec, candidates: list[ScoredCandidate], winner: ScoredCandidate,
                  best: ScoredCandidate, exported: str, metric_name: str, seeds: list[int], deciding: str,
                  timings: dict[str, Any]) -> dict[str, Any]:
    """What results.json holds: settings, trial counts, every baseline and control with per-seed held-out
    metrics and paired comparisons to the winner, the winner, the export, timings. `heldout_score` is the
    mean of the searched metric over the held-out seeds."""
    beaten = [c.name for c in candidates if c.kind == "baseline" and compare(c, winner, metric_name).verdict == "beats"]
    return {
        "metric": metric_name,
        "search": {"samples": args.fid_samples, "noise_seed": args.noise_seed, "optimizer": args.optimizer,
                   "space": args.space, "bound": args.bound, "sigma": space.sigma, "seed": args.seed,
                   "fresh_noise_every": args.fresh_noise_every, "coef_penalty": args.coef_penalty,
                   "trials_completed": len(table.rows),
                   "trials_failed": sum(bool(r.metrics.get("failed")) for r in table.rows),
                   "trials_errored": table.num_errored, "experiment": table.experiment_path},
        "heldout": {"samples": args.final_samples, "noise_seeds": seeds, "metrics": list(winner.heldout[0]),
                    "rule": f"beats/loses to: |mean paired difference| > {SIGNIFICANCE_SE:g} standard errors over "
                            "the seeds, else ties", "deciding_metric": deciding, "winner_selected_on": args.select_on},
        "steps": steps,
        "checkpoints": [str(f.path) for f in spec.files],
        "baselines": {c.name: _candidate_json(c, winner) for c in candidates if c.kind == "baseline"},
        "controls": {c.name: {**_candidate_json(c, winner), "a": c.transform.a, "b": c.transform.b}
                     for c in candidates if c.kind == "control"},
        "winner": {**_candidate_json(winner, winner), "steps": steps, "trial": winner.trial, "beats": beaten},
        "exported": {"name": best.name, "kind": best.kind, "alpha": best.alpha,
                     "source_checkpoint": None if best.checkpoint is None else str(best.checkpoint.file.path),
                     "heldout_score": best.mean(metric_name), deciding: best.mean(deciding), "checkpoint": exported},
        "finalists": [{"trial": c.trial, "search_score": c.search_score, "heldout_score": c.mean(metric_name)}
                      for c in candidates if c.kind == "lcsc"],
        "timings": timings,
    }


def _candidate_json(candidate: ScoredCandidate, winner: ScoredCandidate) -> dict[str, Any]:
    metrics = list(candidate.heldout[0])
    entry: dict[str, Any] = {"alpha": candidate.alpha, "search_score": candidate.search_score,
                             "heldout_score": candidate.mean(metrics[0])}
    if candidate.checkpoint is not None:
        entry["checkpoint"] = str(candidate.checkpoint.file.path)
    entry["heldout_metrics"] = {}
    for metric in metrics:
        values = {"mean": candidate.mean(metric), "per_seed": candidate.values(metric)}
        if candidate is not winner:
            comparison = compare(candidate, winner, metric,
                                 lower_is_better=not metric.startswith(("precision_", "recall_")))
            values.update(diff_vs_winner=comparison.diff, se=comparison.se, winner=comparison.verdict)
        entry["heldout_metrics"][metric] = values
    return entry


def _task_resources(args: argparse.Namespace) -> dict[str, float]:
    return dict(num_cpus=args.cpus_per_trial, num_gpus=args.gpus_per_trial or 0)


@ray.remote(max_retries=2)
def _score_candidate(spec: ScoringSpec, payload: dict | None, plan: EvalPlan, source: Any,
                     transform: OutputAffine | None, seed: int, num_samples: int) -> dict[str, float]:
    """Every metric of `plan` for one candidate on one noise seed, on a Ray worker (scorer and extractors are
    cached per worker process)."""
    scorer = cached_scorer(spec, payload)
    batches = candidate_samples(scorer, source, transform, seed=seed, num_samples=num_samples)
    return cached_metrics(plan, scorer).score(scorer, batches)


@ray.remote(max_retries=2)
def _fit_affine(spec: ScoringSpec, payload: dict | None, source: Any, seed: int,
                num_samples: int) -> tuple[OutputAffine, float]:
    """`fit_output_affine` on a Ray worker."""
    return fit_output_affine(cached_scorer(spec, payload), source, seed=seed, num_samples=num_samples)


@ray.remote
def _export_candidate(spec: ScoringSpec, payload: dict | None, source: Any, out_path: str, metrics: dict,
                      grids: dict[str, Any], seed: int, ship_back: bool = False) -> Any:
    """Export a candidate where the stack already lives (a worker), in the inputs' format (a baseline file is
    re-saved as a one-checkpoint combination), and write a sample grid (held-out noise) for each candidate in
    `grids` next to it, so the gain can be seen. With `ship_back` (the worker may not see `out_path`'s folder)
    they are written to a temporary folder here and returned as (exported path, {relative path: bytes})."""
    if ship_back:
        folder = Path(tempfile.mkdtemp(prefix="lcsc-export-"))
        try:
            exported = _write_export(spec, payload, source, str(folder / Path(out_path).name), metrics, grids, seed)
            files = {str(path.relative_to(folder)): path.read_bytes() for path in folder.rglob("*") if path.is_file()}
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return str(Path(out_path).parent / Path(exported).relative_to(folder)), files
    return _write_export(spec, payload, source, out_path, metrics, grids, seed)


def _write_export(spec: ScoringSpec, payload: dict | None, source: Any, out_path: str, metrics: dict,
                  grids: dict[str, Any], seed: int) -> str:
    """`_export_candidate`'s files, written on this worker at `out_path` and beside it."""
    scorer = cached_scorer(spec, payload)
    if isinstance(source, ExtraBaseline):
        file = replace(source.file, path=Path(local_path(scorer.shipped, source.file.path)))  # shipped_files.py
        single = CheckpointStack.from_files([file], ckpt_key=source.ckpt_key, trust_pickle=spec.trust_pickle)
        exported = export_merged(single, np.ones(1), out_path, metrics=metrics)
    else:
        exported = export_merged(scorer.stack, source, out_path, metrics=metrics)
    for name, (grid_source, transform, title) in grids.items():
        scorer.load_candidate(grid_source)
        write_sample_grid(scorer.run, scorer.net, Path(out_path).parent / f"samples_{name}.png", seed=seed,
                          sampler=scorer.sampler, title=title, transform=transform)
    return str(exported)


def _median_stage_times(table: ResultTable) -> dict[str, float]:
    stages: dict[str, list[float]] = {}
    for row in table.rows:
        for key, value in row.metrics.items():
            if key.startswith("time_"):
                stages.setdefault(key[5:], []).append(float(value))
    return {stage: float(np.median(values)) for stage, values in stages.items()}
