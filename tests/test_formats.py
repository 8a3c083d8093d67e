"""Runs of other code bases, read as they lie on disk (fixtures built here, tiny real networks): detection,
trajectory selection, the merge, each convention's scalings and time input, the export through the code
base's own loader, and pickles that are never unpickled without --trust-pickle."""

from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lcsc_ray.checkpoints import CheckpointFile, load_checkpoint
from lcsc_ray.conventions import Convention, class_labels
from lcsc_ray.errors import LcscError
from lcsc_ray.export import export_merged
from lcsc_ray.noise import FixedNoise
from lcsc_ray.precond import SigmaConfig
from lcsc_ray.run_formats import ForeignHints, build_network, resolve_run
from lcsc_ray.run_formats.nvlabs import network_class_name
from lcsc_ray.sampling import build_sampler
from lcsc_ray.stack import CheckpointStack

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from fixture_nets import runs  # noqa: E402
from fixture_nets.edm_like import Payload  # noqa: E402
from fixture_nets.openai_like import TimeProbe  # noqa: E402

ALPHA = np.array([0.5, -0.25, 0.75])
OPENAI_HINTS = ForeignHints(model_factory="fixture_nets.openai_like:create_model", model_kwargs={"num_classes": 10},
                            image_shape=(1, 8, 8), code_dir=str(TESTS))
TRUSTED = ForeignHints(trust_pickle=True, code_dir=str(TESTS))


def _merged_by_hand(files: list[CheckpointFile], trust: bool = False, alpha: np.ndarray = ALPHA) -> dict[str, torch.Tensor]:
    """Σ αᵢ θᵢ per tensor, except tensors identical in every file, which are the newest's."""
    states = [load_checkpoint(f, trust_pickle=trust).state_dict for f in files]
    return {k: states[-1][k].double() if all(torch.equal(s[k], states[-1][k]) for s in states)
            else sum(a * s[k].double() for a, s in zip(alpha, states)) for k in states[0]}


def _assert_state_equal(state: dict, expected: dict, atol: float = 1e-6) -> None:
    assert set(state) == set(expected)
    for key, tensor in state.items():
        assert torch.allclose(tensor.double(), expected[key], atol=atol), key


# -- diffusers ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def diffusers_dir(tmp_path_factory) -> Path:
    return runs.diffusers_run(tmp_path_factory.mktemp("diffusers") / "run", prediction_type="v_prediction")


def test_diffusers_run_is_detected_and_needs_a_trajectory(diffusers_dir):
    with pytest.raises(LcscError, match=r"unet \(3 checkpoints\), unet_ema \(3 checkpoints\); pick one with --ckpt-select"):
        resolve_run(diffusers_dir)
    resolved = resolve_run(diffusers_dir, select="unet_ema")
    assert [f.step for f in resolved.files] == list(runs.STEPS)
    assert all(f.folder.name == "unet_ema" for f in resolved.files)
    run = resolved.run
    assert (run.format, run.convention.name, run.kind, run.image_shape) == ("diffusers", "diffusers", "dm", (1, 8, 8))
    assert run.convention.prediction_type == "v_prediction" and run.convention.num_classes == 10
    assert resolve_run(diffusers_dir, select="unet", hints=ForeignHints(prediction_type="epsilon")
                       ).run.convention.prediction_type == "epsilon"
    assert not (diffusers_dir / "run.json").exists()  # detection never writes into the user's run folder


def test_diffusers_merge_export_loads_with_from_pretrained_and_samples_share_noise(diffusers_dir, tmp_path):
    from diffusers import UNet2DModel

    resolved = resolve_run(diffusers_dir, select="unet_ema")
    stack = CheckpointStack.from_files(resolved.files)
    expected = _merged_by_hand(resolved.files)
    _assert_state_equal(stack.merged_state_dict(ALPHA), expected)
    export_merged(stack, ALPHA, tmp_path / "merged")
    loaded = UNet2DModel.from_pretrained(tmp_path / "merged")
    _assert_state_equal(loaded.state_dict(), expected)
    net = build_network(resolved.run)
    stack.merge_into(net, ALPHA)
    noise = FixedNoise(3, (1, 8, 8))
    for name in ("ddim", "dpmsolver++"):
        sampler = build_sampler(resolved.run, name, nfe=4)
        whole = sampler.sample(net, noise, 0, 6)
        assert whole.shape == (6, 1, 8, 8) and torch.isfinite(whole).all()
        assert torch.allclose(torch.cat([sampler.sample(net, noise, 0, 2), sampler.sample(net, noise, 2, 4)]), whole,
                              atol=1e-5)
    with pytest.raises(LcscError, match="does not fit this run"):
        build_sampler(resolved.run, "onestep")


