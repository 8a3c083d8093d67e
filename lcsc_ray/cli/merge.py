"""Merge the saved checkpoints of one training run with given coefficients and export the result.

discover -> select -> print the chosen steps -> stack -> merge -> export (weights + JSON sidecar), e.g.

    lcsc-merge runs/cm/checkpoints --window 40000 --interval 1 --profile ema_0.999 --out outputs/ema_0.999.safetensors
    lcsc-merge runs/cm/checkpoints --coefficients best.json --out outputs/lcsc
    lcsc-merge ddpm-output --ckpt-select unet_ema --profile ema_0.999 --out merged_unet   # a diffusers run

(`python launch/merge_checkpoints.py ...` is the same command.)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from lcsc_ray.checkpoints import CheckpointFile, MissingModule, discover_checkpoints, select_checkpoints
from lcsc_ray.errors import LcscError
from lcsc_ray.export import export_merged, exported_dtype
from lcsc_ray.profiles import named_profile, run_ema_warmup
from lcsc_ray.run_folder import RUN_JSON, add_python_path, code_folder, read_run_json
from lcsc_ray.run_formats import detect_format, own_run_folder, select_trajectory
from lcsc_ray.stack import STORAGE_DTYPES, CheckpointStack


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Merge the checkpoints of one training run as θ = Σ αᵢ θᵢ (LCSC) and export the result "
                    "in the inputs' format, with a JSON sidecar of the coefficients.")
    parser.add_argument("checkpoint_dir", help="folder holding the run's checkpoints (files with a step number "
                        "in the name, or checkpoint-<step>/ sub-folders)")
    parser.add_argument("--ckpt-select", help="trajectory of a run of another code base (unet | unet_ema, raw | "
                        "ema_<rate>, an EDM2 EMA width; docs/FORMATS.md)")
    parser.add_argument("--trust-pickle", action="store_true", help="allow unpickling NVlabs network-snapshot "
                        ".pkl files (unpickling runs code stored in them)")
    parser.add_argument("--code-dir", help="folder of the run's code base (e.g. a clone of NVlabs edm), put on the "
                        "Python path so the pickled network classes import")
    parser.add_argument("--ckpt-pattern", help=r"regular expression matched against whole file/folder names, with a "
                        r"group for the step, e.g. 'model_(?P<step>\d+)\.pt' (default: last number in the name)")
    parser.add_argument("--ckpt-key", help="key of the state dict inside .pt files holding several entries "
                        "(model, ema, ...); nested keys as a/b")
    parser.add_argument("--window", type=int, help="keep checkpoints from the last WINDOW training iterations")
    parser.add_argument("--interval", type=int, default=1,
                        help="keep every INTERVAL-th saved checkpoint, counted back from the newest (default 1)")
    parser.add_argument("--max-checkpoints", type=int, help="then keep at most the newest N checkpoints")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--profile", help="baseline coefficients: newest, uniform, ema_<decay> (e.g. ema_0.999) or phema_<width> (EDM2 post-hoc EMA, e.g. phema_0.1)")
    source.add_argument("--coefficients", help="coefficients as a comma list ('0.2,0.3,0.5') or a JSON file "
                        "holding a list or an object with 'coefficients'/'alpha' (and optionally 'steps', checked)")
    parser.add_argument("--out", help="output weights path (suffix of the inputs' format, or none: a folder for "
                        "checkpoint-<step>/ inputs); a <out>.json sidecar is written next to it")
    parser.add_argument("--stack-dtype", choices=sorted(STORAGE_DTYPES), default="float32",
                        help="storage of the stacked checkpoints; bfloat16/float16 store deltas from the newest "
                             "(half the memory, ~1e-3 relative error at most) (default float32)")
    parser.add_argument("--device", default="auto", help="device for the stack and the merge: auto (a visible "
                        "GPU, else the CPU), cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (0 = torch's default: all cores) (default 1)")
    return parser


def read_coefficients(text: str, steps: list[int]) -> np.ndarray:
    """Coefficients from a comma list or a JSON file (a list, or an object with coefficients/alpha)."""
    path = Path(text).expanduser()
    if path.is_file():
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise LcscError(f"--coefficients {path}: not a readable JSON file ({error})") from error
        if isinstance(loaded, dict):
            if loaded.get("steps") is not None and list(loaded["steps"]) != steps:
                raise LcscError(f"--coefficients {path}: written for steps {loaded['steps']} but the selection is "
                                f"{steps}; select the same checkpoints (--window/--interval/--max-checkpoints)")
            loaded = loaded.get("coefficients", loaded.get("alpha"))
        values = loaded
    else:
        try:
            values = [float(part) for part in text.split(",")]
        except ValueError as error:
            raise LcscError(f"--coefficients {text!r}: neither a file nor a comma list of numbers") from error
    try:
        return np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as error:
        raise LcscError(f"--coefficients {text}: expected a list of numbers") from error


def run_checkpoints(args: argparse.Namespace) -> list[CheckpointFile]:
    """The checkpoints of the folder: one trajectory of a run of another code base (found from file names
    alone, nothing unpickled), else every checkpoint the folder holds."""
    folder = Path(args.checkpoint_dir).expanduser().resolve()
    fmt = detect_format(folder) if folder.is_dir() else None
    if fmt is None:
        return discover_checkpoints(folder, args.ckpt_pattern)
    trajectories = fmt.trajectories(folder, args.ckpt_pattern)
    return trajectories[select_trajectory(trajectories, args.ckpt_select, folder)]


def recorded_ema_warmup(folder: Path) -> str | None:
    """The EMA warm-up the run.json of our run folder records (found as the tune job finds it), so
    `--profile ema_<decay>` rebuilds the EMA the training loop kept; None elsewhere."""
    run_dir = own_run_folder(folder)
    return None if run_dir is None else run_ema_warmup(read_run_json(run_dir / RUN_JSON))


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.code_dir:
        add_python_path([str(code_folder(args.code_dir))])
    files = select_checkpoints(run_checkpoints(args), window=args.window, interval=args.interval,
                               max_count=args.max_checkpoints)
    steps = [f.step for f in files]
    print(f"selected {len(files)} checkpoints, steps: {', '.join(map(str, steps))}")
    if args.profile is None and args.coefficients is None:
        return
    if args.out is None:
        raise LcscError("--out is required to export a merged checkpoint")
    if args.profile:
        warmup = recorded_ema_warmup(Path(args.checkpoint_dir).expanduser().resolve())
        alpha = named_profile(args.profile, steps, warmup)
        if warmup and args.profile.startswith("ema_"):
            print(f"{args.profile}: with the run's EMA warm-up ({warmup}), as its training loop kept it")
    else:
        alpha = read_coefficients(args.coefficients, steps)
    if alpha.shape != (len(steps),):
        raise LcscError(f"--coefficients: {alpha.size} values for {len(steps)} selected checkpoints")
    try:
        stack = CheckpointStack.from_files(files, ckpt_key=args.ckpt_key, device=args.device,
                                           storage_dtype=STORAGE_DTYPES[args.stack_dtype],
                                           trust_pickle=args.trust_pickle)
    except MissingModule as error:
        raise error.for_code_dir(args.code_dir) from None
    target = export_merged(stack, alpha, args.out, extra={"profile": args.profile} if args.profile else None)
    print(f"wrote {target} (+ {target.name}.json) in {exported_dtype(target)}, coefficient sum {alpha.sum():.6g}")

