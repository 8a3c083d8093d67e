"""Domain features for the embedded 8x8 digits: a small CNN classifier's penultimate layer (metric "fd_digits").

InceptionV3 on 8x8 greyscale upscaled to 299 measures mostly interpolation artefacts, so the embedded demo
scores samples with a classifier trained on the digits themselves (the "domain classifier" Fréchet distance
used for MNIST-like data). The metric is a Fréchet distance on these features, never called "FID".

- Architecture: two 3x3 conv layers (16, 32 channels), 2x2 max-pool, linear 512 -> 128 -> 64 -> 10
  (`DigitsNet`).
- Features: the 64-d output of the penultimate linear layer, *before* its ReLU, so no direction is a dead
  (always-zero) unit and the covariance stays full rank. 64 dims keep the covariance well estimated from
  the ~1-2K samples a search evaluation uses (n >> d) and the Fréchet distance cheap.
- Training: fixed seed, 80/20 stratified split of the 1,797 images, Adam; the held-out accuracy must reach
  `MIN_ACCURACY` or training fails loudly: a weak classifier would make a meaningless metric.
- Cache: `cache_dir()/extractors/digits-<key>.safetensors`, key = sha256 of the data fingerprint, the
  architecture (`repr` of the network) and the recipe; written atomically; an unreadable file is retrained.

The training, caching and feature code takes a `ClassifierSpec` (network, recipe, names), so a second,
independently trained classifier (`digits_indep.py`, for metrics the search never saw) reuses all of it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from lcsc_ray.atomic import atomic_write
from lcsc_ray.data import dataset_fingerprint, load_digits_labelled
from lcsc_ray.paths import cache_dir

log = logging.getLogger(__name__)

FEATURE_DIM = 64
MIN_ACCURACY = 0.97
RECIPE = {"seed": 0, "held_out": 0.2, "epochs": 30, "batch_size": 64, "lr": 2e-3, "weight_decay": 1e-4}


class DigitsNet(nn.Module):
    """8x8x1 -> conv16 -> conv32 -> pool -> 4x4x32 -> linear 128 -> linear 64 (features) -> ReLU -> linear 10."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 4 * 4, 128), nn.ReLU(),
            nn.Linear(128, FEATURE_DIM),
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.2), nn.Linear(FEATURE_DIM, 10))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(images))


@dataclass(frozen=True)
class ClassifierSpec:
    """One digits classifier: its network (with `features(images)` and `forward`), training recipe and the
    names its extractor and metric go by; also the cache file prefix."""

    name: str
    metric_name: str
    make_net: Callable[[], nn.Module]
    recipe: dict
    dim: int = FEATURE_DIM


DIGITS = ClassifierSpec("digits", "fd_digits", DigitsNet, RECIPE)


def cache_key(images: torch.Tensor, spec: ClassifierSpec = DIGITS) -> str:
    """sha256 over what determines the trained weights: data, architecture, recipe."""
    text = json.dumps({"data": dataset_fingerprint(images), "net": repr(spec.make_net()), "recipe": spec.recipe},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _split(labels: torch.Tensor, spec: ClassifierSpec = DIGITS) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    return train_test_split(index, test_size=spec.recipe["held_out"], random_state=spec.recipe["seed"],
                            stratify=labels.numpy())


@torch.no_grad()
def held_out_accuracy(net: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                      spec: ClassifierSpec = DIGITS) -> float:
    """Accuracy on the held-out part of the fixed split."""
    _, test = _split(labels, spec)
    net.eval()
    return float((net(images[test]).argmax(1) == labels[test]).float().mean())


def train(images: torch.Tensor, labels: torch.Tensor, spec: ClassifierSpec = DIGITS) -> nn.Module:
    """Train the classifier of `spec` with its fixed recipe on the training part of the split (CPU,
    deterministic seed).

    Runs on one CPU thread: the layers are so small that a second thread only adds synchronisation, which
    on a CPU shared with busy processes costs far more than it saves.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(images, labels, spec)
    finally:
        torch.set_num_threads(threads)


def _train(images: torch.Tensor, labels: torch.Tensor, spec: ClassifierSpec) -> nn.Module:
    recipe = spec.recipe
    train_index, _ = _split(labels, spec)
    generator = torch.Generator().manual_seed(recipe["seed"])
    torch.manual_seed(recipe["seed"])
    net = spec.make_net()
    optimizer = torch.optim.AdamW(net.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    x, y = images[train_index], labels[train_index]
    for _ in range(recipe["epochs"]):
        net.train()
        for batch in torch.randperm(len(x), generator=generator).split(recipe["batch_size"]):
            loss = nn.functional.cross_entropy(net(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    accuracy = held_out_accuracy(net, images, labels, spec)
    if accuracy < MIN_ACCURACY:
        raise RuntimeError(f"{spec.name} classifier reached {accuracy:.2%} held-out accuracy, below {MIN_ACCURACY:.0%}")
    return net.eval()


def _load_cached(path: Path, spec: ClassifierSpec = DIGITS) -> nn.Module | None:
    """The cached network, or None when the file is missing or unreadable (then it is retrained)."""
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    try:
        net = spec.make_net()
        net.load_state_dict(load_file(str(path), device="cpu"))
    except Exception as error:  # truncated/corrupt file, other architecture: rebuild instead of crashing
        log.warning("%s extractor cache %s unreadable (%s); retraining", spec.name, path, error)
        return None
    return net.eval()


def load_or_train(images: torch.Tensor, labels: torch.Tensor, *, directory: Path | None = None,
                  spec: ClassifierSpec = DIGITS) -> tuple[nn.Module, str]:
    """The trained network and its cache key, from `directory` (default `cache_dir()/extractors`) or trained
    now and saved there atomically."""
    from safetensors.torch import save_file

    key = cache_key(images, spec)
    path = (directory or cache_dir() / "extractors") / f"{spec.name}-{key}.safetensors"
    net = _load_cached(path, spec)
    if net is None:
        net = train(images, labels, spec)
        state = {name: tensor.contiguous() for name, tensor in net.state_dict().items()}
        metadata = {"recipe": json.dumps(spec.recipe),
                    "held_out_accuracy": f"{held_out_accuracy(net, images, labels, spec):.4f}"}
        atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))
    return net, key


class DigitsExtractor:
    """Images in [-1, 1] [N, 1, 8, 8] -> penultimate features of a digits classifier (`spec`)."""

    def __init__(self, net: nn.Module, identity: str, device: torch.device, spec: ClassifierSpec = DIGITS) -> None:
        self.net = net.to(device).eval()
        self.identity = identity
        self.device = device
        self.name, self.metric_name, self.dim = spec.name, spec.metric_name, spec.dim

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Clamp to the data range [-1, 1] (as when samples are saved as images) and take the features."""
        if tuple(images.shape[1:]) != (1, 8, 8):
            raise ValueError(f"the {self.name} extractor takes [N, 1, 8, 8] images, got {tuple(images.shape)}")
        return self.net.features(images.clamp(-1.0, 1.0).float())


def build(*, device: torch.device, inception_weights: str | None = None) -> DigitsExtractor:
    """The registry entry (`inception_weights` does not apply here)."""
    net, key = load_or_train(*load_digits_labelled())
    return DigitsExtractor(net, f"digits:{key}", device)
