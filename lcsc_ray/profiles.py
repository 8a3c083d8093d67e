"""Baseline coefficient profiles over the saved checkpoints: newest, uniform average, EMA, post-hoc EMA.

They are what LCSC must beat and what the search is seeded with (docs/METHOD.md, "Baselines and warm
starts"). Each is a float64 numpy vector [K] over the checkpoints sorted by step that sums
to 1. Pure numerics: no I/O, no torch.
"""

from __future__ import annotations

import math
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


EMA_WARMUP = "num_updates"  # β_k = min(β, (1+k)/(10+k)): TF's ExponentialMovingAverage with num_updates
EMA_WARMUPS = (EMA_WARMUP,)


def ema_decay_at(decay: float, k: int, warmup: str | None) -> float:
    """The decay used by update k (0-based) of an EMA with nominal `decay`, under the `warmup` schedule a
    run records in run.json (`training.ema_warmup`; None: constant decay). The one definition the training
    loop applies; `ema_profile` integrates the same schedule in closed form."""
    if warmup is None:
        return decay
    if warmup != EMA_WARMUP:
        raise LcscError(f"EMA warm-up {warmup!r} unknown; run.json's training.ema_warmup must be one of "
                        f"{', '.join(EMA_WARMUPS)} or absent")
    return min(decay, (1.0 + k) / (10.0 + k))


def _log_decay_product(start: float, stop: float, beta: float, warmup: str | None) -> float:
    """ln Π_{k=start}^{stop−1} β_k for the schedule of `ema_decay_at`, in closed form (no loop over k):
    the warm-up factors (1+k)/(10+k) telescope into Γ functions, the constant part is (count)·ln β."""
    if stop <= start:
        return 0.0
    if warmup is None:
        return (stop - start) * math.log(beta)
    ema_decay_at(beta, 0, warmup)  # validates the name
    cutoff = max(0.0, math.ceil((10.0 * beta - 1.0) / (1.0 - beta)))  # first k with (1+k)/(10+k) >= β
    warm_stop = min(stop, cutoff)
    log_warm = 0.0
    if warm_stop > start:  # Π (1+k)/(10+k) over [start, warm_stop) = Γ(w+1)Γ(s+10) / (Γ(s+1)Γ(w+10))
        log_warm = (math.lgamma(warm_stop + 1) + math.lgamma(start + 10)
                    - math.lgamma(start + 1) - math.lgamma(warm_stop + 10))
    return log_warm + max(0.0, stop - max(start, cutoff)) * math.log(beta)


def ema_profile(steps: Sequence[int], beta: float, warmup: str | None = None) -> np.ndarray:
    """An EMA of the raw weights, updated every iteration, read at the newest saved step n_K, expressed
    over the saved checkpoints θ₁…θ_K at steps n₁ < … < n_K (a geometric profile
    that depends on the step spacing), following the run's EMA warm-up when `warmup` names one.

    Derivation. The EMA e_{k+1} = β_k e_k + (1−β_k) w_{k+1} (β_k = `ema_decay_at(β, k, warmup)`) unrolls
    to e_{n_K} = P₀ w_0 + Σ_{t=1}^{n_K} (P_t − P_{t−1}) w_t with P_m = Π_{k=m}^{n_K−1} β_k. Between saved
    steps the raw weights w_t are unknown. Assumption: each saved checkpoint stands for the iterations since
    the previous save (w_t ≈ θᵢ for n_{i−1} < t ≤ nᵢ), and everything before the oldest selected
    checkpoint, the initial weights w_0 included, is folded onto θ₁. The sum over each interval telescopes:
        α_K = 1 − P_{n_{K−1}},   αᵢ = P_{nᵢ} − P_{n_{i−1}}  for 1 < i < K,   α₁ = P_{n₁},
    so Σαᵢ = 1 exactly; without warm-up P_m = β^{n_K−m}. With a checkpoint saved every iteration it is
    the exact EMA. Computed in logs (exp/expm1) so long runs (n ~ 10⁶, β ~ 0.9999) neither underflow nor
    lose the small differences. A warm-up matters: with TF's num_updates schedule β_k stays below 0.999
    until k ≈ 9,000, so a short run's training EMA averages over far fewer steps than β = 0.999 suggests.
    """
    if not 0.0 < beta < 1.0:
        raise LcscError(f"EMA decay {beta} must lie strictly between 0 and 1 (e.g. --ema 0.999)")
    n = np.asarray(steps, dtype=np.float64)
    _check_count(len(n))
    if np.any(np.diff(n) <= 0):
        raise LcscError(f"checkpoint steps {list(steps)} must be strictly increasing for an EMA profile")
    log_p = np.array([_log_decay_product(m, n[-1], beta, warmup) for m in n])  # ln P_{nᵢ}
    log_interval = np.array([_log_decay_product(a, b, beta, warmup) for a, b in zip(n[:-1], n[1:])])
    alpha = np.empty(len(n), dtype=np.float64)
    alpha[1:] = -np.exp(log_p[1:]) * np.expm1(log_interval)  # P_{nᵢ}(1 − Π over (n_{i−1}, nᵢ])
    alpha[0] = np.exp(log_p[0])
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
                      phema_widths: Sequence[float] = (), ema_warmup: str | None = None) -> dict[str, np.ndarray]:
    """{"newest", "uniform", "ema_<β>" for each β, "phema_<σ_rel>" for each width}: the baselines every search
    reports and starts from. The EMAs follow `ema_warmup`, the schedule the run recorded (`run_ema_warmup`)."""
    profiles = {"newest": newest_profile(len(steps)), "uniform": uniform_profile(len(steps))}
    for beta in ema_betas:
        profiles[f"ema_{float(beta)!r}"] = ema_profile(steps, float(beta), ema_warmup)
    for width in phema_widths:
        profiles[f"phema_{float(width)!r}"] = posthoc_ema_profile(steps, float(width))
    return profiles


def run_ema_warmup(config: dict) -> str | None:
    """The EMA warm-up a run.json records (`training.ema_warmup`), None when it records none."""
    return (config.get("training") or {}).get("ema_warmup")


def named_profile(name: str, steps: Sequence[int], ema_warmup: str | None = None) -> np.ndarray:
    """The profile a user names on the command line: `newest`, `uniform`, `ema_<β>` (e.g. `ema_0.999`, with
    the run's `ema_warmup`) or `phema_<σ_rel>` (e.g. `phema_0.1`)."""
    if name == "newest":
        return newest_profile(len(steps))
    if name == "uniform":
        return uniform_profile(len(steps))
    for prefix in ("ema_", "phema_"):
        if name.startswith(prefix):
            try:
                value = float(name.removeprefix(prefix))
            except ValueError:
                break
            return ema_profile(steps, value, ema_warmup) if prefix == "ema_" else posthoc_ema_profile(steps, value)
    raise LcscError(f"--profile {name!r}: choose newest, uniform, ema_<decay> (e.g. ema_0.999) or "
                    f"phema_<width> (e.g. phema_0.1)")


def _check_count(num_checkpoints: int) -> None:
    if num_checkpoints < 1:
        raise LcscError("no checkpoints selected; a profile needs at least one")
