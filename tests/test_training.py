"""Training runs: checkpoint cadence, loss decrease, kill-and-resume, demo reuse and CLI errors, on real digits."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lcsc_ray.data import load_images
from lcsc_ray.errors import LcscError
from lcsc_ray.models import build_model
from lcsc_ray.precond import SigmaConfig
from lcsc_ray.run_folder import load_run
from lcsc_ray.run_formats import build_network
from lcsc_ray.training import demo
from lcsc_ray.training.checkpointing import RESUME_FILE, load_weights
from lcsc_ray.training.ct import CT_DEFAULTS, ct_loss
from lcsc_ray.training.loop import learning_rate, make_config, train

ROOT = Path(__file__).resolve().parents[1]
TINY = {"channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attention": False, "dropout": 0.0,
        "emb_mode": "scale_shift"}
TINY_FLAGS = ["--channels", "8", "--channel-mult", "1,2", "--num-blocks", "1", "--batch-size", "16", "--quiet"]


def tiny_config(kind, steps, save_every, batch_size=32, lr=2e-3):
    return make_config(kind, data="digits", steps=steps, save_every=save_every, batch_size=batch_size, lr=lr,
                       seed=0, model_kwargs=TINY, ema_decay=0.99, warmup=1, loss_settings=demo.DEMO_CURRICULUM)


def steps_in(folder, prefix):
    return sorted(int(p.stem.removeprefix(prefix)) for p in Path(folder).glob(f"{prefix}*.safetensors"))


def fixed_ct_loss(run, net):
    """CT loss at the first curriculum stage (N = 11) on 512 digits with fixed noise."""
    images = load_images("digits")[:512]
    with torch.no_grad():
        return ct_loss(net, images, 0, 120, run.sigmas, run.config["training"], torch.Generator().manual_seed(123)).item()


def test_short_ct_run_writes_cadence_and_lowers_loss(tmp_path):
    stats = train(tmp_path, tiny_config("cm", steps=120, save_every=40), quiet=True)
    assert steps_in(tmp_path / "checkpoints", "model_") == [40, 80, 120]
    assert steps_in(tmp_path / "checkpoints_ema", "ema_") == [40, 80, 120]
    assert (tmp_path / "samples.png").stat().st_size > 0 and (tmp_path / "done.json").is_file()
    run = load_run(tmp_path)
    assert run.kind == "cm" and run.image_shape == (1, 8, 8)
    assert stats["parameters"] == sum(p.numel() for p in build_network(run).parameters())

    torch.manual_seed(0)  # the run's initial weights (same seed as training)
    initial = build_model("unet", TINY).train()
    trained = build_network(run).train()
    load_weights(tmp_path / "checkpoints" / "model_0000120.safetensors", trained)
    # paired comparison (same images and noise); measured 5.65 -> 5.14, the N = 11 loss has a noise floor
    assert fixed_ct_loss(run, trained) < 0.95 * fixed_ct_loss(run, initial)
    raw40 = load_file(str(tmp_path / "checkpoints" / "model_0000040.safetensors"))
    raw120 = load_file(str(tmp_path / "checkpoints" / "model_0000120.safetensors"))
    assert set(raw40) == set(trained.state_dict()) and not torch.equal(raw40["conv_in.weight"], raw120["conv_in.weight"])


class DropoutProbe(torch.nn.Module):
    """A network whose output is its input under a dropout mask; it records every mask it draws."""

    def __init__(self):
        super().__init__()
        self.masks = []

    def forward(self, x, noise_label):
        mask = torch.nn.functional.dropout(torch.ones_like(x), 0.5, self.training)
        self.masks.append(mask)
        return x * mask


def test_ct_target_and_prediction_share_their_dropout_masks():
    """With masks of their own the target would be another random sub-network each step; the CM demo trains
    with dropout 0.2, so this is what makes its CT learn at all (docs/TRAINING.md)."""
    run_settings = {**CT_DEFAULTS, **demo.DEMO_CURRICULUM}
    net = DropoutProbe().train()
    images = load_images("digits")[:64]
    ct_loss(net, images, 0, 100, SigmaConfig(), run_settings, torch.Generator().manual_seed(0))
    target, prediction = net.masks
    assert torch.equal(target, prediction) and 0.3 < (target == 0).float().mean() < 0.7
    ct_loss(net, images, 1, 100, SigmaConfig(), run_settings, torch.Generator().manual_seed(0))
    assert not torch.equal(net.masks[2], target), "each step draws new masks"


def test_dm_run_writes_checkpoints(tmp_path):
    train(tmp_path, tiny_config("dm", steps=20, save_every=10), quiet=True)
    assert steps_in(tmp_path / "checkpoints", "model_") == [10, 20]
    assert load_run(tmp_path).kind == "dm"


def _launch(out, steps):
    cmd = [sys.executable, str(ROOT / "launch" / "train_cm.py"), "--out", str(out), "--steps", str(steps),
           "--save-every", "20", *TINY_FLAGS]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_kill_and_resume_continues_from_newest_checkpoint(tmp_path):
    steps, out = 200, tmp_path / "killed"
    proc = _launch(out, steps)
    deadline = time.time() + 90
    while len(steps_in(out / "checkpoints", "model_")) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resume_step = torch.load(out / RESUME_FILE, weights_only=True)["step"]
    assert 20 <= resume_step < steps and not (out / "done.json").exists(), "the run was not interrupted mid-way"

    finished = _launch(out, steps)
    stdout, stderr = finished.communicate(timeout=180)
    assert finished.returncode == 0, stderr
    assert json.loads(stdout.strip().splitlines()[-1])["resumed_from"] == resume_step
    assert steps_in(out / "checkpoints", "model_") == list(range(20, steps + 1, 20))

    # an uninterrupted run with the same settings reaches the same weights: resume restored everything, the
    # dropout masks of the CM recipe's dropout 0.2 included
    reference = tmp_path / "reference"
    assert demo.DEFAULTS["cm"]["model_kwargs"]["dropout"] == 0.2
    config = make_config("cm", data="digits", steps=steps, save_every=20, batch_size=16, lr=demo.DEFAULTS["cm"]["lr"], seed=0,
                         model_kwargs={**TINY, "dropout": 0.2}, ema_decay=0.999, warmup=200,
                         loss_settings=demo.DEMO_CURRICULUM)
    train(reference, config, quiet=True)
    for sub, name in (("checkpoints", "model"), ("checkpoints_ema", "ema")):
        a = load_file(str(out / sub / f"{name}_{steps:07d}.safetensors"))
        b = load_file(str(reference / sub / f"{name}_{steps:07d}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_ensure_demo_run_trains_once_and_reuses(tmp_path, monkeypatch):
    monkeypatch.setenv("LCSC_RAY_CACHE", str(tmp_path))
    monkeypatch.setitem(demo.DEFAULTS, "cm", {**demo.DEFAULTS["cm"], "steps": 10, "save_every": 5,
                                              "batch_size": 8, "model_kwargs": TINY})
    run_dir = demo.ensure_demo_run("cm", quiet=True)
    assert run_dir == tmp_path / "runs" / f"digits-cm-{demo.DEMO_VERSION['cm']}" and steps_in(run_dir / "checkpoints", "model_") == [5, 10]
    marker = (run_dir / "done.json").stat().st_mtime_ns
    assert demo.ensure_demo_run("cm", quiet=True) == run_dir
    assert (run_dir / "done.json").stat().st_mtime_ns == marker


def test_resume_refuses_a_folder_with_other_settings(tmp_path):
    train(tmp_path, tiny_config("cm", steps=4, save_every=2), quiet=True)
    with pytest.raises(LcscError, match="different settings"):
        train(tmp_path, tiny_config("cm", steps=4, save_every=2, lr=1e-2), quiet=True)


def test_cli_reports_bad_flags_in_one_line(tmp_path):
    cmd = [sys.executable, str(ROOT / "launch" / "train_dm.py"), "--out", str(tmp_path), "--channel-mult", "1,x"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.strip().startswith("error: --channel-mult")
    assert len(result.stderr.strip().splitlines()) == 1


def test_training_options_are_recorded_only_when_set_and_shape_the_run(tmp_path):
    plain = tiny_config("cm", steps=40, save_every=20)["training"]
    assert not {"grad_clip", "adam_beta2", "lr_anneal", "init_weights"} & set(plain)  # run.json of older runs stays equal
    config = make_config("cm", data="digits", steps=40, save_every=20, batch_size=16, lr=1e-3, seed=0,
                         model_kwargs=TINY, ema_decay=0.99, warmup=10, loss_settings=demo.DEMO_CURRICULUM,
                         grad_clip=1.0, adam_beta2=0.99, lr_anneal=(0.5, 0.1))
    settings = config["training"]
    assert (settings["grad_clip"], settings["adam_beta2"], settings["lr_anneal"]) == (1.0, 0.99, {"start": 0.5, "final": 0.1})
    rates = [learning_rate(settings, k) for k in range(40)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == rates[19] == pytest.approx(1e-3)  # warm-up, then constant
    assert all(a >= b for a, b in zip(rates[19:], rates[20:])) and rates[-1] == pytest.approx(1e-4)  # cosine to 0.1x
    assert learning_rate(plain, 39) == plain["lr"]
    train(tmp_path, config, quiet=True)  # the options train; a rerun with the same options is the same run
    assert train(tmp_path, config, quiet=True)["steps"] == 40
    # A run started from the first run's weights: its initial weights are those, not a fresh initialisation.
    init = tmp_path / "checkpoints_ema" / "ema_0000040.safetensors"
    tuned = make_config("cm", data="digits", steps=1, save_every=1, batch_size=16, lr=1e-9, seed=0, model_kwargs=TINY,
                        ema_decay=0.99, warmup=1, loss_settings=demo.DEMO_CURRICULUM, init_weights=str(init))
    train(tmp_path / "tuned", tuned, quiet=True)
    start, after = load_file(str(init)), load_file(str(tmp_path / "tuned" / "checkpoints" / "model_0000001.safetensors"))
    assert all(torch.allclose(start[k], after[k], atol=1e-6) for k in start)


@pytest.mark.parametrize("flags, message", [
    (["--lr-anneal", "0.6"], "error: --lr-anneal '0.6': give START,FINAL"),
    (["--lr-anneal", "1.2,0.1"], "error: --lr-anneal 1.2,0.1: give START,FINAL with START in [0, 1)"),
    (["--adam-beta2", "1"], "error: --adam-beta2 1.0: give a decay in (0, 1)"),
    (["--init-weights", "absent.safetensors"], "error: --init-weights absent.safetensors: no such file"),
    (["--grad-clip", "-1"], "error: --grad-clip -1.0: give a maximum gradient norm > 0, or 0 for no clipping"),
])
def test_optimizer_flags_report_bad_values_in_one_line(tmp_path, flags, message):
    cmd = [sys.executable, str(ROOT / "launch" / "train_cm.py"), "--out", str(tmp_path), *flags]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.strip().startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "run.json").exists()
