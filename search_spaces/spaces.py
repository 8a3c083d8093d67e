"""Coefficient spaces: how a Nevergrad parametrization value becomes the merge coefficients α [K].

LCSC searches θ(α) = Σᵢ αᵢ θᵢ (docs/METHOD.md, "The merge"). A space is one way of parametrizing α; each is
one class behind `CoefficientSpace`, registered under the name users type (`--space full|affine|grouped:G`).

All spaces share these choices (documented once here; the reasons are in docs/METHOD.md, "Coefficient
spaces", and docs/RAY_NEVERGRAD.md):
- The parametrization is `ng.p.Dict(alpha=ng.p.Array(...))`: Ray's `NevergradSearch.suggest` breaks on a
  bare `Array`, and the Dict hands the trial a float64 array.
- The centre (`init`) is the uniform profile αᵢ = 1/K, a known-good baseline (model soups).
- Bounds are ±`bound` with clipping, default `DEFAULT_BOUND` = 10: room for the large-magnitude
  coefficients LCSC finds while ruling out absurd extrapolations. Clipping keeps the map from Nevergrad's
  standardized data to the value linear (value = init + σ·data inside the box), which Gaussian mutation in
  `lcsc_ray.search.lcsc_es` relies on.
- `full_range_sampling=False`: DE/PSO/ES initialise around the centre with scale σ instead of uniformly over
  the ±10 box; the useful region is near the baseline profiles.
- σ (Nevergrad's mutation scale per coordinate) defaults to 1/√D for a D-dimensional value, so a mutation
  moves the whole vector by about 1 in Euclidean norm whatever K is: checkpoints of one window are close
  in weight space, so useful moves in α are large, and a per-coordinate scale that ignored D would make
  large-K searches either timid or explosive.
"""
from __future__ import annotations

import difflib
import math
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import numpy as np

from lcsc_ray.errors import LcscError

if TYPE_CHECKING:
    import nevergrad as ng

DEFAULT_BOUND = 10.0
SPACE_FORMS = ("full", "affine", "grouped:G")


class CoefficientSpace(ABC):
    """One parametrization of the K merge coefficients; `value` is what Nevergrad optimizes (D floats)."""

    def __init__(self, name: str, num_checkpoints: int, dimension: int, bound: float, sigma: float | None):
        if num_checkpoints < 1:
            raise LcscError(f"a coefficient space needs at least one checkpoint, got K={num_checkpoints}")
        if not (math.isfinite(bound) and bound > 0):
            raise LcscError(f"--bound must be a positive number, got {bound}")
        if sigma is not None and not (math.isfinite(sigma) and sigma > 0):
            raise LcscError(f"--sigma must be a positive number, got {sigma}")
        self.name = name
        self.num_checkpoints = num_checkpoints
        self.dimension = dimension
        self.bound = float(bound)
        self.sigma = float(sigma) if sigma is not None else 1.0 / math.sqrt(dimension)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, K={self.num_checkpoints}, D={self.dimension})"

    @abstractmethod
    def init_value(self) -> np.ndarray:
        """The centre of the search (the value of the uniform profile)."""

    @abstractmethod
    def _coefficients(self, value: np.ndarray) -> np.ndarray:
        """The map value [D] -> α [K] (value already validated)."""

    @abstractmethod
    def _value(self, alpha: np.ndarray) -> np.ndarray:
        """The map α [K] -> value [D] (α already validated)."""

    def parametrization(self) -> ng.p.Dict:
        """A fresh `ng.p.Dict(alpha=Array[D])`, bounded with clipping, centred on `init_value()`."""
        import nevergrad as ng  # here, not at the top: Ray workers decode spaces and never need Nevergrad

        array = ng.p.Array(init=self.init_value())
        array.set_mutation(sigma=self.sigma)
        array.set_bounds(-self.bound, self.bound, method="clipping", full_range_sampling=False)
        return ng.p.Dict(alpha=array)

    def to_coefficients(self, value: np.ndarray) -> np.ndarray:
        """The trial's parametrization value (D floats) -> α, float64 [K]."""
        value = np.asarray(value, dtype=np.float64)
        if value.shape != (self.dimension,):
            raise LcscError(
                f"space {self.name} (K={self.num_checkpoints}) expects a value of shape ({self.dimension},), got "
                f"{value.shape}; was the experiment started with another --space or checkpoint window?"
            )
        return self._coefficients(value)

    def to_value(self, alpha: np.ndarray) -> np.ndarray:
        """α [K] -> the parametrization value, for warm-start points (inverse of `to_coefficients`)."""
        alpha = np.asarray(alpha, dtype=np.float64)
        if alpha.shape != (self.num_checkpoints,) or not np.all(np.isfinite(alpha)):
            raise LcscError(
                f"a warm-start profile must be {self.num_checkpoints} finite coefficients, got shape {alpha.shape}"
            )
        value = self._value(alpha)
        if np.max(np.abs(value)) > self.bound:
            raise LcscError(
                f"a warm-start profile has a coefficient of magnitude {np.max(np.abs(value)):.3g}, beyond the "
                f"search bound {self.bound:g}; raise --bound"
            )
        return value


