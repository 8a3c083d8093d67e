"""The preflight, driven through `launch/tune_cm.py` as a user runs it: each mistake people make with their own
network and checkpoints stops the job before Ray starts, with one line naming the file or field and the fix,
exit status 2, and no experiment folder. Fixing the input (or the flag the line names) makes the same
command start the search."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_runs import FAST, driver_env, last_line, run_driver
from lcsc_ray.checkpoints import discover_checkpoints
from lcsc_ray.preflight import preflight
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
    run = load_run(run_copy)
    files = exclude_steps(discover_checkpoints(run.checkpoint_dir), [30])
    spec = ScoringSpec(run_dir=str(run_copy), files=tuple(files), extractor="digits",
                       reference_stats=str(ensure_reference_stats(run.config["data"], "digits")))
    assert preflight(spec, run).num_checkpoints == 11


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
