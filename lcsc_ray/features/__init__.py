"""Feature extractors: images [N, C, H, W] in [-1, 1] -> features [N, dim] for a Fréchet distance.

One module per extractor, one entry per name in `EXTRACTORS` (the name users type for `--extractor`). Each
module exposes `build(*, device, inception_weights) -> FeatureExtractor` (or another function named as
`module:function`); adding an extractor is a new file and one line here. The metric an extractor yields is
named for what it is: only InceptionV3 pool3 features with the FID weights give an "fid"; the same network
with random weights (`inception-random`, for timing checks) gives "fd_inception_random", the digits
classifier "fd_digits", and the second, independently trained digits classifier "fd_digits_indep" (used to
check the search's result on features it never saw), and the images themselves "fd_pixels".
"""

from __future__ import annotations

import importlib
from typing import Protocol

import torch

from lcsc_ray.devices import resolve_device
from lcsc_ray.errors import LcscError


class FeatureExtractor(Protocol):
    """What the statistics, reference files and the evaluator need from an extractor."""

    name: str  # registry name, stored in reference statistics ("inception", "digits")
    metric_name: str  # what the resulting Fréchet distance is called ("fid", "fd_digits")
    dim: int  # feature dimension d
    device: torch.device  # where images must be for __call__
    identity: str  # changes whenever the features would change (weights/recipe hash): a cache key

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, C, H, W] float in [-1, 1] on `device` -> features [N, dim], computed without grad."""
        ...


# name -> module implementing `build`; imported lazily so `digits` does not pay for torchvision's Inception.
EXTRACTORS: dict[str, str] = {
    "inception": "lcsc_ray.features.inception",
    "inception-random": "lcsc_ray.features.inception:build_random",
    "digits": "lcsc_ray.features.digits",
    "digits_indep": "lcsc_ray.features.digits_indep",
    "pixels": "lcsc_ray.features.pixels",
}


def build_extractor(name: str, *, device: str | torch.device = "cpu",
                    inception_weights: str | None = None) -> FeatureExtractor:
    """Build the extractor registered as `name` on `device` (`inception_weights` is used by `inception` only)."""
    if name not in EXTRACTORS:
        raise LcscError(f"--extractor {name!r} is unknown; choose one of: {', '.join(sorted(EXTRACTORS))}")
    module, _, function = EXTRACTORS[name].partition(":")
    build = getattr(importlib.import_module(module), function or "build")
    return build(device=resolve_device(device), inception_weights=inception_weights)