def test_diffusers_unet_gets_the_schedulers_integer_timesteps_labels_and_prediction_type(diffusers_dir):
    from types import SimpleNamespace

    from diffusers import DDIMScheduler

    run = resolve_run(diffusers_dir, select="unet").run
    calls = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))  # samplers find the device from the parameters

        def forward(self, x, t, class_labels=None):
            calls.append((t.clone(), class_labels.clone()))
            return SimpleNamespace(sample=torch.zeros_like(x))

    sampler = build_sampler(run, "ddim", nfe=4)
    assert sampler.scheduler().config.prediction_type == "v_prediction"
    sampler.sample(Recorder(), FixedNoise(0, (1, 8, 8)), 5, 3)
    reference = DDIMScheduler.from_config(run.config["scheduler"])
    reference.set_timesteps(4)
    assert [int(t[0]) for t, _ in calls] == reference.timesteps.tolist()
    assert all(t.dtype == torch.int64 and t.shape == (3,) for t, _ in calls)
    assert all(torch.equal(labels, class_labels(0, 5, 3, 10)) for _, labels in calls)


# -- OpenAI consistency models --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def openai_dir(tmp_path_factory) -> Path:
    return runs.openai_run(tmp_path_factory.mktemp("openai") / "logs")


def test_openai_run_needs_its_network_and_picks_a_trajectory(openai_dir):
    with pytest.raises(LcscError, match="--model-factory pkg.module:function and --image-shape C,H,W"):
        resolve_run(openai_dir, select="raw")
    resolved = resolve_run(openai_dir, select="ema_0.999", hints=OPENAI_HINTS)
    assert sorted(resolved.trajectories) == ["ema_0.999", "ema_0.9999", "raw"]  # opt*/target_model* ignored
    assert [f.path.name for f in resolved.files] == [f"ema_0.999_{s:06d}.pt" for s in runs.STEPS]
    assert resolved.run.convention.name == "openai-cm" and resolved.run.convention.num_classes == 10
    stack = CheckpointStack.from_files(resolved.files)
    export = export_merged(stack, ALPHA, Path(resolved.files[0].path).parent.parent / "openai-merged.pt")
    _assert_state_equal(torch.load(export, weights_only=True), _merged_by_hand(resolved.files))


def test_openai_convention_feeds_1000_quarter_log_sigma_and_boundary_scalings():
    """With F(x, t) = t, f(x, σ) = c_skip·x + c_out·1000·ln(σ + 1e-44)/4, numbers worked out by hand."""
    conv = Convention("openai-cm", SigmaConfig(), boundary=True)
    x = torch.full((2, 1, 2, 2), 0.3, dtype=torch.float64)
    sigma, sd, lo = 1.5, 0.5, 0.002
    c_skip = sd**2 / ((sigma - lo) ** 2 + sd**2)
    c_out = (sigma - lo) * sd / math.sqrt(sigma**2 + sd**2)
    expected = c_skip * 0.3 + c_out * 1000 * math.log(sigma) / 4
    assert torch.allclose(conv.denoise(TimeProbe(), x, sigma), torch.full_like(x, expected), rtol=1e-12)
    assert torch.equal(conv.denoise(TimeProbe(), x, lo), x)  # the boundary condition f(x, σ_min) = x


def test_edm_and_ect_modules_are_called_with_sigma_and_one_hot_labels(tmp_path):
    seen = {}

    class Recorder(torch.nn.Module):
        def forward(self, x, sigma, class_labels=None):
            seen.update(sigma=sigma, labels=class_labels)
            return x * 0

    conv = Convention("edm", SigmaConfig(), boundary=False, num_classes=4)
    labels = conv.labels(seed=5, start=0, count=8, device=torch.device("cpu"))
    assert labels.shape == (8, 4) and torch.equal(labels.sum(0), torch.full((4,), 2.0))
    conv.denoise(Recorder(), torch.zeros(8, 1, 2, 2), 2.5, labels)
    assert seen["sigma"].dtype == torch.float32 and torch.equal(seen["sigma"], torch.full((8,), 2.5))
    assert seen["labels"] is labels


