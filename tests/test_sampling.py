"""Samplers: batch-size-independent fixed noise, exact NFE counts, and solver accuracy on a Gaussian oracle."""

import math

import pytest
import torch
from torch import nn

from lcsc_ray.atomic import atomic_write_json
from lcsc_ray.errors import LcscError
from lcsc_ray.noise import BLOCK, FixedNoise
from lcsc_ray.run_folder import load_run
from lcsc_ray.run_formats import build_network
from lcsc_ray.sampling import build_sampler, generate_batches
from lcsc_ray.training.loop import make_config

TINY = {"channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attention": True, "dropout": 0.0}


def make_run(tmp_path, kind):
    config = make_config(kind, data="digits", steps=1, save_every=1, batch_size=1, lr=1e-3, seed=0,
                         model_kwargs=TINY, ema_decay=0.9, warmup=1)
    atomic_write_json(tmp_path / "run.json", {**config, "image_shape": [1, 8, 8]})
    return load_run(tmp_path)


def random_net(run):
    torch.manual_seed(1)
    net = build_network(run)
    nn.init.normal_(net.conv_out.weight, std=0.3)  # the zero init would make F trivially 0
    return net


class CallCounter:
    def __init__(self, net):
        self.calls = 0
        net.register_forward_hook(lambda *args: setattr(self, "calls", self.calls + 1))


def test_fixed_noise_is_a_function_of_the_sample_index():
    noise = FixedNoise(7, (1, 8, 8))
    whole = noise.normal(0, 0, BLOCK + 50)
    assert torch.equal(noise.normal(0, BLOCK - 10, 30), whole[BLOCK - 10 : BLOCK + 20])  # across a block edge
    assert torch.equal(FixedNoise(7, (1, 8, 8)).normal(0, 3, 1), whole[3:4])
    assert not torch.allclose(noise.normal(1, 0, 5), whole[:5])
    assert not torch.allclose(FixedNoise(8, (1, 8, 8)).normal(0, 0, 5), whole[:5])
    assert abs(whole.mean().item()) < 0.05 and abs(whole.std().item() - 1) < 0.05


@pytest.mark.parametrize("name,kwargs", [("onestep", {}), ("multistep", {"steps": 18, "ts": [0, 10, 17]})])
def test_cm_samplers_identical_across_batch_sizes(tmp_path, name, kwargs):
    run = make_run(tmp_path, "cm")
    net = random_net(run)
    sampler = build_sampler(run, name, **kwargs)
    noise = FixedNoise(3, run.image_shape)
    reference = sampler.sample(net, noise, 0, 12)
    for batch in (1, 5, 12):
        batched = torch.cat(list(generate_batches(sampler, net, noise, 12, batch)))
        torch.testing.assert_close(batched, reference, rtol=0, atol=1e-5)
    assert reference.shape == (12, 1, 8, 8) and reference.abs().max() <= 1
    assert not torch.allclose(sampler.sample(net, FixedNoise(4, run.image_shape), 0, 12), reference)


class RecordingNoise(FixedNoise):
    """FixedNoise that records which streams a sampler draws and can negate one of them."""

    def __init__(self, seed, shape, negate=None):
        super().__init__(seed, shape)
        self.negate, self.streams = negate, []

    def normal(self, stream, start, count, device="cpu"):
        self.streams.append(stream)
        out = super().normal(stream, start, count, device)
        return -out if stream == self.negate else out


