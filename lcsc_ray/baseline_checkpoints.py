"""Baselines a run provides as separate checkpoint files, beside the raw checkpoints LCSC combines.

The strongest baseline of a real run is often its own training EMA, saved next to the raw weights. It is
not a linear combination of the selected raw checkpoints (it averages every iteration, from the start of
training), so it cannot be a coefficient vector: it is scored from its own file and reported as a baseline
(docs/METHOD.md, "Baselines").

The hook: a provider is a function `(run, selected files, post-hoc EMA widths) -> list[ExtraBaseline]`;
`PROVIDERS` lists them and `extra_baselines` asks each in turn: our run folders' `checkpoints_ema/`, for runs
of other code bases every other trajectory they saved (EMA files named by their rate, `unet_ema`, other EMA
widths), and for EDM2 runs the post-hoc EMA of other widths, reconstructed from the snapshots of every saved
width the way EDM2's `reconstruct_phema.py` does (lcsc_ray/posthoc_ema.py) and written once to the cache.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lcsc_ray.checkpoints import CheckpointFile
from lcsc_ray.run_folder import RunInfo, ema_checkpoint_path


@dataclass(frozen=True)
class ExtraBaseline:
    """A baseline checkpoint file: its table name, the file (loaded like any checkpoint, safely) and the
    entry holding its state dict in a `.pt` container (None: the file is the state dict)."""

    name: str
    file: CheckpointFile
    ckpt_key: str | None = None


Provider = Callable[[RunInfo, Sequence[CheckpointFile], Sequence[float]], list[ExtraBaseline]]
# Post-hoc EMA widths reconstructed for an EDM2 run when --phema gives none: between and beyond the two
# widths EDM2 saves by default (0.050, 0.100), which are baselines as saved.
EDM2_PHEMA_WIDTHS = (0.075, 0.15)


def training_ema(run: RunInfo, files: Sequence[CheckpointFile], widths: Sequence[float] = ()) -> list[ExtraBaseline]:
    """Our run folders: the training EMA saved at the newest selected step (`checkpoints_ema/`), when the
    selection comes from the run's raw trajectory and that file exists."""
    newest = files[-1]
    path = ema_checkpoint_path(run.run_dir, newest.step)
    if run.format != "ours" or newest.path.parent != run.checkpoint_dir or not path.is_file():
        return []
    return [ExtraBaseline("training_ema", CheckpointFile(path, newest.step, "safetensors"))]


def other_trajectories(run: RunInfo, files: Sequence[CheckpointFile],
                       widths: Sequence[float] = ()) -> list[ExtraBaseline]:
    """Runs of other code bases: every other trajectory the run saved (OpenAI `ema_<rate>` files next to the raw
    `model` ones, diffusers `unet_ema` next to `unet`, EDM2's other EMA widths) at the newest selected step,
    named `training_<trajectory>`. The selected trajectory itself is what LCSC combines, so it is left out."""
    if run.format == "ours":
        return []
    from lcsc_ray.run_formats import get_format  # the formats import this module's users, not the reverse

    newest = files[-1]
    selected = {f.path for f in files}
    found = []
    for name, trajectory in sorted(get_format(run.format).trajectories(run.checkpoint_dir).items()):
        at_step = [f for f in trajectory if f.step == newest.step and f.path not in selected]
        if at_step and newest.path not in {f.path for f in trajectory}:
            found.append(ExtraBaseline(f"training_{name}", at_step[0]))
    return found


def edm2_width_snapshots(run: RunInfo) -> dict[float, list[CheckpointFile]]:
    """An EDM2 run's snapshots by saved width (`network-snapshot-<kimg>-<width>.pkl`); empty for other runs."""
    if run.format != "nvlabs-pickle":
        return {}
    from lcsc_ray.run_formats import get_format

    trajectories = get_format(run.format).trajectories(run.checkpoint_dir)
    try:
        return {float(name): files for name, files in trajectories.items()}
    except ValueError:  # EDM's and ECT's snapshots have one unnamed trajectory ("ema")
        return {}


