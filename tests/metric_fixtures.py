"""Shared fixtures for the metric tests: the digits extractor trained once per session into a temporary cache,
and random-weight FID Inception weights saved as a real file (the true weights cannot be downloaded here)."""

from __future__ import annotations

import pytest
import torch

from lcsc_ray.data import load_digits_labelled
from lcsc_ray.features import digits


@pytest.fixture(scope="session")
def metric_cache(tmp_path_factory):
    """A cache root shared by the metric test modules (so the digits classifier is trained once)."""
    return tmp_path_factory.getbasetemp() / "lcsc_metric_cache"


@pytest.fixture(scope="session")
def digits_extractor(metric_cache):
    net, key = digits.load_or_train(*load_digits_labelled(), directory=metric_cache / "extractors")
    return digits.DigitsExtractor(net, f"digits:{key}", torch.device("cpu"))


@pytest.fixture(scope="session")
def random_inception_weights(tmp_path_factory):
    """A state dict with the FID Inception's keys and shapes (torchvision's InceptionV3 with 1008 classes and
    no aux head has the same parameters as pytorch-fid's patched blocks), random values, saved with torch."""
    import torchvision

    torch.manual_seed(0)
    state = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None,
                                            init_weights=True).state_dict()
    path = tmp_path_factory.mktemp("inception") / "random_inception.pth"
    torch.save(state, path)
    return path
