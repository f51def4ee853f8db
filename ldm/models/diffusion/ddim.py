"""DDIM sampling (Song et al. 2021) with latent-diffusion's API, plus SDEdit-style tail refinement.

One step implementation (:func:`ddim_step`) serves full sampling from noise and refinement of a clean latent.

Refinement convention (see DESIGN.md): the DDIM grid is latent-diffusion's ``range(0, T, T // S) + 1`` (S=50, T=1000:
``1, 21, ..., 981``).  The *tail* for ``start_t`` is the grid entries ``<= start_t``; the clean latent is noised with
``q_sample`` to the first (largest) of them, which is exactly the noise level the first DDIM step assumes.  (Stable
Diffusion's img2img noises to one grid entry and starts denoising from the next one down; that off-by-one is not copied.)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ldm.models.autoencoder import quantize_latent
from ldm.models.diffusion.denoisers import (
    CFGDenoiser,
    Denoiser,
    ModelDenoiser,
    check_denoiser_timesteps,
    resolve_denoiser,
)
from ldm.modules.diffusionmodules.util import make_ddim_sampling_parameters, make_ddim_timesteps
from ldm.util import is_rank_zero

logger = logging.getLogger(__name__)

# One generator for the whole batch, or one per sample (row i's noise then depends only on generator i, so a result
# does not depend on which other samples share its batch).
Generators = torch.Generator | Sequence[torch.Generator] | None


def ddim_step(
    x: torch.Tensor,
    e_t: torch.Tensor,
    a_t: torch.Tensor,
    a_prev: torch.Tensor,
    sigma_t: torch.Tensor,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM update (DDIM eq. 12) from ``x_t`` to ``x_prev``.

    Args:
        x: ``x_t`` ``[B, C, H, W]``.  e_t: predicted noise, same shape.
        a_t, a_prev: ``alphas_cumprod`` at this grid step and the previous (smaller-t) one (scalars or broadcastable).
        sigma_t: ``eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))``.
        noise: standard normal ``[B, C, H, W]``; required when ``sigma_t > 0``.
    Returns:
        ``(x_prev, pred_x0)`` with ``pred_x0 = (x_t - sqrt(1 - a_t) e_t) / sqrt(a_t)`` and
        ``x_prev = sqrt(a_prev) pred_x0 + sqrt(1 - a_prev - sigma_t^2) e_t + sigma_t noise``.
    """
    pred_x0 = (x - (1.0 - a_t).sqrt() * e_t) / a_t.sqrt()
    x_prev = a_prev.sqrt() * pred_x0 + (1.0 - a_prev - sigma_t**2).sqrt() * e_t
    if noise is not None:
        x_prev = x_prev + sigma_t * noise
    return x_prev, pred_x0


