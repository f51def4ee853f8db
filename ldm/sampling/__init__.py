"""Sampling as small pure functions over a noise schedule and a denoiser (the refinement engine).

* :mod:`ldm.sampling.schedule`: which timesteps run (DDIM grid tail or an exact count) and each solver's coefficients,
  from ``alphas_cumprod`` alone;
* :mod:`ldm.sampling.steps`: one update per solver (``ddim_step``, ``dpmpp_2m_step``);
* :mod:`ldm.sampling.plan`: :func:`build_plan` validates everything once and freezes a :class:`RefinePlan`;
* :mod:`ldm.sampling.loop`: :func:`run_tail` runs a plan (optionally with a per-pixel start map), checking nothing;
* :mod:`ldm.sampling.noise`: noise from explicit generators (one per sample for batch-independent results);
* :mod:`ldm.sampling.denoisers`: the ``(x, t, cond) -> eps`` callables a plan steps with, and their wrappers.

The Refiner, training's ``log_images`` and the evaluation use these directly; latent-diffusion's ``DDIMSampler``
(:mod:`ldm.models.diffusion.ddim`) is a thin adapter over the same step and schedule functions.
"""

from ldm.sampling.loop import noise_to_start, run_steps, run_tail
from ldm.sampling.noise import Generators, randn
from ldm.sampling.plan import SAMPLERS, RefinePlan, build_plan, check_eta, check_int_arg, check_solver, resolve_start
from ldm.sampling.schedule import NoiseSchedule
from ldm.sampling.steps import ddim_step, dpmpp_2m_step

__all__ = [
    "SAMPLERS",
    "Generators",
    "NoiseSchedule",
    "RefinePlan",
    "build_plan",
    "check_eta",
    "check_int_arg",
    "check_solver",
    "ddim_step",
    "dpmpp_2m_step",
    "noise_to_start",
    "randn",
    "resolve_start",
    "run_steps",
    "run_tail",
]
