"""Check lcsc-ray against the original code of NVlabs EDM, EDM2 and locuslab ECT (clones you pass), on CPU.

For each code base a tiny run is written with that code base's own classes, the way its training loop
writes snapshots (EDM: `EDMPrecond` + `EDMLoss` snapshot dicts; EDM2: `PowerFunctionEMA` of widths 0.050/0.100
updated every step, float16 snapshot pickles with encoder and loss; ECT: `ECMPrecond` + `ECMLoss` snapshot
dicts); the weights move by random steps, so no data set or GPU is needed. Then:

- EDM2 post-hoc EMA: EDM2's own `reconstruct_phema.py` (run as a command) against lcsc-ray's reconstruction
  of the same widths (`baseline_checkpoints.edm2_posthoc_ema`);
- exports: `lcsc-merge` writes a merged snapshot, and a fresh process with only the code base on its path
  loads it the way the code base does (`pickle.load(f)['ema']`) and runs the network;
- sampling: EDM's `edm_sampler` of generate.py (Heun, 18 steps) against lcsc-ray's `heun`, and ECT's
  `generator_fn` (two steps, mid t = 0.821) against lcsc-ray's `multistep`, on the same noise (ECT's
  `torch.randn_like` replaced by the same fixed noise stream).

    python benchmarks/original_code_check.py --edm-dir ~/edm --edm2-dir ~/edm2 --ect-dir ~/ect

Prints one table (the numbers docs/FORMATS.md and docs/RESULTS.md quote). Needs click and psutil (pinned).
"""

from __future__ import annotations

import argparse
import copy
import os
import pickle
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lcsc_ray.baseline_checkpoints import extra_baselines  # noqa: E402
from lcsc_ray.checkpoints import load_checkpoint  # noqa: E402
from lcsc_ray.noise import FixedNoise  # noqa: E402
from lcsc_ray.run_formats import ForeignHints, build_network, resolve_run  # noqa: E402
from lcsc_ray.sampling import build_sampler  # noqa: E402

SNAPSHOTS = 4  # snapshots per run
STEPS_PER_SNAPSHOT = 8  # random "training" steps between snapshots
BATCH = 1024  # images per step (EDM2 names snapshots by kimg of a multiple of 1,024 images)


def _perturb(net: torch.nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        for p in net.parameters():
            scale = float(p.detach().float().std()) if p.numel() > 1 else 1.0
            p.add_(0.02 * max(scale, 1e-3) * torch.randn(p.shape, generator=generator))


def write_edm2_run(edm2: Path, folder: Path) -> None:
    """Snapshots as EDM2's training loop writes them: one pickle per width, `ema` in float16."""
    sys.path.insert(0, str(edm2))
    import dnnlib
    from training import phema
    from training.encoders import StandardRGBEncoder
    from training.networks_edm2 import Precond
    from training.training_loop import EDM2Loss

    torch.manual_seed(0)
    net = Precond(img_resolution=8, img_channels=3, label_dim=0, model_channels=16, channel_mult=[1, 2],
                  num_blocks=1, attn_resolutions=[]).train()
    ema = phema.PowerFunctionEMA(net, stds=[0.050, 0.100])
    generator = torch.Generator().manual_seed(1)
    folder.mkdir(parents=True)
    for step in range(1, SNAPSHOTS * STEPS_PER_SNAPSHOT + 1):
        _perturb(net, generator)
        ema.update(cur_nimg=step * BATCH, batch_size=BATCH)
        if step % STEPS_PER_SNAPSHOT == 0:
            for ema_net, suffix in ema.get():
                data = dnnlib.EasyDict(encoder=StandardRGBEncoder(), dataset_kwargs={}, loss_fn=EDM2Loss())
                data.ema = copy.deepcopy(ema_net).cpu().eval().requires_grad_(False).to(torch.float16)
                with open(folder / f"network-snapshot-{step * BATCH // 1000:07d}{suffix}.pkl", "wb") as handle:
                    pickle.dump(data, handle)


def write_songunet_run(code: Path, folder: Path, precond: str, loss: str, step_of: Callable[[int], int],
                       seed: int) -> None:
    """Snapshots as EDM's and ECT's training loops write them: dict(ema, loss_fn, augment_pipe, dataset_kwargs)
    of the code base's `precond` network (a tiny SongUNet) and `loss`, named `network-snapshot-<step>.pkl` with
    the snapshot's step in the code base's unit (`step_of`: EDM counts kimg, ECT ticks)."""
    sys.path.insert(0, str(code))
    from training import loss as losses
    from training import networks

    torch.manual_seed(0)
    net = getattr(networks, precond)(img_resolution=8, img_channels=3, label_dim=0, model_type="SongUNet",
                                     model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])
    generator = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    for snapshot in range(1, SNAPSHOTS + 1):
        for _ in range(STEPS_PER_SNAPSHOT):
            _perturb(net, generator)
        data = dict(ema=copy.deepcopy(net).eval().requires_grad_(False), loss_fn=getattr(losses, loss)(),
                    augment_pipe=None, dataset_kwargs={"resolution": 8})
        with open(folder / f"network-snapshot-{step_of(snapshot):06d}.pkl", "wb") as handle:
            pickle.dump(data, handle)


