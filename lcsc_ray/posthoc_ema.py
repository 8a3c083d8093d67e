"""EDM2's post-hoc EMA reconstruction from stored power-function EMA snapshots (Karras et al. 2024,
"Analyzing and Improving the Training Dynamics of Diffusion Models", Appendix C.3).

An EDM2 run saves, at each snapshot time tᵢ, power-function EMAs of the raw weights with a few relative
widths σ_rel (0.050 and 0.100 by default). A power-function EMA of exponent γ at time t weighs the raw weights
with the profile p(τ) = (γ+1) τ^γ / t^{γ+1} on [0, t]. Any other profile at time T is approximated by the
combination Σ xᵢ θᵢ of the stored snapshots whose profiles are closest to it in L2: the normal equations
A x = b with Aᵢⱼ = ⟨pᵢ, pⱼ⟩ and bᵢ = ⟨pᵢ, p_target⟩, the inner products in closed form (eq. 151). The
coefficients are normalised to sum to 1, as EDM2's `solve_posthoc_coefficients` does.

This is not a search: it is the best baseline an EDM2 user already has, and the profiles over the snapshots
assume they are EMAs (lcsc_ray/profiles.py assumes raw weights). Pure numerics: no I/O, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lcsc_ray.profiles import sigma_rel_to_gamma


def edm2_kimg_to_nimg(kimg: int) -> int:
    """The training time, in images, of an EDM2 snapshot named by its kimg: EDM2 counts in batches of 1,024
    images and writes nimg // 1000 into the file name, so nimg is the multiple of 1,024 with that quotient."""
    nimg = (int(kimg) * 1000 + 999) // 1024 * 1024
    if nimg // 1000 != kimg:
        raise ValueError(f"no multiple of 1024 images has kimg {kimg}")
    return nimg


def profile_inner_product(t_a: np.ndarray, width_a: np.ndarray, t_b: np.ndarray, width_b: np.ndarray) -> np.ndarray:
    """⟨p_a, p_b⟩ of two power-function EMA profiles (time t, exponent γ from the width), eq. 151:
    (γ_a+1)(γ_b+1) / ((γ_a+γ_b+1) max(t_a, t_b)) · (t_a/t_b)^{γ_b} when t_a < t_b, else · (t_b/t_a)^{γ_a}.
    Broadcasts over its arguments."""
    gamma = np.vectorize(sigma_rel_to_gamma, otypes=[np.float64])
    g_a, g_b = gamma(width_a), gamma(width_b)
    t_a, t_b = np.asarray(t_a, np.float64), np.asarray(t_b, np.float64)
    ratio = np.where(t_a < t_b, (t_a / t_b) ** g_b, (t_b / t_a) ** g_a)
    return (g_a + 1) * (g_b + 1) * ratio / ((g_a + g_b + 1) * np.maximum(t_a, t_b))


def posthoc_coefficients(times: Sequence[float], widths: Sequence[float], target_time: float,
                         target_widths: Sequence[float]) -> np.ndarray:
    """[len(times), len(target_widths)] coefficients over the stored snapshots (time, width) that rebuild the
    power-function EMA of each target width at `target_time` (module docstring); each column sums to 1."""
    t = np.asarray(times, np.float64).reshape(-1, 1)
    w = np.asarray(widths, np.float64).reshape(-1, 1)
    gram = profile_inner_product(t, w, t.T, w.T)
    targets = np.asarray(target_widths, np.float64).reshape(1, -1)
    rhs = profile_inner_product(t, w, np.full_like(targets, float(target_time)), targets)
    solution = np.linalg.solve(gram, rhs)
    return solution / solution.sum(axis=0, keepdims=True)
