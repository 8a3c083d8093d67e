"""The LCSC search end to end with a real local Ray: tiny real training runs, real merges, real sampling,
the real digits feature extractor and Fréchet distance, Nevergrad on Ray Tune."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import ray
from safetensors.torch import load_file

from lcsc_ray.checkpoints import discover_checkpoints
from lcsc_ray.errors import LcscError
from lcsc_ray.evaluator import Evaluator
from lcsc_ray.features import build_extractor
from lcsc_ray.noise import FixedNoise
from lcsc_ray.reference_stats import ensure_reference_stats, load_reference_stats
from lcsc_ray.sampling import build_sampler, generate_batches
from lcsc_ray.run_folder import load_run
from lcsc_ray.run_formats import build_network
from lcsc_ray.scoring import ScoringSpec
from lcsc_ray.search.job import run_job
from lcsc_ray.search.trial import PENALTY_SCORE, LcscTrial
from lcsc_ray.search.tuner import run_search
from lcsc_ray.profiles import newest_profile
from lcsc_ray.search.objective import SearchObjective
from ray import tune
from search_spaces import load_preset
from search_spaces.spaces import build_space


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _job(run_dir: Path, storage: Path, name: str, *extra: str, kind: str = "cm") -> dict:
    argv = ["--ckpt-dir", str(run_dir), "--num-trials", "14", "--fid-samples", "300", "--final-samples", "600",
            "--top-k", "2", "--storage", str(storage), "--name", name, "--no-dashboard", "--quiet",
            "--batch-size", "300", "--heldout-seeds", "2", *extra]
    return run_job(argv, kind=kind)


def test_search_runs_the_budget_tells_baselines_and_exports_a_loadable_winner(local_ray, tiny_cm_run, tmp_path,
                                                                             capsys):
    results = _job(tiny_cm_run, tmp_path, "cm-es")
    out = tmp_path / "cm-es" / "final"
    console = capsys.readouterr().out
    final_block = console.split("held-out scoring took", 1)[1].splitlines()[1:]
    assert final_block[0].startswith("LCSC winner on held-out fd_digits (searched)")  # the verdict comes first
    too_wide = [line for line in final_block if len(line) > 120 and not line.startswith("results: ")]
    assert not too_wide, too_wide
    check_report_page(out, on_disk_title="LCSC search")
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["search"]["trials_completed"] == 14 and results["search"]["trials_completed"] == 14
    assert on_disk["metric"] == "fd_digits"
    # Every baseline profile was evaluated as a trial and told to the optimizer as a not-asked point; the run's
    # training EMA (a separate file, not a combination) joins them in the table with its own search score.
    manifest = json.loads((tmp_path / "cm-es" / "lcsc_search.json").read_text())
    assert len(manifest["warm_start"]) == len(on_disk["baselines"]) - 1 == (
        2 + len(load_preset("digits-cm")["ema"]) + len(load_preset("digits-cm")["phema"]))
    ema = on_disk["baselines"]["training_ema"]
    assert ema["alpha"] is None and ema["checkpoint"].endswith("checkpoints_ema/ema_0000060.safetensors")
    assert all(b["search_score"] is not None and b["heldout_score"] is not None for b in on_disk["baselines"].values())
    # Every row carries the searched metric, the independent one and precision/recall on each held-out seed,
    # with the paired difference to the winner and its verdict.
    assert on_disk["heldout"]["metrics"] == ["fd_digits", "fd_digits_indep", "fd_pixels", "precision_digits_indep",
                                             "recall_digits_indep"]
    assert len(on_disk["heldout"]["noise_seeds"]) == 2
    for row in [*on_disk["baselines"].values(), *on_disk["controls"].values()]:
        for metric, values in row["heldout_metrics"].items():
            assert len(values["per_seed"]) == 2 and values["winner"] in ("beats", "ties", "loses to"), metric
            assert values["mean"] == pytest.approx(np.mean(values["per_seed"]))
    (control,) = on_disk["controls"].values()
    assert control["a"] > 0 and control["search_score"] <= min(b["search_score"] for b in on_disk["baselines"].values())
    winner = on_disk["winner"]
    assert len(winner["alpha"]) == len(winner["steps"]) == 12
    assert abs(sum(winner["alpha"]) - 1.0) < 1e-9  # the affine space keeps Σα = 1
    # The export is the best of the winner and the baselines on the independent distance.
    exported = on_disk["exported"]
    rows = [winner, *on_disk["baselines"].values()]
    assert exported["fd_digits_indep"] == min(r["heldout_metrics"]["fd_digits_indep"]["mean"] for r in rows)
    if exported["kind"] == "lcsc":  # Σ αᵢ θᵢ as a plain state dict with the run's keys
        merged = load_file(exported["checkpoint"])
        files = discover_checkpoints(load_run(tiny_cm_run).checkpoint_dir)
        reference = {k: sum(a * load_file(f.path)[k].double() for a, f in zip(exported["alpha"], files))
                     for k in merged}
        for key, tensor in merged.items():
            assert np.allclose(tensor.double().numpy(), reference[key].numpy(), rtol=1e-5, atol=1e-6), key
    # Its held-out score, recomputed from the exported file alone (a fresh network, no stack, no Ray).
    run = load_run(tiny_cm_run)
    net = build_network(run)
    net.load_state_dict(load_file(exported["checkpoint"]))
    extractor = build_extractor("digits")
    evaluator = Evaluator(extractor, load_reference_stats(ensure_reference_stats("digits", "digits"),
                                                          extractor="digits", dim=extractor.dim))
    rescored = [evaluator.evaluate(generate_batches(build_sampler(run), net, FixedNoise(seed, run.image_shape),
                                                    on_disk["heldout"]["samples"], 300)).score
                for seed in on_disk["heldout"]["noise_seeds"]]
    assert np.mean(rescored) == pytest.approx(exported["heldout_score"], rel=1e-4)
    sidecar = json.loads(Path(exported["checkpoint"] + ".json").read_text())
    assert sidecar["metrics"]["fd_digits"] == pytest.approx(exported["heldout_score"])
    for plot in ("best_score_vs_trial.png", "coefficients_vs_step.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_another_optimizer_name_runs_with_the_stack_in_a_mapped_file(local_ray, tiny_cm_run, tmp_path):
    results = _job(tiny_cm_run, tmp_path, "cm-de", "--optimizer", "TwoPointsDE", "--space", "grouped:4",
                   "--stack-file")
    assert (tmp_path / "cm-de.stack" / "data.bin").stat().st_size > 0  # every trial mapped this one file
    assert results["search"]["trials_completed"] == 14
    assert results["search"]["optimizer"] == "TwoPointsDE"
    assert len(results["winner"]["alpha"]) == 12


def test_diffusion_search_with_dpmsolver_at_9_nfe(local_ray, tiny_dm_run, tmp_path):
    results = _job(tiny_dm_run, tmp_path, "dm", "--sampler", "dpmsolver++", "--nfe", "9", kind="dm")
    assert results["search"]["trials_completed"] == 14
    assert np.isfinite(results["winner"]["heldout_score"])


@pytest.fixture(scope="module")
def explosive_search(tiny_cm_run):
    """(trainable, space, warm starts) on the tiny CM run whose second warm start, coefficients of ±1e30,
    overflows float32 activations into Inf/NaN samples."""
    files = tuple(discover_checkpoints(load_run(tiny_cm_run).checkpoint_dir))
    spec = ScoringSpec(run_dir=str(tiny_cm_run), files=files, extractor="digits", batch_size=200, threads=1,
                       reference_stats=str(ensure_reference_stats("digits", "digits")))
    space = build_space("full", len(files), bound=1e31)
    explosive = np.zeros(len(files))
    explosive[-1], explosive[-2] = 1e30, -1e30
    trainable = tune.with_parameters(LcscTrial, scoring=spec, space=space, objective=SearchObjective(),
                                     num_samples=200)
    return trainable, space, {"newest": newest_profile(len(files)), "explosive": explosive}


def test_a_nan_candidate_is_penalised_and_the_search_goes_on(local_ray, explosive_search, tmp_path):
    """Coefficients of ±1e30 overflow float32 activations into Inf/NaN samples: that trial must be reported
    with the penalty and `failed`, told to the optimizer, and the search must finish its budget."""
    trainable, space, warm_start = explosive_search
    table = run_search(trainable, space, optimizer="OnePlusOne", num_trials=6, seed=0, warm_start=warm_start,
                       storage=tmp_path, name="nan", resources={"cpu": 1}, progress=False, penalty=PENALTY_SCORE)
    assert len(table.rows) == 6 and table.num_errored == 0
    rows = table.baselines()
    assert rows["explosive"].metrics["failed"] is True and rows["explosive"].score == PENALTY_SCORE
    assert "NonFinite" in rows["explosive"].metrics["error"] or "finite" in rows["explosive"].metrics["error"].lower()
    assert rows["newest"].metrics["failed"] is False and rows["newest"].score < PENALTY_SCORE
    assert ("baseline:explosive", PENALTY_SCORE) in [(label, loss) for _, label, loss in table.told]


def test_batched_trials_tell_every_candidate_with_its_own_score(local_ray, explosive_search, tmp_path):
    """Four candidates per Tune trial (one of them failing): 14 candidates in 4 trials, every candidate a row
    and one tell with its own score, and a resume with another batch size refused."""
    trainable, space, warm_start = explosive_search
    table = run_search(trainable, space, optimizer="CMA", num_trials=14, seed=0, warm_start=warm_start,
                       storage=tmp_path, name="batched", resources={"cpu": 1}, progress=False, penalty=PENALTY_SCORE,
                       candidates_per_trial=4)
    assert [row.index for row in table.rows] == list(range(14)) and table.num_errored == 0
    assert len({row.trial_id for row in table.rows}) == 4  # 4 + 4 + 4 + 2
    assert sorted(index for index, _, _ in table.told) == list(range(14))
    told = {index: loss for index, _, loss in table.told}
    assert all(told[row.index] == pytest.approx(row.score) for row in table.rows)
    assert len({row.score for row in table.rows}) > 10  # own scores, not the batch's best repeated
    rows = table.baselines()
    assert rows["explosive"].metrics["failed"] is True and rows["explosive"].score == PENALTY_SCORE
    assert rows["newest"].score < PENALTY_SCORE and rows["newest"].metrics["num_samples"] == 200
    with pytest.raises(LcscError, match="--candidates-per-trial 4, not --candidates-per-trial 2"):
        run_search(trainable, space, optimizer="CMA", num_trials=14, seed=0, storage=tmp_path, name="batched",
                   resume=True, progress=False, candidates_per_trial=2)


def check_report_page(out: Path, on_disk_title: str) -> None:
    """report.html is one self-contained page (every image inline) with the verdict, the table and the four
    titled sample grids, and a real headless Chromium renders it offline (a screenshot is taken)."""
    page = (out / "report.html").read_text()
    assert on_disk_title in page and "LCSC winner on held-out" in page and "<pre>" in page
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 6 and all(src.startswith("data:image/png;base64,") for src in sources)
    for title in ("LCSC winner", "newest checkpoint", "best baseline", "control (rescaled)"):
        assert f"<figcaption>{title}</figcaption>" in page
    assert (out / "results.md").read_text().startswith("# LCSC search results")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no Chromium here (Debian's `chromium` package): the page was checked as text only")
    shot = out.parent / "report.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,2400",
                    f"--screenshot={shot}", (out / "report.html").as_uri()], capture_output=True, timeout=120,
                   check=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
