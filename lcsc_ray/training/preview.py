"""A PNG grid of samples from a run's default sampler: the quick visual check after training."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.utils import save_image

from lcsc_ray.atomic import atomic_write
from lcsc_ray.noise import FixedNoise
from lcsc_ray.run_folder import RunInfo
from lcsc_ray.sampling import Sampler, build_sampler


def write_sample_grid(run: RunInfo, net: nn.Module, path: Path, count: int = 100, seed: int = 0, scale: int = 4,
                      sampler: Sampler | None = None) -> Path:
    """Sample `count` images with fixed noise (the run's default sampler unless `sampler` is given) and save
    them as a square grid, upscaled `scale`x (nearest)."""
    images = (sampler or build_sampler(run)).sample(net, FixedNoise(seed, run.image_shape), 0, count)
    images = torch.nn.functional.interpolate((images + 1) / 2, scale_factor=scale, mode="nearest")
    nrow = max(1, int(count**0.5))
    return atomic_write(path, lambda tmp: save_image(images, str(tmp), nrow=nrow, padding=2, pad_value=0.5))
