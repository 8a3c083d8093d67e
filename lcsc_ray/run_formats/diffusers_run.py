"""diffusers runs as accelerate saves them: `checkpoint-<step>/unet/` and, with EMA, `checkpoint-<step>/unet_ema/`
(each `config.json` + `diffusion_pytorch_model.safetensors`); optimizer and RNG files next to them are ignored.

The network is `UNet2DModel.from_config` of the newest checkpoint's config (local files only: the hub is
set offline before diffusers is imported, so nothing is ever downloaded). The sampling schedule comes from
`scheduler/scheduler_config.json` in the run folder (the pipeline `train_unconditional.py` saves), else
diffusers' DDPM defaults; `--prediction-type` overrides what the UNet was trained to predict.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from torch import nn

from lcsc_ray.checkpoints import CheckpointFile
from lcsc_ray.errors import LcscError
from lcsc_ray.run_folder import RunInfo

WEIGHTS = "diffusion_pytorch_model.safetensors"
_STEP_FOLDER = re.compile(r"checkpoint-(\d+)")


def build_unet(config_file: str) -> nn.Module:
    """A freshly initialised `UNet2DModel` from a saved `config.json` (the model factory detection writes)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers import UNet2DModel

    try:
        config = json.loads(Path(config_file).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise LcscError(f"{config_file}: unreadable UNet config ({error}); point model.kwargs.config_file in run.json "
                        "at a checkpoint's unet/config.json") from None
    return UNet2DModel.from_config(config)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise LcscError(f"{path}: unreadable JSON ({error}); re-save the checkpoint") from None


class DiffusersFormat:
    name = "diffusers"
    label = "diffusers / accelerate (checkpoint-<step>/unet, unet_ema)"

    def matches(self, folder: Path) -> bool:
        return any(_STEP_FOLDER.fullmatch(p.name) and any((p / sub / "config.json").is_file() for sub in ("unet", "unet_ema"))
                   for p in folder.iterdir() if p.is_dir())

    def trajectories(self, folder: Path, pattern: str | None = None) -> dict[str, list[CheckpointFile]]:
        found: dict[str, list[CheckpointFile]] = {}
        for entry in sorted(folder.iterdir()):
            match = _STEP_FOLDER.fullmatch(entry.name)
            if not (match and entry.is_dir()):
                continue
            for sub in sorted(entry.iterdir()):
                if (sub / WEIGHTS).is_file() and (sub / "config.json").is_file():
                    found.setdefault(sub.name, []).append(
                        CheckpointFile(sub / WEIGHTS, int(match.group(1)), "safetensors", sub))
        if not found:
            raise LcscError(f"{folder}: checkpoint-<step>/ folders without {WEIGHTS} + config.json in unet/ or unet_ema/")
        return {name: sorted(files, key=lambda f: f.step) for name, files in found.items()}

    def describe(self, folder: Path, newest: CheckpointFile, hints) -> dict:
        config_file = newest.folder / "config.json"
        unet = _read_json(config_file)
        size = unet.get("sample_size", 32)
        height, width = (size, size) if isinstance(size, int) else size
        scheduler_file = folder / "scheduler" / "scheduler_config.json"
        scheduler = _read_json(scheduler_file) if scheduler_file.is_file() else {}
        guesses = [] if scheduler else [f"no {scheduler_file}: diffusers' DDPM schedule defaults "
                                        "(1000 steps, linear betas); edit 'scheduler' if the run used another"]
        prediction = hints.prediction_type or scheduler.get("prediction_type")
        if prediction is None:
            guesses.append("prediction_type epsilon (diffusers' default; --prediction-type to change)")
        scheduler = {key: value for key, value in scheduler.items() if not key.startswith("_")}
        scheduler["prediction_type"] = prediction or "epsilon"
        return {
            "run_format": self.name, "convention": "diffusers", "kind": "dm", "checkpoints": str(folder),
            "image_shape": list(hints.image_shape or (unet.get("in_channels", 3), height, width)),
            "num_classes": int(unet.get("num_class_embeds") or 0),
            "model": {"factory": "lcsc_ray.run_formats.diffusers_run:build_unet",
                      "kwargs": {"config_file": str(config_file)}},
            "scheduler": scheduler, "guesses": guesses,
        }

    def build_network(self, run: RunInfo, trust_pickle: bool) -> nn.Module:
        from lcsc_ray.run_formats.ours import OURS

        return OURS.build_network(run, trust_pickle)

    def holds_ema(self, trajectory: str) -> bool:
        """`unet_ema` (EMAModel.save_pretrained) holds the EMA; `unet` the raw weights."""
        return "ema" in trajectory


DIFFUSERS = DiffusersFormat()
