"""NVlabs-style pickle snapshots: EDM `network-snapshot-<kimg:06d>.pkl`, ECT `network-snapshot-<tick:06d>.pkl`
(the number is a tick; `network-snapshot-latest.pkl` is a moving copy and is skipped) and EDM2
`network-snapshot-<kimg:07d>-<std:.3f>.pkl` (one trajectory per post-hoc EMA width, e.g. `0.050`).

Each file is a pickled dict whose `ema` entry is the whole network module (EDM2's in float16), called as
`net(x, σ, class_labels)` with its preconditioning inside. Unpickling runs code from the file, so nothing
here unpickles without `--trust-pickle` (file names alone are enough to detect the format), and the
module's classes must import: the code base goes on the Python path (`--code-dir` or PYTHONPATH).
The convention is `ect` when the module's class is ECT's `ECMPrecond`, else `edm`.
"""

from __future__ import annotations

import hashlib
import pickle
import re
from pathlib import Path

import numpy as np
from torch import nn

from lcsc_ray.checkpoints import CheckpointFile, MissingModule, pickle_refusal, unpickle_snapshot
from lcsc_ray.errors import LcscError
from lcsc_ray.paths import cache_dir
from lcsc_ray.precond import SigmaConfig
from lcsc_ray.reference_stats import ReferenceStats, save_reference_stats
from lcsc_ray.run_folder import RunInfo, add_python_path, code_folder

_SNAPSHOT = re.compile(r"network-snapshot-(\d+)(?:-(\d+\.\d+))?\.pkl")
_DEFAULT = SigmaConfig()


def _code_path(code_dir: str | None) -> list[str]:
    return [str(code_folder(code_dir))] if code_dir else []


class NVlabsFormat:
    name = "nvlabs-pickle"
    label = "NVlabs EDM / EDM2 / ECT network-snapshot pickles"

    def matches(self, folder: Path) -> bool:
        return any(_SNAPSHOT.fullmatch(p.name) for p in folder.iterdir() if p.is_file())

    def trajectories(self, folder: Path, pattern: str | None = None) -> dict[str, list[CheckpointFile]]:
        found: dict[str, list[CheckpointFile]] = {}
        for entry in sorted(folder.iterdir()):
            match = _SNAPSHOT.fullmatch(entry.name)
            if match:
                found.setdefault(match.group(2) or "ema", []).append(CheckpointFile(entry, int(match.group(1)), "pickle"))
        return {name: sorted(files, key=lambda f: f.step) for name, files in found.items()}

    def describe(self, folder: Path, newest: CheckpointFile, hints) -> dict:
        if not hints.trust_pickle:
            raise LcscError(pickle_refusal(folder / "network-snapshot-*.pkl"))
        add_python_path(_code_path(hints.code_dir))
        try:
            net = unpickle_snapshot(newest.path, True)["ema"]
        except MissingModule as error:
            raise error.for_code_dir(hints.code_dir) from None
        ect = "ECM" in type(net).__name__
        resolution = int(getattr(net, "img_resolution", 0))
        shape = hints.image_shape or (int(getattr(net, "img_channels", 0)), resolution, resolution)
        if not all(shape):
            raise LcscError(f"{newest.path}: the network has no img_channels/img_resolution; pass --image-shape C,H,W")
        sigma_min = max(float(getattr(net, "sigma_min", 0.0)), _DEFAULT.sigma_min)
        sigma_max = min(float(getattr(net, "sigma_max", float("inf"))), _DEFAULT.sigma_max)
        return {
            "run_format": self.name, "convention": "ect" if ect else "edm", "kind": "cm" if ect else "dm",
            "checkpoints": str(folder), "image_shape": list(shape),
            "num_classes": int(getattr(net, "label_dim", 0) or 0),
            "model": {"snapshot": str(newest.path), "class": network_class_name(net)},
            "precond": {**_DEFAULT.to_dict(), "sigma_min": sigma_min, "sigma_max": sigma_max,
                        "sigma_data": float(getattr(net, "sigma_data", _DEFAULT.sigma_data))},
            "python_path": _code_path(hints.code_dir),
        }

    def build_network(self, run: RunInfo, trust_pickle: bool) -> nn.Module:
        """The `ema` module of the snapshot run.json names (always in eval mode: EDM2's weight normalisation
        rewrites its weights in training mode)."""
        return unpickle_snapshot(Path(run.config["model"]["snapshot"]), trust_pickle)["ema"]

    def holds_ema(self, trajectory: str) -> bool:
        """EDM and ECT snapshots hold only the EMA network; EDM2's hold one power-function EMA per width."""
        return True


NVLABS = NVlabsFormat()


def network_class_name(net: nn.Module) -> str:
    """`module.Class` of the network as its code base names it. NVlabs' persistence wraps each class in a
    subclass named `persistent_class.<locals>.Decorator`; the class it wraps is the one users know."""
    cls = type(net)
    if cls.__qualname__.endswith("<locals>.Decorator"):
        cls = next((base for base in cls.__mro__[1:] if not base.__qualname__.endswith("<locals>.Decorator")), cls)
    return f"{cls.__module__}.{cls.__qualname__}"


def reference_stats_from_pickle(path: Path, trust_pickle: bool) -> Path:
    """EDM2's reference statistics (`dataset-refs/*.pkl`: a pickled dict whose `fid` entry holds the Inception
    `mu` and `sigma`) as a cached `.npz` the scorer reads; unpickled only with `trust_pickle`."""
    if not trust_pickle:
        raise LcscError(f"--ref-stats {path}: a pickle; unpickling runs code stored in the file, so it is only read "
                        "when you trust its source: add --trust-pickle (or pass .npz statistics)")
    if not path.is_file():
        raise LcscError(f"--ref-stats {path}: not found")
    data = path.read_bytes()
    target = cache_dir() / "stats" / f"{path.stem}-{hashlib.sha256(data).hexdigest()[:16]}.npz"
    if target.is_file():
        return target
    try:
        refs = pickle.loads(data)  # noqa: S301 - the user passed --trust-pickle
        fid = refs["fid"]
        mu, sigma = np.asarray(fid["mu"], np.float64), np.asarray(fid["sigma"], np.float64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as error:
        raise LcscError(f"--ref-stats {path}: not EDM2 reference statistics (a dict with fid.mu and fid.sigma; "
                        f"{type(error).__name__}); pass a .npz instead") from None
    meta = {"extractor": "inception", "metric_name": "fid", "dataset": f"EDM2 reference {path.name}"}
    return save_reference_stats(target, ReferenceStats(mu, sigma, meta))
