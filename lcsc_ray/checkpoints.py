"""Checkpoints on disk: find the files of one training run, parse their steps, select, and load safely.

Supported layouts (the inputs are the checkpoints θ₁…θ_K of one run, saved at steps n₁ < … < n_K):
- files `<name><step>.{safetensors,pt,pth,bin,ckpt}` in one folder (`model_0040000.safetensors`,
  `model_040000.pt`, `ckpt_800000.pth`, OpenAI's `ema_0.9999_800000.pt`): the step is the last run of
  digits in the file name, or the `step` group of the user's `--ckpt-pattern`;
- sub-folders `checkpoint-<step>/` holding one weights file (`model.safetensors`, `pytorch_model.bin`, ...).

Loading never unpickles arbitrary objects: safetensors, or `torch.load(weights_only=True)`: a checkpoint
from elsewhere must not be able to run code. The one exception is a pickled network snapshot (NVlabs EDM,
EDM2, ECT: `format="pickle"`), which is only ever unpickled when the user passed `--trust-pickle`. A `.pt` file may hold the state dict itself or a dict holding it under a key such as
`model`/`ema`/`state_dict`/`model_ema`; `ckpt_key` picks one, and an ambiguous file says which keys exist.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from lcsc_ray.errors import LcscError

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# Weights file names looked for, in this order, inside a `checkpoint-<step>/` folder (HF Trainer /
# accelerate / diffusers conventions); optimizer or scheduler files next to them are ignored.
FOLDER_WEIGHT_NAMES = (
    "model.safetensors",
    "diffusion_pytorch_model.safetensors",
    "pytorch_model.bin",
    "diffusion_pytorch_model.bin",
    "model.pt",
    "model.pth",
)
_LAST_NUMBER = re.compile(r"(\d+)(?!.*\d)")


@dataclass(frozen=True)
class CheckpointFile:
    """One saved checkpoint: the file holding its tensors and the training step it was saved at.

    `folder` is the `checkpoint-<step>/` folder when the run uses that layout (export mirrors it).
    """

    path: Path
    step: int
    format: str  # "safetensors", "torch" or "pickle"
    folder: Path | None = None


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A loaded state dict plus where it sat in the file (`key_path`: () for a plain state dict)."""

    state_dict: dict[str, torch.Tensor]
    key_path: tuple[str, ...]
    metadata: dict[str, str] | None


# ----------------------------------------------------------------------------------------------------


