"""Fréchet distance between Gaussians fitted to features, with the reference factored once.

FD = ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr √(Σ₁ Σ₂)  (Dowson & Landau 1982; the
FID of Heusel et al. 2017 is this on InceptionV3 pool3 features). pytorch-fid evaluates the last term with scipy's
`sqrtm` of the non-symmetric product, seconds to minutes at d = 2048. Here, with any factor Σ_ref = F Fᵀ computed
once per search, Σ_ref Σ_gen = F (Fᵀ Σ_gen) has the eigenvalues of (Fᵀ Σ_gen) F, a symmetric PSD matrix, so

    tr √(Σ_ref Σ_gen) = Σᵢ √λᵢ(Fᵀ Σ_gen F)                                                    (full form)

and one symmetric eigenvalue problem per candidate suffices. When the candidate has n < d samples with centred
features X (n × d), Σ_gen = XᵀX / (n − 1) and Fᵀ Σ_gen F = AᵀA with A = X F / √(n − 1), whose non-zero
eigenvalues are those of the n × n matrix

    A Aᵀ = (X F)(X F)ᵀ / (n − 1)                                                              (Gram form)

Everything is float64. The CPU path (numpy/scipy LAPACK) takes F = P L, the Cholesky factor of Σ_ref (P a
permutation, the identity unless Σ_ref is singular and pivoted Cholesky is needed), because a triangular F makes
both forms cheaper than the symmetric square root: the full form is LAPACK's `dsygst` (Lᵀ Σ_gen L in d³ flops,
where S Σ_gen S with S = √Σ_ref costs two d × d products, 4d³) and the Gram form one `dtrmm` and one `dsyrk`
(n d² + n² d flops instead of 2 n d² + 2 n² d). The eigenvalues then come from `dsytrd` + `dsterf`
(`_eigvalsh_lower`), 4d³/3 flops. Per candidate at d = 2048 that is about 2.3 d³ flops, against 5.3 d³
for the symmetric-root form with numpy's `eigvalsh` (docs/RESULTS.md, "Fréchet distance per candidate").

On a GPU (and with `use_torch=True` on the CPU) the distance is computed in torch float64 on the device with
F = S = √Σ_ref from one `eigh`: two matrix products and `torch.linalg.eigvalsh` (cuSOLVER's `syevd` on CUDA)
per candidate, a batched one for a stack of Gaussians; only the eigenvalues' extremes and sum are read back.

CPU threads: numpy's and scipy's BLAS run on one thread here by default (`cpu_threads=1`): a search runs several
trials side by side, each with its own CPU, and extra BLAS threads then only spin against each other.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Sequence

import numpy as np
import torch
from scipy.linalg import blas, lapack
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


@functools.cache
def _tridiagonal_workspace(n: int) -> int:
    """`dsytrd`'s optimal workspace for an n × n matrix (queried once per size)."""
    work, info = lapack.dsytrd_lwork(n, lower=1)
    return max(int(work), 1) if info == 0 else max(n, 1)


def _eigvalsh_lower(a: np.ndarray) -> np.ndarray:
    """Eigenvalues (ascending) of the symmetric matrix stored in the lower triangle of the Fortran-ordered
    float64 `a`, which is overwritten: `dsytrd` (blocked Householder reduction to tridiagonal form) then `dsterf`
    (root-free QL/QR on the tridiagonal, O(n²)), the same two steps as LAPACK's eigenvalues-only drivers.

    Called directly, with `dsytrd`'s optimal workspace: at d = 2048 on one thread this took 0.79 s against 0.99 s
    for `np.linalg.eigvalsh` and 1.6 s for scipy's `dsyevd` with its default (minimal) workspace, with which
    the reduction runs unblocked.
    """
    _, diagonal, off_diagonal, _, info = lapack.dsytrd(a, lower=1, lwork=_tridiagonal_workspace(a.shape[0]),
                                                       overwrite_a=1)
    if info != 0:
        raise LcscError(f"LAPACK dsytrd failed (info {info}) on a {a.shape[0]}x{a.shape[0]} matrix")
    eigenvalues, info = lapack.dsterf(diagonal, off_diagonal, overwrite_d=1, overwrite_e=1)
    if info != 0:  # dsterf did not converge: fall back to numpy's driver on the same (symmetric) matrix
        return np.linalg.eigvalsh(np.tril(a) + np.tril(a, -1).T)  # pragma: no cover (never seen)
    return eigenvalues


