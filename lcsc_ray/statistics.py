"""Running mean and covariance of feature batches: float64 sums on the features' device, constant memory.

Statistics are accumulated as float64 running sums, never keeping the feature matrix, so memory does not grow
with the sample count.
We use the shifted-data form of the textbook sums (Chan, Golub & LeVeque 1983): with a shift K (the first
batch's mean), keep n, s = Σ (x − K) and Q = Σ (x − K)(x − K)ᵀ; then

    μ = K + s / n,        Σ = (Q − s sᵀ / n) / (n − 1)

which is exactly `np.mean` / `np.cov` (unbiased, the pytorch-fid convention) in exact arithmetic, and the
shift keeps the subtraction from cancelling when the features have a large common offset.
"""

from __future__ import annotations

import torch


class RunningStats:
    """Accumulates the mean and covariance of [n, d] feature batches (see module docstring)."""

    def __init__(self, dim: int, *, device: str | torch.device = "cpu") -> None:
        self.dim = dim
        self.device = torch.device(device)
        self.num_samples = 0
        self._shift: torch.Tensor | None = None
        self._sum = torch.zeros(dim, dtype=torch.float64, device=self.device)
        self._outer = torch.zeros(dim, dim, dtype=torch.float64, device=self.device)

    def update(self, features: torch.Tensor) -> None:
        """Add a batch of features [n, dim] (any float dtype; summed in float64)."""
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"expected features shaped [n, {self.dim}], got {tuple(features.shape)}")
        if features.shape[0] == 0:
            return
        features = features.detach().to(self.device, torch.float64)
        if self._shift is None:
            self._shift = features.mean(0)
        shifted = features - self._shift
        self._sum += shifted.sum(0)
        self._outer += shifted.T @ shifted
        self.num_samples += features.shape[0]

    def mean(self) -> torch.Tensor:
        """μ = K + s / n, float64 [dim]."""
        if self.num_samples == 0:
            raise ValueError("no features accumulated yet")
        return self._shift + self._sum / self.num_samples

    def covariance(self) -> torch.Tensor:
        """Unbiased Σ = (Q − s sᵀ / n) / (n − 1), float64 [dim, dim] (as `np.cov(features, rowvar=False)`)."""
        if self.num_samples < 2:
            raise ValueError(f"a covariance needs at least 2 samples, have {self.num_samples}")
        n = self.num_samples
        return (self._outer - torch.outer(self._sum, self._sum) / n) / (n - 1)
