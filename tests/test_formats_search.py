"""The tune commands end to end on runs of other code bases (one real local Ray for the module, tiny budgets):
a diffusers run, an OpenAI consistency-models run and NVlabs EDM / ECT / EDM2 pickles, each searched as it
lies on disk, with the detected run.json kept next to the results and the winner exported in the run's
own format; plus --dry-run and inspect_run, which stop before Ray."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import torch

from lcsc_ray.cli.inspect_run import main as inspect_main
from lcsc_ray.errors import LcscError
from lcsc_ray.reference_stats import ensure_reference_stats
from lcsc_ray.search.job import run_job

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))
from fixture_nets import runs  # noqa: E402

OPENAI_FLAGS = ["--model-factory", "fixture_nets.openai_like:create_model", "--model-kwargs", '{"num_classes": 10}',
                "--image-shape", "1,8,8", "--code-dir", str(TESTS)]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _job(run_dir: Path, tmp: Path, name: str, kind: str, *extra: str) -> dict:
    storage = tmp / "exp"
    stats = ensure_reference_stats("digits", "digits")
    argv = ["--ckpt-dir", str(run_dir), "--extractor", "digits", "--ref-stats", str(stats), "--num-trials", "5",
            "--fid-samples", "40", "--final-samples", "40", "--top-k", "1", "--batch-size", "40", "--ema", "0.9",
            "--phema", "", "--storage", str(storage), "--name", name, "--no-dashboard", "--quiet", *extra]
    return run_job(argv, kind=kind)


def _detected(tmp: Path, name: str) -> dict:
    return json.loads((tmp / "exp" / f"{name}.run.json").read_text())


def test_diffusers_run_searched_as_saved(local_ray, tmp_path):
    from diffusers import UNet2DModel

    run_dir = runs.diffusers_run(tmp_path / "ddpm")
    results = _job(run_dir, tmp_path, "ddpm", "dm", "--ckpt-select", "unet_ema", "--sampler", "ddim", "--nfe", "3")
    assert results["search"]["trials_completed"] == 5
    assert _detected(tmp_path, "ddpm")["run_format"] == "diffusers" and not (run_dir / "run.json").exists()
    exported = Path(results["exported"]["checkpoint"])
    UNet2DModel.from_pretrained(exported.parent)  # the winner is a folder diffusers loads


def test_openai_run_searched_as_saved(local_ray, tmp_path):
    run_dir = runs.openai_run(tmp_path / "cm-logs")
    results = _job(run_dir, tmp_path, "openai", "cm", "--ckpt-select", "ema_0.999", "--sampler", "multistep",
                   "--grid-steps", "18", "--ts", "0,10", *OPENAI_FLAGS)
    assert results["search"]["trials_completed"] == 5
    assert _detected(tmp_path, "openai")["convention"] == "openai-cm"
    state = torch.load(results["exported"]["checkpoint"], weights_only=True)
    assert "label_emb.weight" in state


@pytest.mark.parametrize("kind, select, command", [("ect", [], "cm"), ("edm2", ["--ckpt-select", "0.050"], "dm")])
def test_nvlabs_pickles_searched_with_trust(local_ray, tmp_path, kind, select, command):
    """EDM's pickles differ from EDM2's only in names and dtype (tests/test_formats.py covers both)."""
    run_dir = runs.nvlabs_run(tmp_path / kind, kind, label_dim=10 if kind == "edm2" else 0)
    sampler = ["--sampler", "heun", "--nfe", "3"] if command == "dm" else ["--sampler", "onestep"]
    with pytest.raises(LcscError, match="--trust-pickle"):
        _job(run_dir, tmp_path, f"{kind}-refused", command, *select, *sampler)
    assert not (tmp_path / "exp" / f"{kind}-refused").exists()
    results = _job(run_dir, tmp_path, kind, command, "--trust-pickle", "--code-dir", str(TESTS), *select, *sampler)
    assert results["search"]["trials_completed"] == 5
    with open(results["exported"]["checkpoint"], "rb") as handle:
        assert isinstance(pickle.load(handle)["ema"], torch.nn.Module)


def test_dry_run_and_inspect_run_stop_before_ray(tmp_path):
    """A diffusers run and EDM pickles through the preflight (--dry-run), and inspect_run as a user runs it."""
    run_dir = runs.diffusers_run(tmp_path / "ddpm", num_class_embeds=None)
    stats = ensure_reference_stats("digits", "digits")
    result = run_job(["--ckpt-dir", str(run_dir), "--ckpt-select", "unet", "--extractor", "digits", "--ref-stats",
                      str(stats), "--nfe", "2", "--storage", str(tmp_path / "exp"), "--name", "look", "--dry-run"],
                     kind="dm")
    assert result["dry_run"] and Path(result["preview"]).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "exp" / "look.run.json").read_text())["run_format"] == "diffusers"
    assert not (tmp_path / "exp" / "look").exists()
    out = subprocess.run([sys.executable, str(REPO / "launch" / "inspect_run.py"), str(run_dir), "--ckpt-select", "unet",
                          "--nfe", "2", "--count", "4", "--out", str(tmp_path / "inspect")],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "format: diffusers; convention: diffusers" in out.stdout and "steps 100, 200, 300" in out.stdout
    assert (tmp_path / "inspect" / "samples.png").is_file() and (tmp_path / "inspect" / "run.json").is_file()
    with pytest.raises(LcscError, match="pick one with --ckpt-select"):
        inspect_main([str(run_dir), "--out", str(tmp_path / "inspect2")])
    # EDM's pickles (class-conditional here) through the whole preflight; the Ray part is EDM2's test above.
    edm = runs.nvlabs_run(tmp_path / "edm", "edm", label_dim=10)
    result = run_job(["--ckpt-dir", str(edm), "--trust-pickle", "--code-dir", str(TESTS), "--extractor", "digits",
                      "--ref-stats", str(stats), "--sampler", "heun", "--nfe", "5", "--storage", str(tmp_path / "exp"),
                      "--name", "edm", "--dry-run"], kind="dm")
    assert (result["format"], result["convention"], result["steps"]) == ("nvlabs-pickle", "edm", list(runs.STEPS))