def test_class_labels_are_balanced_and_a_function_of_seed_and_index():
    labels = class_labels(7, 0, 30, 10)
    assert torch.equal(torch.bincount(labels), torch.full((10,), 3))
    assert torch.equal(torch.cat([class_labels(7, 0, 13, 10), class_labels(7, 13, 17, 10)]), labels)


# -- NVlabs pickles -------------------------------------------------------------------------------------------


def test_pickles_are_refused_without_trust_and_a_payload_never_runs(tmp_path):
    target = tmp_path / "pwned"
    folder = tmp_path / "edm"
    folder.mkdir()
    with open(folder / "network-snapshot-000100.pkl", "wb") as handle:
        pickle.dump({"ema": Payload(str(target))}, handle)
    (folder / "network-snapshot-000200.pkl").write_bytes((folder / "network-snapshot-000100.pkl").read_bytes())
    with pytest.raises(LcscError, match="add --trust-pickle"):
        resolve_run(folder)
    file = CheckpointFile(folder / "network-snapshot-000200.pkl", 200, "pickle")
    with pytest.raises(LcscError, match="add --trust-pickle"):
        load_checkpoint(file)
    with pytest.raises(LcscError, match="add --trust-pickle"):
        CheckpointStack.from_files([file])
    assert not target.exists()


@pytest.mark.parametrize("kind", ["edm", "ect", "edm2"])
def test_nvlabs_snapshots_detect_merge_and_export_as_pickles(kind, tmp_path):
    folder = runs.nvlabs_run(tmp_path / kind, kind, label_dim=10 if kind == "edm" else 0)
    select = "0.050" if kind == "edm2" else None
    if kind == "edm2":
        with pytest.raises(LcscError, match=r"0.050 \(3 checkpoints\), 0.100 .*--ckpt-select"):
            resolve_run(folder, hints=TRUSTED)
    resolved = resolve_run(folder, select=select, hints=TRUSTED)
    run = resolved.run
    assert [f.step for f in resolved.files] == list(runs.STEPS)  # ECT's network-snapshot-latest.pkl is skipped
    assert run.convention.name == ("ect" if kind == "ect" else "edm") and run.kind == ("cm" if kind == "ect" else "dm")
    assert run.convention.num_classes == (10 if kind == "edm" else 0) and run.image_shape == (1, 8, 8)
    stack = CheckpointStack.from_files(resolved.files, trust_pickle=True)
    alpha = 2 * ALPHA  # Σα = 2: a merged constant buffer would come out doubled
    expected = _merged_by_hand(resolved.files, trust=True, alpha=alpha)
    newest = load_checkpoint(resolved.files[-1], trust_pickle=True).state_dict
    assert stack.copied_float_tensors == ["resample_filter"]
    assert torch.equal(stack.merged_state_dict(alpha)["resample_filter"], newest["resample_filter"])
    _assert_state_equal(stack.merged_state_dict(alpha), expected, atol=2e-3 if kind == "edm2" else 1e-6)
    export = export_merged(stack, alpha, tmp_path / "merged.pkl")
    with open(export, "rb") as handle:  # the code bases' own loader: pickle.load(f)['ema']
        snapshot = pickle.load(handle)
    sidecar = json.loads(export.with_name(export.name + ".json").read_text())
    if kind == "ect":  # its loss object does not survive a second pickling: left out, and said so
        assert set(snapshot) == {"ema", "augment_pipe", "dataset_kwargs"}
        assert "TypeError" in sidecar["left_out"]["loss_fn"]
    else:
        assert set(snapshot) == {"ema", "loss_fn", "augment_pipe", "dataset_kwargs"} and sidecar["left_out"] == {}
    assert snapshot["dataset_kwargs"] == {"resolution": 8} and snapshot["augment_pipe"] is None
    assert sidecar["copied_from_newest"] == ["resample_filter"]
    dtype = torch.float16 if kind == "edm2" else torch.float32
    assert all(t.dtype == dtype for t in snapshot["ema"].state_dict().values())
    assert torch.equal(snapshot["ema"].resample_filter, newest["resample_filter"])
    _assert_state_equal(snapshot["ema"].state_dict(), expected, atol=4e-3 if kind == "edm2" else 1e-6)
    net = build_network(run, trust_pickle=True)
    stack.merge_into(net, ALPHA)
    sampler = build_sampler(run, "multistep" if kind == "ect" else "heun", nfe=3 if kind != "ect" else None,
                            **({"steps": 18, "ts": [0, 10]} if kind == "ect" else {}))
    images = sampler.sample(net, FixedNoise(0, (1, 8, 8)), 0, 4)
    assert images.shape == (4, 1, 8, 8) and torch.isfinite(images).all()


