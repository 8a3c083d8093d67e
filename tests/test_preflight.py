"""The preflight, driven through `launch/tune_cm.py` as a user runs it: each mistake people make with their own
network and checkpoints stops the job before Ray starts, with one line naming the file or field and the fix,
exit status 2, and no experiment folder. Fixing the input (or the flag the line names) makes the same
command start the search."""

from __future__ import annotations

import json
import shutil
import struct
import threading
import zipfile
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load_file, save_file

from cli_runs import FAST, driver_env, last_line, run_driver
from lcsc_ray.checkpoints import discover_checkpoints
from lcsc_ray.errors import LcscError
from lcsc_ray.features.inception import WEIGHTS_FILE, weights_name_mismatch
from lcsc_ray.preflight import VERIFY_THREAD_PREFIX, check_detection_flags, check_trial_budget, preflight
from lcsc_ray.reference_stats import ensure_reference_stats
from lcsc_ray.run_folder import load_run
from lcsc_ray.scoring import ScoringSpec
from lcsc_ray.search.job import exclude_steps

FACTORY_MODULE = '''
from lcsc_ray.models.unet import UNet

def build(fail=False, **kwargs):
    if fail:
        raise ValueError("this factory was asked to fail")
    return UNet(**kwargs)
'''


@pytest.fixture()
def run_copy(tiny_cm_run, tmp_path) -> Path:
    """A private copy of the tiny CM run that a test may damage."""
    run = tmp_path / "run"
    shutil.copytree(tiny_cm_run, run)
    return run


def _checkpoints(run: Path) -> list[Path]:
    return sorted((run / "checkpoints").glob("*.safetensors"))


def _edit_run_json(run: Path, edit) -> None:
    path = run / "run.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def _spec(run_dir: Path, exclude: tuple[int, ...] = ()) -> ScoringSpec:
    """The search's scoring spec for every checkpoint of `run_dir` but the `exclude` steps (digits extractor)."""
    run = load_run(run_dir)
    files = exclude_steps(discover_checkpoints(run.checkpoint_dir), list(exclude))
    return ScoringSpec(run_dir=str(run_dir), files=tuple(files), extractor="digits",
                       reference_stats=str(ensure_reference_stats(run.config["data"], "digits")))


def _refused(run: Path, tmp_path: Path, *extra: str, env: dict | None = None) -> str:
    """Run the job on `run`; assert it stopped in the preflight (exit 2, no experiment, no Ray); its last line."""
    storage, log = tmp_path / "storage", tmp_path / "refused.log"
    args = ["--ckpt-dir", str(run), "--num-trials", "12", "--storage", str(storage), "--name", "x", "--no-dashboard",
            *FAST, *extra]
    code = run_driver(args, log, env=env, timeout=180)
    text = log.read_text()
    assert code == 2, text[-3000:]
    assert not (storage / "x").exists(), "the preflight must fail before an experiment folder exists"
    assert "Started a local Ray" not in text and "Traceback" not in text, text[-3000:]
    line = last_line(log)
    assert line.startswith("error: ") and len(line.splitlines()) == 1
    return line


def test_ddp_prefix_is_named_and_the_flag_it_names_fixes_it(run_copy, tmp_path):
    for path in _checkpoints(run_copy):
        save_file({f"module.{k}": v for k, v in load_file(path).items()}, path)
    line = _refused(run_copy, tmp_path)
    assert "every key starts with 'module.'" in line and line.endswith("pass --strip-key-prefix module.")
    # The flag the line names makes the same command run the search to its end.
    code = run_driver(["--ckpt-dir", str(run_copy), "--num-trials", "12", "--storage", str(tmp_path / "ok"),
                       "--name", "x", "--no-dashboard", *FAST, "--strip-key-prefix", "module."], tmp_path / "ok.log")
    assert code == 0, (tmp_path / "ok.log").read_text()[-3000:]
    results = json.loads((tmp_path / "ok" / "x" / "final" / "results.json").read_text())
    assert results["search"]["trials_completed"] == 12 and results["search"]["trials_failed"] == 0


