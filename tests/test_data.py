"""Dataset loading: the bundled digits, CIFAR-10 python batches (safely), .npz and image folders."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from lcsc_ray.data import dataset_fingerprint, load_digits_labelled, load_images
from lcsc_ray.errors import LcscError


def test_digits_are_scaled_to_unit_range():
    images, labels = load_digits_labelled()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.float32
    assert images.min() == -1.0 and images.max() == 1.0
    assert sorted(labels.unique().tolist()) == list(range(10))
    assert torch.equal(load_images("digits"), images)


def _write_cifar(folder, batch_data):
    batches = folder / "cifar-10-batches-py"
    batches.mkdir()
    for i in range(1, 6):
        with open(batches / f"data_batch_{i}", "wb") as handle:
            pickle.dump({b"data": batch_data, b"labels": [0] * 4}, handle, protocol=2)


def test_cifar10_batches_load_as_nchw(tmp_path):
    data = np.arange(4 * 3072, dtype=np.int64).astype(np.uint8).reshape(4, 3072)
    _write_cifar(tmp_path, data)
    images = load_images(f"cifar10:{tmp_path}")
    assert images.shape == (20, 3, 32, 32)
    assert images[0, 0, 0, 1].item() == pytest.approx(1 / 127.5 - 1)


class _Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_cifar10_refuses_pickled_code(tmp_path):
    _write_cifar(tmp_path, _Exploit())
    with pytest.raises(LcscError, match="data_batch_1.*refusing to load (builtins|__builtin__).print"):
        load_images(f"cifar10:{tmp_path}")


def test_missing_cifar_names_the_files(tmp_path):
    with pytest.raises(LcscError, match="missing data_batch_1"):
        load_images(f"cifar10:{tmp_path}")


def test_npz_and_folder_agree(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, size=(3, 6, 5, 3), dtype=np.uint8)
    np.savez(tmp_path / "imgs.npz", images=pixels)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(folder / f"{i}.png")
    from_npz, from_folder = load_images(str(tmp_path / "imgs.npz")), load_images(str(folder))
    assert from_npz.shape == (3, 3, 6, 5)
    assert torch.equal(from_npz, from_folder)
    assert dataset_fingerprint(from_npz) == dataset_fingerprint(from_folder)


def test_unknown_spec_is_one_line(tmp_path):
    with pytest.raises(LcscError, match="--data .*not found"):
        load_images(str(tmp_path / "nope"))
