"""Samplers: turn a raw network (possibly merged weights) and fixed noise into images.

Registry keyed by the sampler family of the run's denoiser convention (`cm`: consistency functions, `dm`:
EDM denoisers, `diffusers`: diffusers UNets on their own schedulers; lcsc_ray/conventions.py) and the name
users type (`--sampler`); a new sampler is a new builder in its module plus one entry here. Builders take
(convention, nfe, steps, ts, order) and validate them.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
from torch import nn

from lcsc_ray.errors import LcscError
from lcsc_ray.noise import FixedNoise
from lcsc_ray.run_folder import RunInfo
from lcsc_ray.sampling import cm, dm, schedulers


class Sampler(Protocol):
    name: str
    nfe: int

    def sample(self, net: nn.Module, noise: FixedNoise, start: int, count: int) -> torch.Tensor:
        """Images for noise samples start..start+count-1: [count, C, H, W] in [-1, 1], on the net's device."""


SAMPLERS: dict[str, dict[str, Callable[..., Sampler]]] = {
    "cm": {"onestep": cm.build_onestep, "multistep": cm.build_multistep},
    "dm": {"dpmsolver++": dm.build_dpmsolver, "ddim": dm.build_ddim, "heun": dm.build_heun},
    "diffusers": {"dpmsolver++": schedulers.build_dpmsolver, "ddim": schedulers.build_ddim},
}
DEFAULT_SAMPLER = {"cm": "onestep", "dm": "dpmsolver++", "diffusers": "dpmsolver++"}
_COMMAND = {"cm": "tune_cm.py", "dm": "tune_dm.py", "diffusers": "tune_dm.py"}


def build_sampler(
    run: RunInfo, name: str | None = None, *, nfe: int | None = None, steps: int | None = None,
    ts: Sequence[int] | None = None, order: int | None = None, sigmas: Sequence[float] | None = None,
) -> Sampler:
    """The sampler `name` (default: onestep for CM, 3rd-order DPM-Solver++ for DM) for this run's convention;
    `sigmas` (noise levels given directly) only fits the CM multistep sampler."""
    convention = run.convention
    family = convention.family
    name = name or DEFAULT_SAMPLER[family]
    builders = SAMPLERS[family]
    if name not in builders:
        raise LcscError(f"--sampler {name!r} does not fit this run (convention {convention.name!r}, searched with "
                        f"{_COMMAND[family]}); use one of {sorted(builders)}")
    if sigmas is not None:
        if builders[name] is not cm.build_multistep:
            raise LcscError(f"--sigmas applies to the CM multistep sampler only, not {name!r}; drop it")
        return cm.build_multistep(convention, nfe, steps, ts, order, sigmas)
    return builders[name](convention, nfe, steps, ts, order)


def sampler_options(args: argparse.Namespace) -> dict[str, Any]:
    """The sampler keyword arguments of `build_sampler` that the command line gave (the flags --nfe,
    --grid-steps, --ts, --sigmas, --order), without the ones left at None."""
    flags = {"nfe": args.nfe, "steps": args.grid_steps, "ts": args.ts, "sigmas": args.sigmas, "order": args.order}
    return {key: value for key, value in flags.items() if value is not None}


def generate_batches(sampler: Sampler, net: nn.Module, noise: FixedNoise, num_samples: int, batch_size: int) -> Iterator[torch.Tensor]:
    """Samples 0..num_samples-1 in batches of at most `batch_size` (same images for any batch size)."""
    if batch_size < 1:
        raise LcscError(f"--batch-size {batch_size}: must be at least 1")
    for start in range(0, num_samples, batch_size):
        yield sampler.sample(net, noise, start, min(batch_size, num_samples - start))


__all__ = ["DEFAULT_SAMPLER", "SAMPLERS", "Sampler", "build_sampler", "generate_batches", "sampler_options"]
