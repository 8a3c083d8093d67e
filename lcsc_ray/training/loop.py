"""The training loop shared by consistency training (CM) and diffusion training (DM).

One Adam optimiser on the raw network (optionally with gradient-norm clipping), linear LR warm-up (optionally a
cosine anneal at the end), a training EMA for evaluation, and a checkpoint
(raw + EMA weights, resume state) every `save_every` updates (lcsc_ray/training/checkpointing.py). The run
folder's run.json is written first, so later tools rebuild the network from the folder alone; a finished
run gets `done.json` (atomic) with its statistics, then sample grids from the newest raw and EMA weights.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from lcsc_ray.atomic import atomic_write_json
from lcsc_ray.data import load_images
from lcsc_ray.devices import resolve_device
from lcsc_ray.errors import LcscError
from lcsc_ray.host_memory import retain_freed_memory
from lcsc_ray.images import write_sample_grid
from lcsc_ray.models import build_model
from lcsc_ray.precond import SigmaConfig
from lcsc_ray.profiles import EMA_WARMUP, ema_decay_at
from lcsc_ray.progress import progress
from lcsc_ray.run_folder import DONE_JSON, RUN_JSON, load_run, validate_config
from lcsc_ray.training.checkpointing import load_weights, resume, save_checkpoint
from lcsc_ray.training.ct import CT_DEFAULTS, ct_loss
from lcsc_ray.training.dm import DM_DEFAULTS, edm_loss

LOSSES = {"cm": (ct_loss, CT_DEFAULTS), "dm": (edm_loss, DM_DEFAULTS)}
ADAM_BETA2 = 0.999  # torch's default; run.json records `adam_beta2` only when a run uses another value


def make_config(
    kind: str, *, data: str, steps: int, save_every: int, batch_size: int, lr: float, seed: int,
    model_kwargs: dict[str, Any], ema_decay: float, warmup: int, factory: str = "unet",
    loss_settings: dict[str, Any] | None = None, grad_clip: float = 0.0, adam_beta2: float = ADAM_BETA2,
    lr_anneal: tuple[float, float] | None = None, init_weights: str | None = None,
) -> dict:
    """run.json content for a new run (image shape filled in by `train` from the data). `loss_settings`
    override the loss's defaults (e.g. the CT curriculum's `s1` and `curriculum_end`). `ema_warmup` records
    the training EMA's decay schedule, so profiles rebuilt from the raw checkpoints can follow it
    (lcsc_ray/profiles.py). `grad_clip` (max gradient norm, 0 = off), `adam_beta2` and `lr_anneal` (start
    fraction, final lr ratio: see `learning_rate`) and `init_weights` (a safetensors state dict of the same
    network to start from instead of a random initialisation, e.g. a diffusion run's EMA as in ECT) are
    recorded only when set, so run.json files written before they existed still describe the same run."""
    for flag, value in (("--steps", steps), ("--save-every", save_every), ("--batch-size", batch_size)):
        if value < 1:
            raise LcscError(f"{flag} {value}: must be at least 1")
    if lr <= 0 or not 0 <= ema_decay < 1:
        raise LcscError(f"--lr {lr} must be > 0 and --ema-decay {ema_decay} in [0, 1)")
    if grad_clip < 0:
        raise LcscError(f"--grad-clip {grad_clip}: give a maximum gradient norm > 0, or 0 for no clipping")
    if not 0 < adam_beta2 < 1:
        raise LcscError(f"--adam-beta2 {adam_beta2}: give a decay in (0, 1), e.g. 0.99")
    if lr_anneal is not None and not (0 <= lr_anneal[0] < 1 and 0 <= lr_anneal[1] <= 1):
        raise LcscError(f"--lr-anneal {lr_anneal[0]},{lr_anneal[1]}: give START,FINAL with START in [0, 1) "
                        "(fraction of training) and FINAL in [0, 1] (final lr / lr), e.g. 0.6,0.1")
    if init_weights is not None and not Path(init_weights).is_file():
        raise LcscError(f"--init-weights {init_weights}: no such file; give a .safetensors state dict of the same network")
    options = {**({"init_weights": str(Path(init_weights).resolve())} if init_weights else {}),
               **({"grad_clip": grad_clip} if grad_clip else {}),
               **({"adam_beta2": adam_beta2} if adam_beta2 != ADAM_BETA2 else {}),
               **({"lr_anneal": {"start": lr_anneal[0], "final": lr_anneal[1]}} if lr_anneal else {})}
    return {
        "format": 1,
        "kind": kind,
        "model": {"factory": factory, "kwargs": model_kwargs},
        "data": data,
        "image_shape": None,
        "precond": SigmaConfig().to_dict(),
        "training": {
            "steps": steps, "save_every": save_every, "batch_size": batch_size, "lr": lr, "seed": seed,
            "ema_decay": ema_decay, "ema_warmup": EMA_WARMUP, "warmup": warmup,
            "loss": "ict" if kind == "cm" else "edm", **LOSSES[kind][1], **(loss_settings or {}), **options,
        },
    }


def _prepare_folder(run_dir: Path, config: dict) -> None:
    """Write run.json for a new run, or check that an existing one describes the same run (resume)."""
    path = run_dir / RUN_JSON
    if path.is_file():
        existing = load_run(run_dir).config
        if existing != config:
            raise LcscError(
                f"{path}: this folder holds a run with different settings; choose another --out or delete the folder"
            )
        return
    validate_config(config, str(path))
    atomic_write_json(path, config)


def train(
    run_dir: str | Path, config: dict, *, quiet: bool = False, threads: int | None = 1, device: str = "cpu"
) -> dict:
    """Train (or resume) the run described by `config` in `run_dir`; return the done.json statistics.

    `threads` caps torch's intra-op threads while training (restored afterwards; None leaves it alone):
    the demo model is so small that a second OpenMP thread per process mostly spins against other processes
    on a shared CPU. `device` ("auto", "cpu", "cuda", ...) holds the network and data; random numbers always
    come from one CPU generator, so resume is exact everywhere.
    """
    retain_freed_memory()  # each step frees and re-allocates the same activations
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _train(Path(run_dir).expanduser().resolve(), config, quiet, resolve_device(device))
    finally:
        torch.set_num_threads(previous)


def _train(run_dir: Path, config: dict, quiet: bool, device: torch.device) -> dict:
    images = load_images(config["data"])
    config = {**config, "image_shape": list(images.shape[1:])}
    _prepare_folder(run_dir, config)
    run = load_run(run_dir)
    settings = config["training"]
    loss_fn = LOSSES[run.kind][0]

    torch.manual_seed(settings["seed"])  # network initialisation
    net = build_model(config["model"]["factory"], config["model"]["kwargs"]).to(device).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(net.parameters(), lr=settings["lr"], betas=(0.9, settings.get("adam_beta2", ADAM_BETA2)))
    generator = torch.Generator().manual_seed(settings["seed"])
    start = resume(run_dir, net, ema, optimizer, generator)
    if start == 0 and settings.get("init_weights"):  # a fresh run from other weights of this network (e.g. a DM's EMA)
        load_weights(Path(settings["init_weights"]), net)
        ema.load_state_dict(net.state_dict())
    total = settings["steps"]
    if start >= total and (run_dir / DONE_JSON).is_file():
        return json.loads((run_dir / DONE_JSON).read_text(encoding="utf-8"))  # already complete: keep its record

    began, losses = time.perf_counter(), []
    bar = progress(range(start, total), initial=start, total=total, disable=quiet, desc=f"{run.kind} training",
                   unit="step")
    for step in bar:
        # dropout masks come from torch's global generator: seeded from the step, so a resumed run draws the same
        torch.manual_seed(settings["seed"] * 2**32 + step)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(settings, step)
        batch = images[torch.randint(len(images), (settings["batch_size"],), generator=generator)].to(device)
        loss = loss_fn(net, batch, step, total, run.sigmas, settings, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if settings.get("grad_clip"):
            torch.nn.utils.clip_grad_norm_(net.parameters(), settings["grad_clip"])
        optimizer.step()
        _update_ema(ema, net, settings["ema_decay"], step)
        losses.append(loss.item())
        if (step + 1) % settings["save_every"] == 0:
            save_checkpoint(run_dir, step + 1, net, ema, optimizer, generator)
            bar.set_postfix(loss=f"{sum(losses[-settings['save_every']:]) / len(losses[-settings['save_every']:]):.4f}",
                            refresh=False)  # shown with the next refresh: a log gets no line per checkpoint

    stats = {
        "steps": total,
        "resumed_from": start,
        "train_seconds_this_session": round(time.perf_counter() - began, 1),
        "parameters": sum(p.numel() for p in net.parameters()),
        "final_loss_mean_last_100": sum(losses[-100:]) / max(1, len(losses[-100:])) if losses else None,
    }
    net.eval()
    write_sample_grid(run, ema, run_dir / "samples.png")
    write_sample_grid(run, net, run_dir / "samples_raw.png")
    atomic_write_json(run_dir / DONE_JSON, stats)
    return stats


def learning_rate(settings: dict, step: int) -> float:
    """Linear warm-up over `warmup` updates, then constant; with `lr_anneal` {"start": f, "final": r} a cosine
    from lr at step f·K down to r·lr at the last step."""
    lr = settings["lr"] * min(1.0, (step + 1) / max(1, settings["warmup"]))
    anneal = settings.get("lr_anneal")
    if anneal:
        begin = anneal["start"] * settings["steps"]
        t = min(1.0, max(0.0, (step + 1 - begin) / max(1.0, settings["steps"] - begin)))
        lr *= anneal["final"] + (1 - anneal["final"]) * 0.5 * (1 + math.cos(math.pi * t))
    return lr


@torch.no_grad()
def _update_ema(ema: torch.nn.Module, net: torch.nn.Module, decay: float, step: int) -> None:
    """θ_ema ← β·θ_ema + (1−β)·θ with β = min(decay, (1+k)/(10+k)) (warm-up as in TF's
    ExponentialMovingAverage with num_updates, `EMA_WARMUP`), so early averages are not dominated by the
    initial weights. Note the warm-up is long: β stays below 0.999 until k ≈ 9,000."""
    beta = ema_decay_at(decay, step, EMA_WARMUP)
    for e, p in zip(ema.parameters(), net.parameters()):
        e.lerp_(p, 1.0 - beta)
    for e, b in zip(ema.buffers(), net.buffers()):
        e.copy_(b)
