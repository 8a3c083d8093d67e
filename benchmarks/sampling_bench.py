"""Sampling against its physical limit: sampling is most of a candidate's evaluation on the demo runs
(benchmarks/trial_overhead.py's stage times), so how close is it to the machine's arithmetic peak?

Counts the FLOPs of one batch of the search's sampler with torch's FlopCounterMode (convolutions and
matrix products: the work that matters), times sampling a candidate's worth of images with the scorer the
trials use, and compares the achieved FLOP rate with a same-run peak: the best rate of a large float32
matrix product at the same thread count.

    python benchmarks/sampling_bench.py [--samples 2000] [--threads 1 2]
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch
from torch.utils.flop_counter import FlopCounterMode

from demo_setup import demo_scoring_spec  # benchmarks/ is on sys.path: the script's own folder
from lcsc_ray.noise import FixedNoise
from lcsc_ray.scoring import CandidateScorer
from merge_bench import best_time


def matmul_peak(threads: int, size: int = 1024, repeats: int = 10) -> float:
    """FLOP/s of the best of `repeats` float32 [size, size] @ [size, size] products (2·size³ FLOPs each)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    return 2 * size**3 / best_time(lambda: a @ b, repeats, sync=lambda: None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2000, help="images per measurement (the digits-cm search size)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts to measure")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    print(f"torch {torch.__version__}, {args.samples} samples per measurement")
    for kind in ("cm", "dm"):
        every_checkpoint = demo_scoring_spec(kind, device="cpu")
        spec = replace(every_checkpoint, files=every_checkpoint.files[-1:])  # sampling time does not depend on K
        scorer = CandidateScorer(spec)
        noise = FixedNoise(0, scorer.image_shape)
        batch = spec.batch_size
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            scorer.sampler.sample(scorer.net, noise, 0, batch)
        flops = counter.get_total_flops() / batch * args.samples
        for threads in args.threads:
            torch.set_num_threads(threads)

            def sample_all() -> None:
                with torch.inference_mode():
                    for start in range(0, args.samples, batch):
                        scorer.sampler.sample(scorer.net, noise, start, min(batch, args.samples - start))

            seconds = best_time(sample_all, args.repeats, sync=lambda: None)
            peak = matmul_peak(threads)
            print(f"digits {kind.upper()} ({scorer.sampler.name}, {scorer.sampler.nfe} NFE), {threads} thread(s): "
                  f"{seconds * 1e3:.0f} ms for {args.samples} samples, {flops / 1e9:.2f} GFLOP = "
                  f"{flops / seconds / 1e9:.1f} GFLOP/s; float32 matmul peak {peak / 1e9:.1f} GFLOP/s; "
                  f"{flops / seconds / peak:.0%} of peak")


if __name__ == "__main__":
    main()
