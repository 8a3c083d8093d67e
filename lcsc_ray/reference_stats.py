"""Reference statistics (μ, Σ of a dataset's features) as `.npz` files, pytorch-fid compatible.

Format: float64 arrays `mu` [d] and `sigma` [d, d], exactly the keys `python -m pytorch_fid --save-stats`
writes and reads, plus `lcsc_meta`, a JSON string (a unicode array, so loading never needs
pickle) with the extractor name and identity, metric name, sample count and dataset. Files without
`lcsc_meta` (pytorch-fid's own) load with empty metadata.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lcsc_ray.atomic import atomic_write
from lcsc_ray.errors import LcscError
from lcsc_ray.host_memory import retain_freed_memory
from lcsc_ray.paths import cache_dir
from lcsc_ray.statistics import RunningStats

log = logging.getLogger(__name__)

META_KEY = "lcsc_meta"


@dataclass
class ReferenceStats:
    """μ (float64 [d]) and Σ (float64 [d, d]) of a dataset's features, with where they came from."""

    mu: np.ndarray
    sigma: np.ndarray
    meta: dict = field(default_factory=dict)  # extractor, extractor_identity, metric_name, num_samples, dataset

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])


def save_reference_stats(path: str | Path, stats: ReferenceStats) -> Path:
    """Write `stats` atomically as a pytorch-fid `.npz` (mu, sigma) plus our metadata; return the path."""
    path = Path(path)
    if path.suffix != ".npz":
        raise LcscError(f"{path}: reference statistics must be a .npz file (pytorch-fid reads only .npz)")

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:  # a handle, so numpy does not append a second ".npz"
            np.savez_compressed(handle, mu=np.asarray(stats.mu, np.float64), sigma=np.asarray(stats.sigma, np.float64),
                                **{META_KEY: np.array(json.dumps(stats.meta, sort_keys=True))})

    return atomic_write(path, write)


def load_reference_stats(path: str | Path, *, extractor: str | None = None, dim: int | None = None) -> ReferenceStats:
    """Read a `.npz` of reference statistics, checking shapes, finiteness and (when given) extractor and dim."""
    path = Path(path)
    remedy = "recompute it with `python launch/fid_stats.py --data SPEC --extractor NAME --out FILE.npz`"
    if not path.is_file():
        raise LcscError(f"reference statistics {path} not found; {remedy}")
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise LcscError(f"{path}: a single array, not an archive with mu and sigma; {remedy}")
        with archive:
            missing = {"mu", "sigma"} - set(archive.files)
            if missing:
                raise LcscError(f"{path}: no {' or '.join(sorted(missing))} array; {remedy}")
            mu, sigma = archive["mu"].astype(np.float64), archive["sigma"].astype(np.float64)
            meta = json.loads(str(archive[META_KEY])) if META_KEY in archive.files else {}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise LcscError(f"{path}: not a readable .npz of statistics ({type(error).__name__}); {remedy}") from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise LcscError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not a [d] mean and [d, d] "
                        f"covariance; {remedy}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise LcscError(f"{path}: mu or sigma contains NaN or Inf; {remedy}")
    stored = meta.get("extractor")
    if extractor is not None and stored is not None and stored != extractor:
        raise LcscError(f"{path}: computed with the {stored!r} extractor, but {extractor!r} is in use; "
                        f"pass --extractor {stored} or recompute the statistics")
    if dim is not None and mu.shape[0] != dim:
        raise LcscError(f"{path}: features have dimension {mu.shape[0]}, the {extractor or 'chosen'} extractor gives "
                        f"{dim}; use statistics computed with that extractor")
    return ReferenceStats(mu, sigma, meta)


def compute_reference_stats(images: torch.Tensor, extractor, *, batch_size: int = 250,
                            dataset: str) -> ReferenceStats:
    """Stream `images` ([N, C, H, W] in [-1, 1]) through `extractor` into float64 running statistics."""
    retain_freed_memory()  # every batch frees and re-allocates the same activations
    stats = RunningStats(extractor.dim, device=extractor.device)
    for batch in images.split(batch_size):
        stats.update(extractor(batch.to(extractor.device)))
    mu, sigma = stats.mean().cpu().numpy(), stats.covariance().cpu().numpy()
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise LcscError(f"dataset {dataset}: the {extractor.name} extractor gave NaN/Inf features; check the images")
    meta = {"extractor": extractor.name, "extractor_identity": extractor.identity,
            "metric_name": extractor.metric_name, "num_samples": stats.num_samples, "dataset": dataset}
    return ReferenceStats(mu, sigma, meta)


def ensure_reference_stats(dataset_spec: str, extractor_name: str, *, device: str | torch.device = "cpu",
                           inception_weights: str | None = None) -> Path:
    """Path of the statistics of `dataset_spec` under `extractor_name`, computed once and cached in
    `cache_dir()/stats/` keyed by the dataset fingerprint and the extractor's identity (weights/recipe).

    `device` ("auto", "cpu", "cuda", ...) is where the features are extracted: pass the search's `--device`,
    so a GPU run does not push the whole reference dataset through the extractor on the driver's CPU."""
    from lcsc_ray.data import dataset_fingerprint, load_images
    from lcsc_ray.features import build_extractor

    extractor = build_extractor(extractor_name, device=device, inception_weights=inception_weights)
    images = load_images(dataset_spec)
    key = hashlib.sha256(f"{dataset_fingerprint(images)}|{extractor.identity}".encode()).hexdigest()[:16]
    path = cache_dir() / "stats" / f"{extractor_name}-{key}.npz"
    if path.is_file():
        try:
            load_reference_stats(path, extractor=extractor_name, dim=extractor.dim)
            return path
        except LcscError as error:
            log.warning("cached statistics unusable (%s); recomputing", error)
    return save_reference_stats(path, compute_reference_stats(images, extractor, dataset=dataset_spec))
