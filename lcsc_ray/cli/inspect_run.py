"""Look at a training run before searching it: which code base wrote it, its checkpoint trajectories and
steps, the network's size, the denoiser convention, and a sample grid of the newest checkpoint with the
chosen sampler (`lcsc-inspect-run RUN_DIR`, `python launch/inspect_run.py RUN_DIR`).

For a run of another code base it prints the run.json that detection wrote and saves it next to the grid,
so every guess can be read, edited and passed back with `--run-json`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lcsc_ray.atomic import atomic_write_json
from lcsc_ray.checkpoints import format_steps, load_checkpoint
from lcsc_ray.devices import resolve_device
from lcsc_ray.errors import run_cli
from lcsc_ray.images import write_sample_grid
from lcsc_ray.run_formats import add_run_flags, build_network, resolve_from_args
from lcsc_ray.sampling import build_sampler, sampler_options
from lcsc_ray.search.flags import float_list, int_list


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Detect a training run's format and convention, list its "
                                     "checkpoints and write a sample grid of the newest one.")
    parser.add_argument("run_dir", help="the run folder (ours, diffusers, OpenAI consistency models, NVlabs pickles)")
    parser.add_argument("--out", help="folder for run.json and samples.png; default lcsc_results/inspect-<run name>")
    parser.add_argument("--ckpt-pattern", help="regex with a step group for our own runs' checkpoint names")
    parser.add_argument("--sampler", help="sampler name; default: the convention's own (onestep, dpmsolver++)")
    parser.add_argument("--nfe", type=int, help="network evaluations per sample")
    parser.add_argument("--grid-steps", type=int, help="points of the CM multistep Karras grid (default 18)")
    parser.add_argument("--ts", type=int_list, help="CM multistep indices into the --grid-steps Karras grid, e.g. 0,10,17")
    parser.add_argument("--sigmas", type=float_list, help="CM multistep noise levels given directly, e.g. 80,0.821")
    parser.add_argument("--order", type=int, help="DPM-Solver++ order")
    parser.add_argument("--count", type=int, default=64, help="samples in the grid")
    parser.add_argument("--seed", type=int, default=0, help="noise seed of the grid")
    parser.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda, cuda:N")
    add_run_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    resolved = resolve_from_args(args, args.run_dir)
    run, files = resolved.run, resolved.files
    out = Path(args.out or Path("lcsc_results") / f"inspect-{Path(args.run_dir).resolve().name}").expanduser()
    device = resolve_device(args.device)
    sampler = build_sampler(run, args.sampler, **sampler_options(args))
    net = build_network(run, args.trust_pickle)
    net.load_state_dict(load_checkpoint(files[-1], trust_pickle=args.trust_pickle).state_dict, strict=True)
    net = net.to(device).requires_grad_(False)
    steps = [f.step for f in files]
    print(f"format: {run.format}; convention: {run.convention.name} ({run.kind}); checkpoint folder {run.checkpoint_dir}")
    print(f"trajectories: {', '.join(f'{n} ({len(f)})' for n, f in sorted(resolved.trajectories.items()))}; "
          f"selected {resolved.trajectory}: {len(files)} checkpoints, steps {format_steps(steps)}")
    num_params = sum(t.numel() for t in net.state_dict().values() if torch.is_floating_point(t))
    classes = run.convention.num_classes
    print(f"network: {type(net).__name__}, {num_params:,} parameters, images {list(run.image_shape)}"
          + (f", {classes} classes" if classes else ""))
    if resolved.carried_config is not None:
        atomic_write_json(out / "run.json", resolved.carried_config)
        print(f"run.json: {out / 'run.json'}")
    grid = write_sample_grid(run, net, out / "samples.png", count=args.count, seed=args.seed, sampler=sampler)
    print(f"samples of step {files[-1].step} ({sampler.name}, {sampler.nfe} evaluations): {grid}")
    return grid


def console_main() -> None:
    """`lcsc-inspect-run`."""
    run_cli(main)
