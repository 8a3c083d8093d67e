"""Build a seeded Nevergrad optimizer by the name users type (`--optimizer lcsc-es|TwoPointsDE|CMA|...`).

The registry is Nevergrad's own (`ng.optimizers.registry`); importing this module registers `lcsc-es`.
Guards (seen with Ray 2.60, Nevergrad 1.0.12, numpy 2.4; docs/RAY_NEVERGRAD.md, Optimizers that must be avoided):
- `NGOpt` (and its numbered variants) crashes inside `ask` with numpy >= 2.3 at small K and routes bounded
  arrays to Cobyla, which cannot be pickled with the experiment: it is replaced by `CMA` (what it would
  pick for a continuous bounded space with a large budget) and a note is printed.
- An optimizer must pickle (Ray saves the searcher with the experiment; resume depends on it) and accept
  told-but-not-asked points (the warm-start baselines): both are checked here, so a bad choice fails at
  launch with a one-line message instead of hours later.
"""

from __future__ import annotations

import difflib
import pickle

import nevergrad as ng
import numpy as np
from nevergrad.common.errors import TellNotAskedNotSupportedError
from nevergrad.optimization.optimizerlib import registry

import lcsc_ray.search.lcsc_es  # noqa: F401 - registers "lcsc-es" in Nevergrad's registry
from lcsc_ray.errors import LcscError

NGOPT_REPLACEMENT = "CMA"
SAFE_CHOICES = "lcsc-es, CMA, DiagonalCMA, TwoPointsDE, DE, OnePlusOne"


def resolve_optimizer_name(name: str) -> str:
    """The registry's spelling of `name` (case-insensitive), NGOpt mapped to a safe choice."""
    by_lower = {key.lower(): key for key in registry}
    resolved = by_lower.get(name.strip().lower())
    if resolved is None:
        close = difflib.get_close_matches(name.strip().lower(), list(by_lower), n=3)
        hint = f" (did you mean {', '.join(by_lower[c] for c in close)}?)" if close else ""
        raise LcscError(f"unknown --optimizer {name!r}{hint}; try one of: {SAFE_CHOICES}")
    if resolved.startswith("NGOpt"):
        print(
            f"note: --optimizer {resolved} is unsafe with this numpy/Ray (crashes in ask, routes to the "
            f"unpicklable Cobyla); using {NGOPT_REPLACEMENT} instead"
        )
        return NGOPT_REPLACEMENT
    return resolved


def build_optimizer(
    name: str, parametrization: ng.p.Parameter, *, budget: int, num_workers: int, seed: int
) -> ng.optimizers.base.Optimizer:
    """A seeded optimizer over a copy of `parametrization`, checked to pickle and to accept warm starts."""
    resolved = resolve_optimizer_name(name)
    factory = registry[resolved]
    probe = factory(parametrization.copy(), budget=budget, num_workers=num_workers)
    try:
        probe.tell(probe.parametrization.spawn_child(), 0.0)
    except TellNotAskedNotSupportedError:
        raise LcscError(
            f"--optimizer {resolved} cannot take the warm-start baselines (told-but-not-asked points); "
            f"choose one of: {SAFE_CHOICES}"
        ) from None
    param = parametrization.copy()
    param.random_state = np.random.RandomState(seed)
    optimizer = factory(param, budget=budget, num_workers=num_workers)
    try:
        pickle.dumps(optimizer)
    except Exception as error:  # noqa: BLE001 - any pickling failure means the experiment cannot resume
        raise LcscError(
            f"--optimizer {resolved} cannot be pickled with the experiment ({type(error).__name__}), so the "
            f"search could not resume; choose one of: {SAFE_CHOICES}"
        ) from None
    return optimizer
