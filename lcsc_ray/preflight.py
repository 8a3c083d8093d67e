"""Check every input of a search in the driver, before Ray starts and before any experiment folder exists.

A mismatch between the network and the checkpoints, a truncated file or a wrong image shape would otherwise
surface inside every Ray trial, each penalised or retried, and burn the budget. The preflight costs about one
forward pass of a tiny batch plus reading two checkpoints:

1. at least two checkpoints are selected;
2. every selected checkpoint's header is readable (safetensors header, or the zip directory of a `.pt`),
   without loading its tensors;
3. the network builds from run.json, and the oldest and newest checkpoints load into it strictly (key sets,
   shapes, floating vs integer tensors), with a hint when every key differs by a prefix such as `module.`;
4. the sampler draws a tiny batch from the newest checkpoint: the images are finite, have the run's image
   shape, and the extractor turns them into finite features of the reference statistics' dimension.
Each failure is an `LcscError` naming the file or field and the fix. Runs of other code bases get their
format's checks on the way: pickled snapshots without --trust-pickle, an unimportable network class (the
code base is not on the Python path), a diffusers config that does not build. With `preview`, a grid of
samples of the newest checkpoint is written there (`--dry-run`).
"""

from __future__ import annotations

import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from lcsc_ray.checkpoints import CheckpointFile, LoadedCheckpoint, layout_difference, load_checkpoint
from lcsc_ray.errors import LcscError
from lcsc_ray.images import write_sample_grid
from lcsc_ray.noise import FixedNoise
from lcsc_ray.run_folder import RUN_JSON, RunInfo
from lcsc_ray.scoring import ScoringSpec, build_pipeline

PREFLIGHT_SAMPLES = 2
PREFLIGHT_SEED = 12345  # any seed: the samples are only checked, never scored
_PICKLE_PROTOCOL_MARK = 0x80  # first byte of a pickle (torch.save's format before zip archives)


@dataclass(frozen=True)
class PreflightReport:
    """What the preflight checked, for the one line the driver prints."""

    num_checkpoints: int
    num_params: int
    sample_shape: tuple[int, ...]
    feature_dim: int
    seconds: float

    def summary(self) -> str:
        return (f"preflight: {self.num_checkpoints} checkpoint headers, network of {self.num_params:,} parameters "
                f"loads the oldest and newest strictly, samples {list(self.sample_shape)} -> {self.feature_dim} "
                f"features: ok in {self.seconds:.2f} s")


def check_header(file: CheckpointFile) -> None:
    """Raise unless the checkpoint's directory of tensors can be read (no tensor data is loaded)."""
    fix = f"re-save it, or leave step {file.step} out with --exclude-steps {file.step}"
    if file.format == "pickle":
        with open(file.path, "rb") as handle:
            first = handle.read(1)
        if not first or first[0] != _PICKLE_PROTOCOL_MARK:
            raise LcscError(f"{file.path}: not a pickle (empty or truncated); {fix}")
        return
    if file.format == "safetensors":
        try:
            with safe_open(str(file.path), framework="pt", device="cpu") as handle:
                handle.keys()
        except (SafetensorError, OSError, ValueError) as error:
            raise LcscError(f"{file.path}: unreadable or truncated safetensors file ({error}); {fix}") from None
        return
    try:
        with zipfile.ZipFile(file.path) as archive:
            archive.namelist()
    except zipfile.BadZipFile:
        with open(file.path, "rb") as handle:
            first = handle.read(1)
        if first and first[0] == _PICKLE_PROTOCOL_MARK:
            return  # torch's pre-zip format has no directory to check; it is fully read when loaded
        raise LcscError(f"{file.path}: unreadable or truncated checkpoint (not a torch zip archive); {fix}") from None
    except OSError as error:
        raise LcscError(f"{file.path}: cannot be read ({error}); {fix}") from None


def _common_prefix_hint(keys: Sequence[str], expected: set[str]) -> str | None:
    """The prefix (up to and including its first '.') that every checkpoint key carries and whose removal
    gives exactly the network's keys, e.g. 'module.' for a DDP-wrapped model."""
    first = keys[0].split(".", 1)[0] + "." if keys else ""
    if first and all(key.startswith(first) for key in keys) and {key[len(first):] for key in keys} == expected:
        return first
    return None


