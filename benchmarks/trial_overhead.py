"""Ray Tune overhead of the LCSC search: trials/s of the real search vs a plain Python loop doing the same
evaluations (same candidates, same scorer, same threads) in one process, measured in the same run.

    python benchmarks/trial_overhead.py                     # the embedded demo run at its evaluation size
    python benchmarks/trial_overhead.py --ckpt-dir RUN --trials 60 --fid-samples 1000

Both sides include building the scorer (stack, model, extractor, √Σ_ref) once. Ray's share of a search
at 1 concurrent trial, 1 candidate per trial (1 - loop/ray time; target <= 10%) is measured first, in
`--repeats` pairs of loop and search, interleaved (`demo_overhead`): each search is the first of a fresh
Ray session, as an `lcsc-ray` command's is; the share is printed without `ray.init` (a session pays it
once) and with it, with a breakdown of Ray's extra time (Tune's start to the trial's worker, the worker's
start and imports, the round trips between trials, the teardown, the trial's bookkeeping, and the scorer
build and evaluation of the trial minus the loop's, which is noise); `--before-too` measures the same
pair on a Ray session started as before 2026-12-05, in the same run; `--demo-only` stops there. Then the
per-candidate time with one candidate per trial and with `--candidates-per-trial` candidates per trial,
and the candidates/s with 1 and 2 concurrent trials (the scaling on this machine). Then the driver's
ceiling: candidates/s of the same search machinery (our searcher, candidate store, monitor, Tune's loop)
around a trainable that does nothing, at 1, 2, 4, 8, 16 and 32 concurrent trials, one candidate per trial
and batched, printed as a curve with each rate's ratio to the 1-concurrent rate (target >= 50 per second at
8 and 32), and around a trainable that does a real demo trial's bookkeeping without its scoring (`BookkeepingTrial`: the candidate file read,
the store's record read and written, the same report) at 8 concurrent trials (target >= 20 per second).
`--long-trials N` adds the do-nothing rate along one search of N candidates at 8 concurrent trials, by
quarter: whether the driver's cost per decision grows with the length of the search.

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
import os
import tempfile
import time


import numpy as np
import psutil
import ray
from ray import tune

import torch

from demo_setup import demo_scoring_spec  # benchmarks/ is on sys.path: the script's own folder
from lcsc_ray import scoring as scoring_module
from lcsc_ray.cluster import start_ray
from lcsc_ray.profiles import baseline_profiles
from lcsc_ray.evaluator import EvalResult
from lcsc_ray.scoring import CandidateScorer, ScoringSpec, cached_scorer
from lcsc_ray.search.candidates import INDEX_KEY, candidate_configs
from lcsc_ray.search.trial import PENALTY_SCORE, LcscTrial
from lcsc_ray.search.tuner import run_search
from lcsc_ray.search.objective import SearchObjective
from lcsc_ray.search.ray_compat import tune_actors_use_idle_workers
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


def completions_after_start(finished: list[float], started: list[float]) -> list[float]:
    """The finishing times, sorted, of the candidates completed after the last actor was set up."""
    return sorted(t for t in finished if t > max(started))


def steady_rate(finished: list[float], started: list[float]) -> float | None:
    """Candidates per second between the first completion after the last actor started and the last
    completion: the rate once every actor runs (None when too few candidates were measured in that span)."""
    times = completions_after_start(finished, started)
    if len(set(times)) < 10:  # the candidates of one batched trial share their finishing time
        return None
    return sum(t > times[0] for t in times) / (times[-1] - times[0])


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


def rates_along(finished: list[float], started: list[float], parts: int = 4) -> list[float]:
    """Candidates per second in each of `parts` consecutive slices of the completions after the last actor
    started: whether the driver slows down as the search grows (its trial list, the store, the optimizer)."""
    times = completions_after_start(finished, started)
    bounds = np.linspace(0, len(times) - 1, parts + 1).round().astype(int)
    return [(b - a) / (times[b] - times[a]) for a, b in zip(bounds, bounds[1:]) if times[b] > times[a]]


def long_search_report(space, storage: str, args: argparse.Namespace) -> None:
    """The do-nothing search's rate along one long search at `BOOKKEEPING_CONCURRENCY` concurrent trials."""
    table = run_search(TrivialTrial, space, optimizer="CMA", num_trials=args.long_trials, seed=0, storage=storage,
                       name="long", max_concurrent=BOOKKEEPING_CONCURRENCY, resources={"cpu": args.ceiling_cpus},
                       progress=False)
    rates = rates_along([row.metrics[FINISHED_KEY] for row in table.rows],
                        [row.metrics[STARTED_KEY] for row in table.rows])
    print(f"along one search of {args.long_trials} candidates, {BOOKKEEPING_CONCURRENCY} concurrent trials that do "
          f"nothing, by quarter: " + ", ".join(f"{rate:.1f}/s" for rate in rates)
          + f"; last quarter / first quarter {rates[-1] / rates[0]:.2f}x")


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


