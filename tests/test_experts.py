"""Expert routing: each DDIM step on the expert whose window holds it, coverage checks, shared first stage/schedule."""

from __future__ import annotations

import logging

import pytest
import torch

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.experts import Expert, ExpertRouter
from ldm.sampling import NoiseSchedule, build_plan, randn, run_tail
from ldm.sampling.denoisers import ModelDenoiser
from ldm.util import instantiate_from_config
from ldm.windows import format_timesteps

from conftest import build_tiny_expert, tiny_expert_config, tiny_ldm_params

GRID_50 = list(range(981, 0, -20))  # latent-diffusion's 50-step grid, descending


@pytest.fixture(scope="module")
def shapes_expert():
    return build_tiny_expert(250, 500, seed=0)


@pytest.fixture(scope="module")
def first_stage_state(shapes_expert):
    return {k: v.clone() for k, v in shapes_expert.first_stage_model.state_dict().items()}


@pytest.fixture(scope="module")
def details_expert(first_stage_state):
    return build_tiny_expert(0, 250, seed=1, first_stage_state=first_stage_state)


def spy_on(model, seen: list, name: str, monkeypatch):
    """Record (name, timestep) for every apply_model call of ``model``."""
    original = model.apply_model

    def spy(x, t, cond=None):
        seen.extend((name, v) for v in t.tolist())
        return original(x, t, cond)

    monkeypatch.setattr(model, "apply_model", spy)


def routed_plan(router, start_t, **kw):
    """A refinement plan over ``router``'s experts (what the Refiner builds)."""
    names = [e.name for e in router.experts]
    schedule = NoiseSchedule.from_model(router.experts[0].model)
    return build_plan(schedule, start_t, router.denoisers, "cpu", assign=router.assign, expert_names=names, **kw)


def test_each_step_goes_to_the_expert_whose_window_holds_it(shapes_expert, details_expert, monkeypatch):
    router = ExpertRouter([Expert.from_model(shapes_expert, "shapes"), Expert.from_model(details_expert, "details")])
    seen: list = []
    spy_on(shapes_expert, seen, "shapes", monkeypatch)
    spy_on(details_expert, seen, "details", monkeypatch)
    plan = routed_plan(router, 500, ddim_steps=50)
    z0 = torch.zeros(1, 3, 8, 8)
    run_tail(plan, z0, randn((1, 3, 8, 8), z0, torch.Generator().manual_seed(0)))
    assert [t for _, t in seen] == list(range(481, 0, -20))
    assert all(name == "shapes" for name, t in seen if t >= 250)
    assert all(name == "details" for name, t in seen if t < 250)
    assert plan.routing == ((481, 261, 0), (241, 1, 1))


def test_assign_picks_the_expert_by_window(shapes_expert, details_expert):
    router = ExpertRouter([shapes_expert, details_expert])
    assert router.assign([499, 250, 249, 0]) == [0, 0, 1, 1]
    assert router.denoisers[0].model is shapes_expert and router.denoisers[1].model is details_expert


def test_direct_call_routes_a_batch_mixing_experts(shapes_expert, details_expert):
    router = ExpertRouter([shapes_expert, details_expert])
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([300, 100, 499])
    with torch.inference_mode():
        got = router(x, t)
        ref = torch.cat(
            [
                ModelDenoiser(shapes_expert)(x[:1], t[:1]),
                ModelDenoiser(details_expert)(x[1:2], t[1:2]),
                ModelDenoiser(shapes_expert)(x[2:], t[2:]),
            ]
        )
    torch.testing.assert_close(got, ref)


def test_gap_is_refused_listing_windows_and_uncovered_steps(shapes_expert, details_expert):
    router = ExpertRouter([Expert.from_model(shapes_expert, "a.ckpt"), Expert.from_model(details_expert, "b.ckpt")])
    with pytest.raises(ValueError) as err:
        routed_plan(router, 800, ddim_steps=50)
    msg = str(err.value)
    assert "start_t=800 (step 200), 40 steps from t=781" in msg and "outside every expert window" in msg
    assert "[250, 500) = steps 500-750 (a.ckpt)" in msg and "[0, 250) = steps 750-1000 (b.ckpt)" in msg
    assert "t=781, 761" in msg and "501 (steps 219-499, 15 grid steps)" in msg
    assert "below 501" in msg and "--allow-outside-window" in msg
    # a gap between windows
    narrow = build_tiny_expert(300, 500, seed=0, first_stage_state=shapes_expert.first_stage_model.state_dict())
    gap = ExpertRouter([Expert.from_model(narrow, "a"), Expert.from_model(details_expert, "b")])
    with pytest.raises(ValueError, match=r"uncovered: t=281, 261 \(steps 719-739, 2 grid steps\)"):
        routed_plan(gap, 500, ddim_steps=50)
    # the lowest steps uncovered: no start_t helps
    top_only = ExpertRouter([shapes_expert])
    with pytest.raises(ValueError, match="no start_t avoids them"):
        routed_plan(top_only, 400, ddim_steps=50)