def edm_sampler_difference(edm: Path, run: Path) -> float:
    """Max |lcsc-ray's Heun samples − EDM's edm_sampler| (18 steps, S_churn 0) on the same initial noise."""
    import generate

    resolved = resolve_run(run, hints=ForeignHints(trust_pickle=True, code_dir=str(edm)))
    net = build_network(resolved.run, trust_pickle=True)
    net.load_state_dict(load_checkpoint(resolved.files[-1], trust_pickle=True).state_dict)
    noise = FixedNoise(0, resolved.run.image_shape)
    ours = build_sampler(resolved.run, "heun", nfe=35).sample(net, noise, 0, 16)
    theirs = generate.edm_sampler(net, noise.normal(0, 0, 16), num_steps=18)
    return float((ours.double() - theirs.clamp(-1, 1)).abs().max())


def forget_code_base(folder: Path) -> None:
    """Drop a code base from the path and its modules from the import cache: EDM, EDM2 and ECT all name their
    packages training, torch_utils and dnnlib."""
    for name in [n for n in list(sys.modules) if n.split(".")[0] in ("training", "torch_utils", "dnnlib",
                                                                     "generate", "metrics")]:
        del sys.modules[name]
    sys.path.remove(str(folder))


def _state(path: Path) -> dict[str, torch.Tensor]:
    with open(path, "rb") as handle:
        return {k: v.detach().float() for k, v in pickle.load(handle)["ema"].state_dict().items()}


def edm2_posthoc_difference(edm2: Path, run: Path, work: Path) -> tuple[float, float]:
    """Max |ours − EDM2's| over every tensor of the post-hoc EMA (widths 0.075, 0.15), and that max relative
    to the largest weight; both reconstructions are stored in float16."""
    out = work / "edm2_phema"
    subprocess.run([sys.executable, str(edm2 / "reconstruct_phema.py"), "--indir", str(run), "--outdir", str(out),
                    "--outstd", "0.075,0.15"], cwd=edm2, check=True, capture_output=True)
    resolved = resolve_run(run, select="0.050", hints=ForeignHints(trust_pickle=True, code_dir=str(edm2)))
    ours = {b.name: load_checkpoint(b.file, trust_pickle=True).state_dict for b in extra_baselines(resolved.run, resolved.files,
                                                                                 (0.075, 0.15))}
    worst = scale = 0.0
    for width in ("0.075", "0.15"):
        theirs = _state(next(out.glob(f"phema-*-{float(width):.3f}.pkl")))
        mine = ours[f"phema_{float(width)!r}"]
        for name, tensor in theirs.items():
            worst = max(worst, float((mine[name].float() - tensor).abs().max()))
            scale = max(scale, float(tensor.abs().max()))
    return worst, worst / scale


_LOAD_AND_RUN = """
import pickle, sys, torch
sys.path.insert(0, sys.argv[2])
with open(sys.argv[1], 'rb') as f:
    net = pickle.load(f)['ema']
with open(sys.argv[3], 'rb') as f:
    newest = dict(pickle.load(f)['ema'].named_buffers())
same = [n for n, b in net.named_buffers() if b.is_floating_point() and b.dtype == newest[n].dtype
        and torch.equal(b, newest[n])]
x = torch.randn(2, 3, 8, 8)
out = net.float()(x, torch.full((2,), 1.0))
assert out.shape == x.shape and torch.isfinite(out).all()
print(len(same), sum(b.is_floating_point() for b in newest.values()))
"""


