"""A training run folder: `run.json` + raw and EMA checkpoint trajectories (docs/ARCHITECTURE.md).

Layout:
    run.json                                  model factory + kwargs, kind (cm|dm), data spec, image shape,
                                              σ constants (`precond`), training settings
    checkpoints/model_<step:07d>.safetensors  raw weights after <step> optimizer updates (plain state dict)
    checkpoints_ema/ema_<step:07d>.safetensors the training EMA at the same steps
    resume.pt                                 optimizer/RNG state of the newest checkpoint (training only)
    done.json                                 completion marker with training statistics
Later tools rebuild the network from run.json alone (`RunInfo.build_network`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from lcsc_ray.errors import LcscError
from lcsc_ray.models import build_model
from lcsc_ray.precond import SigmaConfig

RUN_JSON = "run.json"
DONE_JSON = "done.json"
KINDS = ("cm", "dm")


def model_checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"model_{step:07d}.safetensors"


def ema_checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints_ema" / f"ema_{step:07d}.safetensors"


@dataclass
class RunInfo:
    """What a run folder says about its model; `config` is the whole run.json."""

    run_dir: Path
    kind: str
    config: dict
    checkpoint_dir: Path
    ema_dir: Path

    @property
    def sigmas(self) -> SigmaConfig:
        return SigmaConfig(**self.config["precond"])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.config["image_shape"])

    def build_network(self) -> nn.Module:
        """The raw network whose state_dict the checkpoints hold, freshly initialised (CPU, float32, eval mode)."""
        model = self.config["model"]
        return build_model(model["factory"], model.get("kwargs", {})).eval()


def validate_config(config: dict, source: str) -> None:
    """Raise LcscError naming `source` unless `config` has the fields every tool relies on."""
    if not isinstance(config, dict):
        raise LcscError(f"{source}: expected a JSON object; re-create the run with launch/train_cm.py or train_dm.py")
    for key in ("kind", "model", "image_shape", "precond"):
        if key not in config:
            raise LcscError(f"{source}: missing {key!r}; see docs/ARCHITECTURE.md for the run.json fields")
    if config["kind"] not in KINDS:
        raise LcscError(f"{source}: kind {config['kind']!r} must be one of {list(KINDS)}")
    model = config["model"]
    if not isinstance(model, dict) or not isinstance(model.get("factory"), str):
        raise LcscError(f"{source}: 'model' must be {{\"factory\": name or module:function, \"kwargs\": {{...}}}}")
    shape = config["image_shape"]
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(s, int) and s > 0 for s in shape)):
        raise LcscError(f"{source}: 'image_shape' must be [C, H, W] positive integers, got {shape!r}")
    try:
        SigmaConfig(**config["precond"])
    except TypeError as error:
        raise LcscError(f"{source}: bad 'precond' ({error}); expected sigma_min, sigma_max, rho, sigma_data") from None


def load_run(run_dir: str | Path) -> RunInfo:
    """Read and validate `run_dir/run.json`; LcscError naming the file if it is missing or invalid."""
    run_dir = Path(run_dir).expanduser().resolve()
    path = run_dir / RUN_JSON
    if not path.is_file():
        raise LcscError(f"{path}: not found; --ckpt-dir must be a training run folder (run.json + checkpoints/), as written by launch/train_cm.py or train_dm.py")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LcscError(f"{path}: not valid JSON ({error}); restore or re-create the run") from None
    validate_config(config, str(path))
    return RunInfo(run_dir, config["kind"], config, run_dir / "checkpoints", run_dir / "checkpoints_ema")
