"""What a finished search leaves for the user: the console table (held-out means over several noise seeds,
paired differences to the winner with standard errors, metrics the search never saw), `results.json` and
two PNG plots (best score vs trial; coefficients vs training step). Written atomically, so an interrupted write never
leaves a half file next to a finished search."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lcsc_ray.atomic import atomic_write, atomic_write_json
from lcsc_ray.baseline_checkpoints import ExtraBaseline
from lcsc_ray.heldout import OutputAffine
from lcsc_ray.images import distinct_styles, new_figure, save_figure


SIGNIFICANCE_SE = 2.0  # a paired difference is called a win or a loss only beyond this many standard errors


@dataclass
class ScoredCandidate:
    """One row of the final table: a baseline profile, a baseline checkpoint file the run provides, the
    output-rescaled control, or a search finalist; scored on the search noise and on every held-out seed."""

    name: str
    kind: str  # "baseline" | "control" | "lcsc"
    search_score: float | None
    alpha: np.ndarray | None = None  # coefficients over the stack (None for a baseline checkpoint file)
    checkpoint: ExtraBaseline | None = None  # a separate baseline file (lcsc_ray/baseline_checkpoints.py)
    transform: OutputAffine | None = None  # the control's output correction
    trial: int | None = None
    heldout: list[dict[str, float]] = field(default_factory=list)  # metrics per held-out seed, in seed order

    @property
    def source(self) -> np.ndarray | ExtraBaseline:
        """What the scorer loads: the coefficients or the checkpoint file."""
        return self.alpha if self.checkpoint is None else self.checkpoint

    def values(self, metric: str) -> np.ndarray:
        return np.array([scores[metric] for scores in self.heldout], dtype=np.float64)

    def mean(self, metric: str) -> float:
        return float(self.values(metric).mean())


@dataclass(frozen=True)
class Comparison:
    """A row against the LCSC winner on one metric, paired over the held-out seeds (same noise for both):
    `diff` = mean of (row − winner), `se` its standard error (NaN with one seed), `verdict` from the
    winner's side: "beats" when the row is worse by more than SIGNIFICANCE_SE·SE, "loses to" when better by
    as much, "ties" otherwise (always with one seed: no error bar, no claim)."""

    diff: float
    se: float
    verdict: str


def compare(row: ScoredCandidate, winner: ScoredCandidate, metric: str, *, lower_is_better: bool = True) -> Comparison:
    """Paired comparison of `row` with `winner` on `metric` (see `Comparison`)."""
    differences = row.values(metric) - winner.values(metric)
    diff = float(differences.mean())
    se = float(differences.std(ddof=1) / np.sqrt(len(differences))) if len(differences) > 1 else math.nan
    worse = diff if lower_is_better else -diff  # > 0: the row is worse than the winner
    if not math.isfinite(se) or abs(worse) <= SIGNIFICANCE_SE * se:
        verdict = "ties"
    else:
        verdict = "beats" if worse > 0 else "loses to"
    return Comparison(diff, se, verdict)


def _delta_cell(row: ScoredCandidate, winner: ScoredCandidate, metric: str) -> str:
    """A table cell: the paired difference of `row` to the winner ± its SE, or "(winner)"."""
    if row is winner:
        return "(winner)"
    comparison = compare(row, winner, metric)
    se = "n/a" if not math.isfinite(comparison.se) else f"{comparison.se:.2f}"
    return f"{comparison.diff:+.2f} ± {se}"


def format_table(rows: Sequence[ScoredCandidate], winner: ScoredCandidate, metric_name: str, *,
                 other_metrics: Sequence[str], search_samples: int, final_samples: int, seeds: int) -> str:
    """Plain-text table: per candidate its search score, then for the searched metric and every metric the
    search never saw the held-out mean over the seeds and the paired difference to the winner ± its standard
    error; precision/recall columns (higher is better) show the mean only."""
    fd_metrics = [metric_name, *[m for m in other_metrics if not m.startswith(("precision_", "recall_"))]]
    pr_metrics = [m for m in other_metrics if m.startswith(("precision_", "recall_"))]
    header = f"{'candidate':<34} {'search ' + metric_name:>18}"
    for metric in fd_metrics:
        header += f" {metric + ' mean':>22} {'Δ vs winner ± SE':>18}"
    for metric in pr_metrics:
        header += f" {metric:>{max(10, len(metric))}}"
    unseen = f"{', '.join(fd_metrics[1:])} never seen by the search" if fd_metrics[1:] else "no other distance"
    lines = [f"search score: {search_samples} samples, search noise seed; held-out: {final_samples} samples on each "
             f"of {seeds} other noise seed{'s' if seeds > 1 else ''} (mean; Δ = row − winner, paired over seeds; "
             f"lower is better for the distances; {unseen})",
             header, "-" * len(header)]
    for row in rows:
        search = "-" if row.search_score is None else f"{row.search_score:.4f}"
        line = f"{row.name:<34} {search:>18}"
        for metric in fd_metrics:
            line += f" {row.mean(metric):>22.4f} {_delta_cell(row, winner, metric):>18}"
        for metric in pr_metrics:
            line += f" {row.mean(metric):>{max(10, len(metric))}.3f}"
        lines.append(line)
    return "\n".join(lines)


def format_compact_table(rows: Sequence[ScoredCandidate], winner: ScoredCandidate, metric_name: str,
                         untouched: str | None) -> str:
    """The console's table, at most 120 columns: per candidate the held-out searched metric and the first
    metric the search never saw (mean over the seeds, Δ vs the winner ± SE); the full table is results.md's."""
    metrics = [metric_name] + ([untouched] if untouched else [])
    header = f"{'candidate':<40}" + "".join(f" {m[:18]:>18} {'Δ ± SE':>16}" for m in metrics)
    lines = [header, "-" * len(header)]
    for row in rows:
        line = f"{row.name[:40]:<40}"
        for metric in metrics:
            line += f" {row.mean(metric):>18.4f} {_delta_cell(row, winner, metric)[:16]:>16}"
        lines.append(line)
    return "\n".join(lines)


def write_results_md(path: Path, verdict: Sequence[str], table: str) -> Path:
    """`results.md`: the verdict lines, then the full table (every metric, every candidate)."""
    text = "# LCSC search results\n\n" + "".join(f"- {line}\n" for line in verdict) + f"\n```\n{table}\n```\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


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
    for (name, value), style in zip(baselines.items(), distinct_styles(len(baselines))):
        ax.axhline(value, lw=1, label=name, **style)
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
    styles = [dict(lw=2, marker="o", ms=3, color="tab:red")] + \
        [dict(lw=1, **style) for style in distinct_styles(len(profiles) - 1)]
    for (name, alpha), style in zip(profiles.items(), styles):
        ax.plot(steps, alpha, label=name, **style)
    ax.axhline(0.0, color="black", lw=0.5)
    ax.set_xlabel("training step of checkpoint")
    ax.set_ylabel("coefficient α")
    ax.legend(fontsize=7)
    return save_figure(fig, path)
