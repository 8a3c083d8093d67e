"""The stack, the in-place merge, profiles and export (lcsc_ray/stack.py, profiles.py, export.py) and the
merge CLI, on real checkpoint files of a tiny model."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoint_runs import run_states, tiny_model, write_run
from lcsc_ray.checkpoints import discover_checkpoints, load_state_dict
from lcsc_ray.cli import main_merge
from lcsc_ray.errors import LcscError
from lcsc_ray.export import export_merged
from lcsc_ray.profiles import (baseline_profiles, ema_profile, named_profile, newest_profile, posthoc_ema_profile,
                               uniform_profile)
from lcsc_ray.scoring import CandidateScorer, ScoringSpec, load_stack
from lcsc_ray.stack import CheckpointStack, plan_memory

REPO = Path(__file__).resolve().parents[1]
STEPS = [100, 200, 350, 500, 800]
# Affine coefficients with large and negative entries, like the solutions LCSC finds (docs/METHOD.md).
ALPHA = np.array([-2.5, 0.75, 3.0, -0.25, 0.0])


def reference_merge(files, alpha, ckpt_key=None) -> dict[str, torch.Tensor]:
    """Σ αᵢ θᵢ in float64 straight from the files; integer tensors from the newest."""
    states = [load_state_dict(f, ckpt_key) for f in files]
    out = {}
    for name, newest in states[-1].items():
        if newest.is_floating_point():
            out[name] = sum(float(a) * s[name].double() for a, s in zip(alpha, states))
        else:
            out[name] = newest
    return out


def max_relative_error(merged: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """max |merged − ref| / max |ref| over floating tensors (relative to each tensor's scale)."""
    worst = 0.0
    for name, ref in reference.items():
        if ref.is_floating_point():
            scale = ref.abs().max().clamp_min(1e-12)
            worst = max(worst, float((merged[name].double() - ref).abs().max() / scale))
    return worst


@pytest.fixture()
def run(tmp_path):
    write_run(tmp_path / "ckpts", STEPS)
    return discover_checkpoints(tmp_path / "ckpts")


@pytest.mark.parametrize("stream", [False, True])
def test_float32_merge_matches_float64_reference(run, stream):
    stack = CheckpointStack.from_files(run, stream=stream)
    assert stack.steps == STEPS and stack.num_checkpoints == 5 and stack.streamed is stream
    assert stack.num_params == sum(p.numel() for p in tiny_model().state_dict().values() if p.is_floating_point())
    assert stack.nbytes == 5 * stack.num_params * 4
    reference = reference_merge(run, ALPHA)
    assert max_relative_error(stack.merged_state_dict(ALPHA), reference) <= 1e-6
    model = tiny_model()
    stack.merge_into(model, ALPHA)
    state = model.state_dict()
    assert max_relative_error(state, reference) <= 1e-6
    assert state["1.num_batches_tracked"].item() == STEPS[-1]  # integer buffer from the newest


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_delta_stack_error(tmp_path, dtype):
    """Rounding δᵢ to a p-bit mantissa errs by at most 2^-p·Σ|αᵢ||δᵢ| per element; on a late-training-like
    run (each tensor moves ~1% of its RMS per save) that stays within the issue's 1e-3 relative error."""
    write_run(tmp_path, STEPS, scale=0.01, relative=True)
    run = discover_checkpoints(tmp_path)
    stack = CheckpointStack.from_files(run, storage_dtype=dtype)
    assert stack.nbytes == 5 * stack.num_params * 2 + stack.num_params * 4
    merged, reference = stack.merged_state_dict(ALPHA), reference_merge(run, ALPHA)
    error = max_relative_error(merged, reference)
    print(f"{dtype} delta stack: max relative error {error:.2e}")
    assert 0 < error <= 1e-3  # > 0: the deltas really were rounded
    states = [load_state_dict(f) for f in run]
    mantissa = 8 if dtype == torch.bfloat16 else 11
    for name, ref in reference.items():
        if ref.is_floating_point():
            bound = sum(abs(a) * (s[name] - states[-1][name]).abs() for a, s in zip(ALPHA, states)) * 2.0**-mantissa
            assert torch.all((merged[name].double() - ref).abs() <= bound.double() + 1e-6 * ref.abs().max()), name
    newest = stack.merged_state_dict(newest_profile(5))  # one-hot newest: base only, exact
    assert all(torch.equal(newest[k], v) for k, v in states[-1].items())


def test_merge_into_binds_once_and_forward_sees_each_merge(run):
    stack = CheckpointStack.from_files(run)
    model = tiny_model()
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    outputs = []
    for alpha in (ALPHA, uniform_profile(5), ALPHA):
        stack.merge_into(model, alpha)
        with torch.no_grad():
            outputs.append(model(x))
    assert len(stack._bindings) == 1
    weight_ptr = model[0].weight.data_ptr()
    assert torch.equal(outputs[0], outputs[2]) and not torch.allclose(outputs[0], outputs[1])
    expected = tiny_model()
    expected.load_state_dict({k: v.float() if v.is_floating_point() else v
                              for k, v in reference_merge(run, ALPHA).items()})
    with torch.no_grad():
        torch.testing.assert_close(outputs[2], expected(x), rtol=1e-5, atol=1e-6)
    stack.merge_into(model, ALPHA)
    assert model[0].weight.data_ptr() == weight_ptr  # storage is stable across merges (compile/graph friendly)
    model.double()  # storage replaced: the binding notices and rebinds via copies
    stack.merge_into(model, uniform_profile(5))
    assert model[0].weight.dtype == torch.float64
    assert max_relative_error(model.state_dict(), reference_merge(run, uniform_profile(5))) <= 1e-6


def test_merge_rejects_wrong_model_and_coefficients(run):
    stack = CheckpointStack.from_files(run)
    with pytest.raises(LcscError, match=r"missing in the model \['2\.bias', '2\.weight'\]"):
        stack.merge_into(torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8)), ALPHA)
    wrong = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 4))
    with pytest.raises(LcscError, match=r"model tensor '2\.(weight|bias)' has shape \[4"):
        stack.merge_into(wrong, ALPHA)
    with pytest.raises(LcscError, match="one coefficient per selected checkpoint"):
        stack.merge_into(tiny_model(), ALPHA[:3])
    with pytest.raises(LcscError, match="NaN or Inf"):
        stack.merge_into(tiny_model(), np.array([np.nan, 0, 0, 0, 1.0]))


