"""Our own runs (run.json from launch/train_*.py, or written by hand for your own architecture): one
trajectory per checkpoint folder, any of the file layouts lcsc_ray/checkpoints.py discovers."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from lcsc_ray.checkpoints import CheckpointFile, discover_checkpoints
from lcsc_ray.errors import LcscError
from lcsc_ray.models import build_model
from lcsc_ray.run_folder import RunInfo


class OursFormat:
    name = "ours"
    label = "lcsc-ray run folder (run.json)"

    def matches(self, folder: Path) -> bool:
        return (folder / "run.json").is_file()

    def trajectories(self, folder: Path, pattern: str | None = None) -> dict[str, list[CheckpointFile]]:
        return {folder.name: discover_checkpoints(folder, pattern)}

    def describe(self, folder: Path, newest: CheckpointFile, hints) -> dict:
        raise LcscError(f"{folder}: our runs carry their own run.json")

    def build_network(self, run: RunInfo, trust_pickle: bool) -> nn.Module:
        """The model factory of run.json (a registry name or the user's `package.module:function`)."""
        model = run.config["model"]
        return build_model(model["factory"], model.get("kwargs", {}))

    def holds_ema(self, trajectory: str) -> bool:
        """Our training writes the EMA to `checkpoints_ema/` (the trajectory is the folder's name)."""
        return trajectory == "checkpoints_ema"


OURS = OursFormat()
