"""The noise schedule: a diffusers scheduler config <-> this project's schedule parameters (the same betas under other
names: :data:`TO_PROJECT`, README "diffusers interop").
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ldm.convert.common import MAX_TIMESTEPS, DiffusersFormatError, Options
from ldm.modules.diffusionmodules.util import make_beta_schedule

logger = logging.getLogger(__name__)

SCHEDULER_CLASSES = ("DDIMScheduler", "DDPMScheduler")
# Stable Diffusion folders ship other samplers' configs (v1.5: PNDMScheduler); these classes define the betas with the
# same options (num_train_timesteps, beta_start/end, beta_schedule, trained_betas, prediction_type)
SD_SCHEDULER_CLASSES = (
    *SCHEDULER_CLASSES,
    "PNDMScheduler",
    "LMSDiscreteScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
)
# defaults shared by DDIMScheduler and DDPMScheduler in diffusers 0.42 (of the options that define the betas)
SCHEDULER_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False,
    "variance_type": "fixed_small",
}
# the DDIMScheduler options under which diffusers' DDIM runs exactly this project's (CompVis') DDIM: the same grid
# (1, 21, ..., 981 for 50 of 1000 steps when T is a multiple of the step count) and the same final step
COMPVIS_DDIM = {"clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading"}
SAMPLER_ONLY = (
    "clip_sample",
    "clip_sample_range",
    "set_alpha_to_one",
    "steps_offset",
    "timestep_spacing",
    "thresholding",
    "dynamic_thresholding_ratio",
    "sample_max_value",
    "tensor_format",
    "timestep_values",
    # the other SD samplers' step options
    "skip_prk_steps",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "interpolation_type",
    "timestep_type",
    "final_sigmas_type",
    "sigma_min",
    "sigma_max",
    "solver_order",
    "solver_type",
    "algorithm_type",
    "lower_order_final",
    "euler_at_final",
    "lambda_min_clipped",
    "use_lu_lambdas",
    "disable_corrector",
    "solver_p",
    "predict_x0",
)
# diffusers' beta_schedule -> this project's: sqrt-spaced linear, linear, Nichol & Dhariwal's cosine (s = 0.008)
TO_PROJECT = {"scaled_linear": "linear", "linear": "sqrt_linear", "squaredcos_cap_v2": "cosine"}
PREDICTION = {"epsilon": "eps", "sample": "x0"}
DIFFUSERS_COSINE_S = 0.008
SCHEDULE_RTOL = 1e-5  # as DDPM.check_schedule_matches


@dataclass(frozen=True)
class ScheduleSpec:
    """This project's schedule parameters (``model.params``)."""

    timesteps: int
    beta_schedule: str
    linear_start: float
    linear_end: float
    parameterization: str = "eps"
    cosine_s: float = 8e-3
    given_betas: tuple[float, ...] | None = None

    def ldm_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "timesteps": self.timesteps,
            "beta_schedule": self.beta_schedule,
            "linear_start": self.linear_start,
            "linear_end": self.linear_end,
            "parameterization": self.parameterization,
        }
        if self.beta_schedule == "cosine":
            params["cosine_s"] = self.cosine_s
        if self.given_betas is not None:
            params["given_betas"] = list(self.given_betas)
        return params

    def betas(self) -> torch.Tensor:
        """Betas ``[T]`` (float64) as ``DDPM.register_schedule`` computes them."""
        if self.given_betas is not None:
            return torch.tensor(self.given_betas, dtype=torch.float64)
        return make_beta_schedule(self.beta_schedule, self.timesteps, self.linear_start, self.linear_end, self.cosine_s)


