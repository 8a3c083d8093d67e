"""Coefficient spaces and presets: pure numerics and file loading, no Ray."""

from __future__ import annotations

import json

import nevergrad as ng
import numpy as np
import pytest

from lcsc_ray.errors import LcscError
from lcsc_ray.search.optimizers import resolve_optimizer_name
from search_spaces import available_presets, build_space, load_preset


def test_full_space_is_identity_and_bounded():
    space = build_space("full", 5, bound=3.0)
    alpha = np.array([0.5, -1.0, 2.0, 0.0, 0.25])
    assert np.array_equal(space.to_coefficients(space.to_value(alpha)), alpha)
    param = space.parametrization()
    assert isinstance(param, ng.p.Dict)
    assert np.allclose(param.value["alpha"], np.full(5, 0.2))  # centred on the uniform profile
    far = param.spawn_child().set_standardized_data(np.full(5, 1e6))
    assert np.allclose(far.value["alpha"], 3.0)  # clipped to the bound


def test_affine_space_sums_to_one_and_is_stable_near_zero_sum():
    space = build_space("affine", 4)
    value = np.array([1e-9, -1e-9, 3.0, -3.0])  # Σv ≈ 0: v/Σv would explode here
    alpha = space.to_coefficients(value)
    assert alpha.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.all(np.abs(alpha) < 4)
    profile = np.array([-0.5, 0.25, 0.25, 1.0])
    assert np.array_equal(space.to_coefficients(space.to_value(profile)), profile)  # exact for Σα = 1


def test_grouped_space_shares_coefficients_within_consecutive_groups():
    space = build_space("grouped:3", 10)
    assert space.dimension == 3
    alpha = space.to_coefficients(np.array([0.2, 0.5, 0.1]))
    assert alpha.sum() == pytest.approx(1.0)
    groups = [alpha[0:4], alpha[4:7], alpha[7:10]]  # np.array_split sizes 4, 3, 3
    assert all(np.allclose(g, g[0]) for g in groups)
    uniform = np.full(10, 0.1)
    assert np.allclose(space.to_coefficients(space.to_value(uniform)), uniform)
    assert np.allclose(space.to_coefficients(space.init_value()), uniform)
    # to_value is the least-squares projection: group sums, so a profile constant per group round-trips
    rough = np.array([0.1, 0.3, 0.0, 0.0, 0.2, 0.2, 0.2, 0.0, 0.0, 0.0])
    assert np.allclose(space.to_value(rough), [0.4, 0.6, 0.0])


@pytest.mark.parametrize("spec", ["foo", "grouped", "grouped:0", "grouped:x", "grouped:11", "affine:3", "ful"])
def test_bad_space_specs_name_the_valid_forms(spec):
    with pytest.raises(LcscError, match="--space"):
        build_space(spec, 10)


def test_warm_start_checks_shape_and_bound():
    space = build_space("affine", 3, bound=2.0)
    with pytest.raises(LcscError, match="3 finite"):
        space.to_value(np.ones(4))
    with pytest.raises(LcscError, match="--bound"):
        space.to_value(np.array([5.0, -2.0, -2.0]))
    with pytest.raises(LcscError, match="shape"):
        space.to_coefficients(np.ones(2))


def test_optimizers_start_near_the_centre_not_over_the_whole_box():
    """full_range_sampling=False: DE's first population lies near the uniform profile, not over ±10."""
    space = build_space("affine", 20)
    param = space.parametrization()
    param.random_state = np.random.RandomState(0)
    optimizer = ng.optimizers.TwoPointsDE(param, budget=100)
    first = np.array([optimizer.ask().value["alpha"] for _ in range(10)])
    assert np.max(np.abs(first - 1 / 20)) < 6 * space.sigma
    assert space.sigma == pytest.approx(1 / np.sqrt(20))


def test_bundled_presets_load_with_the_paper_settings():
    assert {"digits-cm", "digits-dm", "cifar10-cm", "cifar10-dm"} <= set(available_presets())
    cm = load_preset("cifar10-cm")
    assert (cm["window"], cm["checkpoint_saved_every"], cm["expected_checkpoints"]) == (40000, 100, 400)
    assert (cm["num_trials"], cm["fid_samples"], cm["final_samples"]) == (2000, 5000, 50000)
    assert (cm["extractor"], cm["sampler"], cm["grid_steps"], cm["ts"]) == ("inception", "multistep", 18, [0, 10, 17])
    dm = load_preset("cifar10-dm")
    assert (dm["window"], dm["checkpoint_saved_every"], dm["expected_checkpoints"]) == (50000, 200, 250)
    assert (dm["sampler"], dm["nfe"], dm["extractor"]) == ("dpmsolver++", 15, "inception")
    for name in available_presets():
        preset = load_preset(name)
        assert preset["preset"] == name and preset["kind"] in ("cm", "dm")
        build_space(preset["space"], 8)  # every preset names a valid space and optimizer
        resolve_optimizer_name(preset["optimizer"])


def test_preset_errors_are_one_line_and_helpful(tmp_path):
    with pytest.raises(LcscError, match="did you mean 'digits-cm'.*bundled presets"):
        load_preset("digits-cn")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(LcscError, match="not valid JSON"):
        load_preset(broken)
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"preset": "x"}))
    with pytest.raises(LcscError, match="lacks kind"):
        load_preset(str(partial))
    custom = tmp_path / "mine.json"
    custom.write_text(json.dumps({**load_preset("digits-cm"), "preset": "mine"}))
    assert load_preset(custom)["preset"] == "mine"
