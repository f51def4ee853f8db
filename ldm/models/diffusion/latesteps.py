"""Late-steps latent diffusion: a LatentDiffusion trained only on a window of timesteps ``[t_min, t_max)``.

Step k of T counts from pure noise and is timestep ``t = T - k``: steps 500-750 train ``t in [250, 500)`` (shapes),
steps 750-1000 ``t in [0, 250)`` (details).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from ldm.models.diffusion.base import training_noise
from ldm.models.diffusion.latent import LatentDiffusion
from ldm.sampling import NoiseSchedule, build_plan, noise_to_start, run_tail
from ldm.sampling.denoisers import ModelDenoiser
from ldm.windows import validate_window, window_to_steps

logger = logging.getLogger(__name__)

TIMESTEP_DENSITIES = ("uniform",)


def stratified_window_timesteps(
    n: int, t_min: int, t_max: int, num_bands: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validation timesteps: sample ``i`` falls in sub-band ``i % num_bands`` (uniform within it).

    Returns ``(t [n] long, band [n] long)``; bands split ``[t_min, t_max)`` into ``num_bands`` near-equal parts.
    """
    edges = torch.linspace(t_min, t_max, num_bands + 1).round().long()
    band = torch.arange(n) % num_bands
    lo, hi = edges[band], edges[band + 1]
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    t = lo + (u * (hi - lo).double()).floor().long()
    return t.clamp(max=t_max - 1), band


class LateStepsLatentDiffusion(LatentDiffusion):
    """LatentDiffusion whose training timesteps are drawn (``timestep_density``: uniformly) from ``[t_min, t_max)``;
    validation also reports the loss on each of ``val_subbands`` sub-bands.  Checkpoints record
    ``checkpoint["window"] = [t_min, t_max]``."""

    def __init__(
        self,
        t_min: int,
        t_max: int,
        timestep_density: str = "uniform",
        val_subbands: int = 4,
        **latent_diffusion_kwargs: Any,
    ):
        given_betas = latent_diffusion_kwargs.get("given_betas")
        timesteps = len(given_betas) if given_betas is not None else int(latent_diffusion_kwargs.get("timesteps", 1000))
        self.t_min, self.t_max = validate_window(t_min, t_max, timesteps)
        if timestep_density not in TIMESTEP_DENSITIES:
            raise ValueError(f"timestep_density={timestep_density!r} is unknown; choose one of {TIMESTEP_DENSITIES}")
        if not 1 <= val_subbands <= t_max - t_min:
            raise ValueError(f"val_subbands={val_subbands} must be in [1, t_max - t_min = {t_max - t_min}]")
        self.timestep_density = timestep_density
        self.val_subbands = val_subbands
        latent_diffusion_kwargs.setdefault("monitor", "val/loss_window_ema")
        super().__init__(**latent_diffusion_kwargs)
        steps = window_to_steps(self.t_min, self.t_max, self.num_timesteps)
        logger.info("late-steps window t in [%d, %d) = sampling steps %d-%d", self.t_min, self.t_max, *steps)

    def window(self) -> tuple[int, int]:
        """Timesteps this model was trained on, ``[t_min, t_max)`` (training draws them uniformly: the only density)."""
        return self.t_min, self.t_max

    # ---------------------------------------------------------------------------------------------------- validation
    def band_edges(self) -> list[tuple[int, int]]:
        """The validation sub-bands ``[lo, hi)`` of the window."""
        edges = torch.linspace(self.t_min, self.t_max, self.val_subbands + 1).round().long().tolist()
        return list(zip(edges[:-1], edges[1:]))

    @torch.no_grad()
    def window_losses(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, tuple[torch.Tensor, int]]:
        """Per-batch window loss and per-sub-band losses (training weights), on stratified fixed-seed draws.

        Returns ``{name: (mean, count)}``: ``loss_window`` over the batch and ``loss_band_<lo>_<hi>`` per sub-band.
        Every band is present, also one that a batch smaller than ``val_subbands`` leaves empty (``(0, 0)``: no weight
        in the epoch's mean), so all ranks log the same keys (``sync_dist`` would hang otherwise).
        """
        z, cond = self.get_input(batch, self.first_stage_key)
        gen = self.validation_generator(batch_idx)
        t, band = stratified_window_timesteps(z.shape[0], self.t_min, self.t_max, self.val_subbands, gen)
        noise = training_noise(z, gen)
        per_sample = self.per_sample_loss(z, t.to(z.device), noise, self.training_conditioning(cond))
        out = {"loss_window": (per_sample.mean(), z.shape[0])}
        band = band.to(per_sample.device)
        for i, (lo, hi) in enumerate(self.band_edges()):
            sel = band == i
            count = int(sel.sum())
            out[f"loss_band_{lo}_{hi}"] = (per_sample[sel].mean() if count else per_sample.new_zeros(()), count)
        return out

    @torch.no_grad()
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        """Logs ``val/loss_window`` and ``val/loss_window_ema`` (the monitor), plus ``val/loss_band_<lo>_<hi>[_ema]``."""
        results = {"": self.window_losses(batch, batch_idx)}
        if self.use_ema:
            with self.ema_scope():
                results["_ema"] = self.window_losses(batch, batch_idx)
        for suffix, losses in results.items():
            for name, (value, count) in losses.items():
                self.log(f"val/{name}{suffix}", value, on_step=False, on_epoch=True, batch_size=count, sync_dist=True)

    # ---------------------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["window"] = [self.t_min, self.t_max]
        checkpoint["num_timesteps"] = self.num_timesteps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("window")
        window = [self.t_min, self.t_max]
        if saved is not None and not (isinstance(saved, (list, tuple)) and list(saved) == window):  # a record only
            pair = isinstance(saved, (list, tuple)) and len(saved) == 2
            shown = f"[{saved[0]}, {saved[1]})" if pair else f"{saved!r:.40}"  # windows are half-open
            logger.warning("checkpoint was trained on window t in %s; this run trains [%d, %d)", shown, self.t_min,
                           self.t_max)  # fmt: skip

    # ---------------------------------------------------------------------------------------------------------- images
    @torch.no_grad()
    def log_images(  # type: ignore[override]
        self,
        batch: Mapping[str, Any],
        N: int = 8,  # noqa: N803 (CompVis name)
        ddim_steps: int = 50,
        ddim_eta: float = 0.0,
        seed: int = 0,
    ) -> dict[str, torch.Tensor]:
        """What matters for a window model, ``[N, 3, H, W]`` in [-1, 1] each: ``inputs``, ``reconstruction`` (first
        stage), ``noised_to_t_max`` (input noised to the window's top DDIM step) and ``window_refined`` (that noised
        input run through this model's DDIM steps inside the window, EMA weights) with its final ``window_pred_x0``."""
        z, c, x, xrec = self.get_input(batch, self.first_stage_key, return_first_stage_outputs=True, bs=N)
        plan = build_plan(NoiseSchedule.from_model(self), self.t_max - 1, [ModelDenoiser(self)], z.device,
                          ddim_steps=ddim_steps, eta=ddim_eta, t_min=self.t_min)  # fmt: skip
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(z.shape, generator=gen).to(z)
        noised = noise_to_start(plan, z, noise)
        with self.ema_scope("log_images"):
            refined, pred_x0 = run_tail(plan, z, noise, generators=gen, cond=c)
        return {
            "inputs": x,
            "reconstruction": xrec,
            "noised_to_t_max": self.decode_first_stage(noised),
            "window_refined": self.decode_first_stage(refined),
            "window_pred_x0": self.decode_first_stage(pred_x0),
        }