def schedule_from_config(data: Mapping[str, Any], source: str, classes: tuple[str, ...] = SCHEDULER_CLASSES) -> ScheduleSpec:
    """The schedule a scheduler config (untrusted JSON) defines; a ``DiffusersFormatError`` refuses another class, or
    a schedule / prediction this project cannot represent.  Unknown options are logged and ignored (they steer
    sampling; the betas come only from the options read here)."""
    cls = data.get("_class_name", "DDIMScheduler")
    if cls not in classes:
        raise DiffusersFormatError(
            f"{source}: _class_name={cls!r} is not supported; the schedule is read from a {' or '.join(classes)} "
            "config (replace scheduler/scheduler_config.json by one of those with the same betas)"
        )
    opt = Options(data, source, SCHEDULER_DEFAULTS)
    timesteps = opt.integer("num_train_timesteps", 2, MAX_TIMESTEPS)
    prediction = opt.choice("prediction_type", list(PREDICTION), "this project's models predict eps or x0")
    opt.choice(
        "rescale_betas_zero_snr",
        [False],
        "zero terminal SNR needs a final beta of 1, which this project's schedule cannot hold",
    )
    if cls == "DDPMScheduler":
        opt.choice(
            "variance_type",
            ["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log"],
            "a learned variance needs a UNet with twice the output channels",
        )
    start = opt.number("beta_start", 1e-12, 0.999)
    end = opt.number("beta_end", 1e-12, 0.999)
    trained = opt.get("trained_betas")
    if trained is not None:
        ok = isinstance(trained, list) and len(trained) == timesteps
        if not ok or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 < b < 1 for b in trained):
            raise opt.fail("trained_betas", trained, f"must be a list of num_train_timesteps={timesteps} numbers in (0, 1)")
        opt.ignore("beta_schedule")
        spec = ScheduleSpec(timesteps, "linear", start, end, PREDICTION[prediction], given_betas=tuple(map(float, trained)))
    else:
        name = opt.choice("beta_schedule", list(TO_PROJECT), "pass the betas as trained_betas instead")
        spec = ScheduleSpec(timesteps, TO_PROJECT[name], start, end, PREDICTION[prediction], cosine_s=DIFFUSERS_COSINE_S)
    differ = {k: data[k] for k, v in COMPVIS_DDIM.items() if k in data and data[k] != v}
    if differ:
        logger.info(
            "%s: sampler options %s are diffusers' sampling settings; this project samples with CompVis' DDIM "
            "(%s), which the converted model uses",
            source,
            differ,
            COMPVIS_DDIM,
        )
    opt.ignore(*SAMPLER_ONLY)
    unknown = opt.unknown()
    if unknown:
        logger.warning("%s: ignoring scheduler option(s) %s unknown to this converter", source, unknown[:5])
    return spec


def scheduler_config_from_model(model: Any) -> dict[str, Any]:
    """A ``DDIMScheduler`` config whose betas are ``model.betas`` (float32 buffer ``[T]``) and whose sampler runs this
    project's DDIM; a named diffusers schedule when one reproduces the betas, else ``trained_betas``."""
    betas = model.betas.detach().to("cpu", torch.float64)
    timesteps = int(betas.shape[0])
    start, end = float(model.linear_start), float(model.linear_end)
    inverse = {v: k for k, v in PREDICTION.items()}
    config: dict[str, Any] = {
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": timesteps,
        "beta_start": start,
        "beta_end": end,
        "beta_schedule": "scaled_linear",
        "trained_betas": None,
        "prediction_type": inverse[model.parameterization],  # eps or x0: DDPM refuses others
        "rescale_betas_zero_snr": False,
        "thresholding": False,
        **COMPVIS_DDIM,
    }
    for theirs, ours in TO_PROJECT.items():
        if ours == "cosine" or all(math.isfinite(v) and v > 0 for v in (start, end)):
            candidate = make_beta_schedule(ours, timesteps, start, end, DIFFUSERS_COSINE_S)
            if torch.allclose(candidate, betas, rtol=SCHEDULE_RTOL, atol=0.0):
                config["beta_schedule"] = theirs
                return config
    config["trained_betas"] = [float(b) for b in betas.tolist()]
    return config
