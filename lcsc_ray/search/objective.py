"""What a trial's told score is, beyond the Fréchet distance itself: two options against overfitting the
searched metric (docs/METHOD.md, "Overfitting the searched metric").

- `--coef-penalty λ` adds λ·(Σ|αᵢ| − 1) to the distance. In the affine space (Σα = 1) the term is 0 for a
  convex combination and grows with the negative mass the search needs to extrapolate; extrapolation is how a
  search can turn a feature network's blind spots (contrast, say) into a lower distance.
- `--fresh-noise-every G` draws new search noise every G trials (a generation of an evolutionary optimizer),
  so candidates cannot keep a lead they owe to one fixed noise draw. Within a generation the noise is shared,
  so its candidates still compare without noise between them.
Both depend only on the trial's suggestion index and coefficients, so a resumed or replayed trial gets the
same noise and the same told score.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lcsc_ray.errors import LcscError


@dataclass(frozen=True)
class SearchObjective:
    """The search noise seed of a trial and the score the optimizer is told for it."""

    noise_seed: int = 0
    fresh_noise_every: int = 0  # 0: one fixed noise draw for the whole search
    coef_penalty: float = 0.0

    def __post_init__(self) -> None:
        if self.fresh_noise_every < 0:
            raise LcscError(f"--fresh-noise-every {self.fresh_noise_every}: must be 0 (fixed noise) or a number of "
                            "trials, e.g. the optimizer's population size")
        if not self.coef_penalty >= 0:
            raise LcscError(f"--coef-penalty {self.coef_penalty}: must be 0 or positive")

    def seed_of(self, index: int) -> int:
        """The search noise seed of the trial with suggestion `index`."""
        if self.fresh_noise_every <= 0 or index < 0:
            return int(self.noise_seed)
        return int(self.noise_seed) + index // self.fresh_noise_every

    def penalty(self, alpha: np.ndarray) -> float:
        """λ·(Σ|αᵢ| − 1): what `told` adds to the distance (0 without --coef-penalty)."""
        if not self.coef_penalty:
            return 0.0
        return float(self.coef_penalty * (np.abs(np.asarray(alpha, dtype=np.float64)).sum() - 1.0))

    def describe(self) -> str:
        """One line for the console, empty for the default objective."""
        parts = []
        if self.fresh_noise_every:
            parts.append(f"fresh search noise every {self.fresh_noise_every} trials")
        if self.coef_penalty:
            parts.append(f"told score = distance + {self.coef_penalty:g}·(Σ|α| − 1)")
        return "; ".join(parts)
