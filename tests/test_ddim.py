"""latent-diffusion's DDIMSampler API (the adapter over ldm.sampling): the step against a float64 reference of DDIM
eq. 12, CompVis call signatures, img2img, determinism, guidance.  The engine itself is tested in test_sampling.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.sampling import NoiseSchedule, build_plan, run_tail
from ldm.sampling.denoisers import CFGDenoiser, ModelDenoiser

from conftest import reference_ddim_eq12, tiny_ldm_model


@pytest.fixture(scope="module")
def model():
    return tiny_ldm_model()


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


class Oracle:
    """A denoiser that predicts the true noise of ``x_t`` for a known ``x0`` (DDIM with eta 0 then inverts exactly)."""

    def __init__(self, model, x0: torch.Tensor):
        self.acp, self.x0 = model.alphas_cumprod, x0

    def __call__(self, x, t, cond=None):
        a = self.acp[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * self.x0) / (1 - a).sqrt()


def test_same_seed_bit_identical(model):
    sampler = DDIMSampler(model)
    s1, _ = sampler.sample(10, 2, (3, 8, 8), eta=1.0, verbose=False, generator=torch.Generator().manual_seed(4))
    s2, _ = sampler.sample(10, 2, (3, 8, 8), eta=1.0, verbose=False, generator=torch.Generator().manual_seed(4))
    s3, _ = sampler.sample(10, 2, (3, 8, 8), eta=1.0, verbose=False, generator=torch.Generator().manual_seed(5))
    assert torch.equal(s1, s2) and s1.shape == (2, 3, 8, 8) and not torch.allclose(s1, s3)


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
    plan = build_plan(NoiseSchedule.from_model(model), int(sampler.ddim_timesteps[index]), [ModelDenoiser(model)], "cpu",
                      ddim_steps=25)  # fmt: skip
    z, _ = run_tail(plan, z0, eps)  # the engine's refinement from the same level: the same latent
    torch.testing.assert_close(dec, z)


# ----------------------------------------------------------------------------- latent-diffusion (CompVis) call signatures
class TimeDenoiser:
    """Cheap deterministic eps that depends on x, t and the conditioning (the API mapping is under test, not the net)."""

    def __init__(self):
        self.timesteps: list[int] = []

    def __call__(self, x, t, cond=None):
        self.timesteps.append(int(t[0]))
        scale = 0.1 + t.to(x.dtype).view(-1, 1, 1, 1) / 2000
        return scale * x + (0.0 if cond is None else cond.view(-1, 1, 1, 1))


class ScaleCorrector:
    def modify_score(self, model, e_t, x, t, c, factor=1.0):
        return e_t * factor


@pytest.fixture()
def stub_sampler(model):
    return DDIMSampler(model, denoiser=TimeDenoiser())


def test_sample_compvis_positional_call_matches_keywords(stub_sampler):
    """Every argument of latent-diffusion's sample() in its position (normals_sequence 6th) lands where it should."""
    x_t = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    cond, uncond = torch.tensor([0.2, -0.1]), torch.tensor([0.0, 0.0])
    seen = {"cb": 0, "img": 0}

    def cb(i):
        seen["cb"] += 1

    def img_cb(pred_x0, i):
        seen["img"] += 1

    positional = stub_sampler.sample(
        8,
        2,
        (3, 8, 8),
        cond,
        cb,
        None,
        img_cb,
        True,
        0.6,
        None,
        None,
        0.8,
        0.25,
        ScaleCorrector(),
        {"factor": 1.1},
        False,
        x_t,
        2,
        1.5,
        uncond,
        generator=torch.Generator().manual_seed(7),
    )
    assert seen == {"cb": 8, "img": 8}
    keywords = stub_sampler.sample(
        S=8,
        batch_size=2,
        shape=(3, 8, 8),
        conditioning=cond,
        quantize_x0=True,
        eta=0.6,
        temperature=0.8,
        noise_dropout=0.25,
        score_corrector=ScaleCorrector(),
        corrector_kwargs={"factor": 1.1},
        verbose=False,
        x_T=x_t,
        log_every_t=2,
        unconditional_guidance_scale=1.5,
        unconditional_conditioning=uncond,
        generator=torch.Generator().manual_seed(7),
    )
    assert torch.equal(positional[0], keywords[0])
    assert len(positional[1]["x_inter"]) == len(keywords[1]["x_inter"]) == 1 + 5  # x_T, positions 7 (first), 6, 4, 2, 0
    plain = stub_sampler.sample(8, 2, (3, 8, 8), cond, x_T=x_t, verbose=False, generator=torch.Generator().manual_seed(7))
    assert not torch.allclose(plain[0], keywords[0])  # the options above did take effect


