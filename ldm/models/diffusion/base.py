"""DDPM (pixel-space diffusion) as a Lightning 2 module with latent-diffusion's API and state-dict layout
(``model.diffusion_model.*``, ``model_ema.*``, float32 schedule buffers), so CompVis checkpoints load strictly."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ldm.checkpoint import (
    EMA_SCALAR_KEYS,
    CheckpointError,
    check_finite,
    drop_keys,
    has_ema_weights,
    load_state_dict,
    load_weights,
    strip_prefix,
)
from ldm.modules.diffusionmodules.util import (
    extract_into_tensor,
    make_beta_schedule,
    make_schedule_buffers,
)
from ldm.modules.ema import LitEma
from ldm.util import count_params, instantiate_from_config

logger = logging.getLogger(__name__)

SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)
CONDITIONING_KEYS = (None, "concat", "crossattn", "hybrid", "adm")


class DiffusionWrapper(nn.Module):
    """Holds the UNet as ``diffusion_model`` and routes conditioning to it.

    ``conditioning_key``: None (unconditional), ``concat`` (channel-concatenate ``c_concat``), ``crossattn``
    (``c_crossattn`` as cross-attention context), ``hybrid`` (both), ``adm`` (``c_crossattn[0]`` as class labels ``y``).
    """

    def __init__(self, diff_model_config: Mapping[str, Any], conditioning_key: str | None):
        super().__init__()
        if conditioning_key not in CONDITIONING_KEYS:
            raise ValueError(f"conditioning_key={conditioning_key!r} is unknown; choose one of {CONDITIONING_KEYS}")
        self.diffusion_model = instantiate_from_config(diff_model_config)
        self.conditioning_key = conditioning_key

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        c_concat: Sequence[torch.Tensor] | None = None,
        c_crossattn: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        key = self.conditioning_key
        if key in ("concat", "hybrid"):
            x = torch.cat([x, *c_concat], dim=1)
        if key in ("crossattn", "hybrid"):
            return self.diffusion_model(x, t, context=torch.cat(list(c_crossattn), 1))
        if key == "adm":
            return self.diffusion_model(x, t, y=c_crossattn[0])
        return self.diffusion_model(x, t)


def training_noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor | None:
    """Noise ``[B, C, H, W]`` like ``x`` drawn from ``generator`` (None: None, and the loss draws from the global RNG)."""
    if generator is None:
        return None
    return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)


def draw_window_timesteps(
    n: int, t_min: int, t_max: int, device: torch.device | str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``n`` training timesteps (long ``[n]``) uniform in ``[t_min, t_max)``, drawn on the generator's device."""
    gen_device = generator.device if generator is not None else device
    return torch.randint(t_min, t_max, (n,), device=gen_device, generator=generator).to(device)


