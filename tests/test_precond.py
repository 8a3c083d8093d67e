"""σ grid, preconditioning scalings and the CT curriculum against their formulas (Karras et al. 2022, Song et al. 2023, iCT)."""

import math

import pytest
import torch

from lcsc_ray.models import UNet
from lcsc_ray.precond import (
    SigmaConfig,
    consistency_fn,
    consistency_scalings,
    edm_scalings,
    karras_sigmas,
    log_normal_cdf_weights,
)
from lcsc_ray.training.ct import discretisation_steps


def test_karras_grid_matches_formula_and_published_value():
    grid = karras_sigmas(18)
    lo, hi = 0.002 ** (1 / 7), 80.0 ** (1 / 7)
    expected = [(hi + i / 17 * (lo - hi)) ** 7 for i in range(18)]
    assert grid.dtype == torch.float64
    assert grid.tolist() == pytest.approx(expected, rel=1e-12)
    assert grid[0].item() == pytest.approx(80.0) and grid[-1].item() == pytest.approx(0.002)
    assert grid[10].item() == pytest.approx(1.09, abs=0.01)  # CIFAR-10 ts=0,10,17 second σ
    assert torch.all(grid[1:] < grid[:-1])


def test_consistency_boundary_condition():
    sigma = torch.tensor([0.002, 1.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in = consistency_scalings(sigma)
    assert c_skip[0].item() == 1.0 and c_out[0].item() == 0.0
    assert c_in.tolist() == pytest.approx([1 / math.sqrt(s**2 + 0.25) for s in sigma.tolist()])
    assert c_skip[2].item() == pytest.approx(0.25 / ((80 - 0.002) ** 2 + 0.25))


def test_consistency_fn_is_identity_at_sigma_min_for_any_network():
    torch.manual_seed(0)
    net = UNet(channels=8)
    torch.nn.init.normal_(net.conv_out.weight, std=0.5)  # a non-trivial F
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(consistency_fn(net, x, 0.002), x)
    assert not torch.allclose(consistency_fn(net, x, 1.0), x, atol=1e-3)


def test_edm_scalings_limits():
    c_skip, c_out, c_in = edm_scalings(torch.tensor([1e-8, 0.5, 1e4], dtype=torch.float64))
    assert c_skip[0].item() == pytest.approx(1.0) and c_out[0].item() == pytest.approx(0.0, abs=1e-7)
    assert c_skip[1].item() == pytest.approx(0.5) and c_out[1].item() == pytest.approx(0.5 / math.sqrt(2))
    assert c_skip[2].item() == pytest.approx(0.0, abs=1e-8) and c_out[2].item() == pytest.approx(0.5, rel=1e-6)


def test_ict_curriculum_doubles_and_caps():
    total = 800  # K' = floor(800 / 8) = 100
    assert [discretisation_steps(k, total, 10, 1280) for k in (0, 99, 100, 250, 799)] == [11, 11, 21, 41, 1281]


def test_log_normal_interval_weights():
    grid = karras_sigmas(41).flip(0)
    p = log_normal_cdf_weights(grid, -1.1, 2.0)
    assert p.shape == (40,) and torch.all(p > 0) and p.sum().item() == pytest.approx(1.0)
    # the interval containing exp(P_mean) ≈ 0.33 is the most likely among its neighbours
    mode = int(torch.argmax(p))
    assert grid[mode].item() < 1.5 and grid[mode + 1].item() > 0.05


def test_sigma_config_round_trips():
    assert SigmaConfig(**SigmaConfig().to_dict()) == SigmaConfig()
