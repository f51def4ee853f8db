"""DDIM: the step against a float64 reference of DDIM eq. 12, the refinement tail, determinism, guidance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.models.diffusion.ddim import DDIMSampler, ddim_step
from ldm.models.diffusion.denoisers import CFGDenoiser
from ldm.util import instantiate_from_config

from conftest import tiny_ldm_params


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = instantiate_from_config({"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": tiny_ldm_params()})
    torch.nn.init.normal_(m.model.diffusion_model.out[2].weight, std=0.05)
    return m.eval()


def reference_ddim_eq12(x, eps, a_t, a_prev, eta, z):
    """DDIM eq. 12 in float64 with sigma from eq. 16."""
    x, eps, z = x.double(), eps.double(), z.double()
    sigma = eta * np.sqrt((1 - a_prev) / (1 - a_t)) * np.sqrt(1 - a_t / a_prev)
    pred_x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
    return np.sqrt(a_prev) * pred_x0 + np.sqrt(1 - a_prev - sigma**2) * eps + sigma * z, pred_x0


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_sampler_step_matches_float64_eq12(model, eta):
    sampler = DDIMSampler(model)
    sampler.make_schedule(50, ddim_eta=eta)
    x = torch.randn(2, 3, 8, 8)
    index = 25
    t_val = int(sampler.ddim_timesteps[index])
    t = torch.full((2,), t_val)
    gen = torch.Generator().manual_seed(3)
    got, got_x0 = sampler.p_sample_ddim(x, None, t, index, generator=gen)
    eps = model.apply_model(x, t)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    acp = model.alphas_cumprod.double()
    a_t, a_prev = acp[t_val].item(), acp[int(sampler.ddim_timesteps[index - 1])].item()
    ref, ref_x0 = reference_ddim_eq12(x, eps, a_t, a_prev, eta, z)
    torch.testing.assert_close(got.double(), ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got_x0.double(), ref_x0, atol=2e-5, rtol=1e-5)


def test_pure_step_function_float64():
    x, e, z = (torch.randn(3, 4, dtype=torch.float64) for _ in range(3))
    a_t, a_prev = torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64)
    sigma = torch.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    got, _ = ddim_step(x, e, a_t, a_prev, sigma, z)
    ref, _ = reference_ddim_eq12(x, e, 0.3, 0.7, 1.0, z)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_tail_is_exactly_the_grid_entries_at_or_below_start(model):
    sampler = DDIMSampler(model)
    sampler.make_schedule(50)
    grid = list(range(1, 1000, 20))
    for start in (1, 20, 21, 22, 500, 501, 981, 999):
        plan = sampler.tail_plan(start)
        assert list(plan.timesteps) == sorted((g for g in grid if g <= start), reverse=True)
        assert plan.noise_t == plan.timesteps[0]
        assert [grid[i] for i in plan.indices] == list(plan.timesteps)
    assert sampler.tail_plan(500, t_min=250).timesteps == tuple(range(481, 250, -20))
    for bad in (0, -5, 1000, 2.5, "500", True):
        with pytest.raises(ValueError, match="start_t"):
            sampler.tail_plan(bad)


def test_noising_level_equals_first_step_assumption(model, monkeypatch):
    """q_sample noises to exactly the timestep at which the first DDIM step is evaluated (no img2img off-by-one)."""
    sampler = DDIMSampler(model)
    sampler.make_schedule(50)
    seen = []
    original_q = model.q_sample

    def spy_q(x0, t, noise=None):
        seen.append(("noise", int(t[0])))
        return original_q(x0, t, noise)

    class SpyDenoiser:
        def __call__(self, x, t, cond=None):
            seen.append(("step", int(t[0])))
            return torch.zeros_like(x)

    monkeypatch.setattr(model, "q_sample", spy_q)
    sampler.denoiser = SpyDenoiser()
    sampler.refine(torch.zeros(1, 3, 8, 8), 500, generator=torch.Generator().manual_seed(0))
    assert seen[0] == ("noise", 481) and seen[1] == ("step", 481)
    assert [s for kind, s in seen[1:]] == list(range(481, 0, -20))
    # the step coefficient at the first step is abar at the noised timestep
    assert torch.equal(sampler.ddim_alphas[sampler.tail_plan(500).indices[0]], model.alphas_cumprod[481])


def test_oracle_denoiser_recovers_x0_exactly(model):
    """With the true noise as prediction, DDIM (eta 0) maps q_sample(x0, t) back to x0 at every start."""
    x0 = torch.randn(2, 3, 8, 8, dtype=torch.float32)
    acp = model.alphas_cumprod

    class Oracle:
        def __call__(self, x, t, cond=None):
            a = acp[t].view(-1, 1, 1, 1)
            return (x - a.sqrt() * x0) / (1 - a).sqrt()

    sampler = DDIMSampler(model, denoiser=Oracle())
    sampler.make_schedule(50)
    for start in (50, 500, 999):
        _, pred_x0, _ = sampler.refine(x0, start, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(pred_x0, x0, atol=1e-4, rtol=1e-4)


def test_same_seed_bit_identical_and_seeds_differ(model):
    sampler = DDIMSampler(model)
    z0 = torch.randn(2, 3, 8, 8)
    outs = []
    for seed in (0, 0, 1):
        sampler.make_schedule(20, ddim_eta=1.0)
        z, _, _ = sampler.refine(z0, 700, generator=torch.Generator().manual_seed(seed))
        outs.append(z)
    assert torch.equal(outs[0], outs[1])
    assert not torch.allclose(outs[0], outs[2])
    s1, _ = sampler.sample(10, 2, (3, 8, 8), verbose=False, generator=torch.Generator().manual_seed(4))
    s2, _ = sampler.sample(10, 2, (3, 8, 8), verbose=False, generator=torch.Generator().manual_seed(4))
    assert torch.equal(s1, s2) and s1.shape == (2, 3, 8, 8)


def test_cfg_wrapper_combines_branches():
    calls = []

    def inner(x, t, cond):
        calls.append(x.shape[0])
        return cond.view(-1, 1, 1, 1).expand_as(x).clone()

    cfg = CFGDenoiser(inner, scale=3.0, uncond=torch.tensor([1.0, 1.0]))
    out = cfg(torch.zeros(2, 1, 2, 2), torch.tensor([5, 5]), torch.tensor([2.0, 4.0]))
    # eps_u + 3 (eps_c - eps_u) = 1 + 3 (c - 1)
    assert torch.equal(out[:, 0, 0, 0], torch.tensor([4.0, 10.0]))
    assert calls == [4]  # one batched call
    with pytest.raises(ValueError, match="unconditional_conditioning"):
        CFGDenoiser(inner, 2.0, None)


def test_stochastic_encode_then_decode_is_consistent(model):
    sampler = DDIMSampler(model)
    sampler.make_schedule(25)
    z0 = torch.randn(1, 3, 8, 8)
    eps = torch.randn_like(z0)
    index = 10
    enc = sampler.stochastic_encode(z0, index, noise=eps)
    ref = model.q_sample(z0, torch.tensor([int(sampler.ddim_timesteps[index])]), eps)
    assert torch.equal(enc, ref)
    dec = sampler.decode(enc, None, index)
    z, _, _ = sampler.refine(z0, int(sampler.ddim_timesteps[index]), noise=eps)
    torch.testing.assert_close(dec, z)