def test_multistep_uses_per_step_noise(tmp_path):
    run = make_run(tmp_path, "cm")
    net = random_net(run)
    # ts ending above σ_min: on the published ts=0,10,17 the last injected noise is scaled by
    # √(σ_min² − σ_min²) = 0
    sampler = build_sampler(run, "multistep", steps=18, ts=[0, 5, 10])
    noise = RecordingNoise(3, run.image_shape)
    reference = sampler.sample(net, noise, 0, 4)
    assert noise.streams == [0, 1, 2]  # x_T, then fresh noise before each of the two later steps
    for stream in (1, 2):  # each step's noise reaches the output: changing only that stream changes the images
        changed = sampler.sample(net, RecordingNoise(3, run.image_shape, negate=stream), 0, 4)
        assert not torch.allclose(changed, reference)
    unused = sampler.sample(net, RecordingNoise(3, run.image_shape, negate=3), 0, 4)
    assert torch.equal(unused, reference)


@pytest.mark.parametrize(
    "kind,name,kwargs,expected",
    [
        ("cm", "onestep", {}, 1),
        ("cm", "multistep", {"steps": 40, "ts": [0, 22, 39]}, 2),  # none at σ_min, as OpenAI's sampler
        ("dm", "ddim", {"nfe": 7}, 7),
        ("dm", "dpmsolver++", {"nfe": 9, "order": 2}, 9),
        ("dm", "dpmsolver++", {"nfe": 15}, 15),
        ("dm", "dpmsolver++", {"nfe": 5, "order": 3}, 5),
        ("dm", "heun", {"nfe": 9}, 9),
    ],
)
def test_network_evaluations_equal_requested_nfe(tmp_path, kind, name, kwargs, expected):
    run = make_run(tmp_path, kind)
    net = random_net(run)
    counter = CallCounter(net)
    sampler = build_sampler(run, name, **kwargs)
    sampler.sample(net, FixedNoise(0, run.image_shape), 0, 3)
    assert sampler.nfe == expected and counter.calls == expected


class GaussianOracle(nn.Module):
    """The exact raw network for data ~ N(0, s²I): D(x, σ) = s²/(s²+σ²)·x, so F = (D − c_skip·x)/c_out
    with σ = exp(4·c_noise) and x = x_in·√(σ²+σ_d²) (EDM preconditioning, σ_d = 0.5)."""

    def __init__(self, s):
        super().__init__()
        self.s, self.anchor = s, nn.Parameter(torch.zeros(()))

    def forward(self, x_in, c_noise):
        sigma = torch.exp(4 * c_noise.double()).view(-1, 1, 1, 1)
        x = x_in.double() * torch.sqrt(sigma**2 + 0.25)
        denoised = self.s**2 / (self.s**2 + sigma**2) * x
        c_skip = 0.25 / (sigma**2 + 0.25)
        c_out = sigma * 0.5 / torch.sqrt(sigma**2 + 0.25)
        return ((denoised - c_skip * x) / c_out).float()


def test_dm_solvers_converge_to_the_exact_ode_solution(tmp_path):
    run = make_run(tmp_path, "dm")
    s, noise = 0.2, FixedNoise(5, run.image_shape)
    oracle = GaussianOracle(s)
    x_t = noise.normal(0, 0, 16) * 80.0
    exact = (x_t * math.sqrt(s**2 + 0.002**2) / math.sqrt(s**2 + 80.0**2)).clamp(-1, 1)  # PF-ODE to σ_min

    def error(name, **kw):
        return (build_sampler(run, name, **kw).sample(oracle, noise, 0, 16) - exact).abs().max().item()

    first, second, third = (error("dpmsolver++", nfe=20, order=k) for k in (1, 2, 3))
    assert third < second < first / 5  # measured 6.9e-3, 1.1e-2, 8.7e-2
    assert error("dpmsolver++", nfe=15) < 0.03  # measured 1.5e-2 (logSNR steps over σ 80 -> 0.002)
    # convergence orders when the step count doubles: DDIM first order (measured ratio 2.0), Heun second (4.4)
    assert 1.6 < error("ddim", nfe=36) / error("ddim", nfe=72) < 2.5
    assert error("heun", steps=36) / error("heun", steps=72) > 3.5