def _format_of(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return "safetensors"
    if suffix in TORCH_SUFFIXES:
        return "torch"
    return None


def _parse_step(name: str, pattern: re.Pattern[str] | None, *, is_file: bool) -> int | None:
    """The step in an entry name: the `step` group (or first group) of `pattern`, else the last number
    (of the file name without its suffix, or of the folder name)."""
    if pattern is None:
        match = _LAST_NUMBER.search(Path(name).stem if is_file else name)
        return int(match.group(1)) if match else None
    match = pattern.fullmatch(name)
    if match is None:
        return None
    group = match.group("step") if "step" in pattern.groupindex else match.group(1)
    return int(group)


def _compile_pattern(pattern: str | None) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    try:
        compiled = re.compile(pattern)
    except re.error as error:
        raise LcscError(f"--ckpt-pattern {pattern!r} is not a valid regular expression ({error}); "
                        r"example: 'model_(?P<step>\d+)\.pt'") from error
    if compiled.groups < 1:
        raise LcscError(f"--ckpt-pattern {pattern!r} has no group for the step; "
                        r"add one, e.g. 'model_(?P<step>\d+)\.pt'")
    return compiled


def _folder_weights(folder: Path) -> Path | None:
    """The weights file inside a `checkpoint-<step>/` folder, or None when it has none."""
    for name in FOLDER_WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    candidates = sorted(p for p in folder.iterdir() if p.is_file() and _format_of(p) is not None)
    if len(candidates) > 1:
        names = ", ".join(p.name for p in candidates)
        raise LcscError(f"{folder}: several weight files ({names}) and none named model.safetensors or "
                        "pytorch_model.bin; keep one per checkpoint folder")
    return candidates[0] if candidates else None


def discover_checkpoints(directory: str | Path, pattern: str | None = None) -> list[CheckpointFile]:
    """The checkpoints of one run in `directory`, sorted by step.

    `pattern` is a regular expression matched against whole entry names (file or sub-folder) with a group
    (preferably named `step`) for the step; without it, every weights file or sub-folder whose name holds
    a number counts, and the last number is the step. Raises `LcscError` on a missing or empty folder and
    on a step that appears twice (e.g. `model800000.pt` next to `ema_0.9999_800000.pt`).
    """
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise LcscError(f"{root}: checkpoint folder not found; pass the folder holding the run's checkpoints")
    compiled = _compile_pattern(pattern)
    found: dict[int, CheckpointFile] = {}
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue  # temporary files of atomic writers, hidden files
        if entry.is_dir():
            step = _parse_step(entry.name, compiled, is_file=False)
            weights = _folder_weights(entry) if step is not None else None
            candidate = None if weights is None else CheckpointFile(weights, step, _format_of(weights), entry)
        else:
            fmt = _format_of(entry)
            step = _parse_step(entry.name, compiled, is_file=True) if fmt is not None else None
            candidate = None if step is None else CheckpointFile(entry, step, fmt)
        if candidate is None:
            continue
        if candidate.step in found:
            raise LcscError(f"{root}: step {candidate.step} appears twice ({found[candidate.step].path.name} "
                            f"and {candidate.path.name}); pass --ckpt-pattern to pick one kind of file, "
                            r"e.g. 'model_(?P<step>\d+)\.pt'")
        found[candidate.step] = candidate
    if not found:
        hint = " (a checkpoints/ sub-folder exists: pass that)" if (root / "checkpoints").is_dir() else ""
        what = f"matching --ckpt-pattern {pattern!r}" if pattern else "(.safetensors/.pt/.pth/.bin/.ckpt files or " \
                                                                 "checkpoint-<step>/ folders with a step number)"
        raise LcscError(f"{root}: no checkpoints {what}{hint}")
    return [found[step] for step in sorted(found)]


def format_steps(steps: Sequence[int]) -> str:
    """The steps as the consoles print them: all of up to 8, else the first 4, "...", and the last 3."""
    shown = list(steps) if len(steps) <= 8 else [*steps[:4], "...", *steps[-3:]]
    return ", ".join(map(str, shown))


def select_checkpoints(files: Sequence[CheckpointFile], *, window: int | None = None, interval: int = 1,
                       max_count: int | None = None) -> list[CheckpointFile]:
    """Pick checkpoints the way the paper's settings are stated (docs/METHOD.md: "window 40K,
    interval 100" gives 400 checkpoints).

    window: keep steps n > n_K − window (the last `window` training iterations); interval: every
    `interval`-th saved checkpoint counted back from the newest (so the newest is always kept);
    max_count: then keep the newest `max_count`. Returns the selection sorted by step.
    """
    for flag, value in (("--window", window), ("--interval", interval), ("--max-checkpoints", max_count)):
        if value is not None and value < 1:
            raise LcscError(f"{flag} must be a positive integer, got {value}")
    chosen = sorted(files, key=lambda f: f.step)
    if not chosen:
        raise LcscError("no checkpoints to select from; check the checkpoint folder")
    if window is not None:
        newest = chosen[-1].step
        chosen = [f for f in chosen if f.step > newest - window]
    chosen = chosen[::-1][::interval][::-1]
    if max_count is not None:
        chosen = chosen[-max_count:]
    return chosen


# ----------------------------------------------------------------------------------------------------


EXCLUDE_HINT = re.compile(r"leave step (\d+) out with --exclude-steps \1\b")


def exclude_hint(file: CheckpointFile) -> str:
    """The remedy for one bad checkpoint that every message names the same way: the flag that drops its step
    (a new selection, so a new search rather than a resumed one)."""
    return f"leave step {file.step} out with --exclude-steps {file.step}"


def excluded_step(message: str) -> int | None:
    """The step an `exclude_hint` in `message` leaves out, or None: a search stopped by that problem needs a
    new selection, which a resume cannot make, so the driver prints a new search's command instead."""
    found = EXCLUDE_HINT.search(message)
    return int(found.group(1)) if found else None


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _resolve_key(obj: object, path: Path, ckpt_key: str | None) -> tuple[tuple[str, ...], Mapping]:
    """Find the state dict inside a loaded `.pt` object; `ckpt_key` may be nested with '/' (`state/ema`)."""
    if ckpt_key is not None:
        node = obj
        keys = tuple(ckpt_key.split("/"))
        for depth, key in enumerate(keys):
            if not isinstance(node, Mapping) or key not in node:
                where = "/".join(keys[:depth]) or "the top level"
                existing = ", ".join(map(str, node.keys())) if isinstance(node, Mapping) else type(node).__name__
                raise LcscError(f"{path}: --ckpt-key {ckpt_key!r} not found at {where}; keys there: {existing}")
            node = node[key]
        if not _is_state_dict(node):
            raise LcscError(f"{path}: --ckpt-key {ckpt_key!r} does not hold a state dict of tensors; "
                            "pick the key of the model weights")
        return keys, node
    if _is_state_dict(obj):
        return (), obj
    if not isinstance(obj, Mapping):
        raise LcscError(f"{path}: holds a {type(obj).__name__}, not a state dict; save model.state_dict()")
    nested = [str(k) for k, v in obj.items() if _is_state_dict(v)]
    if len(nested) == 1:
        return (nested[0],), obj[nested[0]]
    existing = ", ".join(map(str, obj.keys()))
    if nested:
        raise LcscError(f"{path}: several state dicts ({', '.join(nested)}); pick one with --ckpt-key "
                        f"(keys in the file: {existing})")
    raise LcscError(f"{path}: no state dict of tensors found; keys in the file: {existing}; "
                    "pick one with --ckpt-key (nested keys as a/b)")


def _load_safetensors(file: CheckpointFile, ckpt_key: str | None) -> LoadedCheckpoint:
    if ckpt_key is not None:
        raise LcscError(f"{file.path}: a safetensors file holds one flat state dict; drop --ckpt-key")
    try:
        with safe_open(str(file.path), framework="pt", device="cpu") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
            metadata = handle.metadata()
    except (SafetensorError, OSError, ValueError) as error:
        raise LcscError(f"{file.path}: unreadable or truncated safetensors file ({error}); "
                        f"re-save it, or {exclude_hint(file)}") from error
    if not tensors:
        raise LcscError(f"{file.path}: holds no tensors; {exclude_hint(file)}")
    return LoadedCheckpoint(tensors, (), metadata)


def _load_torch(file: CheckpointFile, ckpt_key: str | None, mmap: bool = False) -> LoadedCheckpoint:
    try:
        obj = torch.load(file.path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        raise LcscError(f"{file.path}: holds objects other than tensors and plain containers, which are "
                        "not unpickled for safety; re-save only the state dict (torch.save(model.state_dict()))"
                        ) from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise LcscError(f"{file.path}: unreadable or truncated checkpoint ({first}); "
                        f"re-save it, or {exclude_hint(file)}") from error
    key_path, state = _resolve_key(obj, file.path, ckpt_key)
    return LoadedCheckpoint(dict(state), key_path, None)


def pickle_refusal(path: Path) -> str:
    """The line that refuses to unpickle `path` without the user's explicit trust."""
    return (f"{path}: a pickled network snapshot; unpickling runs code stored in the file, so it is only loaded "
            "when you trust its source: add --trust-pickle")


class MissingModule(LcscError):
    """A pickled network whose classes need a module that does not import (the code base is not on the path)."""

    def __init__(self, module: str, message: str, path: Path) -> None:
        super().__init__(message)
        self.module = module
        self.path = path

    def for_code_dir(self, code_dir: str | None) -> LcscError:
        """The error to show when the user passed `--code-dir` (itself when not): whether that folder lacks the
        package altogether or has it without this module (another code base or version)."""
        if not code_dir:
            return self
        folder = Path(code_dir).expanduser().resolve()
        top = self.module.split(".")[0]
        if (folder / top).exists() or (folder / f"{top}.py").exists():
            return LcscError(f"--code-dir {folder}: has {top} but not the module {self.module!r} that "
                             f"{self.path.name} needs, so it is likely another code base or version than the one "
                             "that wrote the run; pass that code base's repository")
        return LcscError(f"--code-dir {folder}: holds no {top}/ (the module {self.module!r} that {self.path.name} "
                         "needs); point it at the root folder of the training code base's repository (for NVlabs "
                         "code bases, the one holding torch_utils/ and dnnlib/)")


def unpickle_snapshot(path: Path, trust_pickle: bool) -> Mapping:
    """The dict an NVlabs training loop pickled (`ema` holds the whole network module); refused without
    `trust_pickle`. A class that cannot be imported means the code base is not on the Python path."""
    if not trust_pickle:
        raise LcscError(pickle_refusal(path))
    try:
        with open(path, "rb") as handle:
            data = pickle.load(handle)  # noqa: S301 - the user passed --trust-pickle for these files
    except (ModuleNotFoundError, AttributeError) as error:
        module = getattr(error, "name", None) or str(error)
        raise MissingModule(module, f"{path}: its network class needs module {module!r}, which cannot be "
                            "imported; put the training code base on PYTHONPATH (or pass --code-dir DIR)",
                            path) from None
    except (pickle.UnpicklingError, EOFError, OSError, ValueError) as error:
        raise LcscError(f"{path}: unreadable or truncated pickle ({error}); re-save it or leave it out") from None
    if not isinstance(data, Mapping) or not isinstance(data.get("ema"), torch.nn.Module):
        raise LcscError(f"{path}: holds no 'ema' network module (keys: {list(data) if isinstance(data, Mapping) else type(data).__name__}); "
                        "expected an EDM/EDM2/ECT network-snapshot pickle")
    return data


def _load_pickle(file: CheckpointFile, ckpt_key: str | None, trust_pickle: bool) -> LoadedCheckpoint:
    if ckpt_key not in (None, "ema"):
        raise LcscError(f"{file.path}: network snapshots hold the network under 'ema'; drop --ckpt-key")
    state = unpickle_snapshot(file.path, trust_pickle)["ema"].state_dict()
    return LoadedCheckpoint({name: tensor.detach().clone() for name, tensor in state.items()}, ("ema",), None)


def layout_difference(reference: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> str | None:
    """The first way `state` differs from `reference` in tensor names, shapes or floating/integer kind, as a
    phrase about `state` ("key 'x' is missing", ...), or None when both have the same layout."""
    missing = [name for name in reference if name not in state]
    extra = [name for name in state if name not in reference]
    counts = f" ({len(missing)} missing, {len(extra)} extra keys in all)"
    if missing:
        return f"key {missing[0]!r} is missing{counts}"
    if extra:
        return f"it holds key {extra[0]!r}, which is absent{counts}"
    for name, tensor in state.items():
        ref = reference[name]
        if tuple(tensor.shape) != tuple(ref.shape):
            return f"tensor {name!r} has shape {list(tensor.shape)} instead of {list(ref.shape)}"
        if tensor.is_floating_point() != ref.is_floating_point():
            return f"tensor {name!r} is {tensor.dtype} instead of {ref.dtype}"
    return None


def load_checkpoint(file: CheckpointFile, ckpt_key: str | None = None,
                    strip_prefix: str | None = None, trust_pickle: bool = False, *,
                    mmap: bool = False) -> LoadedCheckpoint:
    """Load one checkpoint safely and check that every floating-point tensor is finite.

    `strip_prefix` removes a prefix every key carries (`module.` from a DDP-wrapped model). Returns the state
    dict with where it sat in the file, so an export can rebuild the same layout. Pickled snapshots load
    only with `trust_pickle`. `mmap` maps the tensors of a zip-format `.pt` instead of copying them (torch
    refuses it for the legacy format): the preflight's check of many files at once then holds no copies.
    """
    if file.format == "pickle":
        loaded = _load_pickle(file, ckpt_key, trust_pickle)
    elif file.format == "safetensors":
        loaded = _load_safetensors(file, ckpt_key)
    else:
        loaded = _load_torch(file, ckpt_key, mmap)
    if strip_prefix:
        without = [name for name in loaded.state_dict if not name.startswith(strip_prefix)]
        if without:
            raise LcscError(f"{file.path}: key {without[0]!r} does not start with --strip-key-prefix "
                            f"{strip_prefix!r}; drop the flag or give the prefix every key has")
        loaded = LoadedCheckpoint({name[len(strip_prefix):]: tensor for name, tensor in loaded.state_dict.items()},
                                  loaded.key_path, loaded.metadata)
    for name, tensor in loaded.state_dict.items():
        if tensor.is_floating_point() and not all_finite(tensor):
            raise LcscError(f"{file.path}: tensor {name!r} holds NaN or Inf (the run diverged at step {file.step}); "
                            f"{exclude_hint(file)}, or fix the run")
    return loaded


def all_finite(tensor: torch.Tensor) -> bool:
    """True when no element is NaN or ±Inf: the minimum and maximum are finite exactly then (both propagate a
    NaN). One fused min/max pass, several times faster than an elementwise isfinite and its boolean tensor."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def load_state_dict(file: CheckpointFile, ckpt_key: str | None = None,
                    strip_prefix: str | None = None, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The validated state dict of one checkpoint (see `load_checkpoint`)."""
    return load_checkpoint(file, ckpt_key, strip_prefix, trust_pickle).state_dict