def test_p_sample_ddim_compvis_positional_call_matches_keywords(stub_sampler):
    stub_sampler.make_schedule(20, ddim_eta=1.0)
    x, t = torch.randn(2, 3, 8, 8), torch.full((2,), int(stub_sampler.ddim_timesteps[7]))
    cond = torch.tensor([0.3, 0.1])
    pos = stub_sampler.p_sample_ddim(
        x,
        cond,
        t,
        7,
        False,
        False,
        False,
        0.9,
        0.3,
        ScaleCorrector(),
        {"factor": 0.5},
        2.0,
        torch.zeros(2),
        generator=torch.Generator().manual_seed(1),
    )
    kw = stub_sampler.p_sample_ddim(
        x,
        cond,
        t,
        index=7,
        temperature=0.9,
        noise_dropout=0.3,
        score_corrector=ScaleCorrector(),
        corrector_kwargs={"factor": 0.5},
        unconditional_guidance_scale=2.0,
        unconditional_conditioning=torch.zeros(2),
        generator=torch.Generator().manual_seed(1),
    )
    assert torch.equal(pos[0], kw[0]) and torch.equal(pos[1], kw[1])


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_p_sample_ddim_use_original_steps_is_one_full_schedule_step(model, eta):
    """use_original_steps=True: index is the timestep and the step goes t -> t-1 (abar_{-1} = 1), float64 reference."""
    den = TimeDenoiser()
    sampler = DDIMSampler(model, denoiser=den)
    sampler.make_schedule(10, ddim_eta=eta)
    acp = model.alphas_cumprod.double()
    x = torch.randn(2, 3, 8, 8)
    for t_val in (0, 1, 537, 999):
        t = torch.full((2,), t_val)
        gen = torch.Generator().manual_seed(2)
        got, got_x0 = sampler.p_sample_ddim(x, None, t, t_val, use_original_steps=True, generator=gen)
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
        a_prev = acp[t_val - 1].item() if t_val > 0 else 1.0
        ref, ref_x0 = reference_ddim_eq12(x, den(x, t), acp[t_val].item(), a_prev, eta, z)
        torch.testing.assert_close(got.double(), ref, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(got_x0.double(), ref_x0, atol=2e-5, rtol=1e-5)


def test_stochastic_encode_compvis_tensor_indices_and_positions(model):
    sampler = DDIMSampler(model)
    sampler.make_schedule(25)
    grid = sampler.ddim_timesteps
    z0, eps = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    mine = sampler.stochastic_encode(z0, 10, noise=eps)
    for t in (torch.tensor([10] * 3), torch.tensor([10]), torch.tensor(10), np.int64(10)):
        assert torch.equal(sampler.stochastic_encode(z0, t, False, eps), mine)  # CompVis positions
        assert torch.equal(sampler.stochastic_encode(z0, t=t, use_original_steps=False, noise=eps), mine)
    per_sample = sampler.stochastic_encode(z0, torch.tensor([0, 10, 24]), False, eps)
    assert torch.equal(per_sample, model.q_sample(z0, torch.tensor([int(grid[i]) for i in (0, 10, 24)]), eps))
    orig = sampler.stochastic_encode(z0, torch.tensor([437] * 3), True, eps)
    assert torch.equal(orig, model.q_sample(z0, torch.full((3,), 437), eps))
    # the old project order (x0, index, noise) no longer slips the noise into a flag
    with pytest.raises(TypeError, match="use_original_steps"):
        sampler.stochastic_encode(z0, 10, eps)
    for bad, match in (
        (25, "outside"),
        (torch.tensor([-1]), "outside"),
        (torch.tensor([1, 2]), "entries"),
        (torch.tensor([1.0]), "integer"),
        (2.0, "int"),
    ):
        with pytest.raises(ValueError, match=match):
            sampler.stochastic_encode(z0, bad, noise=eps)
    a = sampler.stochastic_encode(z0, 10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, sampler.stochastic_encode(z0, 10, generator=torch.Generator().manual_seed(3)))


def test_decode_compvis_positional_call_and_original_steps(model):
    den = TimeDenoiser()
    sampler = DDIMSampler(model, denoiser=den)
    sampler.make_schedule(25, ddim_eta=0.5)
    z, cond, uncond = torch.randn(2, 3, 8, 8), torch.tensor([0.1, 0.2]), torch.zeros(2)
    pos = sampler.decode(z, cond, 6, 3.0, uncond, False, generator=torch.Generator().manual_seed(4))
    kw = sampler.decode(
        z,
        cond,
        t_start=6,
        unconditional_guidance_scale=3.0,
        unconditional_conditioning=uncond,
        use_original_steps=False,
        generator=torch.Generator().manual_seed(4),
    )
    assert torch.equal(pos, kw)
    den.timesteps.clear()
    sampler.decode(z, None, 30, 1.0, None, True, generator=torch.Generator().manual_seed(4))
    assert den.timesteps == list(range(30, -1, -1))  # every timestep of the full schedule, t_start inclusive
    with pytest.raises(TypeError, match="use_original_steps"):
        sampler.decode(z, None, 6, 1.0, None, torch.Generator())  # a generator in the old 6th position
    for bad in (25, -1, True):
        with pytest.raises(ValueError, match="t_start"):
            sampler.decode(z, None, bad)


def test_full_schedule_encode_decode_recovers_x0_with_oracle(model):
    x0 = torch.randn(1, 3, 8, 8)
    sampler = DDIMSampler(model, denoiser=Oracle(model, x0))
    sampler.make_schedule(10)
    z = sampler.stochastic_encode(x0, torch.tensor([999]), True, torch.randn_like(x0))
    torch.testing.assert_close(sampler.decode(z, None, 999, use_original_steps=True), x0, atol=1e-4, rtol=1e-4)


def test_unsupported_or_misspelled_compvis_arguments_are_refused(stub_sampler, monkeypatch):
    kw = dict(verbose=False, generator=torch.Generator().manual_seed(0))
    with pytest.raises(NotImplementedError, match="normals_sequence"):
        stub_sampler.sample(2, 1, (3, 8, 8), None, None, [torch.randn(1, 3, 8, 8)], **kw)
    with pytest.raises(TypeError, match="unconditional_guidance_scal"):
        stub_sampler.sample(2, 1, (3, 8, 8), unconditional_guidance_scal=3.0, **kw)
    with pytest.raises(TypeError, match="modify_score"):
        stub_sampler.sample(2, 1, (3, 8, 8), score_corrector=lambda e: e, **kw)
    for p in (-0.1, 1.5, True):
        with pytest.raises(ValueError, match="noise_dropout"):
            stub_sampler.sample(2, 1, (3, 8, 8), eta=1.0, noise_dropout=p, **kw)
    monkeypatch.setattr(stub_sampler.model, "first_stage_model", torch.nn.Identity())
    with pytest.raises(ValueError, match="quantize_x0.*VQ first stage"):
        stub_sampler.sample(2, 1, (3, 8, 8), quantize_x0=True, **kw)
    stub_sampler.make_schedule(10)
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([981])
    with pytest.raises(ValueError, match="index"):
        stub_sampler.p_sample_ddim(x, None, t, 10)
    with pytest.raises(TypeError, match="use_original_steps"):
        stub_sampler.p_sample_ddim(x, None, t, 9, False, "yes")


def test_noise_dropout_uses_the_generator_not_the_global_rng(stub_sampler):
    """Same seed -> same sample, the global RNG is untouched, and elements are dropped with probability p and the kept
    ones scaled by 1 / (1 - p) (recovered from one step against its noiseless and undropped versions)."""
    x_t = torch.randn(1, 3, 8, 8)
    state = torch.get_rng_state()
    runs = [
        stub_sampler.sample(
            5, 1, (3, 8, 8), eta=1.0, noise_dropout=0.5, x_T=x_t, verbose=False, generator=torch.Generator().manual_seed(seed)
        )[0]
        for seed in (11, 11, 12)
    ]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(runs[0], runs[1]) and not torch.allclose(runs[0], runs[2])

    stub_sampler.make_schedule(10, ddim_eta=1.0)
    x, t = torch.randn(4, 3, 16, 16), torch.full((4,), int(stub_sampler.ddim_timesteps[5]))

    def step(**kw):
        return stub_sampler.p_sample_ddim(x, None, t, 5, generator=torch.Generator().manual_seed(5), **kw)[0]

    sigma = stub_sampler.ddim_sigmas[5]
    det = step(temperature=0.0)
    full = (step() - det) / sigma
    dropped = (step(noise_dropout=0.3) - det) / sigma
    kept = dropped.abs() > 1e-4
    torch.testing.assert_close(dropped[kept], full[kept] / 0.7, atol=1e-3, rtol=1e-3)
    assert abs((~kept).float().mean().item() - 0.3) < 0.05


def test_make_schedule_sets_compvis_attributes_against_float64(model):
    """Every tensor latent-diffusion's make_schedule registers, float32 on the model's device, against a float64 closed
    form of the model's schedule; and its register_buffer helper."""
    sampler = DDIMSampler(model)
    sampler.make_schedule(50, ddim_eta=0.7, verbose=False)
    acp, betas = model.alphas_cumprod.double(), model.betas.double()
    prev = torch.cat([torch.ones(1, dtype=torch.float64), acp[:-1]])
    grid = torch.as_tensor(sampler.ddim_timesteps)
    a, a_prev = acp[grid], torch.cat([acp[:1], acp[grid[:-1]]])
    ref = {
        "betas": betas,
        "alphas_cumprod": acp,
        "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": acp.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1 - acp).sqrt(),
        "log_one_minus_alphas_cumprod": (1 - acp).log(),
        "sqrt_recip_alphas_cumprod": 1 / acp.sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / acp - 1).sqrt(),
        "ddim_sigmas_for_original_num_steps": 0.7 * ((1 - prev) / (1 - acp) * (1 - acp / prev)).sqrt(),
        "ddim_alphas": a,
        "ddim_alphas_prev": a_prev,
        "ddim_sqrt_one_minus_alphas": (1 - a).sqrt(),
        "ddim_sigmas": 0.7 * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt(),
    }
    for name, want in ref.items():
        got = getattr(sampler, name)
        assert got.dtype == torch.float32 and got.device == model.alphas_cumprod.device, name
        torch.testing.assert_close(got.double(), want, rtol=2e-7, atol=1e-12, msg=name)
    sampler.register_buffer("extra", torch.ones(2, dtype=torch.float64))
    sampler.register_buffer("note", "kept")
    assert sampler.extra.device == model.alphas_cumprod.device and sampler.note == "kept"


@pytest.mark.parametrize("steps, log_every_t", [(50, 100), (8, 2), (10, 3), (1, 100)])
def test_intermediates_follow_compvis_rule(stub_sampler, steps, log_every_t):
    """latent-diffusion logs x_T, then each step whose position is a multiple of log_every_t or the first one."""
    seen = []
    _, inter = stub_sampler.sample(
        steps, 1, (3, 8, 8), img_callback=lambda x0, i: seen.append(x0), verbose=False, log_every_t=log_every_t,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    logged = [i for i in range(steps) if (steps - 1 - i) % log_every_t == 0 or i == 0]  # loop counter i, position S-1-i
    assert len(inter["x_inter"]) == len(inter["pred_x0"]) == 1 + len(logged)
    assert all(inter["pred_x0"][k + 1] is seen[i] for k, i in enumerate(logged))


def test_sample_batch_size_must_be_positive(stub_sampler):
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match=r"batch_size=.* must be a positive integer"):
            stub_sampler.sample(5, bad, (3, 8, 8), verbose=False, generator=torch.Generator().manual_seed(0))