def test_payload_round_trip_through_pickle(run):
    for dtype in (torch.float32, torch.bfloat16):
        stack = CheckpointStack.from_files(run, storage_dtype=dtype)
        payload = pickle.loads(pickle.dumps(stack.to_payload()))
        payload["data"].setflags(write=False)  # as it arrives from the Ray object store
        clone = CheckpointStack.from_payload(payload)
        assert clone.steps == stack.steps and clone.storage_dtype == dtype and clone.key_path == stack.key_path
        a, b = stack.merged_state_dict(ALPHA), clone.merged_state_dict(ALPHA)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_object_store_stack_keeps_the_stack_dtype(run):
    """The copy a driver shares through the object store holds `--stack-dtype`, and a scorer refuses one
    that does not (a float32 payload under `--stack-dtype bfloat16` would silently double the memory)."""
    spec = ScoringSpec(run_dir="unused", files=tuple(run), reference_stats="unused", extractor="digits",
                       stack_dtype="bfloat16")
    payload = pickle.loads(pickle.dumps(load_stack(spec).to_payload()))
    assert payload["storage_dtype"] == "bfloat16"
    assert CheckpointStack.from_payload(payload).storage_dtype == torch.bfloat16
    with pytest.raises(LcscError, match="holds float32 but --stack-dtype is bfloat16"):
        CandidateScorer(spec, CheckpointStack.from_files(run).to_payload())


def test_stack_validation_errors(tmp_path, run):
    with pytest.raises(LcscError, match="no checkpoints selected"):
        CheckpointStack.from_files([])
    bad = tmp_path / "bad"
    states = write_run(bad, [1, 2, 3])
    shape = dict(states[1], **{"0.weight": torch.zeros(8, 7)})
    save_file(shape, str(bad / "model_0000001.safetensors"))
    with pytest.raises(LcscError, match=r"model_0000001\.safetensors: tensor '0\.weight' has shape \[8, 7\] "
                                        r"instead of \[8, 6\] compared with model_0000003\.safetensors"):
        CheckpointStack.from_files(discover_checkpoints(bad))
    save_file({k: v for k, v in states[1].items() if k != "2.bias"}, str(bad / "model_0000001.safetensors"))
    with pytest.raises(LcscError, match=r"model_0000001\.safetensors: key '2\.bias' is missing"):
        CheckpointStack.from_files(discover_checkpoints(bad))
    save_file(dict(states[1], extra=torch.ones(1)), str(bad / "model_0000001.safetensors"))
    with pytest.raises(LcscError, match=r"it holds key 'extra', which is absent"):
        CheckpointStack.from_files(discover_checkpoints(bad))
    with pytest.raises(LcscError, match=r"needs .* GiB but does not fit on cpu .*--stack-dtype bfloat16"):
        CheckpointStack.from_files(run, max_bytes=1000)
    huge = torch.ones(1000) * 60000.0
    save_file({"w": huge}, str(tmp_path / "big_1.safetensors"))
    save_file({"w": -huge}, str(tmp_path / "big_2.safetensors"))
    with pytest.raises(LcscError, match=r"big_1\.safetensors: its difference .* overflows torch\.float16"):
        CheckpointStack.from_files(discover_checkpoints(tmp_path, r"big_(\d+)\.safetensors"),
                                   storage_dtype=torch.float16)