def test_an_unimportable_network_class_names_its_module(tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    (code / "vanishing_nets.py").write_text("import torch\nclass Net(torch.nn.Module):\n    pass\n")
    sys.path.insert(0, str(code))
    try:
        import vanishing_nets

        folder = tmp_path / "run"
        folder.mkdir()
        for step in (1, 2):
            with open(folder / f"network-snapshot-{step:06d}.pkl", "wb") as handle:
                pickle.dump({"ema": vanishing_nets.Net()}, handle)
    finally:
        sys.path.remove(str(code))
        sys.modules.pop("vanishing_nets", None)
    with pytest.raises(LcscError, match="needs module 'vanishing_nets'.*PYTHONPATH"):
        resolve_run(folder, hints=ForeignHints(trust_pickle=True))


def test_merge_command_takes_a_diffusers_run(diffusers_dir, tmp_path):
    from diffusers import UNet2DModel

    from lcsc_ray.cli.merge import main

    main([str(diffusers_dir), "--ckpt-select", "unet", "--coefficients", ",".join(map(str, ALPHA)),
          "--out", str(tmp_path / "merged_unet")])
    expected = _merged_by_hand(resolve_run(diffusers_dir, select="unet").files)
    _assert_state_equal(UNet2DModel.from_pretrained(tmp_path / "merged_unet").state_dict(), expected)


def test_an_edited_run_json_is_taken_back(openai_dir, tmp_path):
    detected = resolve_run(openai_dir, select="raw", hints=OPENAI_HINTS).detected
    edited = {**detected, "precond": {**detected["precond"], "sigma_max": 40.0}}
    (tmp_path / "run.json").write_text(json.dumps(edited))
    resolved = resolve_run(openai_dir, run_json=str(tmp_path / "run.json"), select="raw")
    assert resolved.run.convention.sigmas.sigma_max == 40.0 and resolved.carried_config == edited
    assert [f.path.name for f in resolved.files] == [f"model{s:06d}.pt" for s in runs.STEPS]


def test_preflight_refuses_a_pickle_run_json_without_trust(tmp_path):
    from lcsc_ray.preflight import preflight
    from lcsc_ray.scoring import ScoringSpec

    folder = runs.nvlabs_run(tmp_path / "edm", "edm")
    resolved = resolve_run(folder, hints=TRUSTED)
    spec = ScoringSpec(run_dir=str(folder), files=tuple(resolved.files), reference_stats=str(tmp_path / "none.npz"),
                       extractor="digits", run_config=resolved.carried_config, trust_pickle=False)
    with pytest.raises(LcscError, match="add --trust-pickle"):
        preflight(spec, resolved.run)


def test_edm2_reference_pickle_becomes_npz_only_with_trust(tmp_path):
    from lcsc_ray.reference_stats import load_reference_stats
    from lcsc_ray.run_formats.nvlabs import reference_stats_from_pickle

    refs = tmp_path / "img64.pkl"
    refs.write_bytes(pickle.dumps({"fid": {"mu": np.arange(8.0), "sigma": np.eye(8)}, "fd_dinov2": {}}))
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"fid": Payload(str(tmp_path / "pwned"))}))
    for path in (refs, evil):
        with pytest.raises(LcscError, match="add --trust-pickle"):
            reference_stats_from_pickle(path, trust_pickle=False)
    assert not (tmp_path / "pwned").exists()
    stats = load_reference_stats(reference_stats_from_pickle(refs, trust_pickle=True), extractor="inception", dim=8)
    assert np.array_equal(stats.mu, np.arange(8.0)) and np.array_equal(stats.sigma, np.eye(8))


