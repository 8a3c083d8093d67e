"""Multi-fidelity trials: rounds of samples on the same fixed noise, the 1/n extrapolation that makes a score
from few samples comparable to a full one, and ASHA stopping trials inside a real Ray Tune search whose
optimizer is still told every candidate.

- On synthetic Gaussians (the true distance known in closed form) the delete-a-block jackknife line removes
  the upward 1/n bias of the plain estimate.
- On the tiny trained CM run: the last round's score is exactly the one-shot score, and the extrapolated
  score of the first round ranks the candidates as their full-fidelity scores do, closer than the raw one.
- A real ASHA search on that run stops some trials, tells each of them once with its comparable score,
  generates fewer samples than full fidelity, and refuses a resume with other rounds or another told score.
- The race scheduler stops a round only when it is clearly worse than the incumbent's same round (paired
  jackknife bound), and a real race search on the tiny run stops exactly the trials that rule names.
"""

from __future__ import annotations

import numpy as np
import pytest
import ray
import torch
from ray import tune
from scipy.stats import spearmanr

from lcsc_ray.checkpoints import discover_checkpoints
from lcsc_ray.errors import LcscError
from lcsc_ray.frechet import FrechetReference, extrapolate_frechet, frechet_distance
from lcsc_ray.reference_stats import ensure_reference_stats
from lcsc_ray.run_folder import load_run
from lcsc_ray.scoring import CandidateScorer, ScoringSpec
from lcsc_ray.search.candidates import load_record
from lcsc_ray.search.flags import parse_args
from lcsc_ray.search.trial import FULL_FIDELITY_KEY, PENALTY_SCORE, LcscTrial, comparable_score, round_schedule
from lcsc_ray.search.ray_compat import ActorKeepingScheduler
from lcsc_ray.search.tuner import KeepingFIFOScheduler, RaceScheduler, build_scheduler, run_search
from lcsc_ray.statistics import RunningStats
from lcsc_ray.search.objective import SearchObjective
from search_spaces.spaces import build_space

ROUNDS = (100, 200, 400)


