"""latent-diffusion's ``DDIMSampler`` API over :mod:`ldm.sampling`; every public method adds ``generator`` (one
``torch.Generator``, or one per sample), so noise never comes from the global RNG.

One deliberate difference: :meth:`decode` runs the step at ``t_start`` itself (latent-diffusion's img2img starts one
position lower), so ``decode(stochastic_encode(x0, i), c, i)`` denoises from exactly the level it was noised to.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ldm.models.autoencoder import quantize_latent
from ldm.modules.diffusionmodules.util import make_ddim_sampling_parameters, make_ddim_timesteps
from ldm.sampling.denoisers import CFGDenoiser, Denoiser, ModelDenoiser
from ldm.sampling.noise import Generators, draw, randn
from ldm.sampling.plan import check_eta
from ldm.sampling.steps import ddim_step
from ldm.util import is_rank_zero


class DDIMSampler:
    """DDIM over ``model``'s schedule through ``denoiser`` (default: the model's ``apply_model``, eps-converted); a
    denoiser with ``check_timesteps(timesteps)`` (an expert router) is asked before any work whether it serves every
    step.  ``schedule`` is latent-diffusion's unused argument."""

    def __init__(self, model: Any, schedule: str = "linear", denoiser: Denoiser | None = None):
        self.model = model
        self.schedule = schedule
        self.denoiser = denoiser if denoiser is not None else ModelDenoiser(model)
        self.ddpm_num_timesteps = int(model.num_timesteps)
        self.ddim_timesteps: np.ndarray | None = None

    def register_buffer(self, name: str, attr: Any) -> None:
        """latent-diffusion's helper: set attribute ``name`` to ``attr``, a tensor moved to the model's device first
        (latent-diffusion moves it to CUDA whenever CUDA is available, whatever the model's device)."""
        if isinstance(attr, torch.Tensor):
            attr = attr.to(self.model.alphas_cumprod.device)
        setattr(self, name, attr)

    def make_schedule(
        self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0, verbose: bool = True
    ) -> None:
        """latent-diffusion's attributes for ``ddim_num_steps`` steps (float64 math, float32 on the model's device): the
        grid ``ddim_timesteps`` and ``ddim_*`` coefficients ``[S]``, and ``[T]`` tables over every timestep
        ``t -> t - 1`` (``abar_{-1} = 1``) for ``use_original_steps``; ``verbose`` logs them at INFO level."""
        self.ddim_eta = check_eta(ddim_eta)
        grid = make_ddim_timesteps(ddim_discretize, ddim_num_steps, self.ddpm_num_timesteps, verbose=verbose)
        acp = self.model.alphas_cumprod.detach().to("cpu", torch.float64)
        sigmas, alphas, alphas_prev = make_ddim_sampling_parameters(acp, grid, self.ddim_eta, verbose=verbose)
        full_prev = torch.cat([acp.new_ones(1), acp[:-1]])
        full_sigmas = self.ddim_eta * ((1.0 - full_prev) / (1.0 - acp) * (1.0 - acp / full_prev)).sqrt()
        betas = getattr(self.model, "betas", None)
        betas = betas.detach().to("cpu", torch.float64) if isinstance(betas, torch.Tensor) else 1.0 - acp / full_prev
        to_dev = dict(device=self.model.alphas_cumprod.device, dtype=torch.float32)
        full = {
            "betas": betas,
            "alphas_cumprod": acp,
            "alphas_cumprod_prev": full_prev,
            "sqrt_alphas_cumprod": acp.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - acp).sqrt(),
            "log_one_minus_alphas_cumprod": (1.0 - acp).log(),
            "sqrt_recip_alphas_cumprod": (1.0 / acp).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / acp - 1.0).sqrt(),
            "ddim_sigmas_for_original_num_steps": full_sigmas,
        }
        for name, value in full.items():
            self.register_buffer(name, value.to(**to_dev))
        self.ddim_timesteps, self.ddim_num_steps = grid, len(grid)
        self.ddim_alphas, self.ddim_alphas_prev, self.ddim_sigmas = (v.to(**to_dev) for v in (alphas, alphas_prev, sigmas))
        self.ddim_sqrt_one_minus_alphas = (1.0 - alphas).sqrt().to(**to_dev)
        self._tables = {
            False: (self.ddim_alphas, self.ddim_alphas_prev, self.ddim_sigmas),
            True: (self.alphas_cumprod, self.alphas_cumprod_prev, self.ddim_sigmas_for_original_num_steps),
        }

    # ------------------------------------------------------------------------------------------------------ one step
    def p_sample_ddim(
        self,
        x: torch.Tensor,
        c: Any,
        t: torch.Tensor,
        index: int,
        repeat_noise: bool = False,
        use_original_steps: bool = False,
        quantize_denoised: bool = False,
        temperature: float = 1.0,
        noise_dropout: float = 0.0,
        score_corrector: Any = None,
        corrector_kwargs: dict | None = None,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning: Any = None,
        generator: Generators = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step from ``x`` ``[B, C, H, W]`` at timesteps ``t`` ``[B]`` (grid position ``index``, or with
        ``use_original_steps`` the timestep itself, stepping to ``index - 1``): returns ``(x_prev, pred_x0)``.  Options
        as latent-diffusion's; dropped noise elements (``noise_dropout``) rescale the kept ones by ``1 / (1 - p)``."""
        self._check_step_options(noise_dropout, quantize_denoised, score_corrector)
        hint = "; the argument order is latent-diffusion's: pass noise=, generator= by keyword"
        self._position("index", index, len(self._grid(use_original_steps, hint)))
        den = self._guided(unconditional_guidance_scale, unconditional_conditioning)
        options = (repeat_noise, quantize_denoised, temperature, noise_dropout, score_corrector, corrector_kwargs)
        return self._step(x, c, t, int(index), bool(use_original_steps), den, options, generator)

    def _step(self, x, c, t, index, original, den, options, generator) -> tuple[torch.Tensor, torch.Tensor]:
        repeat_noise, quantize, temperature, noise_dropout, corrector, corrector_kwargs = options
        e_t = den(x, t, c)
        if corrector is not None:
            e_t = corrector.modify_score(self.model, e_t, x, t, c, **(corrector_kwargs or {}))
        a_t, a_prev, sigma_t = (v[index] for v in self._tables[original])
        noise = None
        if self.ddim_eta > 0:
            shape = (1, *x.shape[1:]) if repeat_noise else tuple(x.shape)
            noise = randn(shape, x, generator).expand_as(x) * temperature
            if noise_dropout > 0:
                keep = draw(torch.rand, tuple(x.shape), x, generator) >= noise_dropout
                noise = noise * keep / (1.0 - noise_dropout) if noise_dropout < 1 else torch.zeros_like(noise)
        x_prev, pred_x0 = ddim_step(x, e_t, a_t, a_prev, sigma_t, noise)
        if quantize:  # latent-diffusion's update with the snapped x0 and the unsnapped direction e_t
            snapped = quantize_latent(self.model.first_stage_model.quantize, pred_x0)
            x_prev, pred_x0 = x_prev + a_prev.sqrt() * (snapped - pred_x0), snapped
        return x_prev, pred_x0

    # ------------------------------------------------------------------------------------------- sampling from noise
    @torch.no_grad()
    def sample(
        self,
        S: int,  # noqa: N803 (CompVis name)
        batch_size: int,
        shape: tuple[int, int, int],
        conditioning: Any = None,
        callback: Callable[[int], None] | None = None,
        normals_sequence: Any = None,
        img_callback: Callable[[torch.Tensor, int], None] | None = None,
        quantize_x0: bool = False,
        eta: float = 0.0,
        mask: torch.Tensor | None = None,
        x0: torch.Tensor | None = None,
        temperature: float = 1.0,
        noise_dropout: float = 0.0,
        score_corrector: Any = None,
        corrector_kwargs: dict | None = None,
        verbose: bool = True,
        x_T: torch.Tensor | None = None,  # noqa: N803 (CompVis name)
        log_every_t: int = 100,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning: Any = None,
        generator: Generators = None,
        ddim_discretize: str = "uniform",
    ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Sample ``[batch_size, *shape]`` latents from pure noise with ``S`` DDIM steps; returns ``(samples,
        {"x_inter": [...], "pred_x0": [...]})``.  No ``**kwargs`` (a misspelled argument raises); ``mask`` (1 = keep)
        with ``x0`` inpaints: kept regions follow ``q_sample(x0, t)``."""
        if normals_sequence is not None:
            raise NotImplementedError(
                "normals_sequence is not supported (latent-diffusion accepts it but never uses it): pass None, and "
                "x_T=... for the initial noise or generator=... to seed every draw"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer (the number of samples): pass e.g. 1")
        self.make_schedule(S, ddim_discretize=ddim_discretize, ddim_eta=eta, verbose=verbose)
        device = self.model.alphas_cumprod.device
        img = randn((batch_size, *shape), self.model.alphas_cumprod, generator) if x_T is None else x_T.to(device)
        return self.ddim_sampling(
            conditioning, (batch_size, *shape), img, False, callback, None, quantize_x0, mask, x0, img_callback,
            log_every_t, temperature, noise_dropout, score_corrector, corrector_kwargs, unconditional_guidance_scale,
            unconditional_conditioning, generator=generator, verbose=verbose,
        )  # fmt: skip

    @torch.no_grad()
    def ddim_sampling(
        self,
        cond: Any,
        shape: tuple[int, ...],
        x_T: torch.Tensor | None = None,  # noqa: N803 (CompVis name)
        ddim_use_original_steps: bool = False,
        callback: Callable[[int], None] | None = None,
        timesteps: Any = None,
        quantize_denoised: bool = False,
        mask: torch.Tensor | None = None,
        x0: torch.Tensor | None = None,
        img_callback: Callable[[torch.Tensor, int], None] | None = None,
        log_every_t: int = 100,
        temperature: float = 1.0,
        noise_dropout: float = 0.0,
        score_corrector: Any = None,
        corrector_kwargs: dict | None = None,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning: Any = None,
        generator: Generators = None,
        verbose: bool = False,
    ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """latent-diffusion's loop over every grid step (or every timestep with ``ddim_use_original_steps``) from
        ``x_T`` (default: noise from ``generator``); intermediates hold ``x_T``, then the first step and every step
        whose ``index`` is a multiple of ``log_every_t``."""
        if timesteps is not None:
            raise NotImplementedError("timesteps= is not supported: call make_schedule with the number of steps you want")
        if mask is not None and x0 is None:
            raise ValueError("mask needs x0 (the latent whose masked regions are kept)")
        self._check_step_options(noise_dropout, quantize_denoised, score_corrector)
        size = len(self._grid(bool(ddim_use_original_steps)))
        img = x_T if x_T is not None else randn(tuple(shape), self.model.alphas_cumprod, generator)
        options = (False, quantize_denoised, temperature, noise_dropout, score_corrector, corrector_kwargs)
        return self._loop(
            img, cond, list(range(size))[::-1], bool(ddim_use_original_steps), options, generator, callback,
            img_callback, log_every_t, mask, x0, verbose, unconditional_guidance_scale, unconditional_conditioning,
        )  # fmt: skip

    def _loop(self, img, cond, indices, original, options, generator, callback, img_callback, log_every_t, mask, x0,
              verbose, scale, uncond) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:  # fmt: skip
        grid = self._grid(original)
        check = getattr(self.denoiser, "check_timesteps", None)
        if check is not None:
            check([int(grid[i]) for i in indices])
        den = self._guided(scale, uncond)
        intermediates: dict[str, list[torch.Tensor]] = {"x_inter": [img], "pred_x0": [img]}
        pred_x0 = img
        bar = tqdm(indices, desc="DDIM", disable=not (verbose and is_rank_zero()), leave=False)
        for i, index in enumerate(bar):
            t = torch.full((img.shape[0],), int(grid[index]), device=img.device, dtype=torch.long)
            if mask is not None:
                img_orig = self.model.q_sample(x0, t, randn(tuple(x0.shape), x0, generator))
                img = img_orig * mask + (1.0 - mask) * img
            img, pred_x0 = self._step(img, cond, t, index, original, den, options, generator)
            if callback is not None:
                callback(i)
            if img_callback is not None:
                img_callback(pred_x0, i)
            if index % log_every_t == 0 or index == len(grid) - 1:  # latent-diffusion's rule: also the first step
                intermediates["x_inter"].append(img)
                intermediates["pred_x0"].append(pred_x0)
        return img, intermediates

    # ------------------------------------------------------------------------------------------------------- img2img
    def stochastic_encode(
        self,
        x0: torch.Tensor,
        t: int | torch.Tensor,
        use_original_steps: bool = False,
        noise: torch.Tensor | None = None,
        generator: Generators = None,
    ) -> torch.Tensor:
        """Noise ``x0`` ``[B, C, h, w]`` with ``q_sample`` to the level of grid position ``t`` (an int, or an integer
        tensor ``[]``, ``[1]`` or ``[B]``: one position per sample), or of timestep ``t`` with ``use_original_steps``.
        ``noise`` overrides the draw from ``generator``."""
        grid = self._grid(use_original_steps)
        hint = "a timestep of the full schedule" if use_original_steps else f"a position in the {len(grid)}-entry DDIM grid"
        if isinstance(t, torch.Tensor):
            if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool or t.dim() > 1:
                raise ValueError(f"t must be an integer tensor of shape [], [1] or [B]; got {t.dtype} {list(t.shape)}")
            positions = t.reshape(-1).long().cpu()
            if positions.numel() not in (1, x0.shape[0]):
                raise ValueError(f"t has {positions.numel()} entries for a batch of {x0.shape[0]}: pass 1 or B")
        elif isinstance(t, (int, np.integer)) and not isinstance(t, bool):
            positions = torch.tensor([int(t)])
        else:
            raise ValueError(f"t={t!r} must be an int or an integer tensor: {hint}")
        if int(positions.min()) < 0 or int(positions.max()) >= len(grid):
            raise ValueError(f"t={t!r} is outside [0, {len(grid) - 1}]: {hint}")
        timesteps = torch.as_tensor(grid, dtype=torch.long)[positions].expand(x0.shape[0]).to(x0.device)
        eps = noise if noise is not None else randn(tuple(x0.shape), x0, generator)
        return self.model.q_sample(x0, timesteps, eps)

    @torch.no_grad()
    def decode(
        self,
        x_latent: torch.Tensor,
        cond: Any,
        t_start: int,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning: Any = None,
        use_original_steps: bool = False,
        generator: Generators = None,
    ) -> torch.Tensor:
        """Denoise ``x_latent`` ``[B, C, h, w]`` from grid position ``t_start`` (inclusive; see the module docstring)
        down to the end; with ``use_original_steps`` the positions are timesteps ``t_start, t_start - 1, ..., 0``."""
        self._position("t_start", t_start, len(self._grid(use_original_steps)))
        options = (False, False, 1.0, 0.0, None, None)
        indices = list(range(int(t_start) + 1))[::-1]
        out, _ = self._loop(x_latent, cond, indices, bool(use_original_steps), options, generator, None, None, 10**9,
                            None, None, False, unconditional_guidance_scale, unconditional_conditioning)  # fmt: skip
        return out

    # ------------------------------------------------------------------------------------------------------ helpers
    def _grid(self, use_original_steps: Any, hint: str = "") -> np.ndarray:
        """The timestep at each step position: every timestep with ``use_original_steps``, else the DDIM grid."""
        if not isinstance(use_original_steps, (bool, np.bool_)):
            raise TypeError(f"use_original_steps must be True or False, got {type(use_original_steps).__name__}{hint}")
        if use_original_steps:
            return np.arange(self.ddpm_num_timesteps)
        if self.ddim_timesteps is None:
            raise RuntimeError("call make_schedule(ddim_num_steps, ...) first")
        return self.ddim_timesteps

    @staticmethod
    def _position(name: str, value: Any, size: int) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < size:
            raise ValueError(f"{name}={value!r} must be an integer position in [0, {size - 1}]")

    def _guided(self, scale: float, uncond: Any) -> Denoiser:
        if scale == 1.0 or uncond is None:
            return self.denoiser
        return CFGDenoiser(self.denoiser, scale, uncond)

    def _check_step_options(self, noise_dropout: Any, quantize: bool, corrector: Any) -> None:
        ok = not isinstance(noise_dropout, bool) and isinstance(noise_dropout, (int, float)) and math.isfinite(noise_dropout)
        if not ok or not 0 <= noise_dropout <= 1:
            raise ValueError(f"noise_dropout={noise_dropout!r} must be a probability in [0, 1] (0 = no dropout)")
        if quantize and not hasattr(getattr(self.model, "first_stage_model", None), "quantize"):
            raise ValueError(
                "quantize_denoised/quantize_x0=True needs a VQ first stage (model.first_stage_model.quantize); this "
                f"model's first stage is {type(getattr(self.model, 'first_stage_model', None)).__name__}: pass False"
            )
        if corrector is not None and not callable(getattr(corrector, "modify_score", None)):
            raise TypeError(
                f"score_corrector={type(corrector).__name__} has no modify_score(model, e_t, x, t, c, **kwargs) method "
                "(latent-diffusion's score-corrector interface); pass such an object or None"
            )