def test_memory_plan():
    cpu = torch.device("cpu")
    assert plan_memory(10, cpu, max_bytes=100) is False
    assert plan_memory(10, cpu, max_bytes=100, stream=True) is True
    with pytest.raises(LcscError, match="needs 0.00 GiB but does not fit"):
        plan_memory(1000, cpu, max_bytes=100)


@pytest.mark.parametrize("layout,key,name", [("safetensors", None, "merged.safetensors"), ("pt", "ema", "merged.pt"),
                                             ("pt", None, "merged.pth"), ("folder", None, "merged")])
def test_export_round_trip_is_bit_exact_for_one_hot(tmp_path, layout, key, name):
    states = write_run(tmp_path / "run", STEPS, layout=layout, key=key)
    files = discover_checkpoints(tmp_path / "run")
    stack = CheckpointStack.from_files(files)
    for index, step in ((len(STEPS) - 1, STEPS[-1]), (1, STEPS[1])):
        alpha = np.eye(len(STEPS))[index]
        target = export_merged(stack, alpha, tmp_path / name, metrics={"fd_digits": 1.5})
        if layout == "folder":
            assert target == tmp_path / "merged" / "model.safetensors"
        if target.suffix == ".safetensors":
            loaded = load_file(str(target))
        else:
            obj = torch.load(target, map_location="cpu", weights_only=True)
            loaded = obj[key] if key else obj
        inputs = list(load_state_dict(files[-1]))
        if target.suffix == ".safetensors":  # the format orders tensors itself
            loaded, inputs = dict(sorted(loaded.items())), sorted(inputs)
        assert list(loaded) == inputs  # same keys (in the inputs' order for torch files)
        for k, v in states[step].items():
            expected = v if v.is_floating_point() else states[STEPS[-1]][k]  # integer buffers from the newest
            assert loaded[k].dtype == expected.dtype and torch.equal(loaded[k], expected), k
        sidecar = json.loads(target.with_name(target.name + ".json").read_text())
        assert sidecar["steps"] == STEPS and sidecar["coefficients"] == alpha.tolist()
        assert sidecar["metrics"] == {"fd_digits": 1.5} and len(sidecar["source_files"]) == len(STEPS)
        assert sidecar["ckpt_key"] == key
    assert not [p for p in tmp_path.rglob(".*tmp*")]  # atomic writes left no temporaries
    with pytest.raises(LcscError, match="name the output with"):
        export_merged(stack, alpha, tmp_path / ("x.pt" if layout != "pt" else "x.safetensors"))


def test_ema_profile_equals_iterated_ema():
    """With piecewise-constant raw weights (the documented assumption) the profile is the exact EMA."""
    steps, beta = [4, 7, 15, 16, 30], 0.9
    theta = np.random.default_rng(0).normal(size=(len(steps), 3))
    owner = np.searchsorted(steps, np.arange(steps[-1] + 1))  # w_t = θ_i for n_{i-1} < t <= n_i; w_0 -> θ_1
    ema = theta[owner[0]].copy()
    for t in range(1, steps[-1] + 1):
        ema = beta * ema + (1 - beta) * theta[owner[t]]
    alpha = ema_profile(steps, beta)
    np.testing.assert_allclose(alpha @ theta, ema, rtol=1e-12)
    assert alpha.sum() == pytest.approx(1.0, abs=1e-15)
    long_run = ema_profile(list(range(10000, 800001, 10000)), 0.9999)
    assert long_run.sum() == pytest.approx(1.0, abs=1e-12) and np.all(long_run > 0)
    assert np.all(np.diff(long_run[1:]) > 0)  # geometric: newer checkpoints weigh more


