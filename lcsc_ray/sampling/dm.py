"""Deterministic samplers for an EDM denoiser D(x, σ) (from the run's convention, lcsc_ray/conventions.py:
our raw network with the EDM scalings, or an NVlabs EDM/EDM2 module that preconditions itself), all in the σ ("VE") form
x = x₀ + σ·n, where the probability-flow ODE is dx/dσ = (x − D(x, σ))/σ (Karras et al. 2022, Eq. 3 and 4).

- DDIM (η = 0): the first-order exponential integrator x' = D + (σ'/σ)(x − D) (Song et al. 2021; identical
  to DPM-Solver++-1 and, in this form, to Euler), on an nfe-point Karras grid followed by σ = 0.
- DPM-Solver++ multistep, 2nd or 3rd order (Lu et al. 2022, Algorithm 2 and its 3rd-order extension in the
  reference `dpm_solver_pytorch`), time steps uniform in logSNR λ = −ln σ from σ_max to σ_min, warm-up with
  lower orders and `lower_order_final` for fewer than 10 steps; nfe = steps (LCSC's DM default: order 3,
  15 steps).
- Heun (EDM Algorithm 1, S_churn = 0): N Karras points + σ = 0, 2N − 1 evaluations.
Only stream 0 of FixedNoise is used (x_T = σ_max·z): the samplers are deterministic given x_T.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from lcsc_ray.devices import module_device
from lcsc_ray.errors import LcscError
from lcsc_ray.noise import FixedNoise
from lcsc_ray.conventions import Convention
from lcsc_ray.precond import karras_sigmas


def _start(conv: Convention, net: nn.Module, noise: FixedNoise, start: int, count: int,
           sigma_max: float) -> tuple[torch.Tensor, Callable[[torch.Tensor, float], torch.Tensor]]:
    """(x_T = σ_max·z, D(x, σ) with this batch's class labels bound)."""
    device = module_device(net)
    labels = conv.labels(noise.seed, start, count, device)
    return noise.normal(0, start, count, device) * sigma_max, lambda x, sigma: conv.denoise(net, x, sigma, labels)


@dataclass
class DDIMSampler:
    convention: Convention
    nfe: int
    name: str = "ddim"

    @torch.no_grad()
    def sample(self, net: nn.Module, noise: FixedNoise, start: int, count: int) -> torch.Tensor:
        s = self.convention.sigmas
        grid = karras_sigmas(self.nfe, s.sigma_min, s.sigma_max, s.rho).tolist() + [0.0] if self.nfe > 1 else [s.sigma_max, 0.0]
        x, denoise = _start(self.convention, net, noise, start, count, grid[0])
        for sigma, sigma_next in zip(grid[:-1], grid[1:]):
            denoised = denoise(x, sigma)
            x = denoised + (sigma_next / sigma) * (x - denoised)
        return x.clamp(-1.0, 1.0)


@dataclass
class DPMSolverPPSampler:
    convention: Convention
    nfe: int
    order: int = 3
    name: str = "dpmsolver++"

    def step_orders(self) -> list[int]:
        """Order used at steps 1..M: warm-up min(order, step); with M < 10 also min(order, M + 1 − step)
        at the end (`lower_order_final`, dpm_solver_pytorch)."""
        m = self.nfe
        return [min(self.order, k, m + 1 - k) if m < 10 else min(self.order, k) for k in range(1, m + 1)]

    @torch.no_grad()
    def sample(self, net: nn.Module, noise: FixedNoise, start: int, count: int) -> torch.Tensor:
        """Data-prediction multistep updates with α_t = 1, h = λ_t − λ_prev (Lu et al. 2022, Eq. 9 and the
        2nd/3rd-order multistep formulas of dpm_solver_pytorch's `multistep_dpm_solver_*_update`)."""
        s, m = self.convention.sigmas, self.nfe
        lam = torch.linspace(-math.log(s.sigma_max), -math.log(s.sigma_min), m + 1, dtype=torch.float64)
        sig = torch.exp(-lam).tolist()
        lam = lam.tolist()
        x, denoise = _start(self.convention, net, noise, start, count, sig[0])
        history = [denoise(x, sig[0])]  # model outputs, newest last
        for k, order in enumerate(self.step_orders(), start=1):
            h = lam[k] - lam[k - 1]
            phi_1 = math.expm1(-h)
            m0 = history[-1]
            if order == 1:
                x = (sig[k] / sig[k - 1]) * x - phi_1 * m0
            elif order == 2:
                r0 = (lam[k - 1] - lam[k - 2]) / h
                d1 = (m0 - history[-2]) / r0
                x = (sig[k] / sig[k - 1]) * x - phi_1 * m0 - 0.5 * phi_1 * d1
            else:
                r0 = (lam[k - 1] - lam[k - 2]) / h
                r1 = (lam[k - 2] - lam[k - 3]) / h
                d1_0 = (m0 - history[-2]) / r0
                d1_1 = (history[-2] - history[-3]) / r1
                d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = phi_1 / h + 1.0
                phi_3 = phi_2 / h - 0.5
                x = (sig[k] / sig[k - 1]) * x - phi_1 * m0 + phi_2 * d1 - phi_3 * d2
            if k < m:
                history = (history + [denoise(x, sig[k])])[-3:]
        return x.clamp(-1.0, 1.0)


@dataclass
class HeunSampler:
    convention: Convention
    steps: int
    name: str = "heun"

    @property
    def nfe(self) -> int:
        return 2 * self.steps - 1

    @torch.no_grad()
    def sample(self, net: nn.Module, noise: FixedNoise, start: int, count: int) -> torch.Tensor:
        """EDM Algorithm 1 with S_churn = 0: Euler step, then a trapezoidal correction unless σ_next = 0."""
        s = self.convention.sigmas
        grid = karras_sigmas(self.steps, s.sigma_min, s.sigma_max, s.rho).tolist() + [0.0] if self.steps > 1 else [s.sigma_max, 0.0]
        x, denoise = _start(self.convention, net, noise, start, count, grid[0])
        for sigma, sigma_next in zip(grid[:-1], grid[1:]):
            d = (x - denoise(x, sigma)) / sigma
            x_next = x + (sigma_next - sigma) * d
            if sigma_next > 0:
                d_next = (x_next - denoise(x_next, sigma_next)) / sigma_next
                x_next = x + (sigma_next - sigma) * 0.5 * (d + d_next)
            x = x_next
        return x.clamp(-1.0, 1.0)


def _positive(flag: str, value: int) -> int:
    if value < 1:
        raise LcscError(f"{flag} {value}: must be at least 1")
    return value


def build_ddim(convention: Convention, nfe: int | None, steps: int | None, ts: Sequence[int] | None, order: int | None) -> DDIMSampler:
    if nfe is not None and steps is not None and nfe != steps:
        raise LcscError(f"--nfe {nfe} and --grid-steps {steps} disagree; DDIM makes one evaluation per step")
    return DDIMSampler(convention, _positive("--nfe", nfe or steps or 15))


def build_dpmsolver(convention: Convention, nfe: int | None, steps: int | None, ts: Sequence[int] | None, order: int | None) -> DPMSolverPPSampler:
    if nfe is not None and steps is not None and nfe != steps:
        raise LcscError(f"--nfe {nfe} and --grid-steps {steps} disagree; DPM-Solver++ multistep makes one evaluation per step")
    if order not in (None, 1, 2, 3):
        raise LcscError(f"--order {order}: DPM-Solver++ multistep supports orders 1, 2 and 3")
    return DPMSolverPPSampler(convention, _positive("--nfe", nfe or steps or 15), order or 3)


def build_heun(convention: Convention, nfe: int | None, steps: int | None, ts: Sequence[int] | None, order: int | None) -> HeunSampler:
    if steps is None and nfe is not None:
        if nfe % 2 == 0:
            raise LcscError(f"--nfe {nfe}: Heun makes 2·steps − 1 evaluations, so give an odd --nfe (or --grid-steps)")
        steps = (nfe + 1) // 2
    sampler = HeunSampler(convention, _positive("--grid-steps", steps or 18))
    if nfe is not None and nfe != sampler.nfe:
        raise LcscError(f"--nfe {nfe} disagrees with --grid-steps {steps} (Heun: {sampler.nfe} evaluations)")
    return sampler
