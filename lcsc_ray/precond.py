"""Noise levels and network preconditioning for consistency models (CM) and EDM diffusion models (DM).

Pure numerics, no I/O. Conventions are the OpenAI consistency-model ones (docs/METHOD.md) so that numbers
stay comparable: σ_min 0.002, σ_max 80, ρ 7, σ_data 0.5. A raw network `F(x_in, c_noise)` is wrapped as

    CM:  f(x, σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, c_noise(σ))   (boundary condition f(x, σ_min) = x)
    DM:  D(x, σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, c_noise(σ))   (EDM, Karras et al. 2022, Table 1)

The wrappers are functions, not modules, so checkpoints hold only the raw network's tensors. Samplers reach
them through the `ours` convention of lcsc_ray/conventions.py, which also knows other code bases' networks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class SigmaConfig:
    """The σ constants a run is trained with; stored in run.json under `precond`."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    sigma_data: float = 0.5

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------------------


def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """The N-point Karras grid, descending from σ_max (index 0) to σ_min (index N-1), float64.

    σᵢ = (σ_max^{1/ρ} + i/(N−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ   (Karras et al. 2022, Eq. 5).
    With N=18 this is the grid of the published CIFAR-10 multistep sampler `ts=0,10,17` (σ₁₀ ≈ 1.09).
    """
    if n < 2:
        raise ValueError(f"a Karras grid needs at least 2 points, got {n}")
    ramp = torch.arange(n, dtype=torch.float64) / (n - 1)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def c_noise(sigma: torch.Tensor) -> torch.Tensor:
    """Noise conditioning input c_noise(σ) = ¼·ln σ (EDM Table 1; OpenAI CM feeds 1000·¼·ln σ, i.e. the same
    quantity, and our U-Net applies the ×1000 inside its sinusoidal embedding)."""
    return 0.25 * torch.log(sigma)


def consistency_scalings(
    sigma: torch.Tensor, sigma_min: float = 0.002, sigma_data: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c_skip, c_out, c_in) of the boundary-condition parameterisation (Song et al. 2023, App. C):

    c_skip = σ_d² / ((σ−σ_min)² + σ_d²),  c_out = (σ−σ_min)·σ_d / √(σ²+σ_d²),  c_in = 1/√(σ²+σ_d²),
    so c_skip(σ_min) = 1 and c_out(σ_min) = 0: f(x, σ_min) = x exactly.
    """
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = (sigma - sigma_min) * sigma_data / torch.sqrt(sigma**2 + sigma_data**2)
    c_in = 1.0 / torch.sqrt(sigma**2 + sigma_data**2)
    return c_skip, c_out, c_in


def edm_scalings(sigma: torch.Tensor, sigma_data: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c_skip, c_out, c_in) of the EDM denoiser (Karras et al. 2022, Table 1, "Ours"):

    c_skip = σ_d²/(σ²+σ_d²),  c_out = σ·σ_d/√(σ²+σ_d²),  c_in = 1/√(σ²+σ_d²).
    """
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / torch.sqrt(sigma**2 + sigma_data**2)
    c_in = 1.0 / torch.sqrt(sigma**2 + sigma_data**2)
    return c_skip, c_out, c_in


def _apply(net: nn.Module, x: torch.Tensor, sigma: torch.Tensor, scalings: tuple) -> torch.Tensor:
    """c_skip·x + c_out·F(c_in·x, c_noise(σ)) with per-sample σ broadcast over C, H, W."""
    c_skip, c_out, c_in = (s.to(x.dtype).view(-1, 1, 1, 1) for s in scalings)
    return c_skip * x + c_out * net(c_in * x, c_noise(sigma).to(x.dtype))


def per_sample_sigma(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """σ as a float64 vector of one value per sample of `x` (a scalar is broadcast)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma.to(torch.float64)


def consistency_fn(
    net: nn.Module, x: torch.Tensor, sigma: torch.Tensor | float, sigma_min: float = 0.002, sigma_data: float = 0.5
) -> torch.Tensor:
    """The consistency function f(x, σ) of a raw network (Song et al. 2023); σ is a scalar or one per sample."""
    sigma = per_sample_sigma(sigma, x)
    return _apply(net, x, sigma, consistency_scalings(sigma, sigma_min, sigma_data))


def edm_denoiser(net: nn.Module, x: torch.Tensor, sigma: torch.Tensor | float, sigma_data: float = 0.5) -> torch.Tensor:
    """The EDM denoiser D(x, σ) ≈ E[x₀ | x] of a raw network (Karras et al. 2022, Eq. 7 and Table 1)."""
    sigma = per_sample_sigma(sigma, x)
    return _apply(net, x, sigma, edm_scalings(sigma, sigma_data))


def log_normal_cdf_weights(sigmas: torch.Tensor, p_mean: float, p_std: float) -> torch.Tensor:
    """Probabilities of the intervals [σᵢ, σᵢ₊₁] of an ascending grid under ln σ ~ N(p_mean, p_std²):
    p(i) ∝ erf((ln σᵢ₊₁ − P_mean)/(√2 P_std)) − erf((ln σᵢ − P_mean)/(√2 P_std))  (iCT, Song & Dhariwal 2023, Eq. 10)."""
    cdf = torch.erf((torch.log(sigmas) - p_mean) / (math.sqrt(2.0) * p_std))
    weights = cdf[1:] - cdf[:-1]
    return weights / weights.sum()