def test_another_architecture_names_the_first_key_and_run_json(run_copy, tmp_path):
    _edit_run_json(run_copy, lambda c: c["model"]["kwargs"].update(channel_mult=[1, 2, 2]))
    line = _refused(run_copy, tmp_path)
    assert str(run_copy / "run.json") in line and "fix 'model' (factory and kwargs) there" in line
    assert "is missing (" in line or ", which is absent (" in line


def test_wrong_width_names_the_tensor_and_both_shapes(run_copy, tmp_path):
    _edit_run_json(run_copy, lambda c: c["model"]["kwargs"].update(channels=16))
    line = _refused(run_copy, tmp_path)
    assert "has shape [" in line and "] instead of [" in line and "fix 'model' (factory and kwargs) there" in line


def test_factory_that_raises_is_an_input_error(run_copy, tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "my_factory.py").write_text(FACTORY_MODULE)

    def use_factory(config):
        config["model"] = {"factory": "my_factory:build", "kwargs": {**config["model"]["kwargs"], "fail": True}}

    _edit_run_json(run_copy, use_factory)
    line = _refused(run_copy, tmp_path, env=driver_env(PYTHONPATH=str(package)))
    assert "model factory 'my_factory:build'" in line and "raised ValueError: this factory was asked to fail" in line
    assert line.endswith("fix 'model' in run.json")


def test_wrong_image_shape_is_caught_by_the_sampler_check(run_copy, tmp_path):
    _edit_run_json(run_copy, lambda c: c.update(image_shape=[1, 16, 16]))
    line = _refused(run_copy, tmp_path)
    assert "'image_shape'" in line and str(run_copy / "run.json") in line


def test_truncated_middle_checkpoint_is_found_from_its_header(run_copy, tmp_path):
    victim = _checkpoints(run_copy)[5]
    victim.write_bytes(victim.read_bytes()[:-64])
    line = _refused(run_copy, tmp_path)
    assert line.startswith(f"error: {victim}: unreadable or truncated safetensors file")
    assert "--exclude-steps 30" in line
    # Dropping it with the flag the line names makes the same selection pass the preflight.
    assert preflight(_spec(run_copy, exclude=(30,)), load_run(run_copy)).num_checkpoints == 11


def test_nan_newest_checkpoint_names_its_step_and_exclude_steps(run_copy, tmp_path):
    newest = _checkpoints(run_copy)[-1]
    state = load_file(newest)
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, newest)
    line = _refused(run_copy, tmp_path)
    assert f"{newest}: tensor {name!r} holds NaN or Inf (the run diverged at step 60)" in line
    assert "--exclude-steps 60" in line


def test_single_checkpoint_and_unknown_excluded_step(run_copy, tmp_path):
    line = _refused(run_copy, tmp_path, "--max-checkpoints", "1")
    assert "LCSC combines at least 2 checkpoints, the selection holds only step 60" in line
    line = _refused(run_copy, tmp_path, "--exclude-steps", "7")
    assert line.startswith("error: --exclude-steps 7: no selected checkpoint at that step")


def test_run_json_without_data_asks_for_ref_stats(run_copy, tmp_path):
    _edit_run_json(run_copy, lambda c: c.pop("data"))
    line = _refused(run_copy, tmp_path)
    assert "names no training 'data'" in line and "pass --ref-stats FILE.npz" in line


def test_relative_storage_inside_a_ray_job_is_refused(tmp_path, tiny_cm_run):
    log = tmp_path / "job.log"
    code = run_driver(["--ckpt-dir", str(tiny_cm_run), "--storage", "relative_results", "--no-dashboard", *FAST], log,
                      env=driver_env(RAY_JOB_CONFIG_JSON_ENV_VAR="{}"), timeout=180)
    assert code == 2, log.read_text()[-3000:]
    assert last_line(log).startswith("error: --storage relative_results is a relative path, and this search runs "
                                     "as a Ray Job")