def _gaussian(rng: np.random.Generator, d: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    mixing = rng.standard_normal((d, d)) / np.sqrt(d) * scale
    return rng.standard_normal(d) * 0.3, mixing @ mixing.T + 0.05 * np.eye(d)


def test_jackknife_line_removes_the_small_sample_bias_on_gaussians():
    rng = np.random.default_rng(0)
    d, n, blocks, repeats = 16, 100, 8, 300
    mu_ref, sigma_ref = _gaussian(rng, d, 1.0)
    mu_gen, sigma_gen = _gaussian(rng, d, 1.3)
    true = frechet_distance(mu_gen, sigma_gen, mu_ref, sigma_ref)
    reference = FrechetReference(mu_ref, sigma_ref)
    chol = np.linalg.cholesky(sigma_gen)
    raw, extrapolated = [], []
    for _ in range(repeats):
        stats = RunningStats(d, blocks=blocks)
        samples = rng.standard_normal((n, d)) @ chol.T + mu_gen
        for batch in np.array_split(samples, [7, 50, 51]):  # uneven batches: blocks stay interleaved
            stats.update(torch.from_numpy(batch))
        full = reference.distance(stats.mean(), stats.covariance())
        leave_out = [(stats.count(b), reference.distance(stats.mean(b), stats.covariance(b))) for b in range(blocks)]
        fd_inf, slope = extrapolate_frechet(full, n, leave_out)
        assert fd_inf + slope / n == pytest.approx(full)  # the line passes through the measured point
        raw.append(full)
        extrapolated.append(fd_inf)
    raw_bias, bias = np.mean(raw) - true, np.mean(extrapolated) - true
    standard_error = np.std(extrapolated) / np.sqrt(repeats)
    assert raw_bias > 0.04 * true and raw_bias > 10 * standard_error  # FD from 100 samples is biased upward...
    assert abs(bias) < 3 * standard_error  # ...and the extrapolation removes that bias


def test_block_statistics_leave_out_exactly_one_interleaved_block():
    rng = np.random.default_rng(1)
    features = rng.standard_normal((103, 5)) + 50.0
    stats = RunningStats(5, blocks=4)
    for batch in np.array_split(features, [3, 40, 41]):
        stats.update(torch.from_numpy(batch))
    kept = features[np.arange(103) % 4 != 2]
    assert stats.count(2) == len(kept)
    np.testing.assert_allclose(stats.mean(2).numpy(), kept.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.covariance(2).numpy(), np.cov(kept, rowvar=False), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(stats.covariance().numpy(), np.cov(features, rowvar=False), rtol=1e-9, atol=1e-10)


def test_round_schedule_appends_the_full_count_and_names_the_flag():
    assert round_schedule([100, 200], 400, "asha") == (100, 200, 400)
    assert round_schedule([100, 400, 800], 400, "asha") == (100, 400)  # a preset's rounds past --fid-samples
    assert round_schedule([500, 1000], 400, "asha") == (400,)
    assert round_schedule([100, 200], 400, "fifo") == (400,)
    for bad in ([200, 100], [100, 100], [1, 100]):
        with pytest.raises(LcscError, match="--rounds"):
            round_schedule(bad, 400, "asha")


def test_flags_refuse_bad_rounds_before_anything_starts_and_the_cm_preset_runs_asha(capsys):
    with pytest.raises(SystemExit) as stop:
        parse_args(["--rounds", "500,250"], "cm")
    assert stop.value.code == 2 and "argument --rounds: '500,250': sample counts must increase" in capsys.readouterr().err
    args = parse_args([], "cm")
    assert (args.scheduler, args.rounds) == ("asha", [250, 500, 1000])
    assert round_schedule(args.rounds, 200, args.scheduler) == (200,)  # a small --fid-samples: one round


@pytest.fixture(scope="module")
def tiny_setup(tiny_cm_run):
    run = load_run(tiny_cm_run)
    files = tuple(discover_checkpoints(run.checkpoint_dir))
    spec = ScoringSpec(run_dir=str(tiny_cm_run), files=files, reference_stats=str(ensure_reference_stats("digits", "digits")),
                       extractor="digits", batch_size=200, threads=1)
    space = build_space("affine", len(files), bound=10.0)
    rng = np.random.default_rng(0)
    alphas = [np.eye(len(files))[-1], np.full(len(files), 1 / len(files))]
    alphas += [space.to_coefficients(space.init_value() + rng.normal(0, 0.6 * space.sigma, space.dimension))
               for _ in range(14)]
    return spec, space, alphas


def test_rounds_reach_the_one_shot_score_and_the_first_round_ranks_like_the_full(tiny_setup):
    spec, _, alphas = tiny_setup
    scorer = CandidateScorer(spec)
    first_raw, first_comparable, full = [], [], []
    for alpha in alphas:
        results = list(scorer.score_rounds(alpha, seed=0, rounds=ROUNDS, blocks=8))
        assert [r.num_samples for r in results] == list(ROUNDS)
        first_raw.append(results[0].score)
        first_comparable.append(comparable_score(results[0], ROUNDS[-1]))
        full.append(results[-1].score)
        assert comparable_score(results[-1], ROUNDS[-1]) == results[-1].score  # measured, not predicted
    one_shot = scorer.score(alphas[0], seed=0, num_samples=ROUNDS[-1]).score
    assert full[0] == pytest.approx(one_shot, rel=1e-9)  # same noise, same samples, same statistics
    full, first_raw, first_comparable = map(np.array, (full, first_raw, first_comparable))
    assert spearmanr(first_comparable, full)[0] > 0.9
    assert np.argmin(full) in np.argsort(first_comparable)[:2]
    # the raw distance from 100 samples sits far above the full one; the extrapolated prediction is closer
    assert np.median(np.abs(first_comparable - full)) < 0.5 * np.median(np.abs(first_raw - full))


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def test_asha_search_stops_trials_and_tells_each_with_its_comparable_score(local_ray, tiny_setup, tmp_path):
    spec, space, alphas = tiny_setup
    trainable = tune.with_parameters(LcscTrial, scoring=spec, space=space, objective=SearchObjective(),
                                     num_samples=ROUNDS[-1], rounds=ROUNDS)
    num_trials = 14
    table = run_search(trainable, space, optimizer="CMA", num_trials=num_trials, seed=0,
                       warm_start={"newest": alphas[0], "uniform": alphas[1]}, storage=tmp_path, name="asha",
                       max_concurrent=1, resources={"cpu": 1}, progress=False, penalty=PENALTY_SCORE,
                       scheduler="asha", rounds=ROUNDS, reduction_factor=2)
    assert len(table.rows) == num_trials and table.num_errored == 0
    stopped = [row for row in table.rows if not row.metrics[FULL_FIDELITY_KEY]]
    assert stopped, "ASHA stopped no trial"
    assert all(row.metrics["num_samples"] < ROUNDS[-1] and "fd_extrapolated" in row.metrics for row in stopped)
    assert table.samples_generated() < num_trials * ROUNDS[-1]
    # every trial, stopped or complete, told once with the score it reported last
    assert sorted(index for index, _, _ in table.told) == list(range(num_trials))
    told = {index: loss for index, _, loss in table.told}
    assert all(told[row.index] == pytest.approx(row.score) for row in table.rows)
    # the candidate store holds every round a stopped trial ran
    record = load_record({"lcsc_candidate": str(next(iter(
        (tmp_path / "asha" / "candidates").glob(f"{stopped[0].index:06d}-*.npy"))))})
    assert [r["num_samples"] for r in record] == list(ROUNDS[:len(record)]) and not record[-1][FULL_FIDELITY_KEY]
    changed = "started with --seed 0 --scheduler asha, not --seed 1 --scheduler fifo; rerun with the original"
    with pytest.raises(LcscError, match=changed):  # every difference named in one line (the rounds follow)
        run_search(trainable, space, optimizer="CMA", num_trials=num_trials, seed=1, storage=tmp_path, name="asha",
                   resume=True, progress=False, scheduler="fifo", rounds=(ROUNDS[-1],))
    with pytest.raises(LcscError, match="started with --coef-penalty 0.0, not --coef-penalty 1.0; rerun"):
        run_search(trainable, space, optimizer="CMA", num_trials=num_trials, seed=0, storage=tmp_path, name="asha",
                   resume=True, progress=False, scheduler="asha", rounds=ROUNDS,
                   objective=SearchObjective(coef_penalty=1.0))


def test_race_stops_a_round_only_when_its_bound_is_above_the_incumbent():
    scheduler = build_scheduler("race", ROUNDS, 3.0, keep_actors=2, race_z=2.0, race_pair=False)
    assert isinstance(scheduler, ActorKeepingScheduler) and scheduler.keep_actors == 2  # one actor per trial kept
    assert scheduler.on_trial_result(None, None, {"score": 50.0, "score_se": 1.0, FULL_FIDELITY_KEY: False}) == "CONTINUE"
    assert scheduler.incumbent == float("inf")  # nothing complete yet: nothing to race against
    scheduler.on_trial_complete(None, None, {"score": 40.0, FULL_FIDELITY_KEY: True})  # Tune's last result comes here
    scheduler.on_trial_complete(None, None, {"score": PENALTY_SCORE, "failed": True, FULL_FIDELITY_KEY: True})
    scheduler.on_trial_complete(None, None, {"score": 30.0, FULL_FIDELITY_KEY: False})  # stopped: a prediction
    assert scheduler.incumbent == 40.0
    assert scheduler.on_trial_result(None, None, {"score": 43.0, "score_se": 2.0, FULL_FIDELITY_KEY: False}) == "CONTINUE"
    assert scheduler.on_trial_result(None, None, {"score": 45.0, "score_se": 2.0, FULL_FIDELITY_KEY: False}) == "STOP"
    scheduler.on_trial_complete(None, None, {"score": 39.0, FULL_FIDELITY_KEY: True})
    assert scheduler.incumbent == 39.0 and scheduler.stopped == 1
    assert isinstance(build_scheduler("race", ROUNDS[-1:], 3.0), KeepingFIFOScheduler)  # one round: nothing to race


def test_race_pairs_a_round_with_the_incumbents_same_round():
    scheduler = build_scheduler("race", ROUNDS, 3.0, race_z=2.0)
    blocks = np.array([51.0, 49.0, 50.5, 49.5, 50.0, 50.0, 52.0, 48.0])

    def result(trial_id: str, score: float, shift: np.ndarray | float = 0.0, samples: int = ROUNDS[0]) -> dict:
        return {"trial_id": trial_id, "score": score, "score_se": 1.0, "num_samples": samples,
                FULL_FIDELITY_KEY: False, "fd_leave_out": list(blocks + shift)}

    # the incumbent's 100-sample prediction is 10 above its full score: the noise draw's error, shared by all
    assert scheduler.on_trial_result(None, None, result("inc", 50.0)) == "CONTINUE"
    scheduler.on_trial_complete(None, None, {"trial_id": "inc", "score": 40.0, FULL_FIDELITY_KEY: True})
    # unpaired, 49 − 2·1 > 40 would stop it; paired with the incumbent at 100 samples it is 1 better
    assert scheduler.on_trial_result(None, None, result("a", 49.0, shift=-1.0)) == "CONTINUE"
    # 3 worse at the same round, blocks moving together (paired SE 0): clearly worse
    assert scheduler.on_trial_result(None, None, result("b", 53.0, shift=3.0)) == "STOP"
    # 3 worse, but the paired differences spread: SE = sqrt(7/8 · Σ (d − d̄)²) = sqrt(7/8 · 8) > 3/2
    spread = np.array([1.0, -1.0] * 4) * 1.0
    assert scheduler.on_trial_result(None, None, result("c", 53.0, shift=3.0 + spread)) == "CONTINUE"
    # no incumbent report at this sample count: the unpaired bound
    assert scheduler.on_trial_result(None, None, result("d", 43.0, samples=ROUNDS[1])) == "STOP"
    assert scheduler.stopped == 2


def test_a_resumed_race_takes_the_best_restored_trial_as_its_incumbent():
    """Tune adds a resumed search's finished trials to the scheduler before any new one: the best full-fidelity
    score among them (not a penalty, not a stopped trial's prediction) is raced against from the start."""
    from ray.tune.experiment import Trial

    def restored(score: float, **extra) -> Trial:
        trial = Trial("lcsc_trial", config={}, stub=True)
        trial.update_last_result({"score": score, FULL_FIDELITY_KEY: True, **extra})
        trial.set_status(Trial.TERMINATED)
        return trial

    scheduler = RaceScheduler(z=2.0)  # without the actor keeping, which needs Tune's controller
    pending = Trial("lcsc_trial", config={}, stub=True)
    for trial in (restored(41.0), restored(20.0, failed=True), restored(10.0, **{FULL_FIDELITY_KEY: False}),
                  restored(40.0), pending):
        scheduler.on_trial_add(None, trial)
    assert scheduler.incumbent == 40.0
    unpaired = {"score": 45.0, "score_se": 2.0, "num_samples": ROUNDS[0], FULL_FIDELITY_KEY: False,
                "fd_leave_out": [45.0] * 8}  # the incumbent's rounds were not kept: the unpaired bound
    assert scheduler.on_trial_result(None, pending, unpaired) == "STOP"


def test_race_search_stops_the_trials_clearly_worse_than_the_incumbent(local_ray, tiny_setup, tmp_path):
    spec, space, alphas = tiny_setup
    trainable = tune.with_parameters(LcscTrial, scoring=spec, space=space, objective=SearchObjective(),
                                     num_samples=ROUNDS[-1], rounds=ROUNDS)
    num_trials, z = 14, 1.0
    table = run_search(trainable, space, optimizer="CMA", num_trials=num_trials, seed=0,
                       warm_start={"uniform": alphas[1], "newest": alphas[0]}, storage=tmp_path, name="race",
                       max_concurrent=1, resources={"cpu": 1}, progress=False, penalty=PENALTY_SCORE,
                       scheduler="race", rounds=ROUNDS, race_z=z)
    assert len(table.rows) == num_trials and table.num_errored == 0
    assert sorted(index for index, _, _ in table.told) == list(range(num_trials))  # stopped ones told too
    def clearly_worse(report: dict, incumbent: list[dict]) -> bool:  # the rule, written out independently
        same = next(r for r in incumbent if r["num_samples"] == report["num_samples"])
        diffs = np.subtract(report["fd_leave_out"], same["fd_leave_out"])
        se = np.sqrt((len(diffs) - 1) / len(diffs) * np.sum((diffs - diffs.mean()) ** 2))
        return report["score"] - same["score"] - z * se > 0

    incumbent, incumbent_score, stopped, replaced = None, float("inf"), 0, 0
    for row in table.rows:  # one trial at a time: suggestion order is the order the scheduler saw them
        path = next((tmp_path / "race" / "candidates").glob(f"{row.index:06d}-*.npy"))
        record = load_record({"lcsc_candidate": str(path)})
        assert [r["num_samples"] for r in record] == list(ROUNDS[:len(record)])
        if incumbent is None:  # the first trial has nothing to race against
            assert record[-1][FULL_FIDELITY_KEY]
        elif record[-1][FULL_FIDELITY_KEY]:  # ran to the end: no earlier round was clearly worse
            assert not any(clearly_worse(r, incumbent) for r in record[:-1]), row.index
        else:  # stopped at its last round, and only there, told with that round's comparable score
            stopped += 1
            assert clearly_worse(record[-1], incumbent) and not any(clearly_worse(r, incumbent) for r in record[:-1])
            assert row.score == pytest.approx(record[-1]["score"])
        if record[-1][FULL_FIDELITY_KEY] and row.score < incumbent_score:
            incumbent, incumbent_score, replaced = record, row.score, replaced + 1
    assert stopped >= 3, f"the race stopped {stopped} of {num_trials} trials"
    assert replaced >= 2, "no trial replaced the first incumbent"  # uniform first, the better newest raced it
    assert table.samples_generated() < num_trials * ROUNDS[-1]