STAGES = ("sample", "features", "statistics", "distance", "merge")  # the scorer's timed stages of one evaluation


class TimedTrial(LcscTrial):
    """`LcscTrial` that also reports when its worker process started, when the trial was set up (after the
    worker unpickled the trainable and imported its modules), how long its worker took to build the scorer
    (the first step; the plain loop builds the same scorer), and when each step began and ended, so that
    `ray_breakdown` can say where Ray's extra time goes. Its own cost is a few timestamps per trial."""

    def setup(self, config: dict, **kwargs) -> None:
        process = psutil.Process()
        self.set_up_at, self.process_started_at = time.time(), process_started_at()
        self.cpu_before_setup = sum(process.cpu_times()[:2])  # the worker's own CPU seconds so far (imports)
        super().setup(config, **kwargs)

    def step(self) -> dict:
        began, build = time.time(), 0.0
        if repr(self.scoring) not in scoring_module._SCORERS:
            cached_scorer(self.scoring, self.stack_payload)
            build = time.time() - began
        report = super().step()
        return {**report, "process_started_at": self.process_started_at, "set_up_at": self.set_up_at,
                "cpu_before_setup": self.cpu_before_setup,
                "scorer_build_s": build, "step_began_at": began, "step_ended_at": time.time()}


def process_started_at() -> float:
    """Wall-clock time this process started, to the clock tick (psutil's `create_time` rounds the boot time to
    the second)."""
    with open("/proc/self/stat", encoding="ascii") as stat:
        ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
    return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK"))


def settle(timeout: float = 60.0) -> float:
    """Wait until this process's children (Ray's processes and its idle workers, which import the trial's
    modules as they start) use less than a fifth of a core; the seconds waited."""
    start = time.perf_counter()

    def busy() -> float:
        total = 0.0
        for child in psutil.Process().children(recursive=True):
            try:
                total += sum(child.cpu_times()[:2])
            except psutil.Error:
                pass
        return total

    before = busy()
    while time.perf_counter() - start < timeout:
        time.sleep(1.0)
        now = busy()
        if now - before < 0.2:
            break
        before = now
    return time.perf_counter() - start


def plain_loop(spec: ScoringSpec, alphas: list[np.ndarray], num_samples: int) -> dict[str, float]:
    """A user's alternative to the search: build the scorer once in this process (stack, model, extractor,
    √Σ_ref, as a trial's worker does once), then score the candidates one after another on one thread."""
    start = time.perf_counter()
    scorer = CandidateScorer(spec)
    built = time.perf_counter()
    evaluate = 0.0
    for alpha in alphas:
        timings = scorer.score(alpha, seed=0, num_samples=num_samples).timings
        evaluate += sum(timings.get(stage, 0.0) for stage in STAGES)
    return {"wall": time.perf_counter() - start, "build": built - start, "evaluate": evaluate}


def ray_search(trainable, space, baselines, storage: str, name: str, args: argparse.Namespace) -> dict[str, float]:
    """One search of `args.trials` candidates, 1 concurrent trial, 1 candidate per trial, around `TimedTrial`:
    its wall time (the call of `run_search`, Ray already started) and `ray_breakdown` of it."""
    driver, called = psutil.Process(), time.time()
    driver_cpu = sum(driver.cpu_times()[:2])
    table = run_search(trainable, space, optimizer="lcsc-es", num_trials=args.trials, seed=0, warm_start=baselines,
                       storage=storage, name=name, max_concurrent=1, resources={"cpu": 1}, progress=False,
                       penalty=PENALTY_SCORE)
    returned = time.time()
    driver_cpu = sum(driver.cpu_times()[:2]) - driver_cpu
    assert len(table.rows) == args.trials and not any(row.metrics.get("replayed") for row in table.rows)
    return {"wall": returned - called, "driver_cpu": driver_cpu,
            **ray_breakdown([row.metrics for row in table.rows], called, returned)}


