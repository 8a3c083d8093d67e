"""Page faults per CPU evaluation: glibc's default malloc thresholds vs the scorer's retained memory.

Each measurement is a fresh Python process, as a trial's worker is: it builds the demo's scorer (the digits
CM demo run, its preset's evaluation size, one thread), evaluates `--warmup` candidates, then times
`--evaluations` more, reading per evaluation the wall time, the kernel CPU time and the minor page faults
(`getrusage`). `default` turns `lcsc_ray.host_memory.retain_freed_memory` off in that process (glibc's
dynamic thresholds, as before it existed), `retained` is the library as it is. The two kinds alternate,
`--rounds` times, so both see the same moments of a noisy machine; medians per kind and their ratio.

    python benchmarks/host_memory_bench.py [--rounds 3] [--evaluations 8] [--samples 2000]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

KINDS = ("default", "retained")


def child(kind: str, samples: int, warmup: int, evaluations: int) -> None:
    """Measure in this process and print one JSON line of per-evaluation lists."""
    import lcsc_ray.scoring as scoring
    from demo_setup import demo_scoring_spec  # benchmarks/ is on sys.path: the script's own folder

    if kind == "default":
        scoring.retain_freed_memory = lambda: False
    spec = demo_scoring_spec("cm", device="cpu", threads=1)
    scorer = scoring.CandidateScorer(spec)
    rng = np.random.default_rng(0)
    rows = []
    for index in range(warmup + evaluations):
        alpha = rng.dirichlet(np.ones(len(spec.files)))
        before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        scorer.score(alpha, seed=0, num_samples=samples)
        seconds, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF)
        if index >= warmup:
            rows.append((seconds, after.ru_stime - before.ru_stime, after.ru_minflt - before.ru_minflt))
    print(json.dumps({"wall": [r[0] for r in rows], "kernel": [r[1] for r in rows], "faults": [r[2] for r in rows]}))


def measure(kind: str, args: argparse.Namespace) -> dict[str, list[float]]:
    command = [sys.executable, __file__, "--child", kind, "--samples", str(args.samples),
               "--warmup", str(args.warmup), "--evaluations", str(args.evaluations)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per kind, alternating")
    parser.add_argument("--evaluations", type=int, default=8, help="timed evaluations per process")
    parser.add_argument("--warmup", type=int, default=2, help="untimed evaluations first")
    parser.add_argument("--samples", type=int, default=2000, help="images per evaluation (the digits-cm preset's)")
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.samples, args.warmup, args.evaluations)
        return

    print(f"digits CM demo, {args.samples} samples per evaluation, 1 thread, {args.rounds} fresh processes per kind "
          f"x {args.evaluations} evaluations (after {args.warmup} untimed)")
    results: dict[str, dict[str, list[float]]] = {kind: {"wall": [], "kernel": [], "faults": []} for kind in KINDS}
    for round_index in range(args.rounds):
        for kind in KINDS if round_index % 2 == 0 else reversed(KINDS):
            measured = measure(kind, args)
            for key, values in measured.items():
                results[kind][key].extend(values)
            print(f"  round {round_index + 1} {kind:8s}: median {1000 * statistics.median(measured['wall']):6.0f} ms, "
                  f"kernel {1000 * statistics.median(measured['kernel']):5.0f} ms, "
                  f"{statistics.median(measured['faults']):7.0f} minor faults per evaluation", flush=True)
    medians = {kind: {key: statistics.median(values) for key, values in results[kind].items()} for kind in KINDS}
    for kind in KINDS:
        m = medians[kind]
        print(f"{kind:8s}: {1000 * m['wall']:6.0f} ms per evaluation, {1000 * m['kernel']:5.0f} ms of it in the kernel, "
              f"{m['faults']:7.0f} minor page faults")
    print(f"retained vs default: evaluation time x{medians['retained']['wall'] / medians['default']['wall']:.2f}, "
          f"kernel time {1000 * (medians['default']['kernel'] - medians['retained']['kernel']):.0f} ms less")


if __name__ == "__main__":
    main()
