"""Tiny stand-ins for NVlabs EDM's `EDMPrecond` and ECT's `ECMPrecond`: whole modules with their
preconditioning inside, called `net(x, sigma, class_labels)` and returning the denoised image, with the
attributes the samplers and detection read (img_resolution, img_channels, label_dim, sigma_min/max/data)."""

from __future__ import annotations

import torch
from torch import nn


class TinyEDMPrecond(nn.Module):
    def __init__(self, img_resolution: int = 8, img_channels: int = 1, label_dim: int = 0, channels: int = 8,
                 sigma_min: float = 0.0, sigma_max: float = float("inf"), sigma_data: float = 0.5):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data
        self.inp = nn.Conv2d(img_channels, channels, 3, padding=1)
        self.noise = nn.Linear(1 + label_dim, channels)
        self.out = nn.Conv2d(channels, img_channels, 3, padding=1)
        # A constant float buffer, identical in every snapshot, like EDM's resample filters.
        self.register_buffer("resample_filter", torch.full((1, 1, 2, 2), 0.25))

    def model(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        cond = c_noise.view(-1, 1)
        if self.label_dim:
            cond = torch.cat([cond, class_labels.to(cond.dtype).reshape(-1, self.label_dim)], dim=1)
        h = torch.tanh(self.inp(x) + self.noise(cond)[:, :, None, None])
        return self.out(h) * (4 * self.resample_filter.sum())  # exactly 4 × out(h) while the filter is untouched

    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sd = self.sigma_data
        return sd**2 / (sigma**2 + sd**2), sigma * sd / (sigma**2 + sd**2).sqrt()

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        c_skip, c_out = self.scalings(sigma)
        c_in = 1 / (self.sigma_data**2 + sigma**2).sqrt()
        dtype = self.inp.weight.dtype
        f = self.model((c_in * x).to(dtype), (sigma.log() / 4).flatten().to(dtype), class_labels)
        return c_skip * x + c_out * f.to(torch.float32)


class TinyECMPrecond(TinyEDMPrecond):
    """ECT's consistency parameterisation: boundary scalings in eval mode, so f(x, σ_min) = x."""

    def __init__(self, **kwargs):
        super().__init__(**{"sigma_min": 0.002, "sigma_max": 80.0, **kwargs})

    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sd, lo = self.sigma_data, self.sigma_min
        return sd**2 / ((sigma - lo) ** 2 + sd**2), (sigma - lo) * sd / (sigma**2 + sd**2).sqrt()


class Payload:
    """Unpickling this opens (creates) `path`: a stand-in for a malicious snapshot."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _reconstruct_fragile(meta: dict) -> "FragileLoss":
    obj = FragileLoss.__new__(FragileLoss)
    obj.__dict__.update(dict(meta["state"]))  # TypeError "'NoneType' object is not iterable" for a lost state
    obj.__dict__["_reconstructed"] = True
    return obj


class FragileLoss:
    """A persistent-class object like ECT's loss: the original pickles and loads, but the unpickled copy
    pickles without its state, so loading that second pickle fails the way NVlabs' persistence does."""

    def __init__(self) -> None:
        self.P_mean = -1.1

    def __reduce__(self):
        state = None if self.__dict__.get("_reconstructed") else dict(self.__dict__)
        return (_reconstruct_fragile, ({"type": "class", "state": state},))
