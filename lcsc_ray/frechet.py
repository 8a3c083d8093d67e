"""Fréchet distance between Gaussians fitted to features, with the reference's square root computed once.

FD = ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr √(Σ₁ Σ₂)  (Dowson & Landau 1982; the
FID of Heusel et al. 2017 is this on InceptionV3 pool3 features). pytorch-fid evaluates the last term with scipy's
`sqrtm` of the non-symmetric product, seconds to minutes at d = 2048. Here, with S = √Σ_ref (symmetric PSD,
from one `eigh` per search):

    tr √(Σ_ref Σ_gen) = Σᵢ √λᵢ(S Σ_gen S)                                                      (full form)

because Σ_ref Σ_gen = S (S Σ_gen) has the eigenvalues of (S Σ_gen) S, a symmetric PSD matrix, so one
`eigvalsh` per candidate suffices. When the candidate has n < d samples with centred features X (n × d),
Σ_gen = XᵀX / (n − 1) and S Σ_gen S = AᵀA with A = X S / √(n − 1), whose non-zero eigenvalues are those of

    A Aᵀ = X Σ_ref Xᵀ / (n − 1)                                                                (Gram form)

an n × n matrix. Everything is float64. On the CPU numpy's LAPACK `eigvalsh` is used (faster than torch's
on the CPUs measured: docs/ARCHITECTURE.md, "Measurements behind defaults"); on a GPU, torch float64 on the device.

CPU threads: numpy's BLAS runs on one thread here by default (`cpu_threads=1`): a search runs several
trials side by side, each with its own CPU, and extra BLAS threads then only spin against each other.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Sequence

import numpy as np
import torch
from threadpoolctl import ThreadpoolController

from lcsc_ray.errors import LcscError

Array = np.ndarray | torch.Tensor

# Eigenvalues below -NEGATIVE_TOLERANCE * λ_max are not rounding error: the matrix is not a covariance.
NEGATIVE_TOLERANCE = 1e-6


@functools.cache
def _blas_controller() -> ThreadpoolController:
    """One controller per process: building one (as `threadpool_limits` does on every call) scans the loaded
    libraries and took 0.9 ms, most of a d = 64 distance; limiting through a kept one takes microseconds."""
    return ThreadpoolController()


def _check_finite(name: str, value: Array) -> None:
    finite = torch.isfinite(value).all().item() if isinstance(value, torch.Tensor) else np.isfinite(value).all()
    if not finite:
        raise LcscError(f"{name} contains NaN or Inf; recompute these statistics (their features were not finite)")


def _clamped_eigenvalues(eigenvalues: Array, name: str) -> Array:
    """Eigenvalues of a PSD matrix with rounding noise removed (clamp tiny negatives).

    `eigvalsh` returns the zero eigenvalues of a rank-deficient matrix (n < d samples, dead features) as
    ±d·ε·λ_max noise; their square roots would add a positive bias of √(d·ε·λ_max) each (1e-6 relative was
    seen), so everything below that level is set to 0. Clearly negative eigenvalues mean the input is not a
    covariance matrix and are refused.
    """
    largest = float(eigenvalues.max()) if len(eigenvalues) else 0.0
    smallest = float(eigenvalues.min()) if len(eigenvalues) else 0.0
    if smallest < -NEGATIVE_TOLERANCE * max(abs(largest), 1e-300):
        raise LcscError(
            f"{name} is not positive semi-definite (eigenvalue {smallest:.3g} vs largest {largest:.3g}); "
            "it is not a covariance matrix: recompute the statistics"
        )
    noise = len(eigenvalues) * np.finfo(np.float64).eps * max(largest, 0.0)
    return eigenvalues * (eigenvalues > noise)


class FrechetReference:
    """The reference Gaussian (μ_ref, Σ_ref) prepared for many distance evaluations.

    `__init__` pays the one `eigh` of Σ_ref (S = V diag(√λ) Vᵀ); `distance` then costs two d × d matrix
    products and one `eigvalsh`, `distance_from_features` (n < d) one n × n `eigvalsh`.
    """

    def __init__(self, mu: Array, sigma: Array, *, device: str | torch.device = "cpu",
                 use_torch: bool | None = None, cpu_threads: int | None = 1) -> None:
        """`use_torch` picks torch float64 (default on GPUs) or numpy (default on the CPU, where it is faster);
        `cpu_threads` caps numpy's BLAS threads during our calls (None: leave the library's setting)."""
        self.device = torch.device(device)
        self._use_torch = self.device.type != "cpu" if use_torch is None else use_torch
        self.cpu_threads = cpu_threads
        mu, sigma = self._as_float64(mu), self._as_float64(sigma)
        _check_finite("reference mean (mu)", mu)
        _check_finite("reference covariance (sigma)", sigma)
        if mu.ndim != 1 or tuple(sigma.shape) != (mu.shape[0], mu.shape[0]):
            raise LcscError(f"reference statistics: mu {tuple(mu.shape)} and sigma {tuple(sigma.shape)} do not "
                            "form a [d] mean and [d, d] covariance; recompute them")
        self.dim = int(mu.shape[0])
        self.mu = mu
        self.sigma = (sigma + sigma.T) / 2
        self.trace_sigma = float(self.sigma.trace())
        with self._threads():
            eigenvalues, eigenvectors = self._linalg().eigh(self.sigma)
            roots = _clamped_eigenvalues(eigenvalues, "reference covariance (sigma)") ** 0.5
            self.sqrt_sigma = (eigenvectors * roots) @ eigenvectors.T

    # ------------------------------------------------------------------------------------------------------
    def _as_float64(self, value: Array) -> Array:
        if self._use_torch:
            return torch.as_tensor(value).to(self.device, torch.float64)
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        return np.asarray(value, dtype=np.float64)

    def _linalg(self):
        return torch.linalg if self._use_torch else np.linalg

    def _threads(self) -> contextlib.AbstractContextManager:
        """Cap numpy's BLAS threads for the duration of a computation (module docstring)."""
        if self._use_torch or self.cpu_threads is None:
            return contextlib.nullcontext()
        return _blas_controller().limit(limits=self.cpu_threads, user_api="blas")

    def _mean_term(self, mu: Array) -> float:
        """‖μ − μ_ref‖², the first term of the distance."""
        diff = mu - self.mu
        return float((diff * diff).sum())

    def _check_dim(self, what: str, size: int) -> None:
        if size != self.dim:
            raise LcscError(f"{what} has dimension {size} but the reference statistics have {self.dim}; "
                            "use the feature extractor the reference was computed with")

    # ------------------------------------------------------------------------------------------------------
    def distance(self, mu: Array, sigma: Array) -> float:
        """FD to N(mu, sigma) by the full form: Σ √λ(S Σ S) (module docstring)."""
        mu, sigma = self._as_float64(mu), self._as_float64(sigma)
        return self.distances(mu[None], sigma[None])[0]

    def distances(self, mus: Array, sigmas: Array) -> list[float]:
        """FD to each N(mus[i], sigmas[i]) ([B, d] and [B, d, d]): `distance` for a stack of Gaussians with one
        batched `eigvalsh`, as the delete-a-block jackknife of a multi-fidelity round needs (B + 1 at once)."""
        mus, sigmas = self._as_float64(mus), self._as_float64(sigmas)
        self._check_dim("candidate mean", mus.shape[-1])
        _check_finite("candidate mean", mus)
        _check_finite("candidate covariance", sigmas)
        with self._threads():
            product = self.sqrt_sigma @ sigmas @ self.sqrt_sigma
            eigenvalues = self._linalg().eigvalsh((product + product.swapaxes(-1, -2)) / 2)
        traces = sigmas.diagonal(0, -2, -1).sum(-1)
        result = []
        for mu, trace, values in zip(mus, traces, eigenvalues):
            trace_sqrt = float((_clamped_eigenvalues(values, "candidate covariance") ** 0.5).sum())
            result.append(self._mean_term(mu) + float(trace) + self.trace_sigma - 2.0 * trace_sqrt)
        return result

    def distance_from_features(self, features: Array) -> float:
        """FD to the Gaussian fitted to `features` [n, d] (mean, unbiased covariance as `np.cov`).

        Uses the n × n Gram form when n < d (module docstring), the full form otherwise.
        """
        features = self._as_float64(features)
        if features.ndim != 2 or features.shape[0] < 2:
            raise ValueError(f"need features shaped [n >= 2, d], got {tuple(features.shape)}")
        n = features.shape[0]
        self._check_dim("candidate features", features.shape[1])
        _check_finite("candidate features", features)
        mu = features.mean(0)
        centred = features - mu
        if n >= self.dim:
            return self.distance(mu, centred.T @ centred / (n - 1))
        with self._threads():
            gram = centred @ self.sigma @ centred.T / (n - 1)
            eigenvalues = self._linalg().eigvalsh((gram + gram.T) / 2)
        trace_sqrt = float((_clamped_eigenvalues(eigenvalues, "candidate covariance") ** 0.5).sum())
        trace_sigma = float((centred * centred).sum()) / (n - 1)
        return self._mean_term(mu) + trace_sigma + self.trace_sigma - 2.0 * trace_sqrt