@pytest.mark.parametrize("sigma_rel", [0.05, 0.1, 0.15, 0.25])
def test_posthoc_ema_has_the_requested_relative_width(sigma_rel):
    """EDM2 defines σ_rel as the standard deviation of the power-function profile's weights over time, relative
    to the current time: checked on a densely saved run, where the profile is the power function itself."""
    steps = np.arange(1, 20001)
    alpha = posthoc_ema_profile(steps, sigma_rel)
    assert alpha.sum() == pytest.approx(1.0, abs=1e-12) and np.all(alpha >= 0)
    assert np.all(np.diff(alpha) > 0)  # later weights count more
    x = (steps - 0.5) / steps[-1]  # each interval's midpoint, as a fraction of the run
    mean = alpha @ x
    assert np.sqrt(alpha @ (x - mean) ** 2) == pytest.approx(sigma_rel, rel=2e-3)
    # A sparse save schedule integrates the same profile: the coarse weights are sums of the dense ones.
    coarse = posthoc_ema_profile(steps[999::1000], sigma_rel)
    np.testing.assert_allclose(coarse, alpha.reshape(20, 1000).sum(axis=1), rtol=1e-9)


def test_posthoc_ema_rejects_bad_widths_and_steps():
    for bad in (0.0, 0.29, -0.1):
        with pytest.raises(LcscError, match="post-hoc EMA width"):
            posthoc_ema_profile([1, 2, 3], bad)
    with pytest.raises(LcscError, match="strictly increasing"):
        posthoc_ema_profile([3, 2], 0.1)
    assert posthoc_ema_profile([0, 5, 10], 0.1)[0] == 0.0  # the initial weights get no mass of their own


def test_profiles_and_names():
    profiles = baseline_profiles([1, 2, 3], [0.5, 0.999], [0.1])
    assert list(profiles) == ["newest", "uniform", "ema_0.5", "ema_0.999", "phema_0.1"]
    np.testing.assert_array_equal(named_profile("phema_0.1", [1, 2, 3]), profiles["phema_0.1"])
    assert profiles["newest"].tolist() == [0, 0, 1] and np.allclose(profiles["uniform"], 1 / 3)
    np.testing.assert_allclose(profiles["ema_0.5"], [0.25, 0.25, 0.5])
    np.testing.assert_array_equal(named_profile("ema_0.5", [1, 2, 3]), profiles["ema_0.5"])
    for bad in ("ema_x", "phema_", "best"):
        with pytest.raises(LcscError, match="--profile"):
            named_profile(bad, [1, 2, 3])
    with pytest.raises(LcscError, match="strictly between 0 and 1"):
        ema_profile([1, 2], 1.0)
    with pytest.raises(LcscError, match="strictly increasing"):
        ema_profile([2, 2], 0.9)


def run_cli(capsys, monkeypatch, *args) -> tuple[int, str, str]:
    """The CLI in-process through its real entry (`lcsc-merge`): exit code, stdout, stderr."""
    monkeypatch.setattr(sys, "argv", ["lcsc-merge", *map(str, args)])
    try:
        main_merge()
        code = 0
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_exports_profile_and_coefficients(tmp_path, capsys, monkeypatch):
    write_run(tmp_path / "run", STEPS, layout="pt", key="model")
    code, out, err = run_cli(capsys, monkeypatch, tmp_path / "run", "--window", 500, "--profile", "ema_0.9",
                             "--out", tmp_path / "ema.pt")
    assert code == 0, err
    assert "selected 3 checkpoints, steps: 350, 500, 800" in out
    sidecar = json.loads((tmp_path / "ema.pt.json").read_text())
    np.testing.assert_allclose(sidecar["coefficients"], ema_profile([350, 500, 800], 0.9))
    code, _, err = run_cli(capsys, monkeypatch, tmp_path / "run", "--window", 500, "--coefficients",
                           tmp_path / "ema.pt.json", "--out", tmp_path / "again.pt")
    assert code == 0, err
    first = torch.load(tmp_path / "ema.pt", weights_only=True)["model"]
    second = torch.load(tmp_path / "again.pt", weights_only=True)["model"]
    assert all(torch.equal(first[k], second[k]) for k in first)
    code, out, _ = run_cli(capsys, monkeypatch, tmp_path / "run", "--interval", 2)
    assert code == 0 and "steps: 100, 350, 800" in out
    code, _, err = run_cli(capsys, monkeypatch, tmp_path / "run", "--coefficients", tmp_path / "ema.pt.json",
                           "--out", tmp_path / "x.pt")
    assert code == 2 and "written for steps [350, 500, 800] but the selection is [100, 200, 350, 500, 800]" in err


