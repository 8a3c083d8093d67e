"""Consistency-model samplers (OpenAI `karras_sample` with `sampler="onestep"/"multistep"`, ECT's few-step
`generator_fn`).

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
    """Consistency multistep sampling over the noise levels `sigmas` (σ₀ > σ₁ > …), each code base's own way.

    For each σₖ: x₀ = f(x, σₖ); then, if a next level exists, x = x₀ + z·s(σₖ₊₁). OpenAI (`karras_sample`
    with its `stochastic_iterative_sampler`) and our own runs clamp x₀ to [-1, 1] at every step and re-noise
    with s(σ) = √(σ² − σ_min²); ECT (`generator_fn` of its training loop) neither clamps between the steps
    nor subtracts σ_min: s(σ) = σ. At σ = σ_min a consistency function is the identity (f(x, σ_min) = x by
    its boundary condition), so no network evaluation is made there: OpenAI's `ts=0,22,39` on a 40-point
    grid is 2 evaluations, as in its own sampler. The final image is always clamped to [-1, 1].
    """

    convention: Convention
    sigmas: tuple[float, ...]
    name: str = "multistep"

    def __post_init__(self) -> None:
        s = self.convention.sigmas
        if not self.sigmas or any(b >= a for a, b in zip(self.sigmas, self.sigmas[1:])) or \
                self.sigmas[-1] < s.sigma_min or self.sigmas[0] > s.sigma_max:
            raise LcscError(f"--sigmas {list(self.sigmas)}: need strictly decreasing noise levels within "
                            f"[sigma_min {s.sigma_min:g}, sigma_max {s.sigma_max:g}] of this run")

    @property
    def nfe(self) -> int:
        return sum(sigma > self.convention.sigmas.sigma_min for sigma in self.sigmas)

    @property
    def ect_steps(self) -> bool:
        """ECT's sampler: no clamp between the steps, re-noise to σ itself."""
        return self.convention.name == "ect"

    @torch.no_grad()
    def sample(self, net: nn.Module, noise: FixedNoise, start: int, count: int) -> torch.Tensor:
        conv, device = self.convention, module_device(net)
        sigma_min = conv.sigmas.sigma_min
        labels = conv.labels(noise.seed, start, count, device)
        x = noise.normal(0, start, count, device) * self.sigmas[0]
        for k, sigma in enumerate(self.sigmas):
            x0 = conv.denoise(net, x, sigma, labels) if sigma > sigma_min else x
            if k + 1 == len(self.sigmas):
                return x0.clamp(-1.0, 1.0)
            if not self.ect_steps:
                x0 = x0.clamp(-1.0, 1.0)
            next_sigma = self.sigmas[k + 1]
            scale = next_sigma if self.ect_steps else math.sqrt(next_sigma**2 - sigma_min**2)
            x = x0 + noise.normal(k + 1, start, count, device) * scale
        raise AssertionError("unreachable")


# ECT's default intermediate noise level for two-step sampling of its CIFAR-10 models (its --mid_t).
ECT_MID_SIGMA = 0.821


def _grid_sigmas(convention: Convention, steps: int, ts: Sequence[int]) -> tuple[float, ...]:
    """σ at indices `ts` of the `steps`-point Karras grid (OpenAI's `--ts`/`--steps`)."""
    if steps < 2 or not ts or list(ts) != sorted(set(ts)) or not 0 <= ts[0] <= ts[-1] < steps:
        raise LcscError(f"--ts {list(ts)}: need strictly increasing indices in [0, --grid-steps {steps})")
    s = convention.sigmas
    grid = karras_sigmas(steps, s.sigma_min, s.sigma_max, s.rho)
    return tuple(s.sigma_min if t == steps - 1 else float(grid[t]) for t in ts)  # the last point is σ_min exactly


def build_onestep(convention: Convention, nfe: int | None, steps: int | None, ts: Sequence[int] | None,
                  order: int | None) -> OneStepSampler:
    if nfe not in (None, 1):
        raise LcscError(f"--nfe {nfe}: the onestep sampler makes exactly 1 evaluation; use 'multistep' for more")
    return OneStepSampler(convention)


def build_multistep(convention: Convention, nfe: int | None, steps: int | None, ts: Sequence[int] | None,
                    order: int | None, sigmas: Sequence[float] | None = None) -> MultistepSampler:
    """The noise levels come from `sigmas` (given directly, e.g. ECT's `80,0.821`) or from indices `ts` into a
    `steps`-point Karras grid (OpenAI's way). Defaults: ECT runs use ECT's own two-step levels (σ_max, 0.821);
    others the published CIFAR-10 grid setting steps=18, ts=0,10,17 (2 evaluations); `nfe` alone spreads
    nfe + 1 indices evenly over the grid (the last one is σ_min, which costs no evaluation)."""
    if sigmas is not None:
        if ts is not None or steps is not None:
            raise LcscError("--sigmas gives the noise levels directly; drop --ts/--grid-steps (or drop --sigmas)")
        sampler = MultistepSampler(convention, tuple(float(v) for v in sigmas))
    elif ts is None and steps is None and nfe is None and convention.name == "ect":
        sampler = MultistepSampler(convention, (convention.sigmas.sigma_max, ECT_MID_SIGMA))
    else:
        steps = steps or 18
        if ts is None:
            ts = (0, 10, 17) if nfe is None and steps == 18 else \
                tuple(round(i * (steps - 1) / (nfe or 2)) for i in range((nfe or 2) + 1))
        sampler = MultistepSampler(convention, _grid_sigmas(convention, steps, tuple(int(t) for t in ts)))
    if nfe is not None and nfe != sampler.nfe:
        raise LcscError(f"--nfe {nfe} disagrees with the noise levels {[round(v, 4) for v in sampler.sigmas]} "
                        f"({sampler.nfe} evaluations; none at sigma_min); give one of them")
    return sampler
