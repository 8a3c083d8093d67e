"""GPU measurements that the CPU benchmarks do not make (item 6 of docs/RESULTS.md); run by benchmarks/gpu_check.sh.

    python benchmarks/gpu_probe.py [--device cuda] [--inception-images 2000] [--trial-samples 5000]

Prints one table:
- merge GB/s of the resident stack vs a device-to-device copy of the same bytes (the practical roofline);
- InceptionV3 pool3 images/s in fp32 and under bf16 autocast, and the Fréchet distance between the two
  feature sets' statistics and the reference (how much bf16 moves the score);
- one full LCSC trial (merge -> 2-step CM sampling -> Inception features -> Fréchet distance) on a
  CIFAR-10-sized U-Net with random weights (K checkpoints), with the time of each stage.
Uses the FID Inception weights from torch hub's cache when present; otherwise the `inception-random` extractor
(the same network with random weights: the same timings, and distances labelled fd_inception_random, not FID).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file


from lcsc_ray.checkpoints import discover_checkpoints
from lcsc_ray.features import build_extractor
from lcsc_ray.features.inception import hub_weights_path
from lcsc_ray.reference_stats import ReferenceStats, save_reference_stats
from lcsc_ray.run_folder import load_run
from lcsc_ray.run_formats import build_network
from lcsc_ray.scoring import CandidateScorer, ScoringSpec
from lcsc_ray.stack import CheckpointStack
from lcsc_ray.statistics import RunningStats

CIFAR_UNET = {"in_channels": 3, "channels": 128, "channel_mult": [1, 2, 2, 2], "num_blocks": 2, "attention": True, "dropout": 0.0}


def cuda_seconds(fn, repeats: int, device: torch.device) -> float:
    """Median wall time of `repeats` calls after a warm-up, synchronising the device around each."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def write_run(folder: Path, num_checkpoints: int, model: dict = CIFAR_UNET) -> Path:
    """A CIFAR-10-sized CM run folder: run.json + K checkpoints of one random U-Net (`model`: its kwargs), each
    save moving every tensor by ~1% of its RMS (a late-training-like trajectory)."""
    config = {"format": 1, "kind": "cm", "model": {"factory": "unet", "kwargs": model}, "data": "random",
              "image_shape": [3, 32, 32], "precond": {"sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0, "sigma_data": 0.5}}
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    state = {k: v.detach().clone() for k, v in build_network(load_run(folder)).state_dict().items()}
    for index in range(num_checkpoints):
        for tensor in state.values():
            if tensor.is_floating_point():
                tensor.add_(0.01 * float(tensor.float().pow(2).mean().sqrt()) * torch.randn(tensor.shape))
        save_file(state, str(folder / "checkpoints" / f"model_{(index + 1) * 100:07d}.safetensors"))
    return folder


def inception_extractor() -> tuple[str, str | None]:
    """(extractor name, weights path): FID's InceptionV3 when its weights are cached, else the same network with
    random weights, named `inception-random` so its distances are never called FID."""
    if hub_weights_path().is_file():
        return "inception", str(hub_weights_path())
    return "inception-random", None


def feature_stats(extractor, images: torch.Tensor, batch: int, bf16: bool) -> RunningStats:
    stats = RunningStats(extractor.dim, device=extractor.device)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16 and extractor.device.type == "cuda"):
        for chunk in images.split(batch):
            stats.update(extractor(chunk.to(extractor.device)).float())
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--checkpoints", type=int, default=40, help="K for the merge and the trial")
    parser.add_argument("--inception-images", type=int, default=2000)
    parser.add_argument("--trial-samples", type=int, default=5000, help="samples in the full trial (paper: 5K)")
    parser.add_argument("--batch-size", type=int, default=500)
    args = parser.parse_args()
    device = torch.device(args.device)
    rows: list[tuple[str, str]] = []
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_run(Path(tmp) / "run", args.checkpoints)
        files = discover_checkpoints(folder / "checkpoints")
        stack = CheckpointStack.from_files(files, device=device)
        net = build_network(load_run(folder)).to(device).eval().requires_grad_(False)
        num_params = sum(p.numel() for p in net.parameters())
        alpha = np.random.default_rng(0).normal(size=len(files))
        alpha /= alpha.sum()
        merge_s = cuda_seconds(lambda: stack.merge_into(net, alpha), 10, device)
        read = stack.data.numel() * stack.data.element_size()
        src = stack.data.reshape(-1)
        dst = torch.empty_like(src)
        copy_s = cuda_seconds(lambda: dst.copy_(src), 10, device)
        del dst
        rows.append((f"merge (K={len(files)}, P={num_params:,})",
                     f"{merge_s * 1e3:.2f} ms = {read / merge_s / 1e9:.0f} GB/s read; D2D copy of the same bytes "
                     f"{2 * read / copy_s / 1e9:.0f} GB/s (read+write); merge/copy-read ratio "
                     f"{(read / merge_s) / (read / copy_s):.2f}"))

        extractor_name, weights = inception_extractor()
        real = weights is not None
        extractor = build_extractor(extractor_name, device=device, inception_weights=weights)
        generator = torch.Generator().manual_seed(0)
        images = torch.rand(args.inception_images, 3, 32, 32, generator=generator) * 2 - 1
        reference = torch.rand(args.inception_images, 3, 32, 32, generator=generator) * 1.6 - 0.8
        ref_stats = feature_stats(extractor, reference, args.batch_size, bf16=False)
        from lcsc_ray.frechet import FrechetReference

        fref = FrechetReference(ref_stats.mean().cpu().numpy(), ref_stats.covariance().cpu().numpy(), device=device)
        scores = {}
        for label, bf16 in (("fp32", False), ("bf16 autocast", True)):
            box = {}
            seconds = cuda_seconds(lambda: box.update(s=feature_stats(extractor, images, args.batch_size, bf16)), 1, device)
            scores[label] = fref.distance(box["s"].mean().cpu().numpy(), box["s"].covariance().cpu().numpy())
            rows.append((f"InceptionV3 pool3 {label}", f"{len(images) / seconds:.0f} images/s, FD to reference "
                         f"{scores[label]:.4f}"))
        rows.append(("FD difference bf16 vs fp32", f"{abs(scores['bf16 autocast'] - scores['fp32']):.4f} "
                     f"({abs(scores['bf16 autocast'] - scores['fp32']) / scores['fp32']:.1e} relative)"
                     + ("" if real else "; random Inception weights (FID weights not cached): compare only the ratio")))

        stats_path = Path(tmp) / "ref.npz"
        save_reference_stats(stats_path, ReferenceStats(ref_stats.mean().cpu().numpy(), ref_stats.covariance().cpu().numpy(),
                                                        {"extractor": extractor.name, "metric_name": extractor.metric_name,
                                                         "dataset": "random"}))
        spec = ScoringSpec(run_dir=str(folder), files=tuple(files), reference_stats=str(stats_path), extractor=extractor.name,
                           sampler="multistep", sampler_options={"steps": 18, "ts": [0, 10]}, inception_weights=weights,
                           batch_size=args.batch_size, device=str(device))
        scorer = CandidateScorer(spec)
        scorer.score(alpha, seed=0, num_samples=args.batch_size)  # warm-up (cuDNN autotuning, allocations)
        start = time.perf_counter()
        result = scorer.score(alpha, seed=0, num_samples=args.trial_samples)
        total = time.perf_counter() - start
        stages = ", ".join(f"{k} {v:.3f}" for k, v in result.timings.items())
        rows.append((f"full trial, 2-step CM, {args.trial_samples} samples", f"{total:.2f} s ({stages} s); "
                     f"{result.metric_name} {result.score:.2f} (random weights)"))
    print(f"device: {name}, torch {torch.__version__}")
    width = max(len(r[0]) for r in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")


if __name__ == "__main__":
    main()
