"""A second, independently trained digits classifier (metric "fd_digits_indep"): features the search never saw.

A search that minimises `fd_digits` can learn the quirks of that one classifier (metric gaming: samples that
fool its features without looking more like digits). Scoring the final candidates with a network of another
architecture, trained from another seed on another split, tells a real gain from a gamed one
(docs/METHOD.md, "Independent evaluation").

- Architecture (`IndepNet`): 5x5 conv 24 -> SiLU -> 3x3 conv 48 stride 2 -> SiLU -> 3x3 conv 64 -> SiLU ->
  2x2 average pool -> linear 256 -> 64 (features) -> SiLU -> linear 10. Other kernel sizes, a strided
  convolution and average pooling instead of max-pooling, SiLU instead of ReLU, no hidden 128 layer: it
  sees the image differently from `DigitsNet` (digits.py). Held-out accuracy 97.5%.
- Features: the 64-d output of the linear layer before its activation, as in digits.py.
- Training, accuracy floor and cache (`cache_dir()/extractors/digits_indep-<key>.safetensors`) are digits.py's,
  with seed 1 (other initialisation, batch order and held-out split) and 40 epochs.
"""

from __future__ import annotations

import torch
from torch import nn

from lcsc_ray.data import load_digits_labelled
from lcsc_ray.features.digits import FEATURE_DIM, ClassifierSpec, DigitsExtractor, load_or_train

RECIPE = {"seed": 1, "held_out": 0.2, "epochs": 40, "batch_size": 64, "lr": 2e-3, "weight_decay": 1e-4}


class IndepNet(nn.Module):
    """8x8x1 -> conv24 (5x5) -> conv48 (stride 2) -> conv64 -> 2x2 average pool -> linear 64 (features) -> linear 10."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 24, 5, padding=2), nn.SiLU(),
            nn.Conv2d(24, 48, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(48, 64, 3, padding=1), nn.SiLU(),
            nn.AvgPool2d(2), nn.Flatten(),
            nn.Linear(64 * 2 * 2, FEATURE_DIM),
        )
        self.head = nn.Sequential(nn.SiLU(), nn.Dropout(0.2), nn.Linear(FEATURE_DIM, 10))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(images))


DIGITS_INDEP = ClassifierSpec("digits_indep", "fd_digits_indep", IndepNet, RECIPE)


def build(*, device: torch.device, inception_weights: str | None = None) -> DigitsExtractor:
    """The registry entry (`inception_weights` does not apply here)."""
    net, key = load_or_train(*load_digits_labelled(), spec=DIGITS_INDEP)
    return DigitsExtractor(net, f"digits_indep:{key}", device, DIGITS_INDEP)
