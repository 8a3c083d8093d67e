"""Datasets as float32 image tensors [N, C, H, W] in [-1, 1]; nothing is ever downloaded.

Specs a user types (`--data`):
- `digits`: scikit-learn's bundled handwritten digits (1,797 real 8x8 grey images shipped inside the
  package), values 0..16 scaled linearly to [-1, 1]; kept at 8x8 so the demo models stay tiny.
- `cifar10:<folder>`: the CIFAR-10 "python version" folder (`cifar-10-batches-py`, as torchvision lays it out)
  or its parent; the training batches are read with a restricted unpickler that accepts only numpy arrays.
- `<file>.npz`: uint8 images under the key `images` (or the only array), NHWC or NCHW.
- `<folder>`: every PNG/JPEG/BMP/WebP file below it, all of one size.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import torch

from lcsc_ray.errors import LcscError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
DIGITS_MAX = 16.0  # sklearn's digits are counts of set pixels in 4x4 blocks: 0..16


def dataset_exists(spec: str) -> bool:
    """Whether `spec` names a dataset `load_images` can read (checked on the driver, before workers need it)."""
    if spec == "digits":
        return True
    path = Path(spec.split(":", 1)[1] if spec.startswith("cifar10:") else spec).expanduser()
    return path.is_dir() or (path.suffix == ".npz" and path.is_file())


def load_images(spec: str) -> torch.Tensor:
    """Load the dataset named by `spec` (see module docstring) as float32 [N, C, H, W] in [-1, 1]."""
    if spec == "digits":
        return load_digits_labelled()[0]
    if spec.startswith("cifar10:"):
        return _uint8_to_unit(_load_cifar10(Path(spec.split(":", 1)[1]).expanduser()))
    path = Path(spec).expanduser()
    if path.suffix == ".npz":
        return _uint8_to_unit(_load_npz(path))
    if path.is_dir():
        return _uint8_to_unit(_load_folder(path))
    raise LcscError(
        f"--data {spec!r}: not found or not a dataset; use 'digits', 'cifar10:<folder>', a .npz of uint8 "
        f"images or an image folder (looked for {path.resolve()})"
    )


def load_digits_labelled() -> tuple[torch.Tensor, torch.Tensor]:
    """The bundled digits as ([1797, 1, 8, 8] float32 in [-1, 1], [1797] int64 labels)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / DIGITS_MAX * 2.0 - 1.0).unsqueeze(1)
    return images.contiguous(), torch.from_numpy(bunch.target.astype(np.int64))


def dataset_fingerprint(images: torch.Tensor) -> str:
    """sha256 of the tensor's shape and bytes: a cache key for statistics and extractors."""
    digest = hashlib.sha256(str(tuple(images.shape)).encode())
    digest.update(images.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _uint8_to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 NCHW -> float32 in [-1, 1] (x / 127.5 - 1, the usual DDPM/EDM scaling)."""
    return torch.from_numpy(images).float().div_(127.5).sub_(1.0)


def _to_nchw(images: np.ndarray, source: Path) -> np.ndarray:
    if images.dtype != np.uint8:
        raise LcscError(f"{source}: images must be uint8 (0..255), got {images.dtype}; convert them first")
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4:
        raise LcscError(f"{source}: expected images shaped [N, H, W, C] or [N, C, H, W], got {images.shape}")
    if images.shape[-1] in (1, 3, 4) and images.shape[1] not in (1, 3, 4):
        images = images.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(images)


def _load_npz(path: Path) -> np.ndarray:
    if not path.is_file():
        raise LcscError(f"--data {path}: file not found; give an existing .npz of uint8 images")
    with np.load(path, allow_pickle=False) as archive:
        keys = list(archive.keys())
        key = "images" if "images" in keys else (keys[0] if len(keys) == 1 else None)
        if key is None:
            raise LcscError(f"{path}: several arrays {keys} and none named 'images'; save the images as 'images'")
        return _to_nchw(archive[key], path)


def _load_folder(path: Path) -> np.ndarray:
    from PIL import Image

    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise LcscError(f"--data {path}: no {'/'.join(IMAGE_SUFFIXES)} images below this folder")
    arrays = []
    for file in files:
        with Image.open(file) as image:
            arrays.append(np.asarray(image.convert("RGB" if image.mode not in ("L", "1") else "L")))
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise LcscError(f"--data {path}: images have different sizes {sorted(shapes)[:4]}; resize them to one size")
    return _to_nchw(np.stack(arrays), path)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR-10 python batches that refuses every global except numpy's array rebuilders,
    so a tampered dataset file cannot run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes; a pure function
    }

    def find_class(self, module: str, name: str):  # noqa: D401 - pickle API
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _load_cifar10(folder: Path) -> np.ndarray:
    """The 50,000 CIFAR-10 training images (the paper's FID reference set) as uint8 NCHW."""
    if (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    files = [folder / f"data_batch_{i}" for i in range(1, 6)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise LcscError(
            f"--data cifar10:{folder}: missing {', '.join(missing)}; point it at the extracted "
            "'cifar-10-batches-py' folder (nothing is downloaded)"
        )
    batches = []
    for file in files:
        with open(file, "rb") as handle:
            try:
                batch = _NumpyOnlyUnpickler(handle, encoding="bytes").load()
            except (pickle.UnpicklingError, EOFError, ValueError) as error:
                raise LcscError(f"{file}: not a CIFAR-10 python batch ({error}); re-extract the archive") from None
        batches.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
    return np.concatenate(batches)
