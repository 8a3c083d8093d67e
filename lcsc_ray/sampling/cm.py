"""Consistency-model samplers (OpenAI `karras_sample` with `sampler="onestep"/"multistep"`).

The consistency function f(x, σ) comes from the run's denoiser convention (lcsc_ray/conventions.py: our
raw F with the boundary scalings, OpenAI's U-Net with its time input, ECT's self-preconditioned module), with
the convention's σ constants and class labels. Noise comes from FixedNoise: stream 0 is x_T/σ_max, stream k the noise
injected after the k-th evaluation, so outputs do not depend on the batch size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from lcsc_ray.devices import module_device
from lcsc_ray.errors import LcscError
from lcsc_ray.noise import FixedNoise
from lcsc_ray.conventions import Convention
from lcsc_ray.precond import karras_sigmas


@dataclass
class OneStepSampler:
    """x_T ~ N(0, σ_max²I), x = f(x_T, σ_max): one network evaluation."""

    convention: Convention
    name: str = "onestep"
    nfe: int = 1

    @torch.no_grad()
    def sample(self, net: nn.Module, noise: FixedNoise, start: int, count: int) -> torch.Tensor:
        conv, device = self.convention, module_device(net)
        x = noise.normal(0, start, count, device) * conv.sigmas.sigma_max
        labels = conv.labels(noise.seed, start, count, device)
        return conv.denoise(net, x, conv.sigmas.sigma_max, labels).clamp(-1.0, 1.0)


@dataclass
class MultistepSampler:
    """On the `steps`-point Karras grid, for t in ts: x₀ = clamp(f(x, σ_t)); then, if a next index exists,
    x = x₀ + z·√(σ_next² − σ_min²) (the published CIFAR-10 setting: `steps=18, ts=0,10,17`)."""

    convention: Convention
    steps: int
    ts: tuple[int, ...]
    name: str = "multistep"

    def __post_init__(self) -> None:
        if self.steps < 2 or not self.ts or list(self.ts) != sorted(set(self.ts)) or not 0 <= self.ts[0] <= self.ts[-1] < self.steps:
            raise LcscError(f"--ts {list(self.ts)}: need strictly increasing indices in [0, --grid-steps {self.steps})")
        s = self.convention.sigmas
        self.grid = karras_sigmas(self.steps, s.sigma_min, s.sigma_max, s.rho)

    @property
    def nfe(self) -> int:
        return len(self.ts)

    @torch.no_grad()
    def sample(self, net: nn.Module, noise: FixedNoise, start: int, count: int) -> torch.Tensor:
        conv, device = self.convention, module_device(net)
        s = conv.sigmas
        labels = conv.labels(noise.seed, start, count, device)
        x = noise.normal(0, start, count, device) * float(self.grid[self.ts[0]])
        for k, t in enumerate(self.ts):
            x0 = conv.denoise(net, x, float(self.grid[t]), labels).clamp(-1.0, 1.0)
            if k + 1 == len(self.ts):
                return x0
            next_sigma = float(self.grid[self.ts[k + 1]])
            x = x0 + noise.normal(k + 1, start, count, device) * math.sqrt(next_sigma**2 - s.sigma_min**2)
        raise AssertionError("unreachable")


def build_onestep(convention: Convention, nfe: int | None, steps: int | None, ts: Sequence[int] | None, order: int | None) -> OneStepSampler:
    if nfe not in (None, 1):
        raise LcscError(f"--nfe {nfe}: the onestep sampler makes exactly 1 evaluation; use 'multistep' for more")
    return OneStepSampler(convention)


def build_multistep(convention: Convention, nfe: int | None, steps: int | None, ts: Sequence[int] | None, order: int | None) -> MultistepSampler:
    """Defaults to the published CIFAR-10 setting steps=18, ts=0,10,17; `nfe` alone spreads nfe indices evenly."""
    steps = steps or 18
    if ts is None:
        ts = (0, 10, 17) if nfe is None and steps == 18 else tuple(round(i * (steps - 1) / max(1, (nfe or 2) - 1)) for i in range(nfe or 2))
    sampler = MultistepSampler(convention, steps, tuple(int(t) for t in ts))
    if nfe is not None and nfe != sampler.nfe:
        raise LcscError(f"--nfe {nfe} disagrees with --ts {list(ts)} ({sampler.nfe} evaluations); give one of them")
    return sampler