class DDPM(pl.LightningModule):
    """Gaussian diffusion in pixel space (Ho et al.) with latent-diffusion's arguments; ``learning_rate`` is set by
    ``main.py``."""

    # ldm.train.trainer.configure_ddp reads this: no buffer needs DDP's broadcast before every forward (the schedule is
    # constant, the EMA follows identical parameters on every rank, scale_by_std broadcasts its one value itself)
    ddp_sync_buffers = False
    # ldm.train.trainer.build_trainer refuses lightning.trainer.precision=16-true / bf16-true for this model.
    true_half_precision = False

    def __init__(
        self,
        unet_config: Mapping[str, Any],
        timesteps: int = 1000,
        beta_schedule: str = "linear",
        loss_type: str = "l2",
        ckpt_path: str | None = None,
        ignore_keys: Sequence[str] = (),
        load_only_unet: bool = False,
        monitor: str | None = "val/loss",
        use_ema: bool = True,
        ema_decay: float = 0.9999,
        first_stage_key: str = "image",
        image_size: int = 256,
        channels: int = 3,
        log_every_t: int = 100,
        clip_denoised: bool = True,
        linear_start: float = 1e-4,
        linear_end: float = 2e-2,
        cosine_s: float = 8e-3,
        given_betas: Sequence[float] | None = None,
        original_elbo_weight: float = 0.0,
        v_posterior: float = 0.0,
        l_simple_weight: float = 1.0,
        conditioning_key: str | None = None,
        parameterization: str = "eps",
        scheduler_config: Mapping[str, Any] | None = None,
        learn_logvar: bool = False,
        logvar_init: float = 0.0,
        unsafe_load: bool = False,
    ):
        super().__init__()
        if parameterization not in ("eps", "x0"):
            raise ValueError(f"parameterization={parameterization!r} is unsupported; use 'eps' or 'x0'")
        if loss_type not in ("l1", "l2"):
            raise ValueError(f"loss_type={loss_type!r} is unknown; use 'l2' or 'l1'")
        self.parameterization = parameterization
        self.clip_denoised = clip_denoised
        self.log_every_t = log_every_t
        self.first_stage_key = first_stage_key
        self.image_size = image_size
        self.channels = channels
        self.model = DiffusionWrapper(unet_config, conditioning_key)
        count_params(self.model, verbose=True)
        self.use_ema = use_ema
        if use_ema:
            self.model_ema = LitEma(self.model, decay=ema_decay)
            logger.info("keeping EMAs of %d parameters", len(self.model_ema.m_name2s_name))
        self.use_scheduler = scheduler_config is not None
        self.scheduler_config = scheduler_config
        self.v_posterior = v_posterior
        self.original_elbo_weight = original_elbo_weight
        self.l_simple_weight = l_simple_weight
        self.loss_type = loss_type
        self.unsafe_load = unsafe_load
        self.learning_rate = 1.0e-4
        if monitor is not None:
            self.monitor = monitor
        self.register_schedule(given_betas, beta_schedule, timesteps, linear_start, linear_end, cosine_s)
        self.learn_logvar = learn_logvar
        logvar = torch.full((self.num_timesteps,), float(logvar_init))
        if learn_logvar:
            self.logvar = nn.Parameter(logvar, requires_grad=True)
        else:  # a buffer so that it moves with the model (no copy per step); not persistent: no key, as in CompVis
            self.register_buffer("logvar", logvar, persistent=False)
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys, only_model=load_only_unet)

    # ---------------------------------------------------------------------------------------------------------- schedule
    def register_schedule(
        self,
        given_betas: Sequence[float] | None = None,
        beta_schedule: str = "linear",
        timesteps: int = 1000,
        linear_start: float = 1e-4,
        linear_end: float = 2e-2,
        cosine_s: float = 8e-3,
    ) -> None:
        """Compute the schedule in float64 and register it as float32 buffers (``lvlb_weights`` non-persistent)."""
        if given_betas is not None:
            betas = torch.as_tensor(given_betas, dtype=torch.float64, device="cpu")
        else:
            betas = make_beta_schedule(beta_schedule, timesteps, linear_start, linear_end, cosine_s)
        self.num_timesteps = int(betas.shape[0])
        self.linear_start, self.linear_end = linear_start, linear_end
        buffers = make_schedule_buffers(betas, self.v_posterior, self.parameterization)
        for name in SCHEDULE_BUFFERS:
            self.register_buffer(name, buffers[name].to(torch.float32))
        self.register_buffer("lvlb_weights", buffers["lvlb_weights"].to(torch.float32), persistent=False)

    # ------------------------------------------------------------------------------------------------------------- EMA
    @contextmanager
    def ema_scope(self, context: str | None = None) -> Iterator[None]:
        """Temporarily swap the EMA weights into ``self.model``; the training weights are restored exactly on exit."""
        if not self.use_ema:
            yield
            return
        self.model_ema.store(self.model.parameters())
        self.model_ema.copy_to(self.model)
        if context is not None:
            logger.debug("%s: switched to EMA weights", context)
        try:
            yield
        finally:
            self.model_ema.restore(self.model.parameters())
            if context is not None:
                logger.debug("%s: restored training weights", context)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """Step the optimizer, then update the EMA (once per optimizer step, before any checkpoint callback runs, so
        a checkpoint written after step k holds the weights and the EMA of step k)."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self.use_ema:
            self.model_ema(self.model)

    # ----------------------------------------------------------------------------------------------------- checkpoints
    def init_from_ckpt(
        self, path: str, ignore_keys: Sequence[str] = (), only_model: bool = False, unsafe: bool | None = None
    ) -> tuple[list[str], list[str]]:
        """Initialise weights from ``path`` (``only_model``: just the ``model.*`` keys) through the safe loader; a
        checkpoint of another noise schedule is refused: a denoiser trained on one schedule is wrong on another."""
        sd = load_state_dict(path, unsafe=self.unsafe_load if unsafe is None else unsafe)
        ignored = tuple(ignore_keys)
        sd, dropped = drop_keys(sd, ignored)
        if dropped:
            logger.info("%s: ignoring %d keys (prefixes %s)", path, len(dropped), list(ignore_keys))
        self.check_schedule_matches(sd, source=path)
        check_finite(sd, f"checkpoint {path!r}")
        # EMA-only releases (Stable Diffusion v1) keep LitEma's two scalars without any EMA weights: loading the
        # scalars alone would cancel the EMA's warm-up, so they go with the weights they belong to
        restores_ema = has_ema_weights(sd) and not only_model
        if not restores_ema:
            sd = {k: v for k, v in sd.items() if k not in EMA_SCALAR_KEYS}
        if only_model:
            sd = strip_prefix(sd, "model.")
        target = self.model if only_model else self
        missing, unexpected = load_weights(target, sd, strict=False, source=f"checkpoint {path!r}")
        unet_prefix = "diffusion_model." if only_model else "model.diffusion_model."
        lacking = [k for k in missing if k.startswith(unet_prefix) and not (ignored and k.startswith(ignored))]
        if lacking:
            raise CheckpointError(
                f"checkpoint {path!r} lacks {len(lacking)} UNet weights (first: {lacking[:3]}): it does not hold a "
                "diffusion model of this architecture (a first-stage or partial checkpoint?). To start those layers "
                "from scratch on purpose, list their prefixes in ignore_keys."
            )
        if self.use_ema and not restores_ema:
            # the file restored no EMA (it has none, e.g. a converted diffusers model, or only_model): start the EMA
            # from the loaded weights, not from the random initialisation it was copied from at construction
            self.model_ema.reset_to(self.model)
            logger.info("%s: no EMA weights restored; the EMA starts from the loaded weights", path)
        logger.info("restored from %s: %d missing keys, %d unexpected keys", path, len(missing), len(unexpected))
        return missing, unexpected

    def check_schedule_matches(self, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Raise :class:`CheckpointError` when ``state_dict`` carries a noise schedule different from this model's."""
        for name in ("betas", "alphas_cumprod"):
            if name not in state_dict:
                continue
            theirs = state_dict[name]
            if not isinstance(theirs, torch.Tensor) or theirs.ndim != 1 or theirs.numel() == 0:
                shown = tuple(theirs.shape) if isinstance(theirs, torch.Tensor) else type(theirs).__name__
                raise CheckpointError(f"{source}: {name} must be a 1-D tensor of T values, got {shown}")
            theirs, ours = theirs.detach().float().cpu(), getattr(self, name).detach().float().cpu()
            if theirs.shape != ours.shape or not torch.allclose(theirs, ours, rtol=1e-5, atol=1e-7):
                raise CheckpointError(
                    f"{source}: noise schedule differs from this model's ({name}: checkpoint T={theirs.shape[0]}, "
                    f"first/last {theirs[0].item():.6g}/{theirs[-1].item():.6g}; model T={ours.shape[0]}, "
                    f"first/last {ours[0].item():.6g}/{ours[-1].item():.6g}). Use the checkpoint's timesteps, "
                    "beta_schedule, linear_start and linear_end in model.params."
                )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # a resumed run: Lightning then restores the checkpoint's schedule buffers over the config's, so a schedule
        # changed since would train on the old one while the run's configs name the new one (refinement refuses those)
        state_dict = checkpoint.get("state_dict")
        if isinstance(state_dict, Mapping):
            self.check_schedule_matches(state_dict, "resume checkpoint")
            check_finite(state_dict, "resume checkpoint")

    # ------------------------------------------------------------------------------------------------ forward process
    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Sample ``x_t ~ q(x_t | x_0)``: ``sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise``; ``t`` ``[B]`` integer indices."""
        if noise is None:
            noise = torch.randn_like(x_start)
        return (
            extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape).to(x_start.dtype) * x_start
            + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape).to(x_start.dtype) * noise
        )

    # ------------------------------------------------------------------------------------------------------- training
    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """Raw network output (eps or x0 prediction) for ``x_noisy`` ``[B, C, H, W]`` at timesteps ``t`` ``[B]``."""
        if cond is not None:
            raise ValueError("DDPM is unconditional; use LatentDiffusion for conditioning")
        return self.model(x_noisy, t)

    def sample_training_timesteps(
        self, batch_size: int, device: torch.device, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Timesteps ``[batch_size]`` (long) drawn for a training batch: uniform over :meth:`window`."""
        return draw_window_timesteps(batch_size, *self.window(), device, generator)

    def window(self) -> tuple[int, int]:
        """Timesteps this model is trained on, ``[t_min, t_max)``: ``[0, T)`` (a late-steps model narrows it)."""
        return 0, self.num_timesteps

    def get_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-element loss (``l2``: squared error, ``l1``: absolute error), same shape as ``pred``."""
        if self.loss_type == "l1":
            return (target - pred).abs()
        return F.mse_loss(target, pred, reduction="none")

    def per_sample_loss(
        self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None, cond: Any = None
    ) -> torch.Tensor:
        """L_simple per sample ``[B]``: mean over C, H, W of the loss between prediction and target at ``t``."""
        noise = torch.randn_like(x_start) if noise is None else noise
        x_noisy = self.q_sample(x_start=x_start, t=t, noise=noise)
        model_out = self.apply_model(x_noisy, t, cond)
        target = noise if self.parameterization == "eps" else x_start
        return self.get_loss(model_out.float(), target.float()).mean(dim=(1, 2, 3))

    def p_losses(
        self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training loss for ``x_start`` ``[B, C, H, W]`` at timesteps ``t`` ``[B]``; returns ``(loss, log_dict)``
        (latent-diffusion's signature; LatentDiffusion's is ``p_losses(x_start, cond, t, noise=None)``)."""
        return self._loss_terms(x_start, t, noise, None)

    def _loss_terms(
        self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None, cond: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """What both classes' ``p_losses`` compute (each keeps latent-diffusion's argument order)."""
        prefix = "train" if self.training else "val"
        loss_simple = self.per_sample_loss(x_start, t, noise, cond)
        logvar_t = self.logvar[t]
        loss = loss_simple / torch.exp(logvar_t) + logvar_t
        log = {f"{prefix}/loss_simple": loss_simple.mean()}
        if self.learn_logvar:
            log[f"{prefix}/loss_gamma"] = loss.mean()
            log["logvar"] = self.logvar.data.mean()
        loss = self.l_simple_weight * loss.mean()
        loss_vlb = (self.lvlb_weights[t] * loss_simple).mean()
        log[f"{prefix}/loss_vlb"] = loss_vlb
        loss = loss + self.original_elbo_weight * loss_vlb
        log[f"{prefix}/loss"] = loss
        return loss, log

    def get_input(self, batch: Mapping[str, Any], k: str) -> torch.Tensor:
        """``batch[k]`` as ``[B, C, H, W]`` float on this module's device (datasets yield HWC images, as in LDM)."""
        if k not in batch:
            raise KeyError(f"batch has no key {k!r} (keys: {sorted(batch)}); set first_stage_key to the image key")
        x = torch.as_tensor(batch[k])
        if x.ndim == 3:
            x = x[..., None]
        x = rearrange(x, "b h w c -> b c h w")
        return x.to(device=self.device, dtype=self.dtype, memory_format=torch.contiguous_format)

    def forward(
        self, x: torch.Tensor, *args: Any, generator: torch.Generator | None = None, **kwargs: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss for a clean batch ``x`` ``[B, C, H, W]`` at timesteps from :meth:`sample_training_timesteps`
        (latent-diffusion's ``forward(x, *args, **kwargs)`` -> ``p_losses(x, t, *args, **kwargs)``); with a
        ``generator`` the timesteps and, unless passed, the noise come from it (same seed, same loss)."""
        t = self.sample_training_timesteps(x.shape[0], x.device, generator)
        if generator is not None and not args and "noise" not in kwargs:
            kwargs["noise"] = training_noise(x, generator)
        return self.p_losses(x, t, *args, **kwargs)

    def shared_step(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self(self.get_input(batch, self.first_stage_key))

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        loss, loss_dict = self.shared_step(batch)
        bs = len(next(iter(batch.values())))
        self.log_dict(loss_dict, prog_bar=True, logger=True, on_step=True, on_epoch=True, batch_size=bs)
        self.log("global_step", float(self.global_step), prog_bar=True, logger=True, on_step=True, on_epoch=False)
        if self.use_scheduler:
            self.log("lr_abs", self.optimizers().param_groups[0]["lr"], prog_bar=True, on_step=True, on_epoch=False)
        return loss

    @torch.no_grad()
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        """Loss with training and EMA weights, on noise and timesteps fixed by ``batch_idx`` (comparable across epochs)."""
        bs = len(next(iter(batch.values())))
        _, loss_dict = self._validation_losses(batch, batch_idx)
        with self.ema_scope():
            _, loss_dict_ema = self._validation_losses(batch, batch_idx)
        loss_dict.update({f"{k}_ema": v for k, v in loss_dict_ema.items()})
        self.log_dict(loss_dict, prog_bar=False, logger=True, on_step=False, on_epoch=True, batch_size=bs, sync_dist=True)

    def validation_generator(self, batch_idx: int) -> torch.Generator:
        """CPU generator seeded by the validation batch index (same draws every epoch)."""
        return torch.Generator().manual_seed(1_000_003 * (batch_idx + 1))

    def _validation_losses(self, batch: Mapping[str, Any], batch_idx: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """:meth:`p_losses` on timesteps and noise fixed by ``batch_idx`` (not through :meth:`forward`: a CompVis-style
        subclass's ``forward(x, *args, **kwargs)`` would hand the generator on to ``p_losses``)."""
        x = self.get_input(batch, self.first_stage_key)
        gen = self.validation_generator(batch_idx)
        t = self.sample_training_timesteps(x.shape[0], x.device, gen)
        return self.p_losses(x, t, noise=training_noise(x, gen))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer updates: the diffusion model, and logvar when learned."""
        params = list(self.model.parameters())
        if self.learn_logvar:
            params.append(self.logvar)
        return params

    def configure_optimizers(self):
        """AdamW on :meth:`trainable_parameters`, with an optional LambdaLR step schedule (``scheduler_config``)."""
        opt = torch.optim.AdamW(self.trainable_parameters(), lr=self.learning_rate)
        if not self.use_scheduler:
            return opt
        schedule = instantiate_from_config(self.scheduler_config)
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=schedule.schedule)
        return [opt], [{"scheduler": scheduler, "interval": "step", "frequency": 1}]
