"""Baseline coefficient profiles over the saved checkpoints: newest, uniform average, EMA, post-hoc EMA.

They are what LCSC must beat and what the search is seeded with (docs/METHOD.md, "Baselines and warm
starts"). Each is a float64 numpy vector [K] over the checkpoints sorted by step that sums
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
    """αᵢ = 1/K: the uniform "model soup" average of the saved checkpoints."""
    _check_count(num_checkpoints)
    return np.full(num_checkpoints, 1.0 / num_checkpoints, dtype=np.float64)


def ema_profile(steps: Sequence[int], beta: float) -> np.ndarray:
    """An EMA of the raw weights, updated every iteration, read at the newest saved step n_K, expressed
    over the saved checkpoints θ₁…θ_K at steps n₁ < … < n_K (a geometric profile
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
        raise LcscError(f"EMA decay {beta} must lie strictly between 0 and 1 (e.g. --ema 0.999)")
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


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent γ of EDM2's power-function EMA with relative standard deviation σ_rel (Karras et al. 2024,
    eq. 3): σ_rel² = (γ+1) / ((γ+2)² (γ+3)), i.e. the largest real root of γ³ + 7γ² + (16 − σ_rel⁻²)γ + 12 − σ_rel⁻²."""
    if not 0.0 < sigma_rel < 12 ** -0.5:  # γ > 0 needs σ_rel < 1/√12 (γ = 0 is the uniform average over [0, t])
        raise LcscError(f"post-hoc EMA width {sigma_rel} must lie in (0, 0.288) (e.g. --phema 0.05,0.1)")
    t = sigma_rel ** -2
    return float(np.roots([1.0, 7.0, 16.0 - t, 12.0 - t]).real.max())


def posthoc_ema_profile(steps: Sequence[int], sigma_rel: float) -> np.ndarray:
    """EDM2's power-function EMA of width σ_rel read at the newest saved step, rebuilt from the saved raw
    checkpoints: a strong baseline that costs no search.

    The power-function average at time T weighs the raw weights w_t with density (γ+1) t^γ / T^{γ+1} on
    [0, T]. EDM2 rebuilds it from two stored EMA profiles by least squares; from raw checkpoints the same
    interval assumption as `ema_profile` (w_t ≈ θᵢ for n_{i−1} < t ≤ nᵢ, n₀ = 0) integrates it exactly:
        αᵢ = (nᵢ/n_K)^{γ+1} − (n_{i−1}/n_K)^{γ+1},
    which telescopes to Σαᵢ = 1. Unlike a fixed-decay EMA its length scales with the run (σ_rel is a
    fraction of the training time), so one width suits runs of any length. It needs checkpoints that cover
    most of the run: the weight of everything before the oldest one, (n₁/n_K)^{γ+1}, is folded onto it.
    """
    n = np.asarray(steps, dtype=np.float64)
    _check_count(len(n))
    if np.any(np.diff(n) <= 0) or n[0] < 0 or n[-1] <= 0:
        raise LcscError(f"checkpoint steps {list(steps)} must be non-negative, strictly increasing and end above 0 "
                        f"for a post-hoc EMA")
    power = np.power(n / n[-1], sigma_rel_to_gamma(sigma_rel) + 1.0)  # (nᵢ/n_K)^{γ+1}
    return np.diff(power, prepend=0.0)


def baseline_profiles(steps: Sequence[int], ema_betas: Sequence[float],
                      phema_widths: Sequence[float] = ()) -> dict[str, np.ndarray]:
    """{"newest", "uniform", "ema_<β>" for each β, "phema_<σ_rel>" for each width}: the baselines every search
    reports and starts from."""
    profiles = {"newest": newest_profile(len(steps)), "uniform": uniform_profile(len(steps))}
    for beta in ema_betas:
        profiles[f"ema_{float(beta)!r}"] = ema_profile(steps, float(beta))
    for width in phema_widths:
        profiles[f"phema_{float(width)!r}"] = posthoc_ema_profile(steps, float(width))
    return profiles


def named_profile(name: str, steps: Sequence[int]) -> np.ndarray:
    """The profile a user names on the command line: `newest`, `uniform`, `ema_<β>` (e.g. `ema_0.999`) or
    `phema_<σ_rel>` (e.g. `phema_0.1`)."""
    if name == "newest":
        return newest_profile(len(steps))
    if name == "uniform":
        return uniform_profile(len(steps))
    for prefix, build in (("ema_", ema_profile), ("phema_", posthoc_ema_profile)):
        if name.startswith(prefix):
            try:
                value = float(name.removeprefix(prefix))
            except ValueError:
                break
            return build(steps, value)
    raise LcscError(f"--profile {name!r}: choose newest, uniform, ema_<decay> (e.g. ema_0.999) or "
                    f"phema_<width> (e.g. phema_0.1)")


def _check_count(num_checkpoints: int) -> None:
    if num_checkpoints < 1:
        raise LcscError("no checkpoints selected; a profile needs at least one")
