"""Export a merged checkpoint in the inputs' own format and layout, so the user's code loads it unchanged.

Safetensors inputs give a safetensors file (with the newest input's metadata); `.pt`-style inputs give
`torch.save` of the state dict under the same key nesting (e.g. `{"ema": state_dict}`; other entries of
the original container, such as optimizer state, are not carried). A `checkpoint-<step>/` layout gives a
folder holding the same weights file name, plus the input folder's `config.json` when it has one (a diffusers
`unet/` folder: `UNet2DModel.from_pretrained(out)` loads the export). A pickled network snapshot (NVlabs EDM,
EDM2, ECT) gives the newest snapshot's dict with its `ema` network holding the merged weights in the
network's own dtypes (float16 for EDM2), so the code base's generate/metric scripts take it; entries of that
dict that do not survive a pickle round trip (ECT's loss object) are left out and named in the sidecar.
Floating tensors identical in every checkpoint are the newest's, bit for bit (lcsc_ray/stack.py). Each merged
tensor is written in the dtype most of the merged checkpoints hold it in, float32 where no dtype has a
majority (the stack records them), so one float16 checkpoint among float32 ones does not round the export;
`export_dtypes` names what was written (pickled snapshots keep their network's own dtypes). The file and
its JSON sidecar `<file>.json` (coefficients, steps, source files, dtype, metrics) are written atomically.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from lcsc_ray.atomic import atomic_write, atomic_write_json
from lcsc_ray.checkpoints import SAFETENSORS_SUFFIXES, TORCH_SUFFIXES, unpickle_snapshot
from lcsc_ray.errors import LcscError
from lcsc_ray.stack import CheckpointStack


def export_path(stack: CheckpointStack, out_path: str | Path) -> Path:
    """Where the weights go: `out_path` itself when it has a suffix of the inputs' format; without a
    suffix, `<out>/<weights name>` for the folder layout, else `<out><inputs' suffix>`. A model folder with a
    `config.json` (diffusers) is always exported as a folder, `<out without suffix>/<weights name>`."""
    out = Path(out_path).expanduser()
    newest = stack.files[-1]
    if newest.folder is not None and (newest.folder / "config.json").is_file():
        return out.with_suffix("") / newest.path.name  # a model folder (diffusers) stays a folder its loader takes
    if not out.suffix:
        return out / newest.path.name if newest.folder is not None else out.with_name(out.name + newest.path.suffix)
    allowed = {"safetensors": SAFETENSORS_SUFFIXES, "pickle": (".pkl",)}.get(newest.format, TORCH_SUFFIXES)
    if out.suffix.lower() not in allowed:
        raise LcscError(f"--out {out}: the inputs are {newest.format} files; name the output with "
                        f"{' or '.join(allowed)} (or give no suffix)")
    return out


def export_merged(stack: CheckpointStack, alpha: np.ndarray | torch.Tensor, out_path: str | Path, *,
                  metrics: dict | None = None, extra: dict | None = None) -> Path:
    """Write θ(α) = Σᵢ αᵢ θᵢ next to a JSON sidecar; return the weights file's path."""
    target = export_path(stack, out_path)
    coefficients = np.asarray(alpha.detach().cpu() if isinstance(alpha, torch.Tensor) else alpha, dtype=np.float64)
    state = stack.merged_state_dict(coefficients)
    newest = stack.files[-1]
    left_out: dict[str, str] = {}
    if newest.format == "safetensors":
        atomic_write(target, lambda tmp: save_file(state, str(tmp), metadata=stack.metadata))
        if newest.folder is not None and (newest.folder / "config.json").is_file():
            atomic_write(target.with_name("config.json"),
                         lambda tmp: shutil.copyfile(newest.folder / "config.json", tmp))
    elif newest.format == "pickle":
        payload, left_out = _snapshot_bytes(newest.path, state)
        atomic_write(target, lambda tmp: tmp.write_bytes(payload))
    else:
        container: Any = state
        for key in reversed(stack.key_path):
            container = {key: container}
        atomic_write(target, lambda tmp: torch.save(container, tmp))
    atomic_write_json(sidecar_path(target), {
        "coefficients": coefficients.tolist(),
        "coefficient_sum": float(coefficients.sum()),
        "steps": stack.steps,
        "source_files": [str(f.path) for f in stack.files],
        "format": stack.files[-1].format,
        "ckpt_key": "/".join(stack.key_path) or None,
        "storage_dtype": str(stack.storage_dtype).removeprefix("torch."),
        "dtype": export_dtypes(state),
        "copied_from_newest": stack.copied_float_tensors,
        "left_out": left_out,
        "metrics": metrics or {},
        "extra": extra or {},
    })
    return target


def sidecar_path(target: Path) -> Path:
    """The JSON sidecar of the export at `target`."""
    return target.with_name(target.name + ".json")


def exported_dtype(target: str | Path) -> str:
    """The dtype(s) the export at `target` was written in, as its sidecar records them, for the console."""
    return json.loads(sidecar_path(Path(target)).read_text(encoding="utf-8")).get("dtype", "unknown")


def export_dtypes(state: dict[str, torch.Tensor]) -> str:
    """The floating dtypes of an exported state dict, e.g. "float16" or "float16+float32"."""
    names = sorted({str(t.dtype).removeprefix("torch.") for t in state.values() if t.is_floating_point()})
    return "+".join(names) or "none"


def _snapshot_bytes(newest: Path, state: dict[str, torch.Tensor]) -> tuple[bytes, dict[str, str]]:
    """The newest snapshot's dict with the merged weights in its `ema` module, pickled, and the entries left
    out with why.

    Code bases load a snapshot with `pickle.load(f)['ema']` (EDM2 also reads `encoder`). Some entries of an
    unpickled snapshot no longer pickle into something loadable: ECT's loss object comes back without its
    state and its re-pickled form fails to load. Every entry except `ema` is therefore kept only when it
    survives a round trip, and the written bytes are loaded once more before they are trusted. The stack
    was only built from these snapshots with --trust-pickle, so unpickling them again is allowed here.
    """
    snapshot = unpickle_snapshot(newest, trust_pickle=True)
    snapshot["ema"].load_state_dict(state, strict=True)  # copies into the module's own dtypes
    left_out = {}
    for key in [key for key in snapshot if key != "ema"]:
        try:
            pickle.loads(pickle.dumps(snapshot[key]))  # noqa: S301 - our own bytes of a trusted snapshot
        except Exception as error:  # noqa: BLE001 - any failure means the entry cannot travel
            left_out[key] = f"does not survive a pickle round trip ({type(error).__name__}: {error})"
            del snapshot[key]
    payload = pickle.dumps(snapshot)
    try:
        reloaded = pickle.loads(payload)["ema"].state_dict()  # noqa: S301 - as above
        intact = reloaded.keys() == state.keys() and all(
            torch.equal(reloaded[name], tensor) for name, tensor in snapshot["ema"].state_dict().items())
    except Exception as error:  # noqa: BLE001
        raise LcscError(f"{newest}: its network module does not survive a pickle round trip "
                        f"({type(error).__name__}: {error}), so no export of it would load; the coefficients "
                        "are in the search's results.json") from None
    if not intact:
        raise LcscError(f"{newest}: its network module comes back from a pickle round trip with other weights; "
                        "no export written (the coefficients are in the search's results.json)")
    return payload, left_out
