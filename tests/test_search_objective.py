"""The options against overfitting the searched metric, on the tiny trained CM run: search noise that changes
every G trials (and only then), the coefficient penalty added to the told score, their flags checked before
anything runs, and the pixel-space Fréchet distance that no feature network takes part in."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lcsc_ray.checkpoints import discover_checkpoints
from lcsc_ray.data import load_images
from lcsc_ray.errors import LcscError
from lcsc_ray.features import build_extractor
from lcsc_ray.reference_stats import ensure_reference_stats
from lcsc_ray.run_folder import load_run
from lcsc_ray.scoring import ScoringSpec
from lcsc_ray.search.candidates import save_candidate
from lcsc_ray.search.job import run_job
from lcsc_ray.search.objective import SearchObjective
from lcsc_ray.search.trial import evaluate_candidate
from search_spaces.spaces import build_space


@pytest.fixture(scope="module")
def tiny(tiny_cm_run):
    files = tuple(discover_checkpoints(load_run(tiny_cm_run).checkpoint_dir))
    spec = ScoringSpec(run_dir=str(tiny_cm_run), files=files, extractor="digits", batch_size=200, threads=1,
                       reference_stats=str(ensure_reference_stats("digits", "digits")))
    return spec, build_space("full", len(files), bound=10.0)


def _score(tiny, tmp_path, index: int, alpha: np.ndarray, objective: SearchObjective) -> dict:
    spec, space = tiny
    config = save_candidate(tmp_path, index, "search", space.to_value(alpha))
    return evaluate_candidate(config, scoring=spec, space=space, objective=objective, num_samples=200)


def test_fresh_noise_changes_with_the_generation_only(tiny, tmp_path):
    alpha = np.eye(tiny[1].num_checkpoints)[-1]
    objective = SearchObjective(noise_seed=5, fresh_noise_every=3)
    assert [objective.seed_of(i) for i in range(7)] == [5, 5, 5, 6, 6, 6, 7]
    first, same_generation, next_generation = (_score(tiny, tmp_path, i, alpha, objective)["score"] for i in (0, 2, 3))
    assert same_generation == first  # one noise draw per generation: the same candidate scores the same
    assert next_generation != first
    fixed = SearchObjective(noise_seed=5)
    assert _score(tiny, tmp_path, 3, alpha, fixed)["score"] == first  # default: one noise draw for the search


def test_coefficient_penalty_is_added_to_the_told_score_only(tiny, tmp_path):
    k = tiny[1].num_checkpoints
    extrapolating = np.zeros(k)
    extrapolating[-1], extrapolating[-2] = 2.0, -1.0  # Σα = 1, Σ|α| = 3
    plain = _score(tiny, tmp_path, 0, extrapolating, SearchObjective())
    penalised = _score(tiny, tmp_path, 0, extrapolating, SearchObjective(coef_penalty=0.5))
    assert penalised["fd_digits"] == plain["fd_digits"] == plain["score"]
    assert penalised["score"] == pytest.approx(plain["score"] + 0.5 * 2.0)
    assert penalised["coef_penalty_term"] == pytest.approx(1.0)
    convex = np.full(k, 1 / k)
    assert SearchObjective(coef_penalty=3.0).penalty(convex) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("flags, message", [
    (["--fresh-noise-every", "-2"], "argument --fresh-noise-every: must be >= 0, got -2"),
    (["--coef-penalty", "-1"], "argument --coef-penalty: must be >= 0, got -1"),
    (["--candidates-per-trial", "3"], "--candidates-per-trial 3: must be 1, or more with --scheduler fifo"),
    (["--candidates-per-trial", "0", "--scheduler", "fifo"], "argument --candidates-per-trial: must be >= 1, got 0"),
])
def test_search_flags_fail_before_any_training_or_loading(flags, message, tmp_path, capsys):
    """Ranges are the parser's (argparse's line, exit 2), combinations the flags' checks (LcscError)."""
    missing = tmp_path / "no-such-run"  # never reached: the flags are checked first
    with pytest.raises((LcscError, SystemExit)) as error:
        run_job([*flags, "--ckpt-dir", str(missing), "--storage", str(tmp_path)], "cm")
    shown = str(error.value) if isinstance(error.value, LcscError) else capsys.readouterr().err
    assert message in shown


def test_pixel_frechet_distance_needs_no_network():
    extractor = build_extractor("pixels")
    images = load_images("digits")[:50]
    features = extractor(images)
    assert features.shape == (50, 64) and extractor.metric_name == "fd_pixels"
    assert torch.equal(features, images.clamp(-1, 1).flatten(1))  # 8x8 grayscale: the pixels themselves
    rgb = torch.rand(4, 3, 32, 32) * 2 - 1
    assert extractor(rgb).shape == (4, 64)