# ---- every checkpoint read in full before Ray: damage in a middle file is one line, not a silent merge -------


class NotATensor:
    """An object a checkpoint must not hold: `weights_only` loading refuses to unpickle it."""


@pytest.fixture()
def pt_run(run_copy) -> Path:
    """The tiny run with its checkpoints re-saved as zip-format `.pt` files (torch.save's default)."""
    for path in _checkpoints(run_copy):
        torch.save(load_file(path), path.with_suffix(".pt"))
        path.unlink()
    return run_copy


def _refusal(run: Path) -> str:
    """The preflight's one-line error for `run` (called directly: no driver, and no Ray session appears)."""
    with pytest.raises(LcscError) as caught:
        preflight(_spec(run), load_run(run))
    assert not ray.is_initialized()
    # no thread still reads a checkpoint that the test may rewrite next (a mapped file cut short is SIGBUS)
    assert not [thread for thread in threading.enumerate() if thread.name.startswith(VERIFY_THREAD_PREFIX)]
    message = str(caught.value)
    assert len(message.splitlines()) == 1 and "--resume" not in message, message
    return message


def _zero_bytes_in_largest_tensor(path: Path, count: int = 64) -> str:
    """Zero `count` bytes inside the data of the largest tensor record of a torch zip archive, leaving its
    directory intact (a bad sector, a flaky copy); returns the record's name."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    assert raw[start:start + count] != bytes(count)
    raw[start:start + count] = bytes(count)
    path.write_bytes(raw)
    return info.filename


def _replace_middle(run: Path, edit) -> Path:
    """Apply `edit` to the state dict of the middle checkpoint (step 30) and save it back; returns its path."""
    victim = _checkpoints(run)[5]
    state = load_file(victim)
    edit(state)
    save_file(state, victim)
    return victim


def test_bit_damaged_middle_pt_fails_its_crc_before_ray(pt_run, tmp_path):
    victim = sorted((pt_run / "checkpoints").glob("*.pt"))[5]
    record = _zero_bytes_in_largest_tensor(victim)
    line = _refused(pt_run, tmp_path, "--dry-run")
    assert line == (f"error: {victim}: record {record!r} fails its CRC-32 check, so its bytes changed after they "
                    "were written (a damaged copy or disk); copy or re-save it, or leave step 30 out with "
                    "--exclude-steps 30")
    assert preflight(_spec(pt_run, exclude=(30,)), load_run(pt_run)).num_checkpoints == 11


def test_nan_in_a_middle_checkpoint_is_found_before_ray(run_copy):
    name = "conv_out.weight"
    victim = _replace_middle(run_copy, lambda state: state[name].view(-1)[3:5].fill_(float("inf")))
    message = _refusal(run_copy)
    assert message.startswith(f"{victim}: tensor {name!r} holds NaN or Inf (the run diverged at step 30)")
    assert "leave step 30 out with --exclude-steps 30" in message


def test_another_shape_in_a_middle_checkpoint_names_the_newest(run_copy):
    name = "conv_out.weight"
    victim = _replace_middle(run_copy, lambda state: state.update({name: torch.cat([state[name]] * 2)}))
    message = _refusal(run_copy)
    assert message.startswith(f"{victim}: tensor {name!r} has shape [")
    assert "compared with the newest checkpoint model_0000060.safetensors" in message
    assert "leave step 30 out with --exclude-steps 30" in message


def test_an_integer_tensor_in_place_of_a_floating_one_is_refused(run_copy):
    name = "conv_out.weight"
    _replace_middle(run_copy, lambda state: state.update({name: state[name].round().to(torch.int32)}))
    assert f"tensor {name!r} is torch.int32 instead of torch.float32" in _refusal(run_copy)


@pytest.mark.parametrize("change, what", [(-64, "cut short"), (16, "bytes after the last tensor")])
def test_safetensors_size_must_match_its_header(run_copy, change, what):
    victim = _checkpoints(run_copy)[5]
    raw = victim.read_bytes()
    victim.write_bytes(raw[:change] if change < 0 else raw + bytes(change))
    message = _refusal(run_copy)
    assert message.startswith(f"{victim}: unreadable or truncated safetensors file ({len(raw) + change:,} bytes "
                              f"where its header describes {len(raw):,}: {what})")


def test_truncated_legacy_pt_and_pickled_objects_are_refused(pt_run):
    files = sorted((pt_run / "checkpoints").glob("*.pt"))
    legacy = files[5]
    torch.save(torch.load(legacy, weights_only=True), legacy, _use_new_zipfile_serialization=False)
    legacy.write_bytes(legacy.read_bytes()[:-100])
    assert _refusal(pt_run).startswith(f"{legacy}: unreadable or truncated checkpoint (")
    torch.save(torch.load(files[4], weights_only=True), legacy, _use_new_zipfile_serialization=False)
    torch.save({**torch.load(files[7], weights_only=True), "extra": NotATensor()}, files[7])
    assert _refusal(pt_run).startswith(f"{files[7]}: holds objects other than tensors and plain containers")


def test_a_link_to_another_selected_checkpoint_names_both(run_copy):
    files = _checkpoints(run_copy)
    files[5].unlink()
    files[5].symlink_to(files[4].name)
    assert _refusal(run_copy) == (
        f"{files[5]} (step 30) and {files[4]} (step 25) are the same file (a link), so one checkpoint would count "
        "twice; remove the link, or leave step 30 out with --exclude-steps 30")
    files[5].unlink()
    files[5].symlink_to("gone.safetensors")
    assert _refusal(run_copy) == (f"{files[5]}: a symbolic link to gone.safetensors, which does not exist; restore "
                                  "it, or leave step 30 out with --exclude-steps 30")


def test_num_trials_spent_on_the_baselines_is_refused_before_ray(run_copy, tmp_path):
    line = _refused(run_copy, tmp_path, "--num-trials", "4", "--ema", "0.99,0.995", "--phema", "")
    assert line == ("error: --num-trials 4 leaves no search candidate after the 4 baselines evaluated first (newest, "
                    "uniform, ema_0.99, ema_0.995); pass --num-trials 5 or more (a search needs hundreds to beat them)")
    check_trial_budget(5, ["newest", "uniform", "ema_0.99", "ema_0.995"])


def test_detection_flags_with_a_run_json_are_refused():
    with pytest.raises(LcscError, match=r"^--model-kwargs applies only to runs without a run.json .* and drop "
                                        r"--model-kwargs and --image-shape$"):
        check_detection_flags({"--model-kwargs": {"channels": 8}, "--image-shape": (1, 8, 8)}, "/r/run.json")
    check_detection_flags({"--model-kwargs": {"channels": 8}}, None)  # a detected run: they describe it
    check_detection_flags({"--model-factory": None, "--model-kwargs": {}}, "/r/run.json")  # not given


def test_sample_counts_below_the_feature_dimension_are_warned_about(run_copy):
    report = preflight(_spec(run_copy), load_run(run_copy), sample_counts={"--fid-samples": 63, "--final-samples": 64})
    assert report.warnings == ("warning: --fid-samples 63 is below the 64 dimensions of the digits features, so "
                               "their sample covariance is singular and the Fréchet distance biased; use at least 64 "
                               "samples for a distance comparable with others",)
    assert report.summary().startswith("preflight: 12 checkpoints read in full")


def test_inception_weights_whose_hash_differs_from_their_name_are_warned_about(tmp_path):
    path = tmp_path / WEIGHTS_FILE
    assert weights_name_mismatch(path, "6726825d" + "0" * 56) is None
    assert weights_name_mismatch(tmp_path / "my_inception.pth", "0" * 64) is None  # no hash in the name
    warning = weights_name_mismatch(path, "0123abcd" + "0" * 56)
    assert warning.startswith(f"warning: {path}: its sha256 starts 0123abcd, not 6726825d as its name says")