def frechet_distance(mu1: Array, sigma1: Array, mu2: Array, sigma2: Array) -> float:
    """Exact FD between N(mu1, sigma1) and N(mu2, sigma2), for one-off comparisons.

    A search should build one `FrechetReference` and reuse it instead.
    """
    return FrechetReference(mu2, sigma2).distance(mu1, sigma1)



def extrapolate_frechet(distance: float, num_samples: int, leave_out: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """(FD∞, slope): the line FD(n) = FD∞ + slope / n through the distance from all `num_samples` samples and
    the mean of the delete-a-block distances `leave_out` ((samples, distance) with one block left out each).

    A Fréchet distance from n samples is biased upward by a term that is, to first order, proportional to 1/n
    (the spread of the sample mean and covariance around the true ones), and how large it is depends on the
    candidate. Distances at several n therefore lie on a line in 1/n whose intercept estimates the distance
    at infinitely many samples (Chong & Forsyth, "Effectively Unbiased FID and Inception Score and where to
    find them", CVPR 2020). We take the second point from the delete-a-block jackknife: averaging over all B
    blocks left out in turn makes the slope far less noisy than fitting nested prefixes of one sample
    stream (docs/METHOD.md, "Multi-fidelity trials").
    """
    if not leave_out:
        raise ValueError("need at least one leave-a-block-out distance to extrapolate")
    inverse = float(np.mean([1.0 / count for count, _ in leave_out]))
    mean_left = float(np.mean([value for _, value in leave_out]))
    slope = (distance - mean_left) / (1.0 / num_samples - inverse)
    return distance - slope / num_samples, slope
