"""Merge-engine benchmark: throughput against a same-run roofline, speed-up over a naive merge,
and the error of the bfloat16-delta stack.

Writes K checkpoints of a >= 10M-parameter model to a temporary folder (the late-training-like run moves
each tensor ~1% of its RMS per save), then prints:
(a) merge GB/s of stack read vs a roofline measured here over the same bytes (a plain column reduction,
    `torch.sum(stack, dim=0)`, which reads the same [K, P] tensor and writes P values);
(b) time per merge vs a naive merge that reloads and accumulates the K files for every candidate;
(c) max relative error against a float64 reference of the float32 stack and of the bfloat16/float16-delta
    stacks, and the low-precision merge time.

    python benchmarks/merge_bench.py [--checkpoints 40] [--width 1024] [--layers 10] [--device cpu]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


from lcsc_ray.checkpoints import discover_checkpoints
from lcsc_ray.stack import CheckpointStack


def build_model(width: int, layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)]).eval()


def write_checkpoints(folder: Path, model: torch.nn.Module, count: int) -> None:
    """A late-training-like run: each save moves every tensor by ~1% of its RMS."""
    generator = torch.Generator().manual_seed(1)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for index in range(count):
        for tensor in state.values():
            tensor.add_(0.01 * float(tensor.pow(2).mean().sqrt()) * torch.randn(tensor.shape, generator=generator))
        save_file(state, str(folder / f"model_{(index + 1) * 100:07d}.safetensors"))


def best_time(fn, repeats: int, sync) -> float:
    """Minimum wall time of `repeats` calls after one warm-up (minimum: the least disturbed by other load)."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def naive_merge(files, alpha: np.ndarray, model: torch.nn.Module) -> None:
    """What a merge costs without a stack: reload every file and accumulate, for every candidate."""
    merged = None
    for weight, file in zip(alpha, files):
        state = load_file(str(file.path))
        if merged is None:
            merged = {k: float(weight) * v.float() for k, v in state.items()}
        else:
            for k, v in state.items():
                merged[k].add_(v.float(), alpha=float(weight))
    model.load_state_dict(merged)


def float64_reference(files, alpha: np.ndarray) -> dict[str, torch.Tensor]:
    reference = None
    for weight, file in zip(alpha, files):
        state = load_file(str(file.path))
        if reference is None:
            reference = {k: float(weight) * v.double() for k, v in state.items()}
        else:
            for k, v in state.items():
                reference[k].add_(v.double(), alpha=float(weight))
    return reference


def max_relative_error(merged: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    return max(float((merged[k].double() - ref).abs().max() / ref.abs().max()) for k, ref in reference.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=int, default=40, help="K, the number of checkpoints (default 40)")
    parser.add_argument("--width", type=int, default=1024, help="Linear layer width (default 1024)")
    parser.add_argument("--layers", type=int, default=10, help="number of Linear layers (default 10: 10.5M params)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--repeats", type=int, default=10, help="timed repeats per measurement (default 10)")
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model = build_model(args.width, args.layers).to(device)
    num_params = sum(p.numel() for p in model.parameters())
    # Shaped like the solutions LCSC finds (docs/METHOD.md): many near zero, a few of large magnitude
    # (|α| > 6 reported) and negative ones, summing to 1.
    rng = np.random.default_rng(0)
    alpha = 0.02 * rng.normal(size=args.checkpoints)
    alpha[-4:] += [-2.5, 6.5, -4.0, 1.0]
    alpha += (1.0 - alpha.sum()) / args.checkpoints
    print(f"device {device}, torch threads {torch.get_num_threads()}, K={args.checkpoints}, P={num_params:,}")

    shm = Path("/dev/shm")  # page-cache-like storage for the files, so the disk's write-back stays out of it
    with tempfile.TemporaryDirectory(prefix="merge_bench_", dir=shm if shm.is_dir() else None) as folder:
        start = time.perf_counter()
        write_checkpoints(Path(folder), build_model(args.width, args.layers), args.checkpoints)
        files = discover_checkpoints(folder)
        stack = CheckpointStack.from_files(files, device=device)
        print(f"wrote and stacked {len(files)} checkpoints in {time.perf_counter() - start:.1f} s "
              f"(stack {stack.nbytes / 2**30:.2f} GiB float32)")

        merge = best_time(lambda: stack.merge_into(model, alpha), args.repeats, sync)
        column_sums = torch.empty(num_params, device=device)
        # Roofline: the fastest plain pass reading the same bytes (a full reduction and a column reduction).
        roofline = min(best_time(lambda: torch.sum(stack.data, dim=0, out=column_sums), args.repeats, sync),
                       best_time(lambda: stack.data.sum(), args.repeats, sync))
        read = stack.num_checkpoints * stack.num_params * 4
        print(f"(a) merge: {merge * 1e3:.2f} ms = {read / merge / 1e9:.1f} GB/s of stack read; roofline "
              f"(fastest of two torch.sum passes over the same [K, P] float32 stack) {read / roofline / 1e9:.1f} GB/s; "
              f"ratio {roofline / merge:.0%} (target >= 70%)")

        naive = best_time(lambda: naive_merge(files, alpha, model), 2, sync)
        print(f"(b) naive reload-and-accumulate merge: {naive * 1e3:.0f} ms per candidate; "
              f"stack merge {merge * 1e3:.2f} ms; speed-up {naive / merge:.0f}x (target >= 50x)")

        reference = float64_reference(files, alpha)
        error32 = max_relative_error(stack.merged_state_dict(alpha), reference)
        del stack
        print(f"(c) max relative error vs float64 (sum|alpha| = {np.abs(alpha).sum():.1f}): float32 stack "
              f"{error32:.1e} (target <= 1e-6)")
        for dtype in (torch.bfloat16, torch.float16):
            low = CheckpointStack.from_files(files, device=device, storage_dtype=dtype)
            error = max_relative_error(low.merged_state_dict(alpha), reference)
            seconds = best_time(lambda: low.merge_into(model, alpha), max(2, args.repeats // 3), sync)
            print(f"    {dtype}-delta stack {error:.1e} (target <= 1e-3), {low.nbytes / 2**30:.2f} GiB, merge "
                  f"{seconds * 1e3:.1f} ms ({low.num_checkpoints * low.num_params * 2 / seconds / 1e9:.1f} GB/s "
                  "of stack read)")
            del low


if __name__ == "__main__":
    main()
