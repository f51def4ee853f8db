"""Sampling as small pure functions over a noise schedule and a denoiser (the refinement engine); latent-diffusion's
``DDIMSampler`` (:mod:`ldm.models.diffusion.ddim`) is a thin adapter over them."""

from ldm.sampling.loop import noise_to_start, run_steps, run_tail
from ldm.sampling.noise import randn
from ldm.sampling.plan import SAMPLERS, RefinePlan, build_plan, check_int_arg, check_solver, resolve_start
from ldm.sampling.schedule import NoiseSchedule
from ldm.sampling.steps import ddim_step, dpmpp_2m_step

__all__ = [
    "SAMPLERS",
    "NoiseSchedule",
    "RefinePlan",
    "build_plan",
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