def check_strict_load(net: nn.Module, loaded: LoadedCheckpoint, file: CheckpointFile, run_json: str) -> None:
    """Raise unless `loaded` has exactly the network's keys, shapes and floating/integer kinds."""
    model = net.state_dict()
    difference = layout_difference(model, loaded.state_dict)
    if difference is None:
        return
    prefix = _common_prefix_hint(list(loaded.state_dict), set(model))
    if prefix is not None:
        raise LcscError(f"{file.path}: every key starts with {prefix!r} (a wrapped model, e.g. DDP), which the "
                        f"network from {run_json} lacks; pass --strip-key-prefix {prefix}")
    raise LcscError(f"{file.path}: {difference} compared with the network that {run_json} builds, so it is not the "
                    "network that was trained: fix 'model' (factory and kwargs) there, or --ckpt-key for a .pt "
                    "holding several state dicts")


def _check_samples(images: torch.Tensor, run: RunInfo, sampler_name: str, run_json: str) -> None:
    expected = (PREFLIGHT_SAMPLES, *run.image_shape)
    if tuple(images.shape) != expected:
        raise LcscError(f"the {sampler_name} sampler made images of shape {list(images.shape)} from the newest "
                        f"checkpoint, expected {list(expected)} from 'image_shape' in {run_json}; fix it there")
    if not bool(torch.isfinite(images).all()):
        raise LcscError(f"the newest checkpoint gives NaN/Inf images with the {sampler_name} sampler; check the "
                        f"sampler flags and 'precond' in {run_json}")


def preflight(spec: ScoringSpec, run: RunInfo, *, device: str | torch.device = "cpu",
              preview: Path | None = None) -> PreflightReport:
    """Run every check of the module docstring for the search `spec` describes; raise `LcscError` on the first
    failure. The checkpoints in `spec.files` must be sorted by step (as the selection returns them)."""
    started = time.perf_counter()
    files = list(spec.files)
    if len(files) < 2:
        found = f"only step {files[0].step}" if files else "none"
        raise LcscError(f"LCSC combines at least 2 checkpoints, the selection holds {found}; widen --window, "
                        "--interval or --max-checkpoints, or drop --exclude-steps")
    for file in files:
        check_header(file)
    run_json = str(run.run_dir / RUN_JSON) if spec.run_config is None else "the run.json of this search"
    device = torch.device(device)
    net, sampler, evaluator = build_pipeline(spec, run, device)
    for file in (files[0], files[-1]):  # the newest last: its weights stay loaded for the sample check
        loaded = load_checkpoint(file, spec.ckpt_key, spec.strip_key_prefix, spec.trust_pickle)
        check_strict_load(net, loaded, file, run_json)
    net.load_state_dict(loaded.state_dict, strict=True)
    try:
        images = sampler.sample(net, FixedNoise(PREFLIGHT_SEED, run.image_shape), 0, PREFLIGHT_SAMPLES)
    except (RuntimeError, ValueError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise LcscError(f"the {sampler.name} sampler failed on the newest checkpoint ({first}); check 'image_shape' "
                        f"and 'model' in {run_json} and the sampler flags") from None
    _check_samples(images, run, sampler.name, run_json)
    extractor = evaluator.extractor
    try:
        features = extractor(images.to(extractor.device))
    except (RuntimeError, ValueError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise LcscError(f"the {extractor.name} extractor cannot take the run's images ({first}); check 'image_shape' "
                        f"in {run_json} and --extractor") from None
    if tuple(features.shape) != (PREFLIGHT_SAMPLES, evaluator.reference.dim) or not bool(torch.isfinite(features).all()):
        raise LcscError(f"the {extractor.name} extractor gave features {list(features.shape)} (finite: "
                        f"{bool(torch.isfinite(features).all())}) for the newest checkpoint's samples, the reference "
                        f"statistics {spec.reference_stats} have dimension {evaluator.reference.dim}; check --extractor "
                        "and --ref-stats")
    if preview is not None:
        write_sample_grid(run, net, preview, count=16, seed=PREFLIGHT_SEED, sampler=sampler)
    num_params = sum(t.numel() for t in loaded.state_dict.values() if t.is_floating_point())
    return PreflightReport(len(files), num_params, tuple(images.shape), int(features.shape[1]),
                           time.perf_counter() - started)
