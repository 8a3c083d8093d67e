"""Improved precision and recall of generated samples (Kynkäänniemi et al., NeurIPS 2019), k-NN manifolds.

A Fréchet distance mixes fidelity and diversity into one number; precision and recall separate them.
Each set of features spans a manifold estimated as the union of balls around its points, each ball's radius
the distance to that point's k-th nearest neighbour within the same set (k = 3, as in the paper):
- precision: the fraction of generated samples inside the real manifold (do samples look real?);
- recall: the fraction of real samples inside the generated manifold (is the data covered?).
Both lie in [0, 1]; higher is better. Distances are Euclidean on the extractor's features, computed in
blocks so memory stays at block × N.
"""

from __future__ import annotations

import torch

DEFAULT_K = 3
_BLOCK = 1024


def knn_radii(features: torch.Tensor, k: int = DEFAULT_K) -> torch.Tensor:
    """Distance of each point to its k-th nearest other point of the same set ([N])."""
    if len(features) <= k:
        raise ValueError(f"k-NN radii need more than k={k} points, got {len(features)}")
    radii = []
    for block in features.split(_BLOCK):
        distances = torch.cdist(block, features)
        radii.append(distances.kthvalue(k + 1, dim=1).values)  # the 1st smallest is the point itself (0)
    return torch.cat(radii)


def _coverage(queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor) -> float:
    """Fraction of `queries` within radii[j] of some support point j."""
    inside = [(torch.cdist(block, support) <= radii[None, :]).any(dim=1) for block in queries.split(_BLOCK)]
    return float(torch.cat(inside).float().mean())


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = DEFAULT_K,
                     real_radii: torch.Tensor | None = None) -> tuple[float, float]:
    """(precision, recall) of `fake` features [M, d] against `real` features [N, d]. `real_radii` may be
    passed when the same real set is used for many candidates (`knn_radii(real, k)`)."""
    real, fake = real.double(), fake.double()
    real_radii = knn_radii(real, k) if real_radii is None else real_radii.double()
    return _coverage(fake, real, real_radii), _coverage(real, fake, knn_radii(fake, k))