def test_openai_and_edm_conventions_agree_with_ours_on_the_same_network():
    """Our raw network F(c_in·x, ¼·ln σ) called OpenAI's way (F(c_in·x, t/1000) with t = 1000·¼·ln σ) gives
    our consistency function; wrapped as an EDM module it gives our EDM denoiser."""
    from lcsc_ray.models import UNet
    from lcsc_ray.precond import consistency_fn, edm_denoiser

    torch.manual_seed(0)
    raw = UNet(channels=8, channel_mult=[1, 2], num_blocks=1, attention=False, dropout=0.0).eval()

    class OpenAIStyle(torch.nn.Module):
        def forward(self, x, t, y=None):
            return raw(x, t / 1000.0)

    class EDMStyle(torch.nn.Module):
        def forward(self, x, sigma, class_labels=None):
            return edm_denoiser(raw, x, sigma)

    x, sigma = torch.randn(3, 1, 8, 8), torch.tensor([0.3, 2.0, 40.0])
    openai = Convention("openai-cm", SigmaConfig(), boundary=True).denoise(OpenAIStyle(), x, sigma)
    assert torch.allclose(openai, consistency_fn(raw, x, sigma), atol=1e-5)
    edm = Convention("edm", SigmaConfig(), boundary=False).denoise(EDMStyle(), x, sigma)
    assert torch.allclose(edm, edm_denoiser(raw, x, sigma), atol=1e-6)


def test_the_runs_other_saved_trajectories_become_baselines(diffusers_dir, openai_dir):
    """The EMAs a run saved next to the raw weights are baselines at the newest selected step (and the raw weights
    are one when an EMA trajectory is searched): `training_<trajectory>` rows of the final table."""
    from lcsc_ray.baseline_checkpoints import extra_baselines

    for folder, select, others, hints in ((diffusers_dir, "unet", ["unet_ema"], ForeignHints()),
                                          (diffusers_dir, "unet_ema", ["unet"], ForeignHints()),
                                          (openai_dir, "raw", ["ema_0.999", "ema_0.9999"], OPENAI_HINTS)):
        resolved = resolve_run(folder, select=select, hints=hints)
        extra = extra_baselines(resolved.run, resolved.files)
        assert [e.name for e in extra] == [f"training_{name}" for name in others]
        for baseline, name in zip(extra, others):
            expected = resolved.trajectories[name][-1]
            assert (baseline.file.path, baseline.file.step) == (expected.path, resolved.files[-1].step)
            assert set(load_checkpoint(baseline.file).state_dict) == set(load_checkpoint(resolved.files[-1]).state_dict)


def test_ect_runs_sample_the_way_ects_own_sampler_does(tmp_path):
    """ECT's few-step `generator_fn` written out: x = 80·z; x = net(x, t) in float64; re-noise x + t_next·z,
    with no clamp between the steps. Without sampler flags an ECT run uses its defaults (80, 0.821)."""
    folder = runs.nvlabs_run(tmp_path / "ect", "ect")
    run = resolve_run(folder, hints=TRUSTED).run
    net = build_network(run, trust_pickle=True)
    net.load_state_dict(load_checkpoint(CheckpointFile(folder / "network-snapshot-000300.pkl", 300, "pickle"),
                                        trust_pickle=True).state_dict)
    sampler = build_sampler(run, "multistep")
    assert sampler.sigmas == (80.0, 0.821) and sampler.nfe == 2
    noise = FixedNoise(5, run.image_shape)
    x = noise.normal(0, 0, 6).double() * 80.0
    first_estimate = None
    for k, (t, t_next) in enumerate(((80.0, 0.821), (0.821, 0.0))):
        x = net(x, torch.full((6,), t, dtype=torch.float64)).double()
        first_estimate = x.clone() if first_estimate is None else first_estimate
        if t_next > 0:
            x = x + t_next * noise.normal(k + 1, 0, 6).double()
    assert first_estimate.abs().max() > 1  # a clamp between the steps would have changed this reference
    ours = sampler.sample(net, noise, 0, 6)
    assert torch.allclose(ours.double(), x.clamp(-1, 1), atol=1e-5, rtol=0)


