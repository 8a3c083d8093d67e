"""Baselines a run provides as separate checkpoint files, beside the raw checkpoints LCSC combines.

The strongest baseline of a real run is often its own training EMA, saved next to the raw weights. It is
not a linear combination of the selected raw checkpoints (it averages every iteration, from the start of
training), so it cannot be a coefficient vector: it is scored from its own file and reported as a baseline
(docs/METHOD.md, "Baselines").

The hook: a provider is a function `(run, selected files) -> list[ExtraBaseline]`; `PROVIDERS` lists them
and `extra_baselines` asks each in turn: our run folders' `checkpoints_ema/`, and for runs of other code
bases every other trajectory they saved (EMA files named by their rate, `unet_ema`, other EMA widths).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lcsc_ray.checkpoints import CheckpointFile
from lcsc_ray.run_folder import RunInfo, ema_checkpoint_path


@dataclass(frozen=True)
class ExtraBaseline:
    """A baseline checkpoint file: its table name, the file (loaded like any checkpoint, safely) and the
    entry holding its state dict in a `.pt` container (None: the file is the state dict)."""

    name: str
    file: CheckpointFile
    ckpt_key: str | None = None


Provider = Callable[[RunInfo, Sequence[CheckpointFile]], list[ExtraBaseline]]


def training_ema(run: RunInfo, files: Sequence[CheckpointFile]) -> list[ExtraBaseline]:
    """Our run folders: the training EMA saved at the newest selected step (`checkpoints_ema/`), when the
    selection comes from the run's raw trajectory and that file exists."""
    newest = files[-1]
    path = ema_checkpoint_path(run.run_dir, newest.step)
    if run.format != "ours" or newest.path.parent != run.checkpoint_dir or not path.is_file():
        return []
    return [ExtraBaseline("training_ema", CheckpointFile(path, newest.step, "safetensors"))]


def other_trajectories(run: RunInfo, files: Sequence[CheckpointFile]) -> list[ExtraBaseline]:
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


PROVIDERS: list[Provider] = [training_ema, other_trajectories]


def extra_baselines(run: RunInfo, files: Sequence[CheckpointFile]) -> list[ExtraBaseline]:
    """Every provider's baseline files for this run and selection (first provider wins on a name clash)."""
    found: dict[str, ExtraBaseline] = {}
    for provider in PROVIDERS:
        for baseline in provider(run, files):
            found.setdefault(baseline.name, baseline)
    return list(found.values())
