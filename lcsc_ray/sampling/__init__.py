"""Samplers: turn a raw network (possibly merged weights) and fixed noise into images.

Registry keyed by run kind and the name users type (`--sampler`); a new sampler is a new builder in its
module plus one entry here. Builders take (σ constants, nfe, steps, ts, order) and validate them.
"""

from __future__ import annotations

from typing import Callable, Iterator, Protocol, Sequence

import torch
from torch import nn

from lcsc_ray.errors import LcscError
from lcsc_ray.noise import FixedNoise
from lcsc_ray.run_folder import RunInfo
from lcsc_ray.sampling import cm, dm


class Sampler(Protocol):
    name: str
    nfe: int

    def sample(self, net: nn.Module, noise: FixedNoise, start: int, count: int) -> torch.Tensor:
        """Images for noise samples start..start+count-1: [count, C, H, W] in [-1, 1], on the net's device."""


SAMPLERS: dict[str, dict[str, Callable[..., Sampler]]] = {
    "cm": {"onestep": cm.build_onestep, "multistep": cm.build_multistep},
    "dm": {"dpmsolver++": dm.build_dpmsolver, "ddim": dm.build_ddim, "heun": dm.build_heun},
}
DEFAULT_SAMPLER = {"cm": "onestep", "dm": "dpmsolver++"}


def build_sampler(
    run: RunInfo, name: str | None = None, *, nfe: int | None = None, steps: int | None = None,
    ts: Sequence[int] | None = None, order: int | None = None,
) -> Sampler:
    """The sampler `name` (default: onestep for CM, 3rd-order DPM-Solver++ for DM) for this run's σ constants."""
    name = name or DEFAULT_SAMPLER[run.kind]
    builders = SAMPLERS[run.kind]
    if name not in builders:
        raise LcscError(f"--sampler {name!r} is not a {run.kind.upper()} sampler; use one of {sorted(builders)}")
    return builders[name](run.sigmas, nfe, steps, ts, order)


def generate_batches(sampler: Sampler, net: nn.Module, noise: FixedNoise, num_samples: int, batch_size: int) -> Iterator[torch.Tensor]:
    """Samples 0..num_samples-1 in batches of at most `batch_size` (same images for any batch size)."""
    if batch_size < 1:
        raise LcscError(f"--batch-size {batch_size}: must be at least 1")
    for start in range(0, num_samples, batch_size):
        yield sampler.sample(net, noise, start, min(batch_size, num_samples - start))


__all__ = ["DEFAULT_SAMPLER", "SAMPLERS", "Sampler", "build_sampler", "generate_batches"]
