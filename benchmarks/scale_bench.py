"""Paper-size stacks on one node: load time, memory per trial worker and per node, merge time, first trial.

Synthetic runs of our U-Net (P ≈ 1M, 10M, 54M parameters; K = 10, 40, 100 checkpoints, safetensors, 16-bit
files for the largest) are scored through the product's own path: Ray actors that each build the
`CandidateScorer` a trial builds and score one candidate on a few samples. Per configuration it prints

- load: `CheckpointStack.from_files` against reading the same files' bytes (page cache dropped for both
  with posix_fadvise), i.e. against the disk-read limit of this machine;
- merge: one merge against the memory-bandwidth roofline (stack bytes / a large copy's bandwidth, both
  measured in this run);
- memory at 1 and 2 concurrent trials for the three ways a trial gets the stack: each worker loads the
  files (`worker`), the driver ships it through Ray's object store (`object-store`, zero-copy numpy), or
  every worker maps one stack file (`file`): each worker's proportional set size (PSS: shared pages divided
  among the processes mapping them; a bare worker with torch imported is about 0.37 GiB), and the node's
  total for this search (PSS of the driver, the raylet holding the object store, and the workers) over its
  level before the trials; a mode whose projected memory exceeds what is available is skipped and said so;
- first trial: seconds from creating the worker to its first score;
- an H100 estimate (labelled): merge = stack bytes / 3.35 TB/s; sampling = the network's FLOPs per image
  (counted here) x images x NFE / 989 TFLOP/s (dense bf16); Inception = 5.7 GFLOP per 299x299 image.

    python benchmarks/scale_bench.py                      # 1M and 10M at K = 10, 40, 100; 54M at K = 10, 40
    python benchmarks/scale_bench.py --configs 54:100     # the 54M x 100 run (16-bit, about 11 GB of files)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lcsc_ray.atomic import atomic_write_json  # noqa: E402
from lcsc_ray.checkpoints import discover_checkpoints  # noqa: E402
from lcsc_ray.models.unet import UNet  # noqa: E402
from lcsc_ray.reference_stats import ensure_reference_stats  # noqa: E402
from lcsc_ray.scoring import CandidateScorer, ScoringSpec, load_stack  # noqa: E402
from lcsc_ray.stack import CheckpointStack, available_host_bytes  # noqa: E402
from lcsc_ray.stack_file import write_stack_file  # noqa: E402
from lcsc_ray.training.loop import make_config  # noqa: E402

# P (millions) -> U-Net kwargs giving about that many parameters at 8x8 images.
SIZES = {1: dict(channels=40, channel_mult=[1, 2], num_blocks=1), 10: dict(channels=128, channel_mult=[1, 2], num_blocks=1),
         54: dict(channels=256, channel_mult=[1, 2], num_blocks=2)}
DEFAULT_CONFIGS = "1:10,1:40,1:100,10:10,10:40,10:100,54:10,54:40"
SAMPLES = 8  # samples per scored candidate: memory, not sampling, is measured here
H100_BANDWIDTH, H100_BF16_FLOPS, INCEPTION_FLOPS = 3.35e12, 989e12, 5.7e9


def make_run(folder: Path, size: int, count: int) -> Path:
    """A CM run folder of our format: run.json and `count` checkpoints of the `size`M U-Net, 16-bit files when
    the float32 stack would not fit this machine's memory twice."""
    kwargs = {**SIZES[size], "attention": False, "dropout": 0.0}
    config = make_config("cm", data="digits", steps=count, save_every=1, batch_size=1, lr=1e-3, seed=0,
                         model_kwargs=kwargs, ema_decay=0.9, warmup=1)
    atomic_write_json(folder / "run.json", {**config, "image_shape": [1, 8, 8]})
    torch.manual_seed(0)
    state = UNet(**kwargs).state_dict()
    num_params = sum(t.numel() for t in state.values())
    half = count * num_params * 4 > (available_host_bytes() or 0) / 2
    (folder / "checkpoints").mkdir(parents=True)
    generator = torch.Generator().manual_seed(1)
    for step in range(1, count + 1):
        for tensor in state.values():
            if tensor.is_floating_point():
                tensor.add_(0.01 * torch.randn(tensor.shape, generator=generator))
        out = {k: (v.half() if half and v.is_floating_point() else v).contiguous() for k, v in state.items()}
        save_file(out, str(folder / "checkpoints" / f"model_{step:07d}.safetensors"))
    return folder


