"""Run formats: the folders other training code bases write, one plug-in module per code base.

Each format answers the same six questions (the `RunFormat` interface): is this folder mine (`matches`),
which checkpoint trajectories does it hold, by name and step (`trajectories`: e.g. `unet`/`unet_ema`, `raw`/
`ema_0.9999`, one per EDM2 EMA width), what run.json describes it (`describe`: the guesses, written for the
user to read and edit), how to build its network (`build_network`), and whether a trajectory holds EMA
weights rather than raw ones (`holds_ema`). Loading a checkpoint's state dict
goes through lcsc_ray/checkpoints.py (`CheckpointFile.format` says safetensors, torch or pickle) and the
export through lcsc_ray/export.py, which mirror each format's files.

`resolve_run` is the one entry point: an explicit `--run-json`, our own run.json, or detection.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from lcsc_ray.checkpoints import CheckpointFile
from lcsc_ray.conventions import PREDICTION_TYPES
from lcsc_ray.errors import LcscError
from lcsc_ray.run_folder import RUN_JSON, RunInfo, load_run, read_run_json, run_from_config


@dataclass(frozen=True)
class ForeignHints:
    """What the user told us about a run we cannot fully read from its files (flags of the tune commands)."""

    model_factory: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    image_shape: tuple[int, ...] | None = None
    code_dir: str | None = None
    prediction_type: str | None = None
    trust_pickle: bool = False


class RunFormat(Protocol):
    name: str
    label: str  # what the user reads: "diffusers (accelerate checkpoint-<step>/unet*)"

    def matches(self, folder: Path) -> bool:
        """True when `folder` has this format's checkpoint names (cheap: file names only, nothing loaded)."""

    def trajectories(self, folder: Path, pattern: str | None = None) -> dict[str, list[CheckpointFile]]:
        """Trajectory name -> its checkpoints sorted by step."""

    def describe(self, folder: Path, newest: CheckpointFile, hints: ForeignHints) -> dict:
        """The run.json of this run: format, convention, kind, image shape, network, σ constants."""

    def build_network(self, run: RunInfo, trust_pickle: bool) -> nn.Module:
        """The network whose state dict the checkpoints hold."""

    def holds_ema(self, trajectory: str) -> bool:
        """True when the trajectory's files are EMA weights rather than raw training weights (profiles such as
        ema_<β> over them would be an EMA of EMAs, not what their names say)."""


def _registry() -> dict[str, RunFormat]:
    from lcsc_ray.run_formats import diffusers_run, nvlabs, openai, ours

    formats = [ours.OURS, diffusers_run.DIFFUSERS, openai.OPENAI, nvlabs.NVLABS]
    return {fmt.name: fmt for fmt in formats}


def get_format(name: str) -> RunFormat:
    formats = _registry()
    if name not in formats:
        raise LcscError(f"run.json format {name!r}: use one of {sorted(formats)}")
    return formats[name]


def build_network(run: RunInfo, trust_pickle: bool = False) -> nn.Module:
    """The network whose state_dict the checkpoints hold (CPU, float32, eval mode), built the way the run's
    format says: our factory registry, a diffusers config, or an unpickled snapshot (with `trust_pickle`)."""
    return get_format(run.format).build_network(run, trust_pickle).float().eval()


def detect_format(folder: Path) -> RunFormat | None:
    """The first foreign format whose file names `folder` holds (our own runs have run.json instead)."""
    return next((fmt for name, fmt in _registry().items() if name != "ours" and fmt.matches(folder)), None)


@dataclass
class ResolvedRun:
    """A run ready to search: its RunInfo, every checkpoint of the selected trajectory, and for a detected run
    the run.json that detection wrote (None when the user's or our own run.json was used)."""

    run: RunInfo
    files: list[CheckpointFile]
    trajectory: str
    trajectories: dict[str, list[CheckpointFile]]
    detected: dict | None = None
    from_run_json_flag: bool = False

    @property
    def holds_ema(self) -> bool:
        """The selected trajectory's files are EMA weights (the format plug-in's `holds_ema`)."""
        return get_format(self.run.format).holds_ema(self.trajectory)

    @property
    def carried_config(self) -> dict | None:
        """The run.json the search must carry to its workers (not the one in the run folder), or None."""
        return self.run.config if self.detected is not None or self.from_run_json_flag else None


def select_trajectory(trajectories: dict[str, list[CheckpointFile]], select: str | None, folder: Path) -> str:
    """The trajectory `--ckpt-select` names; without it the only one, else one line naming the choices."""
    names = sorted(trajectories)
    if select is not None:
        if select not in trajectories:
            raise LcscError(f"--ckpt-select {select}: {folder} has no such trajectory; choose one of {', '.join(names)}")
        return select
    if len(names) > 1:
        counts = ", ".join(f"{n} ({len(trajectories[n])} checkpoints)" for n in names)
        raise LcscError(f"{folder} holds several checkpoint trajectories: {counts}; pick one with --ckpt-select "
                        f"{names[-1]}")
    return names[0]


