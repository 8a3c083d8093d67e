"""Consistency training (CT) loss, improved-CT variant (Song & Dhariwal 2023, "Improved Techniques for
Training Consistency Models", iCT), on the OpenAI conventions (lcsc_ray/precond.py).

Choices (documented in run.json under `training`):
- Karras σ grid with σ_min 0.002, σ_max 80, ρ 7 and boundary-condition scalings (lcsc_ray/precond.py).
- Growing discretisation N(k) = min(s₀·2^⌊k/K'⌋, s₁) + 1, K' = ⌊K / (⌊log₂(s₁/s₀)⌋ + 1)⌋ (iCT Eq. 11).
  With `curriculum_end` = f (a fraction of training) the doublings are spread over the first f·K steps
  instead, K' = ⌊f·K / ⌈log₂(s₁/s₀)⌉⌋, so N reaches s₁ at step f·K and is held there: the last (1 − f)·K
  steps train one fixed objective, the window LCSC combines in the digits demo (docs/TRAINING.md).
- No target EMA: the target is the online network under stop-gradient (iCT Sec. 3.2); a separate training EMA
  is kept for evaluation only (lcsc_ray/training/loop.py).
- Noise-level index sampled from the discretised log-normal p(i) (iCT Eq. 10, P_mean −1.1, P_std 2.0),
  weight λ(σᵢ) = 1/(σᵢ₊₁ − σᵢ) (iCT Sec. 3.4), pseudo-Huber distance √(‖a−b‖² + c²) − c with c = 0.00054·√d
  (iCT Sec. 3.3).
- With dropout, the target and the prediction see the same dropout masks (the random state is replayed for
  the prediction, as ECT does): with masks of their own the target is a different random sub-network every
  step and the run does not learn (measured on the digits demo, docs/TRAINING.md).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lcsc_ray.precond import SigmaConfig, consistency_fn, karras_sigmas, log_normal_cdf_weights

CT_DEFAULTS = {"s0": 10, "s1": 1280, "p_mean": -1.1, "p_std": 2.0}


def discretisation_steps(step: int, total_steps: int, s0: int, s1: int, curriculum_end: float | None = None) -> int:
    """N(k), the number of grid points at training step k (iCT Eq. 11, exponential curriculum; held at s₁
    from step `curriculum_end`·K on when that fraction is given)."""
    if curriculum_end is None:
        k_prime = max(1, math.floor(total_steps / (math.floor(math.log2(s1 / s0)) + 1)))
    else:
        k_prime = max(1, math.floor(curriculum_end * total_steps / max(1, math.ceil(math.log2(s1 / s0)))))
    return min(s0 * 2 ** (step // k_prime), s1) + 1


def ct_loss(
    net: nn.Module, x0: torch.Tensor, step: int, total_steps: int, sigmas: SigmaConfig, settings: dict,
    generator: torch.Generator,
) -> torch.Tensor:
    """The iCT loss λ(σᵢ)·d(f_θ(x + σᵢ₊₁z, σᵢ₊₁), sg f_θ(x + σᵢz, σᵢ)) averaged over the batch."""
    n = discretisation_steps(step, total_steps, settings["s0"], settings["s1"], settings.get("curriculum_end"))
    grid = karras_sigmas(n, sigmas.sigma_min, sigmas.sigma_max, sigmas.rho).flip(0)  # ascending
    probs = log_normal_cdf_weights(grid, settings["p_mean"], settings["p_std"])
    i = torch.multinomial(probs, x0.shape[0], replacement=True, generator=generator)
    sigma_lo, sigma_hi = grid[i].to(x0.device), grid[i + 1].to(x0.device)
    z = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)  # CPU generator: resumable
    shape = (-1, 1, 1, 1)
    x_hi = x0 + sigma_hi.to(x0.dtype).view(shape) * z
    x_lo = x0 + sigma_lo.to(x0.dtype).view(shape) * z
    # fork_rng restores the random state on exit, so the prediction draws the target's dropout masks again
    with torch.random.fork_rng(devices=[x0.device] if x0.device.type == "cuda" else []), torch.no_grad():
        target = consistency_fn(net, x_lo, sigma_lo, sigmas.sigma_min, sigmas.sigma_data)
    pred = consistency_fn(net, x_hi, sigma_hi, sigmas.sigma_min, sigmas.sigma_data)
    c = 0.00054 * math.sqrt(x0[0].numel())
    distance = torch.sqrt((pred - target).flatten(1).square().sum(1) + c**2) - c
    weight = (1.0 / (sigma_hi - sigma_lo)).to(x0.dtype)
    return (weight * distance).mean()