def _to_like(noise: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``noise`` on ``like``'s device and dtype.  A CPU tensor bound for CUDA goes through pinned memory with a
    non-blocking copy: a copy from pageable memory would wait for the device's queued work (a per-step host sync)."""
    if noise.device.type == "cpu" and like.device.type == "cuda":
        return noise.pin_memory().to(like.device, like.dtype, non_blocking=True)
    return noise.to(like.device, like.dtype)


def _draw(
    draw: Callable[..., torch.Tensor], shape: tuple[int, ...], like: torch.Tensor, generator: Generators
) -> torch.Tensor:
    """``draw(shape)`` (``torch.randn`` or ``torch.rand``) on the generator's device (bit-reproducible on CPU), moved to
    ``like``.  ``generator`` may be a sequence of per-sample generators: row ``i`` of the batch (``shape[0]``) is drawn
    from ``generator[i]`` alone; a shape whose batch is 1 (``repeat_noise``) draws from the first.
    """
    if generator is None or isinstance(generator, torch.Generator):
        device = generator.device if generator is not None else like.device
        return _to_like(draw(shape, generator=generator, device=device, dtype=torch.float32), like)
    gens = list(generator)
    if shape[0] != 1 and len(gens) != shape[0]:
        raise ValueError(f"{len(gens)} per-sample generators for a batch of {shape[0]}; pass one generator per sample")
    devices = {g.device for g in gens[: shape[0]]}
    rows = [draw((1, *shape[1:]), generator=g, device=g.device, dtype=torch.float32) for g in gens[: shape[0]]]
    if len(devices) == 1:
        return _to_like(torch.cat(rows), like)
    return torch.cat([_to_like(r, like) for r in rows])


def _randn(shape: tuple[int, ...], like: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Standard normal noise ``shape`` like ``like`` from ``generator`` (one, or one per sample; see :func:`_draw`)."""
    return _draw(torch.randn, shape, like, generator)


def _dropout(noise: torch.Tensor, p: float, generator: Generators) -> torch.Tensor:
    """Inverted dropout of ``noise`` with probability ``p`` in ``[0, 1]``, its mask drawn from ``generator`` (the global
    RNG is never touched): each element is zeroed with probability ``p``, the kept ones are scaled by ``1 / (1 - p)``."""
    if p >= 1.0:
        return torch.zeros_like(noise)
    keep = _draw(torch.rand, tuple(noise.shape), noise.new_empty(0, dtype=torch.float32), generator) >= p
    return noise * keep / (1.0 - p)


@dataclass(frozen=True)
class TailPlan:
    """The grid steps a refinement runs: ``timesteps`` descending, ``indices`` into the DDIM grid."""

    start_t: int
    timesteps: tuple[int, ...]
    indices: tuple[int, ...]

    @property
    def noise_t(self) -> int:
        """The timestep the clean latent is noised to (= the first step's timestep)."""
        return self.timesteps[0]


class DDIMSampler:
    """DDIM over a model's ``alphas_cumprod``; the network is reached only through ``denoiser``.

    ``model`` supplies the schedule (``alphas_cumprod``, ``num_timesteps``), the device and, by default, the denoiser
    (:class:`ModelDenoiser`).  Pass another ``denoiser`` (e.g. expert routing) that shares the schedule.
    """

    def __init__(self, model: Any, denoiser: Denoiser | None = None):
        self.model = model
        self.denoiser = denoiser if denoiser is not None else ModelDenoiser(model)
        self.ddpm_num_timesteps = int(model.num_timesteps)
        self.ddim_timesteps: np.ndarray | None = None

    @property
    def device(self) -> torch.device:
        return self.model.alphas_cumprod.device

    def make_schedule(
        self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0, verbose: bool = False
    ) -> None:
        """Grid and per-step coefficients for ``ddim_num_steps`` steps, placed on the model's device once."""
        if isinstance(ddim_eta, bool) or not isinstance(ddim_eta, (int, float)) or not math.isfinite(ddim_eta) or ddim_eta < 0:
            raise ValueError(f"eta={ddim_eta!r} must be a finite number >= 0 (0 = deterministic DDIM, 1 = DDPM-like noise)")
        grid = make_ddim_timesteps(ddim_discretize, ddim_num_steps, self.ddpm_num_timesteps)
        alphacums = self.model.alphas_cumprod.detach().to("cpu", torch.float64)
        sigmas, alphas, alphas_prev = make_ddim_sampling_parameters(alphacums, grid, ddim_eta)
        self.ddim_timesteps = grid
        self.ddim_num_steps, self.ddim_discretize, self.ddim_eta = ddim_num_steps, ddim_discretize, ddim_eta
        to_dev = dict(device=self.device, dtype=torch.float32)
        self.ddim_alphas = alphas.to(**to_dev)
        self.ddim_alphas_prev = alphas_prev.to(**to_dev)
        self.ddim_sigmas = sigmas.to(**to_dev)
        self.ddim_sqrt_one_minus_alphas = (1.0 - alphas).sqrt().to(**to_dev)
        # use_original_steps: DDIM on every timestep t -> t-1 of the model's schedule (abar_{-1} = 1), same eta
        full_prev = torch.cat([alphacums.new_ones(1), alphacums[:-1]])
        full_sigmas = ddim_eta * ((1.0 - full_prev) / (1.0 - alphacums) * (1.0 - alphacums / full_prev)).sqrt()
        self.original_alphas = alphacums.to(**to_dev)
        self.original_alphas_prev = full_prev.to(**to_dev)
        self.original_sigmas = full_sigmas.to(**to_dev)
        if verbose:
            logger.info("DDIM grid: %d steps, t from %d to %d, eta %.3g", len(grid), grid[0], grid[-1], ddim_eta)

    def _require_schedule(self) -> np.ndarray:
        if self.ddim_timesteps is None:
            raise RuntimeError("call make_schedule(ddim_num_steps, ...) first")
        return self.ddim_timesteps

    def _grid(self, use_original_steps: bool) -> np.ndarray:
        """The timesteps that grid positions index: the DDIM grid, or every timestep ``0..T-1`` (``use_original_steps``)."""
        grid = self._require_schedule()
        if not isinstance(use_original_steps, (bool, np.bool_)):
            raise TypeError(
                f"use_original_steps must be True or False, got {type(use_original_steps).__name__}; the argument order "
                "is latent-diffusion's: pass noise=, generator= by keyword"
            )
        return np.arange(self.ddpm_num_timesteps) if use_original_steps else grid

    def _denoiser_for(self, scale: float, uncond: Any) -> Denoiser:
        if scale == 1.0 or uncond is None:
            return self.denoiser
        return CFGDenoiser(self.denoiser, scale, uncond)

    # -------------------------------------------------------------------------------------------------------- a step
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
        denoiser: Denoiser | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One grid step at timestep ``t`` ``[B]`` (grid position ``index``): returns ``(x_prev, pred_x0)``.

        The signature is latent-diffusion's, then ``generator`` and ``denoiser``.  ``use_original_steps=True`` steps on
        the model's full schedule instead of the DDIM grid: ``index`` is then the timestep itself and the step goes to
        ``index - 1`` (``eta`` still comes from :meth:`make_schedule`).  ``quantize_denoised`` snaps ``pred_x0`` to the
        first stage's VQ codebook and recomputes ``e_t`` from it; ``score_corrector.modify_score(model, e_t, x, t, c,
        **corrector_kwargs)`` edits the predicted noise.  With ``eta > 0`` the noise is scaled by ``temperature`` and
        each element dropped with probability ``noise_dropout``; both draws come from ``generator`` (one, or one per
        sample).  ``denoiser`` is the callable for this step (the sampler loop passes the one resolved for the step's
        timestep); by default the sampler's denoiser, with guidance when ``unconditional_guidance_scale != 1``.
        """
        if isinstance(noise_dropout, bool) or not isinstance(noise_dropout, (int, float)) or not 0 <= noise_dropout <= 1:
            raise ValueError(f"noise_dropout={noise_dropout!r} must be a probability in [0, 1] (0 = no dropout)")
        if quantize_denoised and not hasattr(getattr(self.model, "first_stage_model", None), "quantize"):
            raise ValueError(
                "quantize_denoised/quantize_x0=True needs a VQ first stage (model.first_stage_model.quantize); this "
                f"model's first stage is {type(getattr(self.model, 'first_stage_model', None)).__name__}: pass False"
            )
        if score_corrector is not None and not callable(getattr(score_corrector, "modify_score", None)):
            raise TypeError(
                f"score_corrector={type(score_corrector).__name__} has no modify_score(model, e_t, x, t, c, **kwargs) "
                "method (latent-diffusion's score-corrector interface); pass such an object or None"
            )
        grid = self._grid(use_original_steps)
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < len(grid):
            raise ValueError(
                f"index={index!r} must be an integer grid position in [0, {len(grid) - 1}]"
                + (" (with use_original_steps=True it is the timestep)" if use_original_steps else "")
            )
        den = denoiser if denoiser is not None else self._denoiser_for(unconditional_guidance_scale, unconditional_conditioning)
        e_t = den(x, t, c)
        if score_corrector is not None:
            e_t = score_corrector.modify_score(self.model, e_t, x, t, c, **(corrector_kwargs or {}))
        if use_original_steps:
            a_t, a_prev = self.original_alphas[index], self.original_alphas_prev[index]
            sigma_t = self.original_sigmas[index]
        else:
            a_t, a_prev = self.ddim_alphas[index], self.ddim_alphas_prev[index]
            sigma_t = self.ddim_sigmas[index]
        noise = None
        if self.ddim_eta > 0:
            shape = (1, *x.shape[1:]) if repeat_noise else tuple(x.shape)
            noise = _randn(shape, x, generator).expand_as(x) * temperature
            if noise_dropout > 0:
                noise = _dropout(noise, noise_dropout, generator)
        if quantize_denoised:
            pred_x0 = (x - (1.0 - a_t).sqrt() * e_t) / a_t.sqrt()
            pred_x0 = quantize_latent(self.model.first_stage_model.quantize, pred_x0)
            e_t = (x - a_t.sqrt() * pred_x0) / (1.0 - a_t).sqrt()
        return ddim_step(x, e_t, a_t, a_prev, sigma_t, noise)

    # ------------------------------------------------------------------------------------------- sampling from noise
    @torch.inference_mode()
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
        """Sample ``[batch_size, *shape]`` latents from pure noise with ``S`` DDIM steps.

        The signature is latent-diffusion's up to ``unconditional_conditioning`` (positional calls line up), then
        ``generator`` (one, or one per sample) and ``ddim_discretize``; latent-diffusion's ``**kwargs`` is not taken, so
        a misspelled argument raises.  ``normals_sequence`` (accepted but unused there) is refused when given.
        ``mask`` (1 = keep) with ``x0`` inpaints: kept regions follow ``q_sample(x0, t)``.  Returns
        ``(samples, {"x_inter": [...], "pred_x0": [...]})`` with intermediates every ``log_every_t`` steps.
        """
        if normals_sequence is not None:
            raise NotImplementedError(
                "normals_sequence is not supported (latent-diffusion accepts it but never uses it): pass None, and "
                "x_T=... for the initial noise or generator=... to seed every draw"
            )
        if mask is not None and x0 is None:
            raise ValueError("mask needs x0 (the latent whose masked regions are kept)")
        self.make_schedule(S, ddim_discretize=ddim_discretize, ddim_eta=eta, verbose=verbose)
        size = (batch_size, *shape)
        img = _randn(size, self.model.alphas_cumprod, generator) if x_T is None else x_T
        grid = self._require_schedule()
        indices = list(range(len(grid)))[::-1]
        denoiser = self._denoiser_for(unconditional_guidance_scale, unconditional_conditioning)
        check_denoiser_timesteps(denoiser, [int(grid[i]) for i in indices])
        return self._run(
            img,
            conditioning,
            indices,
            generator=generator,
            callback=callback,
            img_callback=img_callback,
            log_every_t=log_every_t,
            mask=mask,
            x0=x0,
            verbose=verbose,
            denoiser=denoiser,
            step_kwargs=dict(
                quantize_denoised=quantize_x0,
                temperature=temperature,
                noise_dropout=noise_dropout,
                score_corrector=score_corrector,
                corrector_kwargs=corrector_kwargs,
            ),
        )

    def _run(
        self,
        img: torch.Tensor,
        cond: Any,
        indices: list[int],
        generator: Generators,
        callback: Callable[[int], None] | None = None,
        img_callback: Callable[[torch.Tensor, int], None] | None = None,
        log_every_t: int = 100,
        mask: torch.Tensor | None = None,
        x0: torch.Tensor | None = None,
        verbose: bool = True,
        denoiser: Denoiser | None = None,
        step_kwargs: dict | None = None,
        use_original_steps: bool = False,
    ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Run the grid positions ``indices`` (descending) from ``img``; the loop shared by sampling and refinement.

        Each step's denoiser is resolved from its timestep as a Python int (:func:`resolve_denoiser`), so routing
        between window experts needs no device-to-host sync; nothing else in the loop reads the device either (no
        ``.item()``, ``bool(tensor)`` or pageable copies), so CUDA work is queued ahead of the host.
        ``use_original_steps``: ``indices`` are timesteps of the full schedule (see :meth:`p_sample_ddim`).
        """
        grid = self._grid(use_original_steps)
        base = denoiser if denoiser is not None else self.denoiser
        b = img.shape[0]
        intermediates: dict[str, list[torch.Tensor]] = {"x_inter": [img], "pred_x0": [img]}
        pred_x0 = img
        steps = tqdm(indices, desc="DDIM", total=len(indices), disable=not (verbose and is_rank_zero()), leave=False)
        for i, index in enumerate(steps):
            t_int = int(grid[index])
            t = torch.full((b,), t_int, device=img.device, dtype=torch.long)
            if mask is not None:
                img_orig = self.model.q_sample(x0, t, _randn(tuple(x0.shape), x0, generator))
                img = img_orig * mask + (1.0 - mask) * img
            img, pred_x0 = self.p_sample_ddim(
                img,
                cond,
                t,
                index,
                use_original_steps=use_original_steps,
                generator=generator,
                denoiser=resolve_denoiser(base, t_int),
                **(step_kwargs or {}),
            )
            if callback is not None:
                callback(i)
            if img_callback is not None:
                img_callback(pred_x0, i)
            if index % log_every_t == 0 or i == len(indices) - 1:
                intermediates["x_inter"].append(img)
                intermediates["pred_x0"].append(pred_x0)
        return img, intermediates

    # ------------------------------------------------------------------------------------------------ refinement tail
    def tail_plan(self, start_t: int, t_min: int = 0) -> TailPlan:
        """Grid steps with ``t_min <= t <= start_t``, descending.  ``start_t`` is an integer timestep in ``[1, T-1]``."""
        grid = self._require_schedule()
        if isinstance(start_t, bool) or not isinstance(start_t, (int, np.integer)):
            raise ValueError(f"start_t={start_t!r} must be an integer timestep in [1, {self.ddpm_num_timesteps - 1}]")
        if not 1 <= int(start_t) <= self.ddpm_num_timesteps - 1:
            raise ValueError(
                f"start_t={start_t} is outside [1, {self.ddpm_num_timesteps - 1}]: it is a timestep index t (t = "
                f"{self.ddpm_num_timesteps} - step), e.g. 500 = halfway; 1 changes almost nothing, 999 almost everything"
            )
        idx = [i for i in range(len(grid) - 1, -1, -1) if t_min <= grid[i] <= start_t]
        if not idx:
            raise ValueError(
                f"start_t={start_t} (t_min={t_min}) holds no DDIM grid step; the grid for {len(grid)} steps is "
                f"{grid[0]}, {grid[1] if len(grid) > 1 else ''} ... {grid[-1]}: raise start_t or use more --ddim-steps"
            )
        return TailPlan(int(start_t), tuple(int(grid[i]) for i in idx), tuple(idx))

    @torch.inference_mode()
    def refine(
        self,
        z0: torch.Tensor,
        start_t: int,
        cond: Any = None,
        t_min: int = 0,
        generator: Generators = None,
        noise: torch.Tensor | None = None,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning: Any = None,
        callback: Callable[[int], None] | None = None,
        verbose: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, TailPlan]:
        """SDEdit: noise the clean latent ``z0`` ``[B, C, h, w]`` to the tail's first timestep and run the tail.

        Call :meth:`make_schedule` first.  ``noise`` (``[B, C, h, w]``) overrides the draw from ``generator`` (one
        generator, or one per sample).  Before any work the denoiser is asked whether it serves every tail timestep
        (an expert router raises a ``ValueError`` naming the uncovered steps).
        Returns ``(z, pred_x0, plan)``: the latent after the last step, that step's x0 prediction, and the plan.
        """
        plan = self.tail_plan(start_t, t_min)
        denoiser = self._denoiser_for(unconditional_guidance_scale, unconditional_conditioning)
        check_denoiser_timesteps(denoiser, plan.timesteps, start_t=plan.start_t)
        b = z0.shape[0]
        eps = noise if noise is not None else _randn(tuple(z0.shape), z0, generator)
        t0 = torch.full((b,), plan.noise_t, device=z0.device, dtype=torch.long)
        z = self.model.q_sample(z0, t0, eps)
        z, inter = self._run(
            z,
            cond,
            list(plan.indices),
            generator=generator,
            callback=callback,
            verbose=verbose,
            denoiser=denoiser,
        )
        return z, inter["pred_x0"][-1], plan

    def _positions(self, t: int | torch.Tensor, batch: int, use_original_steps: bool, name: str) -> torch.Tensor:
        """Grid positions ``t`` (an int, or an integer tensor ``[]``, ``[1]`` or ``[B]``) as timesteps ``[B]`` (long)."""
        grid = self._grid(use_original_steps)
        hint = f"{name} is a position in the {len(grid)}-entry " + (
            "full schedule (a timestep)" if use_original_steps else "DDIM grid (not a timestep)"
        )
        if isinstance(t, torch.Tensor):
            if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool or t.dim() > 1:
                shape = list(t.shape)
                raise ValueError(f"{name} must be an integer tensor of shape [], [1] or [{batch}]; got {t.dtype} {shape}")
            positions = t.reshape(-1).long()
            if positions.numel() not in (1, batch):
                raise ValueError(f"{name} has {positions.numel()} entries for a batch of {batch}: pass 1 or {batch}")
        elif isinstance(t, (int, np.integer)) and not isinstance(t, bool):
            positions = torch.tensor([int(t)])
        else:
            raise ValueError(f"{name}={t!r} must be an int or an integer tensor; {hint}")
        lo, hi = int(positions.min()), int(positions.max())
        if lo < 0 or hi >= len(grid):
            raise ValueError(f"{name}={t!r} is outside [0, {len(grid) - 1}]: {hint}")
        return torch.as_tensor(grid, dtype=torch.long)[positions.cpu()].expand(batch)

    def stochastic_encode(
        self,
        x0: torch.Tensor,
        t: int | torch.Tensor,
        use_original_steps: bool = False,
        noise: torch.Tensor | None = None,
        generator: Generators = None,
    ) -> torch.Tensor:
        """Noise ``x0`` ``[B, C, h, w]`` with ``q_sample`` to the level of grid position ``t``; :meth:`decode` continues
        from it.  latent-diffusion's signature: ``t`` is an int or an integer tensor (``[]``, ``[1]`` or ``[B]``, one
        position per sample) of DDIM grid positions, or of timesteps with ``use_original_steps=True``.  ``noise``
        ``[B, C, h, w]`` overrides the draw from ``generator``."""
        timesteps = self._positions(t, x0.shape[0], use_original_steps, "t").to(x0.device)
        eps = noise if noise is not None else _randn(tuple(x0.shape), x0, generator)
        return self.model.q_sample(x0, timesteps, eps)

    @torch.inference_mode()
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
        """Denoise ``x_latent`` ``[B, C, h, w]`` from grid position ``t_start`` (inclusive) down to the end, e.g. after
        :meth:`stochastic_encode` with the same position: the first step's assumed noise level equals the encoded one.

        latent-diffusion's signature, then ``generator``.  Unlike latent-diffusion/Stable Diffusion img2img, which start
        one position lower (``t_start - 1``), the step at ``t_start`` is run (see the module docstring).  With
        ``use_original_steps=True`` the positions are the full schedule's timesteps: ``t_start, t_start - 1, ..., 0``.
        """
        grid = self._grid(use_original_steps)
        if isinstance(t_start, bool) or not isinstance(t_start, (int, np.integer)) or not 0 <= t_start < len(grid):
            raise ValueError(
                f"t_start={t_start!r} must be an integer position in [0, {len(grid) - 1}] of the "
                + ("full schedule (a timestep)" if use_original_steps else "DDIM grid (not a timestep)")
            )
        indices = list(range(int(t_start) + 1))[::-1]
        denoiser = self._denoiser_for(unconditional_guidance_scale, unconditional_conditioning)
        check_denoiser_timesteps(denoiser, [int(grid[i]) for i in indices])
        out, _ = self._run(
            x_latent,
            cond,
            indices,
            generator=generator,
            verbose=False,
            denoiser=denoiser,
            use_original_steps=use_original_steps,
        )
        return out
