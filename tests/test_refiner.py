"""Refiner.plan (ldm/refine/refiner.py) under fuzzed arguments: a valid plan or a ValueError, never anything else.
The rest of the refinement Python API is tested in test_refine.py, the command line in test_refine_cli.py."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st


@pytest.fixture(scope="module")
def refiner(expert_checkpoints):
    from ldm.refine import Refiner

    return Refiner.from_checkpoints(expert_checkpoints, device="cpu", allow_outside_window=True)


@settings(max_examples=60, deadline=None)
@given(
    start=st.one_of(st.integers(-5, 1100), st.floats(allow_nan=True), st.booleans(), st.text(max_size=3)),
    steps=st.one_of(st.integers(-5, 1100), st.floats(allow_nan=True), st.booleans(), st.none()),
    eta=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2, 3), st.text(max_size=2)),
)
def test_fuzzed_refine_arguments_are_planned_or_refused(refiner, start, steps, eta):
    try:
        plan = refiner.plan(start, steps, eta)
    except ValueError:
        return
    assert 1 <= plan.effective_start <= start <= 999 and 1 <= plan.ddim_steps <= 1000 and 0 <= plan.eta <= 1
    assert list(plan.timesteps) == sorted(plan.timesteps, reverse=True)