def export_loads_in_original(code: Path, run: Path, work: Path, select: str | None) -> str:
    """lcsc-merge a combination with Σα = 2 into a snapshot, then load and run it in a process that has only
    the code base on its path (as its generate/eval scripts do), and count the constant float buffers that
    are still bit for bit the newest snapshot's."""
    out = work / f"{run.name}_merged.pkl"
    newest = sorted(run.glob(f"network-snapshot-*{'-' + select if select else ''}.pkl"))[-1]
    command = [sys.executable, str(REPO / "launch" / "merge_checkpoints.py"), str(run), "--trust-pickle",
               "--code-dir", str(code), "--coefficients", ",".join(["0.5"] * SNAPSHOTS), "--out", str(out)]
    if select:
        command += ["--ckpt-select", select]
    subprocess.run(command, check=True, capture_output=True, cwd=work)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    check = subprocess.run([sys.executable, "-c", _LOAD_AND_RUN, str(out), str(code), str(newest)],
                           capture_output=True, text=True, cwd=code, env=env)
    if check.returncode != 0:
        return f"FAILS: {check.stderr.strip().splitlines()[-1]}"
    same, total = check.stdout.split()[-2:]
    return f"loads and runs; Σα = 2 leaves {same} of {total} float buffers equal to the newest's"


def ect_sampler_difference(ect: Path, run: Path) -> float:
    """Max |lcsc-ray's two-step samples − ECT's generator_fn| on the same noise (before the final clamp that
    both image writers apply, ours clamps at the end)."""
    from training import ct_training_loop

    resolved = resolve_run(run, hints=ForeignHints(trust_pickle=True, code_dir=str(ect)))
    net = build_network(resolved.run, trust_pickle=True)
    net.load_state_dict(load_checkpoint(resolved.files[-1], trust_pickle=True).state_dict)
    noise = FixedNoise(0, resolved.run.image_shape)
    ours = build_sampler(resolved.run, "multistep").sample(net, noise, 0, 16)
    streams = iter([noise.normal(1, 0, 16)])
    original_randn_like = torch.randn_like
    torch.randn_like = lambda x: next(streams).to(x.dtype)  # ECT re-noises with torch.randn_like
    try:
        theirs = ct_training_loop.generator_fn(net, noise.normal(0, 0, 16), mid_t=[0.821])
    finally:
        torch.randn_like = original_randn_like
    return float((ours.double() - theirs.clamp(-1, 1)).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edm-dir", type=Path, required=True, help="a clone of NVlabs/edm")
    parser.add_argument("--edm2-dir", type=Path, required=True, help="a clone of NVlabs/edm2")
    parser.add_argument("--ect-dir", type=Path, required=True, help="a clone of locuslab/ect")
    args = parser.parse_args()
    edm, edm2, ect = (folder.expanduser().resolve() for folder in (args.edm_dir, args.edm2_dir, args.ect_dir))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ["LCSC_RAY_CACHE"] = str(work / "cache")
        rows = []
        write_songunet_run(edm, work / "edm_run", "EDMPrecond", "EDMLoss", lambda k: 50 * k, seed=3)
        rows.append(("EDM export (lcsc-merge) in EDM's loader", export_loads_in_original(edm, work / "edm_run",
                                                                                       work, None)))
        rows.append(("EDM Heun samples vs generate.py edm_sampler (18 steps)",
                     f"max |diff| {edm_sampler_difference(edm, work / 'edm_run'):.2e}"))
        forget_code_base(edm)
        write_edm2_run(edm2, work / "edm2_run")
        absolute, relative = edm2_posthoc_difference(edm2, work / "edm2_run", work)
        rows.append(("EDM2 post-hoc EMA 0.075/0.15 vs reconstruct_phema.py", f"max |diff| {absolute:.2e} "
                     f"({relative:.1e} of the largest weight; both float16)"))
        rows.append(("EDM2 export (lcsc-merge) in EDM2's loader", export_loads_in_original(edm2, work / "edm2_run",
                                                                                         work, "0.050")))
        forget_code_base(edm2)
        write_songunet_run(ect, work / "ect_run", "ECMPrecond", "ECMLoss", lambda k: k, seed=2)
        rows.append(("ECT export (lcsc-merge) in ECT's loader", export_loads_in_original(ect, work / "ect_run",
                                                                                       work, None)))
        rows.append(("ECT two-step samples vs generator_fn (mid t 0.821)",
                     f"max |diff| {ect_sampler_difference(ect, work / 'ect_run'):.2e}"))
    width = max(len(r[0]) for r in rows)
    for check, result in rows:
        print(f"{check:<{width}}  {result}")


if __name__ == "__main__":
    main()
