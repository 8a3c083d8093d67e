"""Baseline coefficient profiles over the saved checkpoints: newest, uniform average, EMA.

They are what LCSC must beat and what the search is seeded with (LCSC-NOTES section 1, "seeded with
known-good profiles"). Each is a float64 numpy vector [K] over the checkpoints sorted by step that sums
to 1. Pure numerics: no I/O, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lcsc_ray.errors import LcscError


def newest_profile(num_checkpoints: int) -> np.ndarray:
    """One-hot on the newest checkpoint: the plain end-of-training model."""
    _check_count(num_checkpoints)
    alpha = np.zeros(num_checkpoints, dtype=np.float64)
    alpha[-1] = 1.0
    return alpha


def uniform_profile(num_checkpoints: int) -> np.ndarray:
    """αᵢ = 1/K: the uniform "model soup" average of the saved checkpoints (LCSC-NOTES section 5)."""
    _check_count(num_checkpoints)
    return np.full(num_checkpoints, 1.0 / num_checkpoints, dtype=np.float64)


def ema_profile(steps: Sequence[int], beta: float) -> np.ndarray:
    """An EMA of the raw weights, updated every iteration, read at the newest saved step n_K, expressed
    over the saved checkpoints θ₁…θ_K at steps n₁ < … < n_K (LCSC-NOTES section 1: a geometric profile
    that depends on the step spacing).

    Derivation. The EMA e_t = β e_{t−1} + (1−β) w_t with e_0 = w_0 unrolls to
        e_{n_K} = β^{n_K} w_0 + Σ_{t=1}^{n_K} (1−β) β^{n_K−t} w_t.
    Between saved steps the raw weights w_t are unknown. Assumption: each saved checkpoint stands for the
    iterations since the previous save (w_t ≈ θᵢ for n_{i−1} < t ≤ nᵢ), and everything before the oldest
    selected checkpoint, the initial weights w_0 included, is folded onto θ₁. Summing the geometric series
    over each interval gives
        α_K = 1 − β^{n_K−n_{K−1}},   αᵢ = β^{n_K−nᵢ} (1 − β^{nᵢ−n_{i−1}})  for 1 < i < K,   α₁ = β^{n_K−n₁},
    which telescopes to Σαᵢ = 1 exactly. With a checkpoint saved every iteration it is the exact EMA.
    Powers are computed as exp/expm1 of m·log β so long runs (n ~ 10⁶, β ~ 0.9999) neither underflow
    nor lose the small differences.
    """
    if not 0.0 < beta < 1.0:
        raise LcscError(f"EMA decay {beta} must lie strictly between 0 and 1 (e.g. --ema-beta 0.999)")
    n = np.asarray(steps, dtype=np.float64)
    _check_count(len(n))
    if np.any(np.diff(n) <= 0):
        raise LcscError(f"checkpoint steps {list(steps)} must be strictly increasing for an EMA profile")
    log_beta = np.log(beta)
    age = n[-1] - n  # n_K − nᵢ
    alpha = np.empty(len(n), dtype=np.float64)
    alpha[1:] = -np.exp(age[1:] * log_beta) * np.expm1(np.diff(n) * log_beta)  # β^{age}(1 − β^{Δn})
    alpha[0] = np.exp(age[0] * log_beta)
    return alpha


def baseline_profiles(steps: Sequence[int], ema_betas: Sequence[float]) -> dict[str, np.ndarray]:
    """{"newest", "uniform", "ema_<β>" for each β}: the baselines every search reports and starts from."""
    profiles = {"newest": newest_profile(len(steps)), "uniform": uniform_profile(len(steps))}
    for beta in ema_betas:
        profiles[f"ema_{float(beta)!r}"] = ema_profile(steps, float(beta))
    return profiles


def named_profile(name: str, steps: Sequence[int]) -> np.ndarray:
    """The profile a user names on the command line: `newest`, `uniform` or `ema_<β>` (e.g. `ema_0.999`)."""
    if name == "newest":
        return newest_profile(len(steps))
    if name == "uniform":
        return uniform_profile(len(steps))
    if name.startswith("ema_"):
        try:
            beta = float(name.removeprefix("ema_"))
        except ValueError:
            beta = None
        if beta is not None:
            return ema_profile(steps, beta)
    raise LcscError(f"--profile {name!r}: choose newest, uniform or ema_<decay> (e.g. ema_0.999)")


def _check_count(num_checkpoints: int) -> None:
    if num_checkpoints < 1:
        raise LcscError("no checkpoints selected; a profile needs at least one")