def _cholesky_factor(sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(L, order): lower-triangular L (Fortran order) and a permutation with Σ[order][:, order] = L Lᵀ; order
    is None (the identity) when plain Cholesky (`dpotrf`) succeeds, the common case of a full-rank reference.

    A singular Σ (dead features, fewer reference samples than d) is first checked to be PSD by its eigenvalues
    (`_clamped_eigenvalues` refuses clearly negative ones), then takes pivoted Cholesky (`dpstrf`, stopping at
    the numerical rank r with LAPACK's tolerance d·ε·max Σᵢᵢ): the trailing (d − r) columns of L are zeroed,
    so Σ_ref is replaced by a PSD matrix within that tolerance, as the clamped `eigh` of the torch path does.
    """
    factor, info = lapack.dpotrf(sigma, lower=1, clean=1)
    if info == 0:
        return np.asfortranarray(factor), None
    # not positive definite: refuse it unless it is positive semi-definite (an indefinite Σ also fails dpotrf)
    _clamped_eigenvalues(_eigvalsh_lower(np.array(sigma, order="F")), "reference covariance (sigma)")
    factor, pivots, rank, info = lapack.dpstrf(sigma, lower=1)
    if info < 0:
        raise LcscError(f"LAPACK dpstrf failed (info {info}) on the reference covariance")
    factor = np.tril(factor)
    factor[:, rank:] = 0.0
    return np.asfortranarray(factor), pivots - 1


def _trace_sqrt(eigenvalues: Array) -> float:
    """Σᵢ √λᵢ = tr √A from the eigenvalues of a PSD matrix A, rounding noise clamped (`_clamped_eigenvalues`)."""
    return float((_clamped_eigenvalues(eigenvalues, "candidate covariance") ** 0.5).sum())


class FrechetReference:
    """The reference Gaussian (μ_ref, Σ_ref) prepared for many distance evaluations.

    `__init__` factors Σ_ref once (Cholesky on the CPU, √Σ_ref by `eigh` in torch); `distance` then costs one
    d × d congruence and one symmetric eigenvalue problem, `distance_from_features` (n < d) an n × n one
    (module docstring).
    """

    def __init__(self, mu: Array, sigma: Array, *, device: str | torch.device = "cpu",
                 use_torch: bool | None = None, cpu_threads: int | None = 1) -> None:
        """`use_torch` picks torch float64 (default on GPUs) or numpy/scipy LAPACK (default on the CPU, where it
        is faster); `cpu_threads` caps the BLAS threads during our calls (None: leave the library's setting)."""
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
            if self._use_torch:
                eigenvalues, eigenvectors = torch.linalg.eigh(self.sigma)
                roots = _clamped_eigenvalues(eigenvalues, "reference covariance (sigma)") ** 0.5
                self.sqrt_sigma = (eigenvectors * roots) @ eigenvectors.T
            else:
                self._factor, self._order = _cholesky_factor(self.sigma)

    # ------------------------------------------------------------------------------------------------------
    def _as_float64(self, value: Array) -> Array:
        if self._use_torch:
            return torch.as_tensor(value).to(self.device, torch.float64)
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        return np.asarray(value, dtype=np.float64)

    def _threads(self) -> contextlib.AbstractContextManager:
        """Cap numpy's and scipy's BLAS threads for the duration of a computation (module docstring)."""
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

    def _permuted(self, columns: np.ndarray, both: bool) -> np.ndarray:
        """The columns (and with `both` the rows) of a CPU array in the pivoted Cholesky order, if any."""
        if self._order is None:
            return columns
        return columns[np.ix_(self._order, self._order)] if both else columns[:, self._order]

    # ------------------------------------------------------------------------------------------------------
    def _trace_sqrt_full(self, sigma: np.ndarray) -> float:
        """tr √(Σ_ref Σ) = Σᵢ √λᵢ(Lᵀ Pᵀ Σ P L) on the CPU (full form with F = P L): LAPACK `dsygst` type 2
        forms Lᵀ A L in d³ flops, reading and writing lower triangles only.

        A is a Fortran-ordered copy of Σᵀ (a plain memory copy of a C-ordered Σ), so LAPACK reads Σ's upper
        triangle: a covariance summed in floating point is symmetric only to rounding, and either triangle is a
        symmetric matrix within that rounding; averaging the two, a transposed pass, took 9% of the time.
        """
        work = np.array(self._permuted(sigma, both=True).T, order="F")
        product, info = lapack.dsygst(work, self._factor, itype=2, lower=1, overwrite_a=1)
        if info != 0:
            raise LcscError(f"LAPACK dsygst failed (info {info}) on the candidate covariance")
        return _trace_sqrt(_eigvalsh_lower(product))

    def _traces_sqrt_torch(self, sigmas: torch.Tensor) -> list[float]:
        """tr √(Σ_ref Σᵢ) = Σ √λ(S Σᵢ S) for a stack [B, d, d] (full form with F = S): one batched `eigvalsh`."""
        product = self.sqrt_sigma @ sigmas @ self.sqrt_sigma
        eigenvalues = torch.linalg.eigvalsh((product + product.mT) / 2)
        return [_trace_sqrt(values) for values in eigenvalues]

    def _trace_sqrt_gram(self, centred: Array) -> float:
        """tr √(Σ_ref XᵀX / (n − 1)) = Σᵢ √λᵢ((X F)(X F)ᵀ / (n − 1)) for centred features X [n, d] (Gram form).

        CPU: (X P L)ᵀ = Lᵀ (X P)ᵀ by `dtrmm` (n d² flops), then its Gram matrix by `dsyrk` (n² d). Torch:
        X Σ_ref Xᵀ, as F Fᵀ = Σ_ref for F = S.
        """
        n = centred.shape[0]
        if self._use_torch:
            gram = centred @ self.sigma @ centred.T / (n - 1)
            return _trace_sqrt(torch.linalg.eigvalsh((gram + gram.T) / 2))
        transposed = blas.dtrmm(1.0, self._factor, self._permuted(centred, both=False).T, side=0, lower=1,
                                trans_a=1)  # into a copy: `centred` is the caller's
        gram = blas.dsyrk(1.0 / (n - 1), transposed, trans=1, lower=1)
        return _trace_sqrt(_eigvalsh_lower(gram))

    # ------------------------------------------------------------------------------------------------------
    def distance(self, mu: Array, sigma: Array) -> float:
        """FD to N(mu, sigma) by the full form (module docstring)."""
        mu, sigma = self._as_float64(mu), self._as_float64(sigma)
        return self.distances(mu[None], sigma[None])[0]

    def distances(self, mus: Array, sigmas: Array) -> list[float]:
        """FD to each N(mus[i], sigmas[i]) ([B, d] and [B, d, d]): `distance` for a stack of Gaussians, as the
        delete-a-block jackknife of a multi-fidelity round needs (B + 1 at once; one batched `eigvalsh` in torch)."""
        mus, sigmas = self._as_float64(mus), self._as_float64(sigmas)
        self._check_dim("candidate mean", mus.shape[-1])
        _check_finite("candidate mean", mus)
        _check_finite("candidate covariance", sigmas)
        with self._threads():
            if self._use_torch:
                roots = self._traces_sqrt_torch(sigmas)
            else:
                roots = [self._trace_sqrt_full(sigma) for sigma in sigmas]
        traces = sigmas.diagonal(0, -2, -1).sum(-1)
        return [self._mean_term(mu) + float(trace) + self.trace_sigma - 2.0 * root
                for mu, trace, root in zip(mus, traces, roots)]

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
            trace_sqrt = self._trace_sqrt_gram(centred)
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
