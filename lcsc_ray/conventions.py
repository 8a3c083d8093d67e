"""Denoiser conventions: how a code base's network is called and which scalings wrap it.

Every sampler asks a convention for the denoised estimate at noise level σ and never calls a network itself,
so one sampler serves networks written for different code bases. run.json names the convention
(`"convention"`; our own runs have none and use `ours`):

- `ours`: the raw network `F(c_in·x, c_noise)` with c_noise = ¼·ln σ, wrapped by the consistency
  (boundary) scalings for a CM run or the EDM scalings for a DM run (lcsc_ray/precond.py).
- `edm` (NVlabs edm/edm2 `EDMPrecond`/`Precond`) and `ect` (locuslab/ect `ECMPrecond`): the module holds its
  preconditioning and is called `net(x, σ, class_labels)` (one-hot labels), returning D(x, σ). `edm` is a
  diffusion denoiser, `ect` a consistency function (its boundary scalings are inside the module).
- `openai-cm` (openai/consistency_models): `F(c_in·x, t, y=labels)` with t = 1000·¼·ln(σ + 1e-44) and the
  boundary scalings c_skip = σ_d²/((σ−σ_min)² + σ_d²), c_out = (σ−σ_min)·σ_d/√(σ²+σ_d²), c_in = 1/√(σ²+σ_d²)
  (its `KarrasDenoiser.denoise` in consistency mode).
- `diffusers`: a `UNet2DModel` called `unet(x_t, t_int, class_labels=...).sample` on a discrete DDPM
  schedule; its samplers are diffusers' own schedulers, so it has no σ-form denoiser here (`model_output`).

Class-conditional networks get labels that are a fixed function of (noise seed, sample index), balanced over
the classes, so every candidate of a search draws the same classes for the same noise (`class_labels`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from lcsc_ray.errors import LcscError
from lcsc_ray.precond import SigmaConfig, consistency_fn, consistency_scalings, edm_denoiser, per_sample_sigma

CONVENTIONS = ("ours", "edm", "ect", "openai-cm", "diffusers")


def class_labels(seed: int, start: int, count: int, num_classes: int) -> torch.Tensor:
    """Labels of samples start..start+count-1: (index + offset(seed)) mod C, int64 on the CPU.

    Any C consecutive samples cover every class once, and the labels depend only on the seed and the index
    (never on the batch), so all candidates and all batch sizes see the same classes."""
    offset = int(np.random.SeedSequence((int(seed), 0x1AB)).generate_state(1)[0]) % num_classes
    return (torch.arange(start, start + count, dtype=torch.int64) + offset) % num_classes


@dataclass(frozen=True)
class Convention:
    """How to get the denoised estimate of one run's network (module docstring).

    `boundary`: the estimate is a consistency function f(x, σ) (CM samplers) rather than an EDM denoiser
    D(x, σ) (DM samplers); `family` names the sampler registry that fits (`cm`, `dm` or `diffusers`)."""

    name: str
    sigmas: SigmaConfig
    boundary: bool
    num_classes: int = 0

    @property
    def family(self) -> str:
        return "cm" if self.boundary else "dm"

    def labels(self, seed: int, start: int, count: int, device: torch.device) -> torch.Tensor | None:
        """The class inputs of a batch in this convention's form, or None for an unconditional network."""
        if not self.num_classes:
            return None
        labels = class_labels(seed, start, count, self.num_classes).to(device)
        if self.name in ("edm", "ect"):  # EDMPrecond takes one-hot float labels
            return torch.nn.functional.one_hot(labels, self.num_classes).to(torch.float32)
        return labels

    def denoise(self, net: nn.Module, x: torch.Tensor, sigma: torch.Tensor | float,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """The network's estimate of the clean image at noise level σ (a scalar or one per sample)."""
        s = self.sigmas
        if self.name == "ours":
            return consistency_fn(net, x, sigma, s.sigma_min, s.sigma_data) if self.boundary else \
                edm_denoiser(net, x, sigma, s.sigma_data)
        sigma = per_sample_sigma(sigma, x)
        if self.name in ("edm", "ect"):
            return net(x, sigma.to(torch.float32), labels).to(x.dtype)
        c_skip, c_out, c_in = (v.to(x.dtype).view(-1, 1, 1, 1)
                               for v in consistency_scalings(sigma, s.sigma_min, s.sigma_data))
        t = (1000.0 * 0.25 * torch.log(sigma + 1e-44)).to(x.dtype)  # openai-cm
        return c_skip * x + c_out * net(c_in * x, t, y=labels)


@dataclass(frozen=True)
class DiffusersConvention:
    """A diffusers `UNet2DModel` on its training run's discrete schedule: the samplers are diffusers'
    schedulers configured from `scheduler_config` (with the run's `prediction_type`)."""

    scheduler_config: dict
    prediction_type: str
    num_classes: int = 0
    name: str = "diffusers"
    family: str = "diffusers"

    def labels(self, seed: int, start: int, count: int, device: torch.device) -> torch.Tensor | None:
        if not self.num_classes:
            return None
        return class_labels(seed, start, count, self.num_classes).to(device)

    def model_output(self, net: nn.Module, x: torch.Tensor, timestep: torch.Tensor | int,
                     labels: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet's raw output (ε, v or x₀ as `prediction_type` says) at an integer training timestep."""
        t = torch.as_tensor(timestep, device=x.device)
        return net(x, t.expand(x.shape[0]) if t.ndim == 0 else t, class_labels=labels).sample


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def build_convention(config: dict, kind: str) -> Convention | DiffusersConvention:
    """The convention run.json names (`convention`, default `ours`) for a run of `kind` (cm|dm)."""
    name = config.get("convention", "ours")
    num_classes = int(config.get("num_classes", 0) or 0)
    if name == "diffusers":
        scheduler = dict(config.get("scheduler") or {})
        prediction = scheduler.get("prediction_type", "epsilon")
        if prediction not in PREDICTION_TYPES:
            raise LcscError(f"run.json scheduler prediction_type {prediction!r}: use one of {list(PREDICTION_TYPES)} "
                            "(or --prediction-type)")
        return DiffusersConvention(scheduler, prediction, num_classes)
    if name not in CONVENTIONS:
        raise LcscError(f"run.json convention {name!r}: use one of {list(CONVENTIONS)}")
    sigmas = SigmaConfig(**config.get("precond", {}))
    boundary = {"ours": kind == "cm", "edm": False, "ect": True, "openai-cm": True}[name]
    if not math.isfinite(sigmas.sigma_max) or sigmas.sigma_min <= 0:
        raise LcscError(f"run.json precond {sigmas.to_dict()}: need 0 < sigma_min < sigma_max")
    return Convention(name, sigmas, boundary, num_classes)