def drop_cache(paths: list[Path]) -> None:
    """Evict the files' pages from the page cache (no root needed for clean pages)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_seconds(paths: list[Path]) -> float:
    started = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            while handle.readinto(_BUFFER):
                pass
    return time.perf_counter() - started


_BUFFER = bytearray(64 << 20)


def copy_bandwidth() -> float:
    """Bytes per second of a 512 MiB float32 copy (read + write counted), the best of 3."""
    source = torch.ones(128 << 20)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - started)
    return 2 * source.numel() * 4 / best


def pss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return 0


def node_pss(extra_pids: list[int]) -> int:
    """PSS of this search's processes on the node: the driver, the raylet (which holds the object store's
    shared memory) and `extra_pids`; unlike the node's free memory it ignores other programs on the machine."""
    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid  # noqa: SLF001
    return sum(pss_bytes(pid) for pid in [os.getpid(), raylet, *extra_pids])


@ray.remote(num_cpus=0)
class Worker:
    """What a trial actor holds: the scorer (stack, network, sampler, extractor), after one scored candidate."""

    def __init__(self, spec: ScoringSpec, payload: dict | None) -> None:
        started = time.perf_counter()
        self.scorer = CandidateScorer(spec, payload)
        alpha = np.full(self.scorer.stack.num_checkpoints, 1.0 / self.scorer.stack.num_checkpoints)
        self.score = self.scorer.score(alpha, seed=0, num_samples=SAMPLES).score
        self.seconds = time.perf_counter() - started

    def report(self) -> tuple[int, float]:
        return os.getpid(), self.seconds


def measure_mode(spec: ScoringSpec, mode: str, concurrency: int, stack_bytes: int) -> str:
    """Memory and time to the first score for `concurrency` workers getting the stack the `mode` way."""
    copies = {"worker": concurrency, "object-store": 2, "file": 1}[mode]  # the object store copies once into shm
    if copies * stack_bytes > 0.8 * (available_host_bytes() or 0):
        return f"skipped: needs about {copies * stack_bytes / 2**30:.1f} GiB for the stack alone"
    baseline = node_pss([])
    payload = ray.put(load_stack(spec).to_payload()) if mode == "object-store" else None
    workers = [Worker.remote(spec, payload) for _ in range(concurrency)]
    reports = ray.get([w.report.remote() for w in workers])
    pss = [pss_bytes(pid) for pid, _ in reports]
    used = node_pss([pid for pid, _ in reports]) - baseline
    first = min(seconds for _, seconds in reports)
    for worker in workers:
        ray.kill(worker)
    del payload
    time.sleep(1.0)
    return (f"worker PSS {', '.join(f'{p / 2**30:.2f}' for p in pss)} GiB; node +{used / 2**30:.2f} GiB; "
            f"first score {first:.1f} s")


def flops_per_image(run_dir: Path) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from lcsc_ray.run_folder import load_run
    from lcsc_ray.run_formats import build_network

    net = build_network(load_run(run_dir))
    with FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, 1, 8, 8), torch.zeros(1))
    return float(counter.get_total_flops())