def test_merge_command_takes_code_dir_and_says_what_a_wrong_one_lacks(tmp_path):
    """lcsc-merge in a process whose Python path lacks the network's code: its module is named; --code-dir of a
    folder without it says that folder lacks it; the right --code-dir merges and exports."""
    folder = runs.nvlabs_run(tmp_path / "edm", "edm")
    out = tmp_path / "merged.pkl"
    command = [sys.executable, str(TESTS.parent / "launch" / "merge_checkpoints.py"), str(folder), "--trust-pickle",
               "--profile", "uniform", "--out", str(out)]
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}

    def merge(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(command + list(extra), cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)

    missing = merge()
    assert missing.returncode == 2 and "needs module 'fixture_nets'" in missing.stderr, missing.stderr
    wrong = merge("--code-dir", str(tmp_path))
    assert wrong.returncode == 2 and f"--code-dir {tmp_path}: holds no fixture_nets/" in wrong.stderr, wrong.stderr
    assert not out.exists()
    done = merge("--code-dir", str(TESTS))
    assert done.returncode == 0 and out.is_file(), done.stderr


def test_run_json_names_a_persistent_class_by_the_class_it_wraps():
    """NVlabs' persistence subclasses each network class as `persistent_class.<locals>.Decorator`."""
    from fixture_nets.edm_like import TinyEDMPrecond

    def persistent_class(cls):
        class Decorator(cls):
            pass

        return Decorator

    assert network_class_name(persistent_class(TinyEDMPrecond)()) == "fixture_nets.edm_like.TinyEDMPrecond"
    assert network_class_name(TinyEDMPrecond()) == "fixture_nets.edm_like.TinyEDMPrecond"


def test_ema_trajectories_are_known_per_format(tmp_path, diffusers_dir, openai_dir):
    """Which trajectories hold EMA weights (their ema_*/phema_* profiles would be EMAs of EMAs)."""
    assert not resolve_run(diffusers_dir, select="unet").holds_ema
    assert resolve_run(diffusers_dir, select="unet_ema").holds_ema
    assert not resolve_run(openai_dir, select="raw", hints=OPENAI_HINTS).holds_ema
    assert resolve_run(openai_dir, select="ema_0.999", hints=OPENAI_HINTS).holds_ema
    for kind, select in (("edm", None), ("ect", None), ("edm2", "0.050")):
        assert resolve_run(runs.nvlabs_run(tmp_path / kind, kind), select=select, hints=TRUSTED).holds_ema


def test_edm2_runs_get_posthoc_ema_reconstructed_from_both_widths(tmp_path, monkeypatch):
    """EDM2 snapshots are EMAs of two widths: the other width is a baseline as saved, and other widths are
    rebuilt from every snapshot of both widths with EDM2's closed-form coefficients (in float16, like EDM2's
    own reconstruction), written once to the cache."""
    from lcsc_ray.baseline_checkpoints import extra_baselines
    from lcsc_ray.posthoc_ema import edm2_kimg_to_nimg, posthoc_coefficients

    monkeypatch.setenv("LCSC_RAY_CACHE", str(tmp_path / "cache"))
    folder = runs.nvlabs_run(tmp_path / "edm2", "edm2")
    resolved = resolve_run(folder, select="0.050", hints=TRUSTED)
    extra = extra_baselines(resolved.run, resolved.files, (0.075, 0.1, 0.15))
    assert [e.name for e in extra] == ["training_0.100", "phema_0.075", "phema_0.15"]  # 0.1 is saved, not rebuilt
    inputs = [(width, f) for width in ("0.050", "0.100") for f in resolved.trajectories[width]]
    coefficients = posthoc_coefficients([edm2_kimg_to_nimg(f.step) for _, f in inputs],
                                        [float(w) for w, _ in inputs], edm2_kimg_to_nimg(300), [0.075, 0.15])
    states = [load_checkpoint(f, trust_pickle=True).state_dict for _, f in inputs]
    for column, baseline in enumerate(extra[1:]):
        rebuilt = load_checkpoint(baseline.file).state_dict
        assert baseline.file.step == 300 and set(rebuilt) == set(states[-1])
        assert torch.equal(rebuilt["resample_filter"], states[-1]["resample_filter"])  # constant: never merged
        for name, tensor in rebuilt.items():
            expected = sum(float(coefficients[i, column]) * s[name].double() for i, s in enumerate(states))
            if name != "resample_filter":
                assert tensor.dtype == torch.float16 and torch.allclose(tensor.double(), expected, atol=2e-3), name
    again = extra_baselines(resolved.run, resolved.files, (0.075, 0.15))
    assert [e.file.path for e in again[1:]] == [e.file.path for e in extra[1:]]  # reused from the cache