def test_bad_sampler_requests_are_one_line_errors(tmp_path):
    run = make_run(tmp_path, "dm")
    with pytest.raises(LcscError, match="ddim.*dpmsolver.*heun"):
        build_sampler(run, "onestep")
    with pytest.raises(LcscError, match="odd"):
        build_sampler(run, "heun", nfe=8)
    with pytest.raises(LcscError, match="--order"):
        build_sampler(run, "dpmsolver++", order=4)
    cm_run = make_run(tmp_path, "cm")
    with pytest.raises(LcscError, match="--ts"):
        build_sampler(cm_run, "multistep", steps=18, ts=[0, 17, 10])


def test_load_run_names_the_missing_file(tmp_path):
    with pytest.raises(LcscError, match="run.json"):
        load_run(tmp_path / "nowhere")
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(LcscError, match="not valid JSON"):
        load_run(tmp_path)


def openai_multistep(conv, net, noise, count, steps, ts):
    """OpenAI's `karras_sample(..., sampler="multistep")` written out from its loop (stochastic_iterative_sampler):
    evaluations at ts[:-1] only, the denoised estimate clamped at every step, re-noised to √(σ²−σ_min²)."""
    s = conv.sigmas
    hi, lo = s.sigma_max ** (1 / s.rho), s.sigma_min ** (1 / s.rho)
    level = lambda i: min(max((hi + i / (steps - 1) * (lo - hi)) ** s.rho, s.sigma_min), s.sigma_max)  # noqa: E731
    x = noise.normal(0, 0, count) * s.sigma_max
    for k in range(len(ts) - 1):
        x0 = conv.denoise(net, x, level(ts[k])).clamp(-1, 1)
        x = x0 + noise.normal(k + 1, 0, count) * math.sqrt(level(ts[k + 1]) ** 2 - s.sigma_min**2)
    return x.clamp(-1, 1)


@pytest.mark.parametrize("steps,ts", [(40, [0, 22, 39]), (18, [0, 10, 17]), (18, [0, 5, 10, 17])])
def test_multistep_matches_openai_sampler_step_for_step(tmp_path, steps, ts):
    run = make_run(tmp_path, "cm")
    net = random_net(run)
    counter = CallCounter(net)
    sampler = build_sampler(run, "multistep", steps=steps, ts=ts)
    ours = sampler.sample(net, FixedNoise(2, run.image_shape), 0, 6)
    assert counter.calls == len(ts) - 1 == sampler.nfe  # no evaluation at σ_min, where f(x, σ_min) = x
    reference = openai_multistep(run.convention, net, FixedNoise(2, run.image_shape), 6, steps, ts)
    assert torch.allclose(ours, reference, atol=1e-6, rtol=0)


def test_sigmas_are_given_directly_and_checked(tmp_path):
    run = make_run(tmp_path, "cm")
    net = random_net(run)
    by_grid = build_sampler(run, "multistep", steps=40, ts=[0, 22, 39])
    direct = build_sampler(run, "multistep", sigmas=list(by_grid.sigmas))
    noise = FixedNoise(0, run.image_shape)
    assert direct.nfe == 2 and torch.equal(direct.sample(net, noise, 0, 3), by_grid.sample(net, noise, 0, 3))
    assert build_sampler(run, "multistep", sigmas=[80, 0.821]).nfe == 2
    for bad, match in (([0.821, 80], "decreasing"), ([100, 1], "sigma_max"), ([80, 0.0001], "sigma_min")):
        with pytest.raises(LcscError, match=match):
            build_sampler(run, "multistep", sigmas=bad)
    with pytest.raises(LcscError, match="drop --ts"):
        build_sampler(run, "multistep", sigmas=[80, 1], ts=[0, 10])
    with pytest.raises(LcscError, match="multistep sampler only"):
        build_sampler(run, "onestep", sigmas=[80])
    with pytest.raises(LcscError, match="--nfe 3 disagrees"):
        build_sampler(run, "multistep", sigmas=[80, 1], nfe=3)
