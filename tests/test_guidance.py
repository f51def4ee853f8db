"""Classifier-free guidance (ldm.sampling.guidance) on a tiny random cross-attention LatentDiffusion: scale 1 is the
conditional model exactly, other scales match a float64 reference of ``eps_u + s (eps_c - eps_u)``, both branches go in
one batched call, and guided plans run through DDIM and DPM-Solver++(2M) with routing and start maps."""

from __future__ import annotations

import copy

import pytest
import torch

from ldm.models.diffusion.experts import Expert, ExpertRouter
from ldm.sampling import NoiseSchedule, build_plan, run_tail
from ldm.sampling.denoisers import AutocastDenoiser, ChunkedDenoiser, ModelDenoiser
from ldm.sampling.guidance import Guidance, GuidedDenoiser, guided_plan
from ldm.util import instantiate_from_config

from conftest import TINY_UNET_PARAMS, tiny_ldm_params

CONTEXT = (5, 8)  # tokens, context_dim


def crossattn_ldm() -> torch.nn.Module:
    """A tiny LatentDiffusion whose UNet attends to a ``[B, 5, 8]`` context; every zero-initialised layer (the output
    layer, the transformers' ``proj_out``) is re-drawn so that the context changes the output."""
    unet = dict(TINY_UNET_PARAMS, use_spatial_transformer=True, context_dim=CONTEXT[1], transformer_depth=1)
    params = tiny_ldm_params(cond_stage_config={"target": "torch.nn.Identity"}, conditioning_key="crossattn",
                             cond_stage_key="caption")  # fmt: skip
    params["unet_config"] = {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet}
    torch.manual_seed(0)
    model = instantiate_from_config({"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params})
    with torch.no_grad():
        for p in model.model.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(0.0, 0.05)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def model():
    return crossattn_ldm()


@pytest.fixture(scope="module")
def model64(model):
    return copy.deepcopy(model).double()


def inputs(dtype=torch.float32, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 8, 8, generator=g, dtype=dtype)
    cond = torch.randn(batch, *CONTEXT, generator=g, dtype=dtype)
    uncond = torch.randn(batch, *CONTEXT, generator=g, dtype=dtype)
    t = torch.tensor([700, 120][:batch] + [400] * max(0, batch - 2))
    return x, t, cond, uncond


class Spy:
    """A denoiser that records each call's batch size, timesteps and conditioning, then runs ``inner``."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __call__(self, x, t, cond=None):
        self.calls.append({"x": x.clone(), "t": t.clone(), "cond": cond})
        return self.inner(x, t, cond)


# ----------------------------------------------------------------------------------------------------- the formula
def test_scale_one_is_the_conditional_model_exactly(model):
    x, t, cond, uncond = inputs()
    spy = Spy(ModelDenoiser(model))
    with torch.inference_mode():
        expected = model.apply_model(x, t, cond)
        for u in (uncond, None):  # no unconditional embedding is needed at scale 1
            assert torch.equal(GuidedDenoiser(spy, cond, u, 1.0)(x, t), expected)
    assert [c["x"].shape[0] for c in spy.calls] == [2, 2]  # the unconditional branch never ran
    assert all(c["cond"] is cond for c in spy.calls)


@pytest.mark.parametrize("scale", [0.0, 0.5, 3.0, 7.5])
def test_matches_a_float64_reference(model, model64, scale):
    x, t, cond, uncond = inputs(torch.float64)
    with torch.inference_mode():
        eps_u = model64.apply_model(x, t, uncond)  # each branch alone
        eps_c = model64.apply_model(x, t, cond)
        reference = eps_u + scale * (eps_c - eps_u)
        assert (eps_c - eps_u).abs().max() > 1e-3  # the context matters: the test can see a wrong branch
        got64 = GuidedDenoiser(ModelDenoiser(model64), cond, uncond, scale)(x, t)
        got32 = GuidedDenoiser(ModelDenoiser(model), cond.float(), uncond.float(), scale)(x.float(), t)
    torch.testing.assert_close(got64, reference, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got32.double(), reference, rtol=1e-4, atol=1e-4 * (1 + scale))
    assert got32.dtype == torch.float32
    if scale == 0.0:
        assert torch.equal(got64, eps_u)  # the unconditional model, exactly


def test_both_branches_in_one_batched_call(model):
    x, t, cond, uncond = inputs()
    spy = Spy(ModelDenoiser(model))
    guided = GuidedDenoiser(spy, cond, uncond, 4.0)
    with torch.inference_mode():
        guided(x, t)
        guided(x, t)
    assert len(spy.calls) == 2  # one network call per step
    call = spy.calls[0]
    assert call["x"].shape[0] == 4 and torch.equal(call["x"], torch.cat([x, x])) and torch.equal(call["t"], t.repeat(2))
    assert torch.equal(call["cond"], torch.cat([uncond, cond]))  # unconditional first, as CompVis
    assert spy.calls[1]["cond"] is call["cond"]  # [uncond, cond] built once, reused by every step


def test_conditioning_forms_and_broadcast(model):
    x, t, cond, uncond = inputs()
    with torch.inference_mode():
        base = GuidedDenoiser(ModelDenoiser(model), cond, uncond, 2.0)(x, t)
        as_list = GuidedDenoiser(ModelDenoiser(model), [cond], [uncond], 2.0)(x, t)
        as_dict = GuidedDenoiser(ModelDenoiser(model), {"c_crossattn": [cond]}, {"c_crossattn": [uncond]}, 2.0)(x, t)
        one = GuidedDenoiser(ModelDenoiser(model), cond[:1], uncond[:1], 2.0)(x, t)  # one prompt for the batch
        repeated = GuidedDenoiser(ModelDenoiser(model), cond[:1].repeat(2, 1, 1), uncond[:1].repeat(2, 1, 1), 2.0)(x, t)
    assert torch.equal(base, as_list) and torch.equal(base, as_dict)
    assert torch.equal(one, repeated) and not torch.equal(one, base)


def test_refusals_say_what_is_allowed(model):
    x, t, cond, uncond = inputs()
    guided = GuidedDenoiser(ModelDenoiser(model), cond, uncond, 2.0)
    with pytest.raises(ValueError, match="run the plan with cond=None"):
        guided(x, t, cond)


# -------------------------------------------------------------------------------------------- composition
def test_batch_invariant_inside_and_autocast_inside(model):
    x, t, cond, uncond = inputs(batch=3)
    with torch.inference_mode():
        chunked = GuidedDenoiser(ChunkedDenoiser(ModelDenoiser(model), 1), cond, uncond, 3.0)
        batched = chunked(x, t)
        alone = torch.cat([GuidedDenoiser(ChunkedDenoiser(ModelDenoiser(model), 1), cond[i : i + 1],
                                          uncond[i : i + 1], 3.0)(x[i : i + 1], t[i : i + 1]) for i in range(3)])  # fmt: skip
        plain = GuidedDenoiser(ModelDenoiser(model), cond, uncond, 3.0)(x, t)
        bf16 = GuidedDenoiser(AutocastDenoiser(ModelDenoiser(model), "cpu", torch.bfloat16), cond, uncond, 3.0)(x, t)
    assert torch.equal(batched, alone)  # each sample's result does not depend on the batch
    torch.testing.assert_close(batched, plain, rtol=1e-5, atol=1e-5)
    assert bf16.dtype == torch.float32 and (bf16 - plain).abs().max() < 0.1 * plain.abs().max()


def test_router_as_the_inner_denoiser(model):
    """latent-diffusion's DDIMSampler steps one timestep tensor at a time through the router: guidance wraps it."""
    x, t, cond, uncond = inputs()
    t = torch.tensor([300, 300])
    router = ExpertRouter([Expert(model, (200, 1000), "high"), Expert(model, (0, 200), "low")])
    with torch.inference_mode():
        got = GuidedDenoiser(router, cond, uncond, 2.0)(x, t)
        expected = GuidedDenoiser(ModelDenoiser(model), cond, uncond, 2.0)(x, t)
    assert torch.equal(got, expected)


def _reference_denoiser(model64, cond, uncond, scale):
    """The guided eps in float64, each branch in its own network call."""

    def denoise(x, t, c=None):
        return model64.apply_model(x, t, uncond) + scale * (model64.apply_model(x, t, cond) - model64.apply_model(x, t, uncond))

    return denoise


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_guided_plan_through_the_solvers_with_routing_and_a_start_map(model64, sampler):
    """Two experts (the same weights, different prompts so that the routing shows): each step gets its expert's
    conditioning, the result matches float64 separate-branch guidance, and pixels not started stay held."""
    schedule = NoiseSchedule.from_model(model64)
    x, _, cond, uncond = inputs(torch.float64)
    other = torch.randn(2, *CONTEXT, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    spies = [Spy(ModelDenoiser(model64)), Spy(ModelDenoiser(model64))]
    plan = build_plan(schedule, 400, spies, "cpu", tail_steps=4, sampler=sampler, dtype=torch.float64,
                      assign=lambda ts, what: [0 if t >= 200 else 1 for t in ts], expert_names=("high", "low"))  # fmt: skip
    guided = guided_plan(plan, [Guidance(cond, uncond, 3.0), Guidance(other, uncond, 1.5)])
    assert guided.timesteps == plan.timesteps and guided.coefficients is plan.coefficients
    assert len({id(d) for d in guided.denoisers}) == 2  # one wrapper per expert, shared by its steps
    reference = build_plan(schedule, 400, [_reference_denoiser(model64, cond, uncond, 3.0),
                                           _reference_denoiser(model64, other, uncond, 1.5)], "cpu", tail_steps=4,
                           sampler=sampler, dtype=torch.float64, assign=lambda ts, what: [0 if t >= 200 else 1 for t in ts],
                           expert_names=("high", "low"))  # fmt: skip
    z0 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    start = torch.zeros(2, 1, 8, 8, dtype=torch.long)
    start[:, :, :4] = 400  # from the first step
    start[:, :, 4:6, :4] = 250  # later
    with torch.inference_mode():
        got, _ = run_tail(guided, z0, noise, start_map=start)
        want, _ = run_tail(reference, z0, noise, start_map=start)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    never = (start == 0).expand_as(z0)
    assert torch.equal(got[never], z0[never])  # pixels never started come back exactly
    assert not torch.allclose(got[~never], z0[~never])
    calls = spies[0].calls + spies[1].calls
    assert len(calls) == len(plan.timesteps)  # one batched call per step (scales 3 and 1.5: both guided)
    for i, t_int in enumerate(plan.timesteps):
        expert = plan.experts[i]
        call = spies[expert].calls[[c["t"][0].item() for c in spies[expert].calls].index(t_int)]
        assert torch.equal(call["cond"], torch.cat([uncond, (cond, other)[expert]]))
        held = (start < t_int).expand_as(z0)  # not started at this step: at q_sample(z0, t) with the start noise
        c = plan.coefficients
        level = c["sqrt_a"][i] * z0 + c["sqrt_1ma"][i] * noise
        assert torch.equal(call["x"][:2][held], level[held])
    assert {plan.experts[i] for i in range(len(plan.timesteps))} == {0, 1}


def test_guided_plan_per_expert_list_and_unguided_expert(model64):
    schedule = NoiseSchedule.from_model(model64)
    seen = []

    def unconditional(x, t, c=None):
        seen.append(c)
        return 0.1 * x

    plan = build_plan(schedule, 400, [unconditional, unconditional], "cpu", tail_steps=3,
                      assign=lambda ts, what: [0, 1, 1][: len(ts)], expert_names=("a", "b"))  # fmt: skip
    x = torch.randn(1, 3, 8, 8)
    same = guided_plan(plan, [None, None])
    assert same.denoisers == plan.denoisers
    with torch.inference_mode():
        run_tail(same, x, torch.randn_like(x))
    assert seen == [None, None, None]
