"""The final evaluation's parts on real data and real tiny runs: EMA profiles that follow the run's EMA
warm-up, k-NN precision/recall, the paired verdict rule, the run's training-EMA baseline file, the
output-rescaled control's fit, and the flags checked before a search."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lcsc_ray.baseline_checkpoints import extra_baselines
from lcsc_ray.checkpoints import discover_checkpoints
from lcsc_ray.errors import LcscError
from lcsc_ray.heldout import EvalPlan, HeldoutMetrics, OutputAffine, candidate_samples, fit_output_affine
from lcsc_ray.precision_recall import precision_recall
from lcsc_ray.profiles import EMA_WARMUP, ema_decay_at, ema_profile, run_ema_warmup
from lcsc_ray.reference_stats import ensure_reference_stats
from lcsc_ray.run_folder import load_run
from lcsc_ray.scoring import CandidateScorer, ScoringSpec
from lcsc_ray.search.flags import parse_args
from lcsc_ray.search.job import print_verdict
from lcsc_ray.search.report import ScoredCandidate, compare


@pytest.mark.parametrize("warmup", [None, EMA_WARMUP])
def test_ema_profile_equals_the_ema_the_training_loop_computes(warmup):
    """With a checkpoint after every update the profile is the exact EMA (the initial weights folded onto the
    first checkpoint carry a weight below 1e-9 with the warm-up); with sparse checkpoints it sums to 1."""
    rng = np.random.default_rng(0)
    n, decay = 400, 0.99
    weights = rng.normal(size=n + 1)  # w_0 (initial) .. w_n
    ema = weights[0]
    for k in range(n):
        beta = ema_decay_at(decay, k, warmup)
        ema = beta * ema + (1 - beta) * weights[k + 1]
    alpha = ema_profile(list(range(1, n + 1)), decay, warmup)
    folded = decay**n * (weights[0] - weights[1]) if warmup is None else 0.0  # w_0's weight, put on θ₁ instead
    assert alpha @ weights[1:] == pytest.approx(ema - folded, abs=1e-9)
    sparse = ema_profile([100, 250, 400], decay, warmup)
    assert sparse.sum() == pytest.approx(1.0) and np.all(sparse >= 0)


def test_warmup_makes_a_short_runs_ema_much_shorter_than_its_nominal_decay():
    steps = list(range(1830, 3001, 30))
    plain, warm = ema_profile(steps, 0.999), ema_profile(steps, 0.999, EMA_WARMUP)
    assert warm[-1] > 2 * plain[-1]  # β_k ≈ 0.997 at k = 3,000: more weight on the newest checkpoint
    assert run_ema_warmup({"training": {"ema_warmup": EMA_WARMUP}}) == EMA_WARMUP and run_ema_warmup({}) is None
    with pytest.raises(LcscError, match="ema_warmup"):
        ema_profile(steps, 0.999, "cosine")


def test_precision_recall_separate_fidelity_from_coverage():
    generator = torch.Generator().manual_seed(0)
    real, fake = torch.randn(800, 8, generator=generator), torch.randn(900, 8, generator=generator)
    precision, recall = precision_recall(real, fake)
    assert precision > 0.8 and recall > 0.8
    precision, recall = precision_recall(real, 0.2 * fake)  # collapsed: realistic but not diverse
    assert precision > 0.95 and recall < 0.1
    assert precision_recall(real, fake + 5.0) == (0.0, 0.0)


def _row(name, scores):
    row = ScoredCandidate(name, "baseline", None)
    row.heldout = [{"fd": s} for s in scores]
    return row


def test_verdict_needs_the_paired_difference_beyond_two_standard_errors():
    winner = _row("w", [10.0, 12.0, 11.0, 13.0])
    assert compare(_row("b", [11.0, 13.0, 12.0, 14.1]), winner, "fd").verdict == "beats"  # +1 every seed: SE tiny
    assert compare(_row("b", [12.0, 11.0, 12.0, 12.5]), winner, "fd").verdict == "ties"  # +0.4 ± 0.65
    assert compare(_row("b", [9.0, 11.0, 10.0, 12.2]), winner, "fd").verdict == "loses to"
    single = compare(_row("b", [50.0]), _row("w", [10.0]), "fd")
    assert single.verdict == "ties" and np.isnan(single.se)  # one seed: no error bar, no claim
    assert compare(_row("b", [0.5, 0.6, 0.55]), _row("w", [0.8, 0.9, 0.85]), "fd", lower_is_better=False).verdict == "beats"


def test_the_runs_training_ema_is_a_baseline_file_at_the_newest_selected_step(tiny_cm_run, tmp_path):
    run = load_run(tiny_cm_run)
    files = discover_checkpoints(run.checkpoint_dir)
    (ema,) = extra_baselines(run, files[:6])
    assert ema.name == "training_ema" and ema.file.step == files[5].step
    assert ema.file.path == run.run_dir / "checkpoints_ema" / f"ema_{files[5].step:07d}.safetensors"
    # a selection from another folder (e.g. the EMA trajectory itself) has no separate training EMA
    assert extra_baselines(run, discover_checkpoints(run.run_dir / "checkpoints_ema")) == []


def test_output_rescaled_control_is_fitted_on_the_search_noise_and_never_worse(tiny_cm_run):
    run = load_run(tiny_cm_run)
    files = tuple(discover_checkpoints(run.checkpoint_dir))
    spec = ScoringSpec(run_dir=str(tiny_cm_run), files=files, extractor="digits", batch_size=300, threads=1,
                       reference_stats=str(ensure_reference_stats("digits", "digits")))
    scorer = CandidateScorer(spec)
    newest = np.eye(len(files))[-1]
    plain = scorer.score(newest, seed=0, num_samples=300).score
    affine, fitted = fit_output_affine(scorer, newest, seed=0, num_samples=300, max_evaluations=20)
    assert fitted <= plain and affine != OutputAffine()
    # the held-out metrics see the corrected samples; the searched metric matches the scorer's own
    metrics = HeldoutMetrics(EvalPlan(real_data="digits", pr_samples=300), scorer)
    scores = metrics.score(scorer, candidate_samples(scorer, newest, None, seed=0, num_samples=300))
    assert scores["fd_digits"] == pytest.approx(plain) and 0 <= scores["precision_digits"] <= 1
    corrected = metrics.score(scorer, candidate_samples(scorer, newest, affine, seed=0, num_samples=300))
    assert corrected["fd_digits"] == pytest.approx(fitted)


@pytest.mark.parametrize("flags, message", [
    (["--eval-extractors", "digits_indpe"], "--eval-extractors 'digits_indpe' is unknown"),
    (["--heldout-seeds", "0"], "argument --heldout-seeds: must be >= 1, got 0"),
])
def test_final_evaluation_flags_fail_before_the_search(flags, message, capsys):
    with pytest.raises((LcscError, SystemExit)) as error:
        parse_args(flags, "cm")
    shown = str(error.value) if isinstance(error.value, LcscError) else capsys.readouterr().err
    assert message in shown
    assert parse_args(["--eval-extractors", ""], "cm").eval_extractors == []


def _finalist(trial, searched, independent):
    row = ScoredCandidate(f"search rank {trial}", "lcsc", searched[0], alpha=np.ones(2) / 2, trial=trial)
    row.heldout = [{"fd_digits": a, "fd_digits_indep": b} for a, b in zip(searched, independent)]
    return row


@pytest.mark.parametrize("select_on, expected", [("searched", 1), ("independent", 2)])
def test_winner_selection_on_the_independent_metric_and_the_candidate_to_use(select_on, expected, capsys):
    """Finalist 1 is best on the searched metric, finalist 2 on the independent one (the case a search that
    overfits its metric produces); the baseline is worse than both on both, so the winner is exported."""
    baseline = ScoredCandidate("ema", "baseline", 30.0, alpha=np.ones(2) / 2)
    baseline.heldout = [{"fd_digits": v, "fd_digits_indep": v + 1} for v in (30.0, 31.0, 29.5)]
    candidates = [baseline, _finalist(1, [10.0, 10.5, 9.8], [20.0, 21.0, 20.4]),
                  _finalist(2, [12.0, 12.4, 11.9], [15.0, 15.5, 14.8])]
    args = parse_args(["--select-on", select_on, "--heldout-seeds", "3"], "cm")
    verdict = print_verdict(candidates, "fd_digits", args)
    winner, best, deciding = verdict.winner, verdict.best, verdict.deciding
    printed = capsys.readouterr().out
    assert all(line in printed.replace("\n  ", " ") for line in verdict.lines)  # printed, wrapped at 120 columns
    out = "\n".join(verdict.lines)
    assert winner.trial == expected and best is winner and deciding == "fd_digits_indep"
    assert "beats 1, ties 0, loses to 0 of 1 baselines and controls" in out
    assert ("picked among the finalists on held-out fd_digits_indep" in out) == (select_on == "independent")
    # with --select-on independent the independent distance is no longer untouched, and the console says so
    assert ("fd_digits_indep (never searched; picked the winner)" in out) == (select_on == "independent")
    assert ("every distance in this table took part" in out) == (select_on == "independent")