def ray_breakdown(reports: list[dict], called: float, returned: float) -> dict[str, float]:
    """Where the wall time of a search around `TimedTrial` went (seconds, wall-clock stamps of one machine):
    `tune_start` from the call to the trial's worker process starting (or, with a worker that was already
    running, to the trial's set-up), `worker_start` from the process start to the trial's set-up (the
    process start, Ray's actor creation, unpickling the trainable and its parameters, importing torch and
    our modules), `first_step` from the set-up to the first step, `build` the scorer's construction in the
    first step, `evaluate` the scorer's timed stages summed over all candidates, `bookkeeping` the rest of
    the steps (candidate file, record read and fsynced write, report), `round_trips` the time between one
    step's end and the next one's start summed (the result's way to the driver, Tune's loop, the searcher's
    tell and ask, the candidate store, the actor's reset and the next call), `teardown` from the last step's
    end to the return (Tune's last save and the actors' stop)."""
    reports = sorted(reports, key=lambda r: r["step_began_at"])
    first, last = reports[0], reports[-1]
    started = first["process_started_at"] if first["process_started_at"] >= called else first["set_up_at"]
    build = sum(r["scorer_build_s"] for r in reports)
    evaluate = sum(sum(r.get(f"time_{s}", 0.0) for s in STAGES) for r in reports)
    steps = sum(r["step_ended_at"] - r["step_began_at"] for r in reports)
    return {"tune_start": started - called, "worker_start": first["set_up_at"] - started,
            "first_step": first["step_began_at"] - first["set_up_at"], "build": build, "evaluate": evaluate,
            "bookkeeping": steps - build - evaluate,
            "round_trips": sum(b["step_began_at"] - a["step_ended_at"] for a, b in zip(reports, reports[1:])),
            "teardown": returned - last["step_ended_at"], "cpu_before_setup": first["cpu_before_setup"],
            "prestarted": float(first["process_started_at"] < called)}


def start_session(previous: bool) -> float:
    """Start a fresh local Ray (after shutting down a running one) and wait for it to settle; the seconds of
    `ray.init`. `previous`: start it as `start_ray` did before 2026-12-05 (a job runtime environment, so no
    trial actor could take one of Ray's idle workers, and no preloaded modules), for the before/after
    comparison in the same run."""
    if ray.is_initialized():
        ray.shutdown()
    start = time.perf_counter()
    if previous:
        tune_actors_use_idle_workers(None)
        ray.init(include_dashboard=False, runtime_env={"env_vars": {"RAY_CHDIR_TO_TRIAL_DIR": "0"}},
                 log_to_driver=False)
    else:
        start_ray(None, dashboard=False, quiet=True)
    seconds = time.perf_counter() - start
    settle()
    return seconds


