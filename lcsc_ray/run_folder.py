"""A training run folder: `run.json` + raw and EMA checkpoint trajectories (docs/ARCHITECTURE.md).

Layout:
    run.json                                  model factory + kwargs, kind (cm|dm), data spec, image shape,
                                              σ constants (`precond`), training settings
    checkpoints/model_<step:07d>.safetensors  raw weights after <step> optimizer updates (plain state dict)
    checkpoints_ema/ema_<step:07d>.safetensors the training EMA at the same steps
    resume.pt                                 optimizer/RNG state of the newest checkpoint (training only)
    done.json                                 completion marker with training statistics
Later tools rebuild the network from run.json alone (`lcsc_ray.run_formats.build_network`).

A run written by another code base (diffusers, OpenAI consistency models, NVlabs pickles) has no run.json of
ours: lcsc_ray/run_formats/ detects it and writes one (with `run_format`, `convention`, `checkpoints` and, where
the network class lives in the user's code, `python_path`), which the search carries in its ScoringSpec. This
module only reads and describes run.json; the formats (which build networks) import it, never the reverse.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path


from lcsc_ray.conventions import Convention, DiffusersConvention, build_convention
from lcsc_ray.errors import LcscError
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

    @property
    def format(self) -> str:
        """Which code base wrote the run (`ours` for run.json written by our training scripts)."""
        return self.config.get("run_format", "ours")

    @property
    def convention(self) -> Convention | DiffusersConvention:
        """How the network is called and preconditioned (lcsc_ray/conventions.py)."""
        return build_convention(self.config, self.kind)


def validate_config(config: dict, source: str) -> None:
    """Raise LcscError naming `source` unless `config` has the fields every tool relies on."""
    if not isinstance(config, dict):
        raise LcscError(f"{source}: expected a JSON object; re-create the run with launch/train_cm.py or train_dm.py")
    fmt = config.get("run_format", "ours")
    required = ("kind", "image_shape") + (("precond",) if fmt != "diffusers" else ()) + \
        (("model",) if fmt != "nvlabs-pickle" else ())
    for key in required:
        if key not in config:
            raise LcscError(f"{source}: missing {key!r}; see docs/ARCHITECTURE.md for the run.json fields")
    if config["kind"] not in KINDS:
        raise LcscError(f"{source}: kind {config['kind']!r} must be one of {list(KINDS)}")
    model = config.get("model", {"factory": ""})
    if not isinstance(model, dict) or not isinstance(model.get("factory", model.get("snapshot")), str):
        raise LcscError(f"{source}: 'model' must be {{\"factory\": name or module:function, \"kwargs\": {{...}}}}")
    shape = config["image_shape"]
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(s, int) and s > 0 for s in shape)):
        raise LcscError(f"{source}: 'image_shape' must be [C, H, W] positive integers, got {shape!r}")
    try:
        SigmaConfig(**config.get("precond", {}))
    except TypeError as error:
        raise LcscError(f"{source}: bad 'precond' ({error}); expected sigma_min, sigma_max, rho, sigma_data") from None
    paths = config.get("python_path", [])
    if not (isinstance(paths, list) and all(isinstance(p, str) for p in paths)):
        raise LcscError(f"{source}: 'python_path' must be a list of folders, got {paths!r}")


def code_folder(code_dir: str) -> Path:
    """The absolute `--code-dir` folder, or LcscError when there is no such folder."""
    folder = Path(code_dir).expanduser().resolve()
    if not folder.is_dir():
        raise LcscError(f"--code-dir {folder}: no such folder; pass the root folder of the training code base's "
                        "repository (the one its network classes import from)")
    return folder


def add_python_path(folders: list[str]) -> None:
    """Put the user's code folders first on sys.path (once each), so their network classes import."""
    for folder in folders:
        if folder not in sys.path:
            sys.path.insert(0, folder)


def run_from_config(run_dir: str | Path, config: dict, source: str) -> RunInfo:
    """A RunInfo from an already-read run.json (`source` names it in errors). Its `python_path` folders go on
    sys.path first, so the user's network classes import in whichever process (a Ray worker too) builds it."""
    validate_config(config, source)
    add_python_path(config.get("python_path", []))
    run_dir = Path(run_dir).expanduser().resolve()
    checkpoints = Path(config["checkpoints"]) if "checkpoints" in config else run_dir / "checkpoints"
    return RunInfo(run_dir, config["kind"], config, checkpoints, run_dir / "checkpoints_ema")


def read_run_json(path: Path) -> dict:
    """The JSON object in `path`, or LcscError naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LcscError(f"{path}: not valid JSON ({error}); restore or re-create the run") from None


def load_run(run_dir: str | Path) -> RunInfo:
    """Read and validate `run_dir/run.json`; LcscError naming the file if it is missing or invalid."""
    run_dir = Path(run_dir).expanduser().resolve()
    path = run_dir / RUN_JSON
    if not path.is_file():
        raise LcscError(f"{path}: not found; --ckpt-dir must be a training run folder (run.json + checkpoints/), as written by launch/train_cm.py or train_dm.py")
    return run_from_config(run_dir, read_run_json(path), str(path))
