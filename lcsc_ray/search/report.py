"""What a finished search leaves for the user: the console table, `results.json` and two PNG plots
(best score vs trial; coefficients vs training step). Written atomically, so an interrupted write never
leaves a half file next to a finished search."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lcsc_ray.atomic import atomic_write_json
from lcsc_ray.images import new_figure, save_figure


@dataclass
class ScoredCandidate:
    """One row of the final table: a baseline profile or a search finalist, scored twice."""

    name: str
    kind: str  # "baseline" | "lcsc"
    alpha: np.ndarray
    search_score: float | None
    heldout_score: float | None = None
    trial: int | None = None


def format_table(rows: Sequence[ScoredCandidate], metric_name: str, *, search_samples: int, final_samples: int) -> str:
    """Plain-text table: one line per candidate, the winner marked, best held-out score first among LCSC."""
    header = f"{'candidate':<30} {'search ' + metric_name:>20} {'held-out ' + metric_name:>22}"
    lines = [
        f"search score: {search_samples} samples, search noise seed; "
        f"held-out score: {final_samples} samples, a different noise seed",
        header,
        "-" * len(header),
    ]
    for row in rows:
        search = "-" if row.search_score is None else f"{row.search_score:.4f}"
        heldout = "-" if row.heldout_score is None else f"{row.heldout_score:.4f}"
        lines.append(f"{row.name:<30} {search:>20} {heldout:>22}")
    return "\n".join(lines)


def write_results(path: Path, payload: dict[str, Any]) -> Path:
    """Atomically write `results.json` (numpy values converted to plain JSON)."""
    return atomic_write_json(path, _jsonable(payload))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, Path):
        return str(value)
    return value


def plot_best_so_far(path: Path, scores: Sequence[float], *, metric_name: str, penalty: float,
                     baselines: dict[str, float]) -> Path:
    """Every trial's search score (penalised trials left out) with the best-so-far curve and the
    baselines' search scores as horizontal references."""
    scores_arr = np.asarray(scores, dtype=np.float64)
    ok = scores_arr < penalty
    trials = np.arange(1, len(scores_arr) + 1)
    best = np.minimum.accumulate(np.where(ok, scores_arr, np.inf))
    fig, axes = new_figure(width=7)
    ax = axes[0, 0]
    ax.scatter(trials[ok], scores_arr[ok], s=8, alpha=0.35, color="tab:gray", label="trial")
    ax.plot(trials, best, color="tab:red", lw=2, label="best so far")
    for i, (name, value) in enumerate(baselines.items()):
        ax.axhline(value, ls="--", lw=1, color=f"C{i % 10}", label=name)
    finite = scores_arr[ok]
    if finite.size:
        low, high = np.percentile(finite, [0, 90])
        pad = 0.05 * max(high - low, 1e-9)
        ax.set_ylim(min(low, min(baselines.values(), default=low)) - pad, max(high, max(baselines.values(), default=high)) + pad)
    ax.set_xlabel("trial")
    ax.set_ylabel(f"search {metric_name} (lower is better)")
    ax.legend(fontsize=7, loc="upper right")
    return save_figure(fig, path)


def plot_coefficients(path: Path, steps: Sequence[int], profiles: dict[str, np.ndarray]) -> Path:
    """Coefficient αᵢ against the training step nᵢ of checkpoint i, one line per profile (winner first)."""
    fig, axes = new_figure(width=7)
    ax = axes[0, 0]
    for i, (name, alpha) in enumerate(profiles.items()):
        style = dict(lw=2, marker="o", ms=3) if i == 0 else dict(lw=1, ls="--")
        ax.plot(steps, alpha, label=name, **style)
    ax.axhline(0.0, color="black", lw=0.5)
    ax.set_xlabel("training step of checkpoint")
    ax.set_ylabel("coefficient α")
    ax.legend(fontsize=7)
    return save_figure(fig, path)