def own_run_folder(folder: Path) -> Path | None:
    """The folder holding our run.json: `folder` itself or its parent (a run's checkpoint folder), else None."""
    for candidate in (folder, folder.parent):
        if (candidate / RUN_JSON).is_file():
            return candidate
    return None


def resolve_run(ckpt_dir: str | Path, *, run_json: str | None = None, select: str | None = None,
                pattern: str | None = None, hints: ForeignHints = ForeignHints()) -> ResolvedRun:
    """The run at `ckpt_dir`: `--run-json FILE` if given, else our run.json there or in the parent (the folder
    may be the run or its checkpoint folder), else a detected foreign format (module docstring)."""
    folder = Path(ckpt_dir).expanduser().resolve()
    if not folder.is_dir():
        raise LcscError(f"--ckpt-dir {folder}: no such folder; point it at a training run or its checkpoints")
    detected = None
    if run_json is not None:
        path = Path(run_json).expanduser().resolve()
        if not path.is_file():
            raise LcscError(f"--run-json {path}: not found; pass the run.json that detection printed (or wrote)")
        config = read_run_json(path)
        if config.get("run_format", "ours") != "ours":
            config.setdefault("checkpoints", str(folder))
        run = run_from_config(folder, config, str(path))
    elif (own := own_run_folder(folder)) is not None:
        run = load_run(own)
        if own != folder:
            run.checkpoint_dir = folder  # the user pointed at one checkpoint folder of the run (e.g. checkpoints_ema)
    else:
        fmt = detect_format(folder)
        if fmt is None:
            raise LcscError(f"--ckpt-dir {folder}: no run.json here or in the parent folder, and no layout of a known "
                            "code base (diffusers checkpoint-<step>/unet, OpenAI model<step>.pt / ema_<rate>_<step>.pt, "
                            "NVlabs network-snapshot-*.pkl); see docs/FORMATS.md")
        trajectories = fmt.trajectories(folder, pattern)
        name = select_trajectory(trajectories, select, folder)
        detected = fmt.describe(folder, trajectories[name][-1], hints)
        run = run_from_config(folder, detected, f"the run.json detected for {folder}")
        return ResolvedRun(run, trajectories[name], name, trajectories, detected)
    trajectories = get_format(run.format).trajectories(run.checkpoint_dir, pattern)
    name = select_trajectory(trajectories, select, run.checkpoint_dir)
    return ResolvedRun(run, trajectories[name], name, trajectories, detected, run_json is not None)


# ----------------------------------------------------------------------------------------------------------


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON ({error})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object, e.g. '{\"image_size\": 64}'")
    return value


def _shape(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError("expected C,H,W, e.g. 3,64,64")
    return shape


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that say which run to read and how: shared by the tune commands and inspect_run."""
    g = parser.add_argument_group("runs of other code bases (docs/FORMATS.md)")
    g.add_argument("--ckpt-select", help="which checkpoint trajectory of the run: unet | unet_ema (diffusers), raw | "
                   "ema_<rate> (OpenAI), an EDM2 EMA width such as 0.050; needed when the run holds several")
    g.add_argument("--trust-pickle", action="store_true", help="allow unpickling NVlabs network-snapshot .pkl files "
                   "(unpickling runs code stored in them: only for files you trust)")
    g.add_argument("--run-json", help="a run.json to use instead of detection (e.g. the detected one, edited)")
    g.add_argument("--model-factory", help="OpenAI runs: the function building your network, package.module:function")
    g.add_argument("--model-kwargs", type=_json_object, default={}, help="OpenAI runs: its keyword arguments as JSON")
    g.add_argument("--image-shape", type=_shape, help="C,H,W of the run's images where the files do not say it")
    g.add_argument("--code-dir", help="folder of the run's code base, put on the Python path of every process that "
                   "builds the network (its classes must import)")
    g.add_argument("--prediction-type", choices=PREDICTION_TYPES, help="diffusers runs: what the UNet predicts; "
                   "default: the run's scheduler/scheduler_config.json, else epsilon")


def hints_from_args(args: argparse.Namespace) -> ForeignHints:
    return ForeignHints(model_factory=args.model_factory, model_kwargs=args.model_kwargs,
                        image_shape=args.image_shape, code_dir=args.code_dir, prediction_type=args.prediction_type,
                        trust_pickle=args.trust_pickle)


def resolve_from_args(args: argparse.Namespace, ckpt_dir: str | Path) -> ResolvedRun:
    """`resolve_run` with the flags of `add_run_flags`; prints what detection found and the run.json it wrote."""
    resolved = resolve_run(ckpt_dir, run_json=args.run_json, select=args.ckpt_select,
                           pattern=getattr(args, "ckpt_pattern", None), hints=hints_from_args(args))
    if resolved.detected is not None:
        fmt = get_format(resolved.run.format)
        others = ", ".join(f"{n} ({len(f)})" for n, f in sorted(resolved.trajectories.items()))
        print(f"detected: {fmt.label}; trajectories {others}; selected {resolved.trajectory}")
        print("run.json written for this run (edit it and pass it back with --run-json FILE):")
        print(json.dumps(resolved.detected, indent=2))
    return resolved
