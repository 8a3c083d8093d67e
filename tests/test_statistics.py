"""Running statistics and reference-statistics files (our format and pytorch-fid's --save-stats output)."""

from __future__ import annotations

import json
import os
import unittest.mock

import numpy as np
import pytest
import torch
from PIL import Image

from lcsc_ray.errors import LcscError
from lcsc_ray.reference_stats import (ReferenceStats, compute_reference_stats, ensure_reference_stats,
                                      load_reference_stats, save_reference_stats)
from lcsc_ray.statistics import RunningStats
from metric_fixtures import digits_extractor, metric_cache, random_inception_weights  # noqa: F401  (fixtures)


def test_streamed_statistics_equal_numpy_of_all_features():
    rng = np.random.default_rng(0)
    # a large common offset: the naive Σxxᵀ/n − μμᵀ would lose ~8 digits here, the shifted sums do not
    features = rng.standard_normal((1000, 24)) @ rng.standard_normal((24, 24)) + 1e4
    stats = RunningStats(24)
    for batch in np.array_split(features, [1, 7, 300, 301, 640]):  # uneven, including a 1-row batch
        stats.update(torch.from_numpy(batch))
    assert stats.num_samples == 1000
    np.testing.assert_allclose(stats.mean().numpy(), features.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.covariance().numpy(), np.cov(features, rowvar=False), rtol=1e-8, atol=1e-8)


def test_running_stats_reject_wrong_shapes_and_too_few_samples():
    stats = RunningStats(3)
    with pytest.raises(ValueError, match=r"\[n, 3\]"):
        stats.update(torch.zeros(2, 4))
    stats.update(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="at least 2"):
        stats.covariance()


def test_save_and_load_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    stats = ReferenceStats(rng.standard_normal(5), np.eye(5) * 2.0,
                           {"extractor": "digits", "metric_name": "fd_digits", "num_samples": 10, "dataset": "x"})
    path = save_reference_stats(tmp_path / "ref.npz", stats)
    loaded = load_reference_stats(path, extractor="digits", dim=5)
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    assert loaded.meta == stats.meta
    # pytorch-fid's own reader sees the mu/sigma it expects
    with np.load(path) as archive:
        np.testing.assert_array_equal(archive["mu"], stats.mu)
    assert [p.name for p in tmp_path.iterdir()] == ["ref.npz"]  # no temporary left behind


def test_pytorch_fid_save_stats_output_loads(tmp_path, random_inception_weights):
    """Write statistics with pytorch-fid's own `save_fid_stats` over a folder of PNGs (only its weight
    download is replaced, by the random weights file) and read them back."""
    from pytorch_fid import fid_score, inception

    folder = tmp_path / "pngs"
    folder.mkdir()
    rng = np.random.default_rng(2)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    state = torch.load(random_inception_weights, map_location="cpu", weights_only=True)
    out = tmp_path / "pytorch_fid_stats.npz"
    with unittest.mock.patch.object(inception, "load_state_dict_from_url", lambda *a, **k: state):
        fid_score.save_fid_stats([str(folder), str(out)], batch_size=4, device="cpu", dims=2048, num_workers=0)
    loaded = load_reference_stats(out, extractor="inception", dim=2048)
    assert loaded.meta == {} and loaded.mu.shape == (2048,) and loaded.sigma.shape == (2048, 2048)
    with pytest.raises(LcscError, match="dimension 2048"):
        load_reference_stats(out, extractor="digits", dim=64)


def test_load_errors_are_one_line_and_name_the_file(tmp_path):
    with pytest.raises(LcscError, match="not found"):
        load_reference_stats(tmp_path / "missing.npz")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip at all")
    with pytest.raises(LcscError, match="garbage.npz: not a readable"):
        load_reference_stats(garbage)
    single = tmp_path / "single.npz"
    with open(single, "wb") as handle:
        np.save(handle, np.zeros(3))
    with pytest.raises(LcscError, match="single array"):
        load_reference_stats(single)
    np.savez(tmp_path / "nomu.npz", sigma=np.eye(2))
    with pytest.raises(LcscError, match="no mu"):
        load_reference_stats(tmp_path / "nomu.npz")
    np.savez(tmp_path / "shape.npz", mu=np.zeros(3), sigma=np.eye(2))
    with pytest.raises(LcscError, match="not a \\[d\\] mean"):
        load_reference_stats(tmp_path / "shape.npz")
    np.savez(tmp_path / "nan.npz", mu=np.array([0.0, np.nan]), sigma=np.eye(2))
    with pytest.raises(LcscError, match="NaN or Inf"):
        load_reference_stats(tmp_path / "nan.npz")
    np.savez(tmp_path / "tagged.npz", mu=np.zeros(2), sigma=np.eye(2), lcsc_meta=json.dumps({"extractor": "digits"}))
    with pytest.raises(LcscError, match="'digits' extractor, but 'inception'"):
        load_reference_stats(tmp_path / "tagged.npz", extractor="inception")
    with pytest.raises(LcscError, match="must be a .npz"):
        save_reference_stats(tmp_path / "ref.txt", ReferenceStats(np.zeros(2), np.eye(2)))


def test_reference_stats_of_digits_equal_numpy(digits_extractor):
    from lcsc_ray.data import load_digits_labelled

    images = load_digits_labelled()[0][:300]
    stats = compute_reference_stats(images, digits_extractor, batch_size=64, dataset="digits[:300]")
    features = digits_extractor(images).double().numpy()
    np.testing.assert_allclose(stats.mu, features.mean(0), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(stats.sigma, np.cov(features, rowvar=False), rtol=1e-7, atol=1e-7)
    assert stats.meta["extractor"] == "digits" and stats.meta["metric_name"] == "fd_digits"
    assert stats.meta["num_samples"] == 300 and stats.meta["extractor_identity"] == digits_extractor.identity


def test_ensure_reference_stats_caches_and_recovers_from_corruption(metric_cache, digits_extractor, monkeypatch):
    monkeypatch.setenv("LCSC_RAY_CACHE", str(metric_cache))  # the extractor is already trained there
    path = ensure_reference_stats("digits", "digits")
    assert path.parent == metric_cache / "stats"
    stats = load_reference_stats(path, extractor="digits", dim=64)
    assert stats.meta["num_samples"] == 1797
    os.utime(path, (1, 1))
    assert ensure_reference_stats("digits", "digits") == path and path.stat().st_mtime == 1  # cache hit
    path.write_bytes(b"truncated")
    assert ensure_reference_stats("digits", "digits") == path
    np.testing.assert_allclose(load_reference_stats(path).sigma, stats.sigma, rtol=1e-12)
