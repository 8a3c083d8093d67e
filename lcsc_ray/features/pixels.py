"""Pixel "features" (metric "fd_pixels"): a Fréchet distance on the images themselves, no network at all.

It is the one metric no feature network can be gamed for, which makes it the untouched check when both
digits classifiers take part in a search and its selection (`--select-on independent`). It is blunt: it sees
mean brightness, contrast and pixel correlations, not whether a stroke is a digit. Images are averaged over
channels and area-pooled to 8x8 (64 features), which for the 8x8 digits are the pixels themselves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SIDE = 8


class PixelExtractor:
    """Images in [-1, 1] [N, C, H, W] -> [N, 64]: channel mean, area-pooled to 8x8, clamped like saved images."""

    name = "pixels"
    metric_name = "fd_pixels"
    dim = SIDE * SIDE
    identity = "pixels:mean-channels-area-8x8"

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        gray = images.clamp(-1.0, 1.0).float().mean(dim=1, keepdim=True)
        return F.adaptive_avg_pool2d(gray, SIDE).flatten(1)


def build(*, device: torch.device, inception_weights: str | None = None) -> PixelExtractor:
    """The registry entry (`inception_weights` does not apply here)."""
    return PixelExtractor(device)
