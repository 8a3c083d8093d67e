"""Run folders laid out exactly as other code bases write them, with tiny networks (see each builder)."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from fixture_nets.edm_like import FragileLoss, TinyECMPrecond, TinyEDMPrecond
from fixture_nets.openai_like import create_model

STEPS = (100, 200, 300)
UNET_CONFIG = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                   down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                   norm_num_groups=4)


def _seeded(build, seed: int):
    torch.manual_seed(seed)
    return build()


def diffusers_run(root: Path, num_class_embeds: int | None = 10, prediction_type: str = "epsilon") -> Path:
    """accelerate's `checkpoint-<step>/` folders with `unet/` and `unet_ema/` (UNet2DModel.save_pretrained),
    the optimizer and RNG files beside them, and the pipeline's `scheduler/` at the top."""
    from diffusers import DDPMScheduler, UNet2DModel

    for step in STEPS:
        folder = root / f"checkpoint-{step}"
        for seed, sub in ((step, "unet"), (step + 1, "unet_ema")):
            _seeded(lambda: UNet2DModel(**UNET_CONFIG, num_class_embeds=num_class_embeds), seed).save_pretrained(folder / sub)
        (folder / "optimizer.bin").write_bytes(b"not a network")
        (folder / "random_states_0.pkl").write_bytes(pickle.dumps({"rng": 0}))
    DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type).save_pretrained(root / "scheduler")
    return root


def openai_run(root: Path, num_classes: int = 10) -> Path:
    """`model<step:06d>.pt`, `ema_<rate>_<step:06d>.pt` for two rates, and the `opt`/`target_model` files."""
    root.mkdir(parents=True, exist_ok=True)
    for step in STEPS:
        build = lambda: create_model(num_classes=num_classes)  # noqa: E731
        torch.save(_seeded(build, step).state_dict(), root / f"model{step:06d}.pt")
        for k, rate in enumerate(("0.999", "0.9999")):
            torch.save(_seeded(build, step + k + 1).state_dict(), root / f"ema_{rate}_{step:06d}.pt")
        torch.save({"state": {}}, root / f"opt{step:06d}.pt")
        torch.save(_seeded(build, 7).state_dict(), root / f"target_model{step:06d}.pt")
    return root


def _snapshot(path: Path, net: torch.nn.Module, loss_fn: object = None) -> None:
    with open(path, "wb") as handle:
        pickle.dump(dict(ema=net.eval().requires_grad_(False), loss_fn=loss_fn, augment_pipe=None,
                         dataset_kwargs={"resolution": 8}), handle)


def nvlabs_run(root: Path, kind: str, label_dim: int = 0) -> Path:
    """`network-snapshot-*.pkl` dicts whose `ema` is the whole module: EDM (kimg:06d), ECT (tick:06d, plus
    the moving `-latest` copy, and a loss object like ECT's) or EDM2 (kimg:07d-std:.3f, float16, two EMA
    widths). Every network holds a constant float buffer (`resample_filter`)."""
    root.mkdir(parents=True, exist_ok=True)
    for step in STEPS:
        if kind == "edm2":
            for k, std in enumerate((0.05, 0.1)):
                net = _seeded(lambda: TinyEDMPrecond(label_dim=label_dim), step + k).half()
                _snapshot(root / f"network-snapshot-{step:07d}-{std:.3f}.pkl", net)
        else:
            cls = TinyECMPrecond if kind == "ect" else TinyEDMPrecond
            _snapshot(root / f"network-snapshot-{step:06d}.pkl", _seeded(lambda: cls(label_dim=label_dim), step),
                      FragileLoss() if kind == "ect" else None)  # ECT's loss does not survive a second pickling
    if kind == "ect":
        _snapshot(root / "network-snapshot-latest.pkl", _seeded(lambda: TinyECMPrecond(label_dim=label_dim), 9))
    return root
