"""Save and resume training: raw + EMA weights as safetensors at a steady cadence, resume state beside them.

Order of writes at a save (each atomic, lcsc_ray/atomic.py): raw weights, EMA weights, then `resume.pt`
(step, optimizer, RNG). `resume.pt` is written last, so the step it names always has both weight files;
a kill at any moment resumes from the newest complete checkpoint. Only the newest resume state is kept.
The resume state holds only tensors and plain containers, loaded with `weights_only=True`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lcsc_ray.atomic import atomic_write
from lcsc_ray.errors import LcscError
from lcsc_ray.run_folder import ema_checkpoint_path, model_checkpoint_path

RESUME_FILE = "resume.pt"


def _save_weights(path: Path, module: nn.Module) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))


def save_checkpoint(
    run_dir: Path, step: int, net: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator
) -> None:
    """Write model_<step>, ema_<step> and the resume state for `step` completed updates."""
    _save_weights(model_checkpoint_path(run_dir, step), net)
    _save_weights(ema_checkpoint_path(run_dir, step), ema)
    state = {"step": step, "optimizer": optimizer.state_dict(), "generator": generator.get_state()}
    atomic_write(Path(run_dir) / RESUME_FILE, lambda tmp: torch.save(state, tmp))


def load_weights(path: Path, module: nn.Module) -> None:
    """Load a safetensors state dict into `module` (strict), naming the file on mismatch."""
    try:
        module.load_state_dict(load_file(str(path)))
    except (RuntimeError, OSError) as error:
        first = str(error).splitlines()[0]
        raise LcscError(f"{path}: cannot load into the run's model ({first}); delete the run folder to retrain") from None


def resume(
    run_dir: Path, net: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator
) -> int:
    """Restore the newest complete checkpoint into the given objects; return its step (0 if none)."""
    path = Path(run_dir) / RESUME_FILE
    if not path.is_file():
        return 0
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable resume file is a user-fixable state problem
        raise LcscError(f"{path}: unreadable resume state ({error}); delete it to restart training from scratch") from None
    step = int(state["step"])
    load_weights(model_checkpoint_path(run_dir, step), net)
    load_weights(ema_checkpoint_path(run_dir, step), ema)
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    return step