def demo_overhead(spec: ScoringSpec, space, baselines, storage: str, args: argparse.Namespace) -> float:
    """Ray's share of a demo search at 1 concurrent trial, 1 candidate per trial: `args.repeats` pairs of the
    plain loop and the search, interleaved (their order alternating) so that both see the same machine, each
    search the first of a fresh Ray session (as the search of an `lcsc-ray` command is), and with
    `args.before_too` the same pair on a session started the previous way (`start_session`); prints each
    pair, the breakdown of Ray's extra time and the medians. Returns the median seconds per candidate of the
    search (`ray.init` not included)."""
    rng = np.random.default_rng(0)
    alphas = list(baselines.values())
    while len(alphas) < args.trials:
        alphas.append(space.to_coefficients(space.init_value() + rng.normal(0, space.sigma, space.dimension)))
    modes = ("before", "after") if args.before_too else ("after",)
    shares = {mode: ([], [], []) for mode in modes}
    walls = []
    for repeat in range(args.repeats):
        for mode in (modes if repeat % 2 == 0 else modes[::-1]):
            ray_init = start_session(mode == "before")
            trainable = tune.with_parameters(TimedTrial, scoring=spec, space=space, objective=SearchObjective(),
                                             num_samples=args.fid_samples)  # its parameters live in this session
            load = "/".join(f"{x:.1f}" for x in psutil.getloadavg())
            sides = {}
            for side in (("loop", "ray") if repeat % 2 == 0 else ("ray", "loop")):
                sides[side] = (plain_loop(spec, alphas, args.fid_samples) if side == "loop" else
                               ray_search(trainable, space, baselines, storage, f"overhead-{mode}-r{repeat}", args))
            loop, search = sides["loop"], sides["ray"]
            extra = search["wall"] - loop["wall"]
            shares[mode][0].append(1 - loop["wall"] / search["wall"])
            shares[mode][1].append(1 - loop["wall"] / (search["wall"] + ray_init))
            if mode == "after":
                walls.append(search["wall"])
            own = extra - (search["evaluate"] - loop["evaluate"])  # Ray's extra without the evaluation's noise
            shares[mode][2].append(own / (loop["wall"] + own))
            parts = {"Tune's start to the worker process": search["tune_start"],
                     "worker start and imports to the trial's set-up": search["worker_start"],
                     "set-up to the first step": search["first_step"],
                     f"round trips between steps ({args.trials - 1}, per trial)": search["round_trips"],
                     "teardown after the last result": search["teardown"],
                     "the trial's bookkeeping in its steps (candidate file, fsynced record)": search["bookkeeping"],
                     "scorer build, trial minus loop": search["build"] - loop["build"],
                     "evaluation, trial minus loop (noise)": search["evaluate"] - loop["evaluate"]}
            print(f"{mode}, repeat {repeat + 1} (load average {load}): plain loop {loop['wall']:.2f} s (scorer "
                  f"build {loop['build']:.2f} s, evaluation {loop['evaluate']:.2f} s), Ray search "
                  f"{search['wall']:.2f} s (scorer build {search['build']:.2f} s, evaluation "
                  f"{search['evaluate']:.2f} s): Ray's share {shares[mode][0][-1]:.1%} without ray.init, "
                  f"{shares[mode][1][-1]:.1%} with it ({ray_init:.2f} s); Ray's extra {extra:.2f} s =")
            for what, seconds in parts.items():
                per = f" ({seconds / (args.trials - 1) * 1e3:.0f} ms each)" if what.startswith("round trips") else ""
                print(f"    {seconds:6.2f} s  {what}{per}")
            print(f"    {extra - sum(parts.values()):6.2f} s  unaccounted")
            when = "was started before" if search["prestarted"] else "started during"
            print(f"  (the trial's worker process {when} the search and had used {search['cpu_before_setup']:.2f} s of CPU (its start, unpickling the "
                  f"trainable, importing torch and our modules) when the trial was set up; the driver used "
                  f"{search['driver_cpu']:.2f} s of CPU during the search)")
    for mode, (without, with_init, own) in shares.items():
        print(f"{mode}: Ray's share of a demo search, {args.trials} candidates, 1 concurrent trial (target <= 10%), "
              f"over {args.repeats} repeat(s): median {np.median(without):.1%} (range {min(without):.1%}-"
              f"{max(without):.1%}) without ray.init, {np.median(with_init):.1%} with it; from Ray's extra time "
              f"without the difference in evaluation time (the trial's evaluation as fast as the loop's): median "
              f"{np.median(own):.1%} (range {min(own):.1%}-{max(own):.1%})")
    return float(np.median(walls)) / args.trials


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
    parser.add_argument("--long-trials", type=int, default=0,
                        help="also measure the do-nothing rate along one search of this many candidates (e.g. 4000)")
    parser.add_argument("--demo-only", action="store_true",
                        help="only Ray's share of a demo search at 1 concurrent trial, with its breakdown")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved pairs of plain loop and search")
    parser.add_argument("--before-too", action="store_true",
                        help="also measure each pair on a Ray session started as before 2026-12-05")
    args = parser.parse_args()

    spec = demo_scoring_spec("cm", args.ckpt_dir, preset=preset, batch_size=args.batch_size, threads=1)
    run_dir, files = spec.run_dir, spec.files
    space = build_space(preset["space"], len(files), bound=preset["bound"])
    baselines = baseline_profiles([f.step for f in files], [0.99, 0.999])
    print(f"run {run_dir}: K={len(files)}, {args.fid_samples} samples per evaluation, {args.trials} candidates")
    if args.ceiling_only:
        start_ray(None, dashboard=False, quiet=True)
        with tempfile.TemporaryDirectory() as storage:
            ceiling_report(space, storage, args, spec)
            if args.long_trials:
                long_search_report(space, storage, args)
        ray.shutdown()
        return

    # Ray's share of one search at 1 concurrent trial against a plain loop over the same kind of candidates
    # (baselines, then random points of the space around them) with the same scorer, built once, on one thread
    # like one trial; pairs interleaved (`demo_overhead`). `ray.init` is timed apart: a session pays it once.
    per_candidate, batch = {}, args.candidates_per_trial
    with tempfile.TemporaryDirectory() as storage:
        per_candidate[1, 1] = demo_overhead(spec, space, baselines, storage, args)
        if args.demo_only:
            ray.shutdown()
            return
        if args.before_too:  # the last session may have been started the previous way
            start_session(previous=False)
        trainable = tune.with_parameters(LcscTrial, scoring=spec, space=space, objective=SearchObjective(),
                                         num_samples=args.fid_samples)
        rng = np.random.default_rng(0)
        alphas = list(baselines.values())
        while len(alphas) < args.trials:
            alphas.append(space.to_coefficients(space.init_value() + rng.normal(0, space.sigma, space.dimension)))
        loop_seconds = plain_loop(spec, alphas, args.fid_samples)["wall"] / len(alphas)
        for concurrent, per_trial in ((2, 1), (1, batch)):
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
        if args.long_trials:
            long_search_report(space, storage, args)
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
