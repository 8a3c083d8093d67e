"""The one place a `--device` value becomes a torch.device, and where a model's device is read from."""

from __future__ import annotations

import torch
from torch import nn

from lcsc_ray.errors import LcscError


def resolve_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device, refusing in one line a name torch does not know or a CUDA device that is
    not visible; `auto` is the first CUDA device when one is visible (Ray makes a trial's GPUs visible),
    else the CPU."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise LcscError(f"--device {device!r}: not a torch device; use auto, cpu, cuda or cuda:<index>") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise LcscError(f"--device {device}: no CUDA device is visible; use --device cpu")
    return resolved


def module_device(net: nn.Module) -> torch.device:
    """The device of `net`'s parameters (samplers draw their noise there)."""
    return next(net.parameters()).device