def test_cli_ema_profile_follows_the_runs_recorded_ema_warmup(tiny_cm_run, tmp_path, capsys, monkeypatch):
    """A run of ours records its EMA warm-up; `--profile ema_<decay>` must rebuild that EMA, not the plain one."""
    warmup = json.loads((tiny_cm_run / "run.json").read_text())["training"]["ema_warmup"]
    code, out, err = run_cli(capsys, monkeypatch, tiny_cm_run / "checkpoints", "--profile", "ema_0.99",
                             "--out", tmp_path / "ema.safetensors")
    assert code == 0, err
    assert "with the run's EMA warm-up" in out
    steps = [f.step for f in discover_checkpoints(tiny_cm_run / "checkpoints")]
    sidecar = json.loads((tmp_path / "ema.safetensors.json").read_text())
    np.testing.assert_allclose(sidecar["coefficients"], ema_profile(steps, 0.99, warmup))
    assert not np.allclose(sidecar["coefficients"], ema_profile(steps, 0.99))


def test_cli_errors_are_one_line_with_exit_2(tmp_path, capsys, monkeypatch):
    write_run(tmp_path / "run", STEPS)
    cases = [
        ((tmp_path / "empty",), "checkpoint folder not found"),
        ((tmp_path / "run", "--coefficients", "1,2", "--out", tmp_path / "m"), "2 values for 5 selected"),
        ((tmp_path / "run", "--window", 500, "--coefficients", "0.1,0.2,x", "--out", tmp_path / "m"),
         "neither a file nor a comma list"),
        ((tmp_path / "run", "--profile", "newest"), "--out is required"),
    ]
    for args, message in cases:
        code, _, err = run_cli(capsys, monkeypatch, *args)
        assert code == 2 and err.startswith("error: ") and message in err, err
        assert len(err.strip().splitlines()) == 1
    script = subprocess.run([sys.executable, str(REPO / "launch" / "merge_checkpoints.py"), str(tmp_path / "nope")],
                            capture_output=True, text=True, timeout=120)  # the script entry point itself
    assert script.returncode == 2 and script.stderr.startswith("error: ") and "not found" in script.stderr
    assert "--stack-dtype" in subprocess.run([sys.executable, str(REPO / "launch" / "merge_checkpoints.py"), "--help"],
                                             capture_output=True, text=True, timeout=120).stdout


@pytest.mark.parametrize("dtype,stream", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)])
def test_constant_float_tensors_are_copied_from_the_newest_never_merged(tmp_path, dtype, stream):
    """A float tensor identical in every checkpoint (a constant buffer such as a resample filter) keeps its
    value bit for bit under Σα ≠ 1, in the stack, its payload, a bound model and the export; every tensor
    that differs is still Σ αᵢ θᵢ."""
    states = run_states(STEPS)
    for state in states.values():
        state["1.running_var"] = torch.linspace(0.5, 1.5, 8)  # constant: the same in every checkpoint
    for step, state in states.items():
        save_file(state, str(tmp_path / f"model_{step:07d}.safetensors"))
    files = discover_checkpoints(tmp_path)
    alpha = ALPHA * 2  # Σα = 1.5
    stack = CheckpointStack.from_files(files, storage_dtype=dtype, stream=stream)
    assert stack.copied_float_tensors == ["1.running_var"]
    assert stack.num_params == sum(t.numel() for t in states[STEPS[0]].values() if t.is_floating_point()) - 8
    reference = reference_merge(files, alpha)
    reference["1.running_var"] = states[STEPS[-1]]["1.running_var"].double()
    for candidate in (stack, CheckpointStack.from_payload(pickle.loads(pickle.dumps(stack.to_payload())))):
        merged = candidate.merged_state_dict(alpha)
        assert torch.equal(merged["1.running_var"], states[STEPS[-1]]["1.running_var"])
        assert max_relative_error(merged, reference) <= (1e-6 if dtype == torch.float32 else 5e-2)
        model = tiny_model()
        candidate.merge_into(model, alpha)
        assert torch.equal(model.state_dict()["1.running_var"], states[STEPS[-1]]["1.running_var"])
        assert max_relative_error(model.state_dict(), reference) <= (1e-6 if dtype == torch.float32 else 5e-2)
    exported = load_file(str(export_merged(stack, alpha, tmp_path / "out.safetensors")))
    assert torch.equal(exported["1.running_var"], states[STEPS[-1]]["1.running_var"])


def test_identical_checkpoints_are_refused(tmp_path):
    state = tiny_model().state_dict()
    for step in (1, 2):
        save_file(state, str(tmp_path / f"model_{step:07d}.safetensors"))
    with pytest.raises(LcscError, match="hold identical weights"):
        CheckpointStack.from_files(discover_checkpoints(tmp_path))
