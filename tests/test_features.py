"""Feature extractors: registry, the digits classifier and its cache, pytorch-fid's InceptionV3 and its weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lcsc_ray.data import load_digits_labelled, load_images
from lcsc_ray.errors import LcscError
from lcsc_ray.features import build_extractor, digits, inception
from metric_fixtures import digits_extractor, metric_cache, random_inception_weights  # noqa: F401  (fixtures)


def test_unknown_extractor_lists_the_valid_names():
    with pytest.raises(LcscError, match="choose one of: digits, digits_indep, inception"):
        build_extractor("vgg")


def test_digits_classifier_is_accurate_and_gives_64d_features(digits_extractor):
    images, labels = load_digits_labelled()
    assert digits.held_out_accuracy(digits_extractor.net, images, labels) >= digits.MIN_ACCURACY
    features = digits_extractor(images[:50])
    assert features.shape == (50, 64) and features.dtype == torch.float32 and not features.requires_grad
    assert torch.equal(features, digits_extractor(images[:50]))
    assert (digits_extractor.name, digits_extractor.metric_name, digits_extractor.dim) == ("digits", "fd_digits", 64)
    # out-of-range samples are clamped to the data range, as when they are saved as images
    assert torch.equal(digits_extractor(images[:5] * 3), digits_extractor((images[:5] * 3).clamp(-1, 1)))
    with pytest.raises(ValueError, match=r"\[N, 1, 8, 8\]"):
        digits_extractor(torch.zeros(2, 3, 8, 8))


def test_digits_extractor_is_loaded_from_cache_and_retrained_when_corrupt(metric_cache, digits_extractor,
                                                                          monkeypatch):
    monkeypatch.setenv("LCSC_RAY_CACHE", str(metric_cache))
    cached = list((metric_cache / "extractors").glob("digits-*.safetensors"))
    assert len(cached) == 1
    images = load_digits_labelled()[0][:20]

    def no_training(*args):
        raise AssertionError("trained although the cache holds the network")

    monkeypatch.setattr(digits, "train", no_training)
    extractor = build_extractor("digits")
    assert extractor.identity == digits_extractor.identity
    assert torch.equal(extractor(images), digits_extractor(images))

    monkeypatch.undo()
    monkeypatch.setenv("LCSC_RAY_CACHE", str(metric_cache))
    cached[0].write_bytes(cached[0].read_bytes()[:100])  # a truncated file, as after a crash mid-copy
    retrained = build_extractor("digits")
    torch.testing.assert_close(retrained(images), digits_extractor(images))  # same seed and recipe
    assert digits._load_cached(cached[0]) is not None  # rewritten whole


def test_independent_digits_classifier_is_another_network_with_its_own_metric(metric_cache, digits_extractor,
                                                                            monkeypatch):
    """fd_digits_indep: another architecture and seed, trained on first use and cached like fd_digits'."""
    from lcsc_ray.features.digits_indep import DIGITS_INDEP

    monkeypatch.setenv("LCSC_RAY_CACHE", str(metric_cache))
    indep = build_extractor("digits_indep")
    images, labels = load_digits_labelled()
    assert (indep.name, indep.metric_name, indep.dim) == ("digits_indep", "fd_digits_indep", 64)
    assert digits.held_out_accuracy(indep.net, images, labels, DIGITS_INDEP) >= digits.MIN_ACCURACY
    assert repr(indep.net) != repr(digits_extractor.net) and indep.identity != digits_extractor.identity
    assert len(list((metric_cache / "extractors").glob("digits_indep-*.safetensors"))) == 1
    features = indep(images[:200])
    assert features.shape == (200, 64)
    # not a copy of the searched features: the two representations are far from linearly identical
    searched = digits_extractor(images[:200])
    fit = torch.linalg.lstsq(torch.cat([searched, torch.ones(200, 1)], 1).double(), features.double()).solution
    residual = features.double() - torch.cat([searched, torch.ones(200, 1)], 1).double() @ fit
    assert residual.square().sum() > 0.01 * (features.double() - features.double().mean(0)).square().sum()


def test_inception_features_match_pytorch_fid_on_png_files(tmp_path, random_inception_weights):
    """Our extractor on images loaded as [-1, 1] tensors equals pytorch-fid's pipeline on the PNG files."""
    from pytorch_fid.fid_score import get_activations

    rng = np.random.default_rng(0)
    files = []
    for i, mode in enumerate(["RGB", "RGB", "L"]):  # a grey image too: both sides repeat it to RGB
        shape = (12, 12, 3) if mode == "RGB" else (12, 12)
        (tmp_path / str(i)).mkdir()
        files.append(tmp_path / str(i) / "image.png")
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(files[-1])
    extractor = build_extractor("inception", inception_weights=str(random_inception_weights))
    assert (extractor.name, extractor.metric_name, extractor.dim) == ("inception", "fid", 2048)
    ours = extractor(torch.cat([load_images(str(f.parent)).expand(-1, 3, -1, -1) for f in files])).double().numpy()
    theirs = get_activations(files, extractor.model, batch_size=3, dims=2048, device="cpu", num_workers=0)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())
    grey = load_images(str(files[2].parent))  # [1, 1, 12, 12]: the extractor repeats it to RGB itself
    torch.testing.assert_close(extractor(grey), torch.from_numpy(ours[2:]).float(),
                               rtol=1e-4, atol=1e-4 * float(np.abs(ours).max()))


def test_inception_weights_from_torch_hub_cache_and_safetensors(tmp_path, random_inception_weights, monkeypatch):
    from safetensors.torch import save_file

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    hub_file = inception.hub_weights_path()
    assert hub_file == tmp_path / "torch" / "hub" / "checkpoints" / inception.WEIGHTS_FILE
    hub_file.parent.mkdir(parents=True)
    hub_file.write_bytes(random_inception_weights.read_bytes())
    from_hub = build_extractor("inception")
    state = torch.load(random_inception_weights, map_location="cpu", weights_only=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    from_safetensors = build_extractor("inception", inception_weights=str(tmp_path / "w.safetensors"))
    images = torch.rand(1, 3, 8, 8) * 2 - 1
    torch.testing.assert_close(from_hub(images), from_safetensors(images))


def test_missing_or_wrong_inception_weights_give_one_line_errors(tmp_path, monkeypatch):
    from pytorch_fid import inception as fid_inception

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(fid_inception, "FID_WEIGHTS_URL", "http://127.0.0.1:9/pt_inception.pth")  # offline
    expected = rf"{inception.WEIGHTS_FILE} not found .* copy the file to .*torch/hub/checkpoints"
    with pytest.raises(LcscError, match=expected):
        build_extractor("inception")
    with pytest.raises(LcscError, match="--inception-weights .*nope.pth: file not found"):
        build_extractor("inception", inception_weights=str(tmp_path / "nope.pth"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"garbage")
    with pytest.raises(LcscError, match="cannot read Inception weights"):
        build_extractor("inception", inception_weights=str(garbage))
    other = tmp_path / "other.pth"
    torch.save(digits.DigitsNet().state_dict(), other)
    with pytest.raises(LcscError, match="not pytorch-fid's FID Inception weights"):
        build_extractor("inception", inception_weights=str(other))
