"""OpenAI consistency_models (and improved-diffusion) log folders: `model<step:06d>.pt` (raw weights) and
`ema_<rate>_<step:06d>.pt` (one trajectory per EMA rate), plain state dicts saved with `torch.save`;
`opt*.pt`, `target_model*.pt` and `teacher_model*.pt` are not networks to merge and are ignored.

The network class is the user's (`cm/unet.py` UNetModel): run.json names a factory `package.module:function`
and its kwargs (`--model-factory`, `--model-kwargs`), with the code base on the Python path (`--code-dir`).
Convention `openai-cm` (lcsc_ray/conventions.py). A class-conditional network is recognised by its
`label_emb.weight` (one row per class).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from lcsc_ray.checkpoints import CheckpointFile
from lcsc_ray.errors import LcscError
from lcsc_ray.precond import SigmaConfig
from lcsc_ray.run_folder import RunInfo, code_folder

_RAW = re.compile(r"model(\d+)\.pt")
_EMA = re.compile(r"ema_([0-9.]+)_(\d+)\.pt")


class OpenAIFormat:
    name = "openai"
    label = "OpenAI consistency_models / improved-diffusion (model<step>.pt, ema_<rate>_<step>.pt)"

    def matches(self, folder: Path) -> bool:
        return any(_RAW.fullmatch(p.name) or _EMA.fullmatch(p.name) for p in folder.iterdir() if p.is_file())

    def trajectories(self, folder: Path, pattern: str | None = None) -> dict[str, list[CheckpointFile]]:
        found: dict[str, list[CheckpointFile]] = {}
        for entry in sorted(folder.iterdir()):
            raw, ema = _RAW.fullmatch(entry.name), _EMA.fullmatch(entry.name)
            if raw:
                found.setdefault("raw", []).append(CheckpointFile(entry, int(raw.group(1)), "torch"))
            elif ema:
                found.setdefault(f"ema_{ema.group(1)}", []).append(CheckpointFile(entry, int(ema.group(2)), "torch"))
        return {name: sorted(files, key=lambda f: f.step) for name, files in found.items()}

    def describe(self, folder: Path, newest: CheckpointFile, hints) -> dict:
        missing = [flag for flag, value in (("--model-factory pkg.module:function", hints.model_factory),
                                            ("--image-shape C,H,W", hints.image_shape)) if not value]
        if missing:
            raise LcscError(f"{folder}: an OpenAI consistency-models run (no run.json); its network is your code's "
                            f"class: pass {' and '.join(missing)} (with --model-kwargs JSON and --code-dir DIR of "
                            "the code base), or --run-json FILE")
        header = torch.load(newest.path, map_location="meta", weights_only=True)
        label_emb = header.get("label_emb.weight") if isinstance(header, dict) else None
        config = {
            "run_format": self.name, "convention": "openai-cm", "kind": "cm", "checkpoints": str(folder),
            "image_shape": list(hints.image_shape), "num_classes": 0 if label_emb is None else int(label_emb.shape[0]),
            "model": {"factory": hints.model_factory, "kwargs": dict(hints.model_kwargs)},
            "precond": SigmaConfig().to_dict(),
            "guesses": ["sigma constants of consistency_models' script defaults (0.002, 80, 0.5); edit 'precond' "
                        "if the run used others"],
        }
        if hints.code_dir:
            config["python_path"] = [str(code_folder(hints.code_dir))]
        return config

    def build_network(self, run: RunInfo, trust_pickle: bool) -> nn.Module:
        from lcsc_ray.run_formats.ours import OURS

        return OURS.build_network(run, trust_pickle)

    def holds_ema(self, trajectory: str) -> bool:
        """`ema_<rate>` files are the EMAs the training loop kept; `raw` (`model<step>.pt`) the raw weights."""
        return trajectory.startswith("ema_")


OPENAI = OpenAIFormat()
