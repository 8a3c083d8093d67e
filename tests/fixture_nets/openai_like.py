"""A tiny stand-in for OpenAI consistency_models' `UNetModel`: called `net(x, timesteps, y=None)` with the
c_in-scaled input and t = 1000·¼·ln σ, returning an image-shaped output; `label_emb` when class-conditional."""

from __future__ import annotations

import torch
from torch import nn


class TinyUNetModel(nn.Module):
    def __init__(self, in_channels: int = 1, model_channels: int = 8, num_classes: int | None = None):
        super().__init__()
        self.inp = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        self.time = nn.Linear(1, model_channels)
        self.label_emb = nn.Embedding(num_classes, model_channels) if num_classes else None
        self.out = nn.Conv2d(model_channels, in_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time(timesteps.view(-1, 1).float() / 1000.0)
        if self.label_emb is not None:
            emb = emb + self.label_emb(y)
        return self.out(torch.tanh(self.inp(x) + emb[:, :, None, None]))


def create_model(in_channels: int = 1, model_channels: int = 8, num_classes: int = 0) -> nn.Module:
    """The model factory a user names with --model-factory fixture_nets.openai_like:create_model."""
    return TinyUNetModel(in_channels, model_channels, num_classes or None)


class TimeProbe(nn.Module):
    """Returns its time input t everywhere, so a test reads back exactly what the convention fed it."""

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return timesteps.view(-1, 1, 1, 1).to(x.dtype).expand_as(x)