def _affine_projection(value: np.ndarray) -> np.ndarray:
    """Orthogonal projection of v onto the hyperplane Σ = 1: v + (1 − Σv)/D.

    Why not v/Σv (the paper's "renormalise to sum 1"): it explodes and flips sign as Σv → 0,
    which Gaussian mutation of profiles with negative entries reaches easily. The projection is linear with
    Lipschitz constant 1, leaves points already on the hyperplane unchanged (so warm starts are exact), and
    the component it discards (the mean direction) does not change the merged model.
    """
    return value + (1.0 - value.sum()) / value.size


class PerCheckpointSpace(CoefficientSpace):
    """One coefficient per checkpoint (D = K), as given (`full`) or projected to Σα = 1 (`affine`).

    `full` leaves α free, so the merged model may be scaled as a whole; `affine` (the paper's form) maps
    the value v to α = v + (1 − Σv)/K, so Σα = 1 exactly while coefficients may be negative. `to_value`
    is the identity in both: exact for `full`, and for `affine` exact whenever Σα = 1 (otherwise the
    search sees its projection).
    """

    def __init__(self, num_checkpoints: int, bound: float, sigma: float | None, *, affine: bool):
        super().__init__("affine" if affine else "full", num_checkpoints, num_checkpoints, bound, sigma)
        self.affine = affine

    def init_value(self) -> np.ndarray:
        return np.full(self.num_checkpoints, 1.0 / self.num_checkpoints)

    def _coefficients(self, value: np.ndarray) -> np.ndarray:
        return _affine_projection(value) if self.affine else value.copy()

    def _value(self, alpha: np.ndarray) -> np.ndarray:
        return alpha.copy()


class GroupedSpace(CoefficientSpace):
    """`grouped:G`: consecutive checkpoints share one coefficient, for large K (fewer dimensions to search).

    The value is the total weight wⱼ of each of the G groups (np.array_split sizes nⱼ, differing by at most
    one), projected affinely to Σw = 1; every checkpoint of group j gets αᵢ = wⱼ/nⱼ, so Σα = 1.
    `to_value` takes group sums of α: the least-squares projection of α onto profiles constant within
    groups (min ‖α − Aw‖² has wⱼ/nⱼ = mean of α over the group), exact when α is constant within groups
    (uniform, and any EMA profile only approximately).
    """

    def __init__(self, num_checkpoints: int, groups: int, bound: float, sigma: float | None):
        if not 1 <= groups <= num_checkpoints:
            raise LcscError(f"--space grouped:{groups} needs 1 <= G <= K={num_checkpoints} groups")
        super().__init__(f"grouped:{groups}", num_checkpoints, groups, bound, sigma)
        self.group_of = np.concatenate(
            [np.full(len(part), j) for j, part in enumerate(np.array_split(np.arange(num_checkpoints), groups))]
        )
        self.group_sizes = np.bincount(self.group_of, minlength=groups).astype(np.float64)

    def init_value(self) -> np.ndarray:
        return self.group_sizes / self.num_checkpoints

    def _coefficients(self, value: np.ndarray) -> np.ndarray:
        weights = _affine_projection(value)
        return (weights / self.group_sizes)[self.group_of]

    def _value(self, alpha: np.ndarray) -> np.ndarray:
        return np.bincount(self.group_of, weights=alpha, minlength=self.dimension)


def _build_full(arg: str | None, k: int, bound: float, sigma: float | None) -> CoefficientSpace:
    return PerCheckpointSpace(k, bound, sigma, affine=False)


def _build_affine(arg: str | None, k: int, bound: float, sigma: float | None) -> CoefficientSpace:
    return PerCheckpointSpace(k, bound, sigma, affine=True)


def _build_grouped(arg: str | None, k: int, bound: float, sigma: float | None) -> CoefficientSpace:
    if arg is None or not arg.isdigit():
        raise LcscError(f"--space grouped needs a group count, e.g. grouped:8 (got {arg!r})")
    return GroupedSpace(k, int(arg), bound, sigma)


SPACES = {"full": _build_full, "affine": _build_affine, "grouped": _build_grouped}


def build_space(
    spec: str, num_checkpoints: int, *, bound: float = DEFAULT_BOUND, sigma: float | None = None
) -> CoefficientSpace:
    """Build the space named by `spec` ("full", "affine", "grouped:G") for K checkpoints."""
    kind, _, arg = spec.strip().partition(":")
    builder = SPACES.get(kind)
    if builder is None or (kind != "grouped" and arg):
        close = difflib.get_close_matches(kind, list(SPACES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise LcscError(f"unknown --space {spec!r}{hint}; valid forms: {', '.join(SPACE_FORMS)}")
    return builder(arg or None, num_checkpoints, bound, sigma)