def test_overlap_is_refused(shapes_expert, details_expert):
    wide = build_tiny_expert(200, 500, seed=0, first_stage_state=shapes_expert.first_stage_model.state_dict())
    router = ExpertRouter([Expert.from_model(wide, "a"), Expert.from_model(details_expert, "b")])
    with pytest.raises(ValueError, match="more than one expert window") as err:
        routed_plan(router, 500, ddim_steps=50)
    assert "t=241, 221, 201" in str(err.value) and "[200, 500)" in str(err.value) and "[0, 250)" in str(err.value)
    # windows that overlap only between the steps that run are fine for them
    router.check_timesteps([481, 461])


def test_adapter_checks_coverage_before_any_work(shapes_expert, details_expert, monkeypatch):
    router = ExpertRouter([shapes_expert, details_expert])
    calls = []
    monkeypatch.setattr(shapes_expert, "apply_model", lambda *a, **k: calls.append("step"))
    with pytest.raises(ValueError, match="the DDIM grid"):
        DDIMSampler(shapes_expert, denoiser=router).sample(50, 1, (3, 8, 8), verbose=False)
    assert calls == []


def test_allow_outside_window_runs_the_nearest_expert_with_a_warning(shapes_expert, details_expert, caplog, monkeypatch):
    router = ExpertRouter([shapes_expert, details_expert], allow_outside_window=True)
    tail = [t for t in GRID_50 if t <= 800]
    with caplog.at_level(logging.WARNING, logger="ldm"):
        choice = router.assign(tail)
    assert choice == [0] * 15 + [0] * 12 + [1] * 13
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "t=781" in warnings[0] and "nearest expert" in warnings[0]
    caplog.clear()
    router.assign(tail)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]  # warned once per timestep
    seen: list = []
    spy_on(shapes_expert, seen, "shapes", monkeypatch)
    z0 = torch.zeros(1, 3, 8, 8)
    run_tail(routed_plan(router, 800, ddim_steps=50), z0, randn((1, 3, 8, 8), z0, torch.Generator().manual_seed(0)))
    assert [t for _, t in seen] == list(range(781, 250, -20))


def test_a_plain_ldm_covers_everything(shapes_expert, first_stage_state):
    torch.manual_seed(0)
    plain = instantiate_from_config({"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": tiny_ldm_params()})
    plain.first_stage_model.load_state_dict(first_stage_state)
    assert Expert.from_model(plain).window == (0, 1000)
    router = ExpertRouter([plain])
    router.check_timesteps(GRID_50)
    # a full-range model and a window expert overlap
    with pytest.raises(ValueError, match="more than one expert window"):
        ExpertRouter([plain, shapes_expert]).check_timesteps([481])


def test_different_first_stage_is_refused_naming_tensors(shapes_expert):
    other = build_tiny_expert(0, 250, seed=7)  # its own randomly initialised first stage
    with pytest.raises(ValueError, match="different first stages") as err:
        ExpertRouter([Expert.from_model(shapes_expert, "a"), Expert.from_model(other, "b")])
    assert "encoder." in str(err.value) and "'a'" in str(err.value) and "'b'" in str(err.value)


def test_different_schedule_is_refused(shapes_expert, first_stage_state):
    cfg = tiny_expert_config(0, 250, linear_end=0.012)
    other = instantiate_from_config(cfg["model"])
    other.first_stage_model.load_state_dict(first_stage_state)
    with pytest.raises(ValueError, match="different noise schedules"):
        ExpertRouter([shapes_expert, other])


def test_one_first_stage_module_is_kept_by_from_checkpoints_and_in_memory_models_are_not_changed(
    first_stage_state, expert_checkpoints
):
    from ldm.refine import Refiner

    a = build_tiny_expert(250, 500, seed=0, first_stage_state=first_stage_state)
    b = build_tiny_expert(0, 250, seed=1, first_stage_state=first_stage_state)
    Refiner([a, b], "cpu")
    assert a.first_stage_model is not b.first_stage_model  # the caller's models: not rewired
    loaded = Refiner.from_checkpoints(expert_checkpoints, device="cpu")
    assert loaded.experts[0].model.first_stage_model is loaded.experts[1].model.first_stage_model


def test_per_sample_generators_make_noise_independent_of_the_batch():
    like = torch.zeros(1)
    gens = [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    batch = randn((3, 2, 4, 4), like, gens)
    for i, seed in enumerate((5, 6, 7)):
        alone = randn((1, 2, 4, 4), like, [torch.Generator().manual_seed(seed)])
        assert torch.equal(batch[i : i + 1], alone)
    with pytest.raises(ValueError, match="per-sample generators"):
        randn((2, 2, 4, 4), like, gens)


def test_format_timesteps():
    assert format_timesteps([41], 1000) == "t=41 (step 959, 1 grid step)"
    assert format_timesteps([21, 41, 1], 1000) == "t=41, 21, 1 (steps 959-999, 3 grid steps)"
