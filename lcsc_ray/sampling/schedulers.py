"""Samplers for diffusers UNets: diffusers' own schedulers (DDIM, DPM-Solver++ multistep) at a chosen number
of network evaluations, so the discrete-time maths is exactly what the run's code base uses.

The initial noise is stream 0 of FixedNoise scaled by the scheduler's `init_noise_sigma`, so every candidate
of a search starts from the same x_T; both schedulers are deterministic from there (DDIM with η = 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from lcsc_ray.conventions import DiffusersConvention
from lcsc_ray.devices import module_device
from lcsc_ray.errors import LcscError
from lcsc_ray.noise import FixedNoise


@dataclass
class SchedulerSampler:
    """Runs `scheduler_name` (a diffusers scheduler class) for `nfe` steps; `options` go to its config."""

    convention: DiffusersConvention
    scheduler_name: str
    nfe: int
    name: str
    options: dict

    def scheduler(self):
        """A fresh scheduler (its multistep history is per batch) from the run's scheduler config."""
        import diffusers

        config = {**self.convention.scheduler_config, "prediction_type": self.convention.prediction_type,
                  **self.options}
        return getattr(diffusers, self.scheduler_name).from_config(config)

    @torch.no_grad()
    def sample(self, net: nn.Module, noise: FixedNoise, start: int, count: int) -> torch.Tensor:
        conv, device = self.convention, module_device(net)
        scheduler = self.scheduler()
        scheduler.set_timesteps(self.nfe, device=device)
        labels = conv.labels(noise.seed, start, count, device)
        x = noise.normal(0, start, count, device) * float(scheduler.init_noise_sigma)
        for t in scheduler.timesteps:
            output = conv.model_output(net, scheduler.scale_model_input(x, t), t, labels)
            x = scheduler.step(output, t, x).prev_sample
        return x.clamp(-1.0, 1.0)


def _steps(nfe: int | None, steps: int | None, default: int = 25) -> int:
    if nfe is not None and steps is not None and nfe != steps:
        raise LcscError(f"--nfe {nfe} and --grid-steps {steps} disagree; a diffusers scheduler makes one "
                        "evaluation per step")
    value = nfe or steps or default
    if value < 1:
        raise LcscError(f"--nfe {value}: must be at least 1")
    return value


def build_ddim(convention: DiffusersConvention, nfe: int | None, steps: int | None, ts: Sequence[int] | None,
               order: int | None) -> SchedulerSampler:
    return SchedulerSampler(convention, "DDIMScheduler", _steps(nfe, steps), "ddim", {})


def build_dpmsolver(convention: DiffusersConvention, nfe: int | None, steps: int | None, ts: Sequence[int] | None,
                    order: int | None) -> SchedulerSampler:
    if order not in (None, 1, 2, 3):
        raise LcscError(f"--order {order}: diffusers' DPM-Solver++ multistep supports orders 1, 2 and 3")
    options = {"algorithm_type": "dpmsolver++", "solver_order": order or 2}
    return SchedulerSampler(convention, "DPMSolverMultistepScheduler", _steps(nfe, steps), "dpmsolver++", options)
