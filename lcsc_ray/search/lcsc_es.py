"""`lcsc-es`: the paper's evolutionary search for combination coefficients ("Algorithm 1"; docs/METHOD.md, The search) as
a Nevergrad optimizer, so it runs under Ray Tune's `NevergradSearch`, pickles with the experiment and resumes.

Algorithm 1 as implemented (a steady-state (μ + λ) evolution strategy):
- Population: the μ best candidates told so far (asked or not), ranked by loss (lower is better; ties by
  tell order, so the ranking is deterministic). "Survivors by fitness": a tell inserts the candidate and
  truncates to μ.
- Seeding: the baseline profiles (newest, uniform, EMA rates) reach it as told-but-not-asked points
  (Ray's `points_to_evaluate` → `optimizer.suggest` → `tell`), so they enter the population like any
  other member. Before anything is told, candidates are drawn around the space's centre.
- Offspring: a parent drawn uniformly from the μ best, plus Gaussian mutation N(0, s²I) in Nevergrad's
  standardized space, i.e. each coefficient moves by s·σ where σ is the space's mutation scale
  (`search_spaces.spaces`: 1/√D, about unit Euclidean norm per mutation). The paper's renormalisation to
  Σα = 1 is the space's job (affine projection), not the optimizer's.
- λ: one offspring per ask; with `num_workers` > 1 up to `num_workers` offspring are in flight at once,
  each drawn from the population as it stands when asked (asynchronous, so no worker waits for a
  generation to finish, as a generational evolution loop would).

Defaults (the paper does not state them, so ours are documented here): μ = 8, a population large
enough to hold every baseline of a typical run (newest, uniform, 3-4 EMA rates) plus a few discoveries,
small enough that selection pressure stays high over a 2K-trial budget; s = 1.0, one space σ.
All randomness comes from `parametrization.random_state`, so the same seed gives the same run.
"""

from __future__ import annotations

import math

import numpy as np
from nevergrad.optimization import base
from nevergrad.optimization.optimizerlib import registry
from nevergrad.parametrization import parameter as p

DEFAULT_MU = 8
DEFAULT_MUTATION_SCALE = 1.0


class _LcscES(base.Optimizer):
    """The optimizer instance Nevergrad builds; configure it through `LcscES` / the "lcsc-es" registry name."""

    def __init__(
        self,
        parametrization: base.IntOrParameter,
        budget: int | None = None,
        num_workers: int = 1,
        *,
        mu: int = DEFAULT_MU,
        mutation_scale: float = DEFAULT_MUTATION_SCALE,
    ) -> None:
        super().__init__(parametrization, budget=budget, num_workers=num_workers)
        if mu < 1 or not (math.isfinite(mutation_scale) and mutation_scale > 0):
            raise ValueError(f"lcsc-es needs mu >= 1 and mutation_scale > 0, got mu={mu}, scale={mutation_scale}")
        self.mu = int(mu)
        self.mutation_scale = float(mutation_scale)
        # (loss, tell order, standardized data), sorted best first, at most mu entries.
        self.population: list[tuple[float, int, np.ndarray]] = []
        self._told = 0

    def _internal_ask_candidate(self) -> p.Parameter:
        """Gaussian mutation of a parent drawn uniformly from the μ best (Algorithm 1's offspring step)."""
        if self.population:
            parent = self.population[self._rng.randint(len(self.population))][2]
        else:
            parent = np.zeros(self.dimension)  # the space's centre, before any point is told
        data = parent + self.mutation_scale * self._rng.normal(size=self.dimension)
        return self.parametrization.spawn_child().set_standardized_data(data)

    def _internal_tell_candidate(self, candidate: p.Parameter, loss: float) -> None:
        """Insert the candidate and keep the μ best (survivors by fitness); NaN counts as worst."""
        loss = float(loss) if not math.isnan(loss) else math.inf
        # Rebuild from the value so a point mutated outside the bounds is stored where it was evaluated
        # (clipped), and parents never drift outside the box.
        data = self.parametrization.spawn_child(new_value=candidate.value).get_standardized_data(
            reference=self.parametrization
        )
        self.population.append((loss, self._told, data))
        self._told += 1
        self.population.sort(key=lambda member: (member[0], member[1]))
        del self.population[self.mu :]

    def _internal_provide_recommendation(self) -> np.ndarray | None:
        return self.population[0][2] if self.population else None


class LcscES(base.ConfiguredOptimizer):
    """Configured `lcsc-es`: `LcscES(mu=..., mutation_scale=...)(parametrization, budget, num_workers)`."""

    def __init__(self, *, mu: int = DEFAULT_MU, mutation_scale: float = DEFAULT_MUTATION_SCALE) -> None:
        super().__init__(_LcscES, locals())


if "lcsc-es" not in registry:
    LcscES().set_name("lcsc-es", register=True)
