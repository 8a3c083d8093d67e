"""Evaluation noise as a pure function of (seed, stream, sample index).

Every candidate model in a search must see the same initial noise and the same per-step noise, whatever the
batch size, the batch's position, or the number and kind of devices. Noise is therefore drawn on the CPU
(CUDA and CPU generators differ) in fixed blocks of BLOCK samples, each block from its own generator seeded
by numpy's SeedSequence((seed, stream, block)), and then sliced: sample i of stream s is always the same
tensor. Stream 0 is the initial noise x_T / σ_max; stream k ≥ 1 is the noise injected before step k.
"""

from __future__ import annotations

import numpy as np
import torch

BLOCK = 256  # samples per generator block; part of the noise definition, so never change it


class FixedNoise:
    """Standard normal noise indexed by (stream, sample index) for images of `shape` = (C, H, W)."""

    def __init__(self, seed: int, shape: tuple[int, int, int]):
        self.seed = int(seed)
        self.shape = tuple(int(s) for s in shape)

    def _block(self, stream: int, block: int) -> torch.Tensor:
        state = np.random.SeedSequence((self.seed, stream, block)).generate_state(2, dtype=np.uint32)
        generator = torch.Generator(device="cpu").manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)
        return torch.randn((BLOCK, *self.shape), generator=generator, dtype=torch.float32)

    def normal(self, stream: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Samples start..start+count-1 of `stream`: [count, C, H, W] float32 standard normal on `device`."""
        if start < 0 or count < 0 or stream < 0:
            raise ValueError(f"stream, start and count must be non-negative, got {stream}, {start}, {count}")
        first, last = start // BLOCK, (start + count - 1) // BLOCK
        blocks = [self._block(stream, b) for b in range(first, last + 1)] if count else []
        out = torch.cat(blocks)[start - first * BLOCK : start - first * BLOCK + count] if count else torch.empty((0, *self.shape))
        return out.to(device)