def edm2_posthoc_ema(run: RunInfo, files: Sequence[CheckpointFile],
                     widths: Sequence[float] = ()) -> list[ExtraBaseline]:
    """EDM2 runs with two or more saved widths: the post-hoc EMA of each width in `widths` (default
    `EDM2_PHEMA_WIDTHS`) at the newest selected snapshot time, reconstructed from every snapshot up to then,
    as EDM2's `reconstruct_phema.py` does; widths saved as snapshots are left to `other_trajectories`."""
    saved = edm2_width_snapshots(run)
    wanted = [float(w) for w in (widths or EDM2_PHEMA_WIDTHS) if not any(abs(float(w) - s) < 5e-4 for s in saved)]
    if len(saved) < 2 or not wanted:
        return []
    step = files[-1].step
    inputs = [(width, f) for width, trajectory in sorted(saved.items()) for f in trajectory if 0 < f.step <= step]
    paths = reconstruct_posthoc_ema(inputs, wanted, step)
    return [ExtraBaseline(f"phema_{width!r}", CheckpointFile(path, step, "safetensors"))
            for width, path in zip(wanted, paths)]


def reconstruct_posthoc_ema(inputs: Sequence[tuple[float, CheckpointFile]], widths: Sequence[float],
                            step: int) -> list[Path]:
    """Write Σᵢ xᵢ θᵢ over the EDM2 snapshots `inputs` ((width, file), kimg steps) for each target width at
    `step` (lcsc_ray/posthoc_ema.py) as safetensors files in the cache, keyed by the inputs' names, sizes and
    times; files already there are reused. One snapshot is held at a time (float64 sums, then the snapshots'
    own dtypes, float16 for EDM2); tensors that are not merged (integer buffers, tensors equal in every
    snapshot) are the newest snapshot's, as EDM2's reconstruction copies the buffers of its last input."""
    from safetensors.torch import save_file

    from lcsc_ray.atomic import atomic_write
    from lcsc_ray.checkpoints import load_checkpoint
    from lcsc_ray.paths import cache_dir
    from lcsc_ray.posthoc_ema import edm2_kimg_to_nimg, posthoc_coefficients

    key = hashlib.sha256(repr(([(w, str(f.path), f.path.stat().st_size, f.path.stat().st_mtime_ns)
                                for w, f in inputs], list(widths), step)).encode()).hexdigest()[:16]
    targets = [cache_dir() / "posthoc_ema" / key / f"phema_{width:.4f}-{step:07d}.safetensors" for width in widths]
    if all(path.is_file() for path in targets):
        return targets
    coefficients = posthoc_coefficients([edm2_kimg_to_nimg(f.step) for _, f in inputs], [w for w, _ in inputs],
                                        edm2_kimg_to_nimg(step), widths)
    sums: list[dict[str, torch.Tensor]] = [{} for _ in widths]
    first: dict[str, torch.Tensor] | None = None  # at the end: the tensors equal in every snapshot
    newest = max(inputs, key=lambda item: item[1].step)[1]
    newest_state: dict[str, torch.Tensor] = {}
    for row, (_, file) in enumerate(inputs):
        state = load_checkpoint(file, trust_pickle=True).state_dict  # the run was only resolved with --trust-pickle
        if file is newest:
            newest_state = state
        if first is None:
            first = {name: tensor.clone() for name, tensor in state.items()}
        floating = [name for name, tensor in state.items() if tensor.is_floating_point()]
        for column, total in enumerate(sums):
            for name in floating:
                term = float(coefficients[row, column]) * state[name].double()
                total[name] = term if name not in total else total[name].add_(term)
        for name in [n for n in floating if n in first and not torch.equal(state[n], first[n])]:
            del first[name]
    for path, total in zip(targets, sums):
        state = {name: (total[name].to(tensor.dtype) if name in total and name not in first else tensor.clone())
                 for name, tensor in newest_state.items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp, state=state: save_file(state, str(tmp)))
    return targets


PROVIDERS: list[Provider] = [training_ema, other_trajectories, edm2_posthoc_ema]


def extra_baselines(run: RunInfo, files: Sequence[CheckpointFile],
                    phema_widths: Sequence[float] = ()) -> list[ExtraBaseline]:
    """Every provider's baseline files for this run and selection (first provider wins on a name clash)."""
    found: dict[str, ExtraBaseline] = {}
    for provider in PROVIDERS:
        for baseline in provider(run, files, phema_widths):
            found.setdefault(baseline.name, baseline)
    return list(found.values())
