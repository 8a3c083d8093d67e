"""EDM diffusion training loss (Karras et al. 2022, "Elucidating the Design Space...", Sec. 5 and Table 1).

ln σ ~ N(P_mean, P_std²) with P_mean −1.2, P_std 1.2; loss λ(σ)·‖D_θ(x + σn, σ) − x‖² with
λ(σ) = (σ² + σ_d²)/(σ·σ_d)², which makes the effective target of the raw network unit-variance.
"""

from __future__ import annotations

import torch
from torch import nn

from lcsc_ray.precond import SigmaConfig, edm_denoiser

DM_DEFAULTS = {"p_mean": -1.2, "p_std": 1.2}


def edm_loss(
    net: nn.Module, x0: torch.Tensor, step: int, total_steps: int, sigmas: SigmaConfig, settings: dict,
    generator: torch.Generator,
) -> torch.Tensor:
    """The EDM training loss averaged over the batch (`step`/`total_steps` unused: no curriculum)."""
    ln_sigma = torch.randn(x0.shape[0], generator=generator) * settings["p_std"] + settings["p_mean"]
    sigma = ln_sigma.exp().to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device) * sigma.view(-1, 1, 1, 1)
    denoised = edm_denoiser(net, x0 + noise, sigma.double(), sigmas.sigma_data)
    sd = sigmas.sigma_data
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
    return (weight * (denoised - x0).flatten(1).square().mean(1)).mean()
