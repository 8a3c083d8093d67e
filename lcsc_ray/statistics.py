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
    """Accumulates the mean and covariance of [n, d] feature batches (see module docstring).

    With `blocks` = B > 1 the sums are kept per block, sample i going to block i mod B (interleaved, so every
    block spreads over the whole sample order), and `mean(exclude=b)` / `covariance(exclude=b)` give the
    statistics of all samples but block b: what the delete-a-block jackknife of the distance needs. Memory
    is B × d × d float64.
    """

    def __init__(self, dim: int, *, device: str | torch.device = "cpu", blocks: int = 1) -> None:
        if blocks < 1:
            raise ValueError(f"blocks must be at least 1, got {blocks}")
        self.dim = dim
        self.blocks = blocks
        self.device = torch.device(device)
        self.num_samples = 0
        self._shift: torch.Tensor | None = None
        self._counts = [0] * blocks
        self._sum = torch.zeros(blocks, dim, dtype=torch.float64, device=self.device)
        self._outer = torch.zeros(blocks, dim, dim, dtype=torch.float64, device=self.device)

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
        for block in range(self.blocks):
            rows = shifted[(block - self.num_samples) % self.blocks::self.blocks]
            self._sum[block] += rows.sum(0)
            self._outer[block] += rows.T @ rows
            self._counts[block] += rows.shape[0]
        self.num_samples += features.shape[0]

    def leave_one_out(self) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """For every block b at once: the sample counts, means [B, dim] and covariances [B, dim, dim] of all
        samples but block b (what `mean(exclude=b)` and `covariance(exclude=b)` give one at a time)."""
        counts = [self.num_samples - c for c in self._counts]
        if min(counts) < 2:
            raise ValueError(f"a covariance needs at least 2 samples, have {min(counts)} without one block")
        n = torch.tensor(counts, dtype=torch.float64, device=self.device)
        s = self._sum.sum(0) - self._sum
        q = self._outer.sum(0) - self._outer
        covariances = (q - s[:, :, None] * s[:, None, :] / n[:, None, None]) / (n[:, None, None] - 1)
        return counts, self._shift + s / n[:, None], covariances

    def _sums(self, exclude: int | None) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(n, s, Q) over all blocks, or over all but block `exclude`."""
        total = (self.num_samples, self._sum.sum(0), self._outer.sum(0))
        if exclude is None:
            return total
        return total[0] - self._counts[exclude], total[1] - self._sum[exclude], total[2] - self._outer[exclude]

    def count(self, exclude: int | None = None) -> int:
        """Samples accumulated (all, or all but block `exclude`)."""
        return self.num_samples if exclude is None else self.num_samples - self._counts[exclude]

    def mean(self, exclude: int | None = None) -> torch.Tensor:
        """μ = K + s / n, float64 [dim] (of all samples, or all but block `exclude`)."""
        n, s, _ = self._sums(exclude)
        if n == 0:
            raise ValueError("no features accumulated yet")
        return self._shift + s / n

    def covariance(self, exclude: int | None = None) -> torch.Tensor:
        """Unbiased Σ = (Q − s sᵀ / n) / (n − 1), float64 [dim, dim] (as `np.cov(features, rowvar=False)`)."""
        n, s, q = self._sums(exclude)
        if n < 2:
            raise ValueError(f"a covariance needs at least 2 samples, have {n}")
        return (q - torch.outer(s, s) / n) / (n - 1)
