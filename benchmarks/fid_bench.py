"""Metric-stack benchmark: per-candidate Fréchet distance, ours vs pytorch-fid, and the
features + statistics throughput of the digits extractor and of InceptionV3 (random weights: same cost).

    python benchmarks/fid_bench.py [--device cpu|cuda] [--repeats 3]

Every ratio is against a baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics as stats_module
import tempfile
import time
import warnings
from pathlib import Path


import numpy as np
import torch
from threadpoolctl import threadpool_limits

from lcsc_ray.features import build_extractor
from lcsc_ray.frechet import FrechetReference
from lcsc_ray.statistics import RunningStats


def seconds(function, repeats: int) -> tuple[float, object]:
    """Median wall time of `repeats` calls, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return stats_module.median(times), result


def correlated_features(rng: np.random.Generator, n: int, d: int, scale: float) -> np.ndarray:
    """Non-negative, correlated features shaped like pool3 activations (mean ~0.4, many correlations)."""
    mixing = rng.standard_normal((d, d)) / np.sqrt(d)
    return np.abs(rng.standard_normal((n, d)) @ mixing * scale + 0.3)


def bench_frechet(device: torch.device, repeats: int, baseline_threads: int | None, n: int = 5000,
                  d: int = 2048) -> None:
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(0)
    ref, gen = correlated_features(rng, n, d, 0.3), correlated_features(rng, n, d, 0.35)
    mu_ref, sigma_ref = ref.mean(0), np.cov(ref, rowvar=False)
    mu_gen, sigma_gen = gen.mean(0), np.cov(gen, rowvar=False)
    print(f"== Fréchet distance per candidate, d={d}, n={n}, device={device}")
    # default: pytorch-fid as users run it (BLAS default threads); --baseline-blas-threads 1 puts it on the
    # single thread FrechetReference uses, the fairest per-core comparison
    with warnings.catch_warnings(), threadpool_limits(limits=baseline_threads, user_api="blas"):
        warnings.filterwarnings("ignore", message=".*disp.*", category=DeprecationWarning)
        baseline_s, baseline = seconds(
            lambda: float(calculate_frechet_distance(mu_gen, sigma_gen, mu_ref, sigma_ref)), 1)
    setup_s, reference = seconds(lambda: FrechetReference(mu_ref, sigma_ref, device=device), 1)
    ours_s, ours = seconds(lambda: reference.distance(mu_gen, sigma_gen), repeats)
    print(f"pytorch-fid calculate_frechet_distance (BLAS threads {baseline_threads or 'default'}): {baseline_s:8.3f} s  FD={baseline:.9f}")
    print(f"ours, once per search (sqrt Sigma_ref): {setup_s:8.3f} s")
    print(f"ours, per candidate (full form):        {ours_s:8.3f} s  FD={ours:.9f}  "
          f"rel.diff={abs(ours - baseline) / baseline:.1e}  speed-up x{baseline_s / ours_s:.1f} (target >= 20)")
    default_threads = FrechetReference(mu_ref, sigma_ref, device=device, cpu_threads=None)
    all_s, _ = seconds(lambda: default_threads.distance(mu_gen, sigma_gen), repeats)
    print(f"ours, per candidate, BLAS default threads: {all_s:5.3f} s  speed-up x{baseline_s / all_s:.1f}")
    few = gen[:1000]
    gram_s, _ = seconds(lambda: reference.distance_from_features(few), repeats)
    print(f"ours, per candidate, Gram form n=1000:  {gram_s:8.3f} s  speed-up x{baseline_s / gram_s:.1f}")


def bench_throughput(name: str, extractor, images: torch.Tensor, batch_size: int, device: torch.device) -> None:
    """Images/s through extractor + float64 running statistics (what `Evaluator.evaluate` does per batch)."""
    def run() -> RunningStats:
        stats = RunningStats(extractor.dim, device=device)
        for batch in images.split(batch_size):
            stats.update(extractor(batch.to(device)))
        stats.covariance()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return stats

    run_s, _ = seconds(run, 1)
    print(f"{name:<34} {len(images):6d} images {tuple(images.shape[1:])}, batch {batch_size:4d}: "
          f"{run_s:7.2f} s  {len(images) / run_s:9.1f} images/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--inception-images", type=int, default=48)
    parser.add_argument("--baseline-blas-threads", type=int, default=None, help="BLAS threads for pytorch-fid")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, numpy {np.__version__}")
    bench_frechet(device, args.repeats, args.baseline_blas_threads)

    print("== features + running statistics throughput")
    from lcsc_ray.data import load_digits_labelled

    digits_images = load_digits_labelled()[0]
    bench_throughput("digits CNN (fd_digits, d=64)", build_extractor("digits", device=device),
                     digits_images.repeat(3, 1, 1, 1), 512, device)
    import torchvision

    with tempfile.TemporaryDirectory() as folder:
        weights = Path(folder) / "random_inception.pth"
        torch.save(torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None,
                                                   init_weights=True).state_dict(), weights)
        inception = build_extractor("inception", device=device, inception_weights=str(weights))
    cifar_like = torch.rand(args.inception_images, 3, 32, 32) * 2 - 1
    bench_throughput("InceptionV3 pool3 (fid, d=2048)", inception, cifar_like, 16, device)


if __name__ == "__main__":
    main()