def bench_config(work: Path, size: int, count: int, bandwidth: float) -> list[str]:
    run_dir = make_run(work / f"run-{size}M-{count}", size, count)
    files = discover_checkpoints(run_dir / "checkpoints")
    paths = [f.path for f in files]
    file_bytes = sum(p.stat().st_size for p in paths)
    dtype = "bfloat16" if file_bytes < count * 4 * sum(
        t.numel() for t in UNet(**SIZES[size]).state_dict().values()) else "float32"
    drop_cache(paths)
    disk = read_seconds(paths)
    drop_cache(paths)
    started = time.perf_counter()
    fits = 1.2 * file_bytes < 0.8 * (available_host_bytes() or 0)
    stack = CheckpointStack.from_files(files, storage_dtype=getattr(torch, dtype), max_bytes=1 << 50) if fits else None
    load = time.perf_counter() - started
    lines = [f"### P = {size}M, K = {count} ({file_bytes / 2**30:.2f} GiB of {'16-bit' if dtype != 'float32' else 'float32'} "
             f"files, stack {dtype})", ""]
    if stack is not None:
        lines.append(f"- load: {load:.1f} s vs reading the files {disk:.1f} s ({load / disk:.2f}x the disk-read "
                     f"time; {file_bytes / disk / 1e9:.2f} GB/s)")
        alpha = np.full(count, 1.0 / count)
        stack.merged_state_dict(alpha)
        started = time.perf_counter()
        stack.merged_state_dict(alpha)
        merge = time.perf_counter() - started
        roofline = stack.nbytes / bandwidth
        lines.append(f"- merge: {merge:.3f} s vs the bandwidth roofline {roofline:.3f} s ({roofline / merge:.0%} of "
                     f"{bandwidth / 1e9:.1f} GB/s); H100 estimate {stack.nbytes / H100_BANDWIDTH * 1e3:.2f} ms")
        stack_bytes = stack.nbytes
        del stack
    else:
        stack_bytes = file_bytes
        lines.append(f"- load: skipped in memory (the stack does not fit); read of the files {disk:.1f} s")
    spec = ScoringSpec(run_dir=str(run_dir), files=tuple(files), extractor="pixels", batch_size=SAMPLES,
                       reference_stats=str(ensure_reference_stats("digits", "pixels")), stack_dtype=dtype, threads=1)
    started = time.perf_counter()
    folder = write_stack_file(work / f"stack-{size}M-{count}", files, storage_dtype=getattr(torch, dtype))
    lines.append(f"- stack file written in {time.perf_counter() - started:.1f} s")
    file_spec = ScoringSpec(**{**spec.__dict__, "stack_file": str(folder)})
    for concurrency in (1, 2):
        for mode, mode_spec in (("worker", spec), ("object-store", spec), ("file", file_spec)):
            lines.append(f"- {concurrency} trial(s), {mode}: {measure_mode(mode_spec, mode, concurrency, stack_bytes)}")
    flops = flops_per_image(run_dir)
    lines.append(f"- H100 estimate per candidate of 5,000 samples, 1 NFE: sampling {flops * 5000 / H100_BF16_FLOPS * 1e3:.1f} ms "
                 f"({flops / 1e9:.2f} GFLOP per image at 8x8), Inception {INCEPTION_FLOPS * 5000 / H100_BF16_FLOPS * 1e3:.1f} ms")
    shutil.rmtree(run_dir)
    shutil.rmtree(folder)
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="SIZE:COUNT pairs, SIZE in millions (1, 10, 54)")
    parser.add_argument("--workdir", help="folder for the synthetic runs (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lcsc-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    bandwidth = copy_bandwidth()
    print(f"# Scale benchmark: {os.cpu_count()} cores, {available_host_bytes() / 2**30:.1f} GiB available, "
          f"copy bandwidth {bandwidth / 1e9:.1f} GB/s\n")
    try:
        for pair in args.configs.split(","):
            size, count = (int(v) for v in pair.split(":"))
            print("\n".join(bench_config(work, size, count, bandwidth)), flush=True)
    finally:
        ray.shutdown()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
