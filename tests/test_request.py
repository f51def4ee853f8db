"""ldm.refine.request: RefineRequest holds every refinement option and its default once, is checked where it is built,
and each front end (refine.py's flags, the app's settings, the Python API's keywords) builds the same one."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ldm.imageio.prompt import Prompt
from ldm.refine.regions import Box, RegionOptions
from ldm.refine.request import DEFAULT_START_T, MAX_SEED, RefineRequest
from ldm.sampling import SAMPLERS


def test_defaults_are_written_once_and_resolve_with_t():
    request = RefineRequest()
    assert request.start(1000) == DEFAULT_START_T == 500
    assert request.plan_arguments() == {"ddim_steps": None, "eta": 0.0, "tail_steps": None, "sampler": "ddim"}
    assert request.regions == RegionOptions() and request.prompt is None and request.sample_seeds() == [0]
    assert RefineRequest(strength=0.25).start(1000) == 250
    assert RefineRequest(strength=1.0).start(1000) == 999  # the noisiest level a latent can be noised to
    assert RefineRequest(seed=7, n_samples=3).sample_seeds() == [7, 8, 9]


def test_a_box_with_a_later_start_moves_the_plan_start_up():
    boxes = (Box(0, 0, 8, 8, 400), Box(8, 8, 16, 16))
    request = RefineRequest(start_t=200, regions=RegionOptions(boxes=boxes))
    assert request.start(1000) == 200 and request.plan_start(1000) == 400
    with pytest.raises(ValueError, match=r"start_t=1200 is outside \[1, 999\]"):
        RefineRequest(regions=RegionOptions(boxes=(Box(0, 0, 8, 8, 1200),))).plan_start(1000)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(start_t=100, strength=0.5), "start_t and strength were both given"),
        (dict(start_t=2.5), "start_t=2.5 must be an integer timestep"),
        (dict(start_t=True), "start_t=True must be an integer timestep"),
        (dict(sampler="euler"), "sampler='euler' is unknown; choose one of ['ddim', 'dpmpp_2m']"),
        (dict(eta=-0.1), "eta=-0.1 must be a number in [0, 1]"),
        (dict(eta=1.5), "eta=1.5 must be a number in [0, 1] (0 = deterministic DDIM"),
        (dict(eta=float("nan")), "eta=nan must be a number in [0, 1]"),
        (dict(eta=0.5, sampler="dpmpp_2m"), "eta=0.5 applies to the ddim sampler only"),
        (dict(seed=-1), "seed=-1 must be an integer in [0, 4294967295]"),
        (dict(seed=MAX_SEED, n_samples=2), f"the last seed must be at most {MAX_SEED}"),
        (dict(seed=2**32), "seed=4294967296 must be an integer in [0, 4294967295]"),  # ran seed 0's noise
        (dict(n_samples=0), "n_samples=0 must be an integer in [1, 1000000]"),
        (dict(regions="whole"), "regions must be a RegionOptions, got str"),
        (dict(prompt="a cat"), "prompt must be a Prompt"),
    ],
)
def test_each_bad_option_is_one_line_naming_it(options, message):
    with pytest.raises(ValueError) as info:
        RefineRequest(**options)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_the_range_checks_that_need_t_happen_with_the_plan():
    assert RefineRequest(start_t=5000).start_t == 5000  # T is the experts': checked when the plan is built
    with pytest.raises(ValueError, match=r"start_t=5000 is outside \[1, 999\]"):
        RefineRequest(start_t=5000).start(1000)
    with pytest.raises(ValueError, match=r"strength=1.5 must be a number in \(0, 1\]"):
        RefineRequest(strength=1.5).start(1000)


def test_it_is_frozen_and_replace_checks_again():
    request = RefineRequest(start_t=100)
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.start_t = 200  # type: ignore[misc]
    assert request.replace(start_t=300).start_t == 300
    with pytest.raises(ValueError, match="both given"):
        request.replace(strength=0.5)


def test_the_app_settings_build_the_request_the_cli_would():
    pytest.importorskip("starlette", reason="the web app needs the app extra")
    from ldm.app.handlers import RefineSettings

    settings = RefineSettings.from_json({"start_t": 300, "sampler": "dpmpp_2m", "step_mode": "exact", "steps": 7,
                                         "seed": 5, "n_samples": 2, "mode": "crop", "boxes": "0,0,8,8@400",
                                         "mask_blur": 2, "mask_dilate": 1, "region_padding": 16})  # fmt: skip
    cli = RefineRequest(
        start_t=300,
        tail_steps=7,
        sampler="dpmpp_2m",
        seed=5,
        n_samples=2,
        regions=RegionOptions(boxes=(Box(0, 0, 8, 8, 400),), blur=2, dilate=1, crop=True, padding=16),
    )
    assert settings.request() == cli
    whole = RefineSettings.from_json({"mode": "whole", "boxes": "0,0,8,8"}).request()
    assert whole.regions.boxes == () and whole.ddim_steps == 50  # boxes count only outside the whole-image mode


@given(
    start=st.one_of(st.none(), st.integers(1, 999)),
    steps=st.one_of(st.none(), st.integers(1, 1000)),
    exact=st.booleans(),
    sampler=st.sampled_from(SAMPLERS),
    eta=st.floats(0, 1),
    seed=st.integers(0, MAX_SEED - 15),
    n_samples=st.integers(1, 16),
)
def test_every_valid_combination_builds_and_plans_with_t(start, steps, exact, sampler, eta, seed, n_samples):
    eta = eta if sampler == "ddim" else 0.0
    request = RefineRequest(start_t=start, ddim_steps=None if exact else steps, tail_steps=steps if exact else None,
                            sampler=sampler, eta=eta, seed=seed, n_samples=n_samples)  # fmt: skip
    assert request.start(1000) == (start if start is not None else DEFAULT_START_T)
    assert request.sample_seeds()[-1] == seed + n_samples - 1
    assert request.replace() == request


def test_a_prompt_is_carried_unchanged():
    prompt = Prompt("a cat", "blurry", 5.0)
    assert RefineRequest(prompt=prompt).prompt is prompt


def test_a_numpy_integer_start_is_an_int():
    """``start_t=np.int64(300)`` (from an array of starts) was refused as "not an integer timestep"."""
    request = RefineRequest(start_t=np.int64(300))
    assert request.start_t == 300 and type(request.start_t) is int


def test_every_accepted_seed_draws_its_own_noise():
    """torch seeds its CPU generator with a seed's low 32 bits: 2**32 drew seed 0's noise while the metadata said
    otherwise, so the range stops at 2**32 - 1, whose noise differs from every seed below it checked here."""
    import torch

    def noise(seed: int) -> torch.Tensor:
        return torch.randn(8, generator=torch.Generator().manual_seed(seed))

    assert MAX_SEED == 2**32 - 1 and torch.equal(noise(0), noise(2**32))  # the aliasing the bound avoids
    assert not any(torch.equal(noise(MAX_SEED), noise(s)) for s in (0, 1, 2**31, MAX_SEED - 1))
