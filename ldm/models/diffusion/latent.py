"""LatentDiffusion: DDPM in the latent space of a frozen first stage, with optional conditioning (CompVis' import
path: ``ldm.models.diffusion.ddpm``)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from ldm.checkpoint import CheckpointError
from ldm.data.latent_format import CACHED_LATENT_KEY, FIRST_STAGE_SHA_KEY, check_first_stage
from ldm.models.autoencoder import VQModelInterface
from ldm.models.diffusion.base import DDPM, training_noise
from ldm.sampling import NoiseSchedule, build_plan, randn, run_steps
from ldm.sampling.denoisers import ModelDenoiser
from ldm.util import FIRST_STAGE_SENTINEL, UNCONDITIONAL_SENTINEL, instantiate_from_config

logger = logging.getLogger(__name__)

# batch keys whose lists of str go to the cond stage as they are: latent-diffusion's "caption", Stable Diffusion's "txt"
TEXT_COND_KEYS = ("caption", "txt")


def check_ucg_training(ucg_training: Mapping[str, Mapping[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """``{batch key: {"p": float in [0, 1], "val": str}}`` from a ``ucg_training`` config (``val`` missing or null:
    ``""``, as in Stable Diffusion 2); raises ValueError saying what is wrong and what the format is."""
    form = "ucg_training: {caption: {p: 0.1, val: ''}} (batch key -> probability p of replacing it by val)"
    if ucg_training is None:
        return {}
    if not isinstance(ucg_training, Mapping):
        raise ValueError(f"ucg_training={ucg_training!r} must be a mapping; write {form}")
    checked = {}
    for key, entry in ucg_training.items():
        if not isinstance(entry, Mapping) or "p" not in entry or set(entry) - {"p", "val"}:
            raise ValueError(
                f"ucg_training.{key}={entry!r} must be a mapping with p and optionally val (no other keys); write {form}"
            )
        p, val = entry["p"], entry.get("val")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"ucg_training.{key}.p={p!r} must be a probability in [0, 1]; write {form}")
        if val is not None and not isinstance(val, str):
            raise ValueError(
                f"ucg_training.{key}.val={val!r} must be a string (the caption that stands for 'no "
                f"caption', usually ''); write {form}"
            )
        checked[str(key)] = {"p": float(p), "val": "" if val is None else val}
    return checked


def drop_captions(captions: Sequence[str], p: float, val: str, generator: torch.Generator | None = None) -> list[str]:
    """Caption dropout for classifier-free guidance: each caption is replaced by ``val`` with probability ``p`` (one
    uniform draw in ``[0, 1)`` per caption from ``generator``, a CPU generator, or the global one when None)."""
    draws = torch.rand(len(captions), generator=generator, dtype=torch.float64)
    return [val if float(u) < p else text for text, u in zip(captions, draws)]


def text_batch(values: Any, key: str) -> list[str]:
    """``batch[key]`` as a list of str (what the default collate makes of per-item strings); TypeError otherwise."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not all(isinstance(v, str) for v in values):
        raise TypeError(
            f"batch[{key!r}] must be a list of str (one caption per item, as the datasets' default collate "
            f"gives), got {type(values).__name__}"
        )
    return list(values)


class LatentDiffusion(DDPM):
    """Latent diffusion (Rombach et al.): the UNet denoises ``z = scale_factor * E(x)`` of a frozen first stage.

    CompVis' arguments; ``cond_stage_key: "class_label"`` passes the whole batch, ``caption`` / ``txt`` its list of str.
    ``scale_by_std`` sets ``scale_factor = 1 / std(z)`` from the first training batch.  ``ucg_training``
    ``{batch key: {p, val}}``: in training, each item's value becomes ``val`` with probability ``p``, so one model
    learns the conditional and unconditional predictions that classifier-free guidance combines.
    """

    def __init__(
        self,
        first_stage_config: Mapping[str, Any],
        cond_stage_config: Mapping[str, Any] | str,
        num_timesteps_cond: int | None = None,
        cond_stage_key: str = "image",
        cond_stage_trainable: bool = False,
        concat_mode: bool = True,
        cond_stage_forward: str | None = None,
        conditioning_key: str | None = None,
        scale_factor: float = 1.0,
        scale_by_std: bool = False,
        ckpt_path: str | None = None,
        ignore_keys: Sequence[str] = (),
        ucg_training: Mapping[str, Mapping[str, Any]] | None = None,
        **ddpm_kwargs: Any,
    ):
        self.num_timesteps_cond = 1 if num_timesteps_cond is None else num_timesteps_cond
        if self.num_timesteps_cond != 1:
            raise ValueError(
                f"num_timesteps_cond={num_timesteps_cond} is not supported (only 1: conditioning at every timestep)"
            )
        if conditioning_key is None:
            conditioning_key = "concat" if concat_mode else "crossattn"
        if cond_stage_config == UNCONDITIONAL_SENTINEL:
            conditioning_key = None
        load_only_unet = ddpm_kwargs.pop("load_only_unet", False)
        self.ucg_training = check_ucg_training(ucg_training)
        if self.ucg_training and conditioning_key is None:
            raise ValueError(
                "ucg_training drops the captions of a text-conditioned model, but this one is unconditional "
                "(cond_stage_config: __is_unconditional__); remove ucg_training or configure a cond stage"
            )
        super().__init__(conditioning_key=conditioning_key, **ddpm_kwargs)
        self.concat_mode = concat_mode
        self.cond_stage_trainable = cond_stage_trainable
        self.cond_stage_key = cond_stage_key
        self.scale_by_std = scale_by_std
        if scale_by_std:
            self.register_buffer("scale_factor", torch.tensor(float(scale_factor)))
        else:
            self.scale_factor = float(scale_factor)
        self.instantiate_first_stage(first_stage_config)
        self.instantiate_cond_stage(cond_stage_config)
        self.cond_stage_forward = cond_stage_forward
        self.clip_denoised = False
        self.restarted_from_ckpt = False
        if ckpt_path is not None:
            missing, _ = self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys, only_model=load_only_unet)
            self.restarted_from_ckpt = True
            if scale_by_std and (load_only_unet or "scale_factor" in missing):
                # as in latent-diffusion, a restarted model never estimates its scale: say which one it keeps
                logger.warning(
                    "scale_by_std: %s records no scale_factor (its model used a fixed one, or only its UNet is loaded); "
                    "keeping scale_factor=%g from the config. If its UNet was trained on latents scaled otherwise "
                    "(Stable Diffusion: 0.18215), set model.params.scale_factor to that value",
                    ckpt_path,
                    float(self.scale_factor),
                )

    # ---------------------------------------------------------------------------------------------------- sub-models
    def instantiate_first_stage(self, config: Mapping[str, Any]) -> None:
        """Build the first stage, frozen (no grad) and in eval mode for the whole run."""
        self.first_stage_model = instantiate_from_config(config).eval().requires_grad_(False)

    def instantiate_cond_stage(self, config: Mapping[str, Any] | str) -> None:
        """Build the conditioning encoder (or reuse the first stage / none, by sentinel)."""
        if config == FIRST_STAGE_SENTINEL:
            logger.info("using the first stage also as the conditioning stage")
            self.cond_stage_model = self.first_stage_model
        elif config == UNCONDITIONAL_SENTINEL:
            logger.info("training an unconditional model")
            self.cond_stage_model = None
        else:
            model = instantiate_from_config(config)
            self.cond_stage_model = model if self.cond_stage_trainable else model.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> LatentDiffusion:
        """Switch train/eval mode; the first stage (and a frozen cond stage) always stay in eval mode."""
        super().train(mode)
        self.first_stage_model.eval()
        if isinstance(self.cond_stage_model, nn.Module) and not self.cond_stage_trainable:
            self.cond_stage_model.eval()
        return self

    @property
    def downsampling_factor(self) -> int:
        """Image pixels per latent pixel along each side (4 for VQ-f4)."""
        return int(getattr(self.first_stage_model, "downsampling_factor", 1))

    # -------------------------------------------------------------------------------------------------- first stage
    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor) -> torch.Tensor:
        """Image ``[B, 3, H, W]`` in [-1, 1] -> unscaled latent ``[B, C, H / f, W / f]`` (or the encoder's
        distribution for a KL first stage)."""
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, encoder_posterior: Any) -> torch.Tensor:
        """Scaled latent ``scale_factor * z`` from the first stage's output (a tensor, or a distribution's sample)."""
        if isinstance(encoder_posterior, torch.Tensor):
            z = encoder_posterior
        elif hasattr(encoder_posterior, "sample"):
            z = encoder_posterior.sample()
        else:
            raise TypeError(f"encoder output of type {type(encoder_posterior).__name__} is not supported")
        return self.scale_factor * z

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor, predict_cids: bool = False, force_not_quantize: bool = False) -> torch.Tensor:
        """Scaled latent ``[B, C, h, w]`` -> image ``[B, 3, h * f, w * f]`` (a VQ first stage snaps to its codebook
        unless ``force_not_quantize``)."""
        z = z / self.scale_factor
        if not isinstance(self.first_stage_model, VQModelInterface):
            return self.first_stage_model.decode(z)
        return self.first_stage_model.decode(z, force_not_quantize=predict_cids or force_not_quantize)

    def check_schedule_matches(self, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
        """As :meth:`DDPM.check_schedule_matches`, and the latent scale: a checkpoint trained with ``scale_by_std``
        carries its ``scale_factor``; a model with a fixed, different ``scale_factor`` would feed its UNet latents of
        the wrong scale, so that is refused too (a ``scale_by_std`` model adopts the checkpoint's value)."""
        super().check_schedule_matches(state_dict, source)
        if "scale_factor" not in state_dict or self.scale_by_std:
            return
        theirs, ours = float(state_dict["scale_factor"]), float(self.scale_factor)
        if abs(theirs - ours) > 1e-6 * max(abs(theirs), 1.0):
            raise CheckpointError(
                f"{source}: its UNet was trained on latents scaled by scale_factor={theirs:.6g} (scale_by_std), this "
                f"model uses scale_factor={ours:.6g}; set model.params.scale_factor={theirs:.6g} (or scale_by_std: true)"
            )

    # ------------------------------------------------------------------------------- cached latents (training at scale)
    def cached_first_stage_encoding(self, batch: Mapping[str, Any], bs: int | None = None) -> torch.Tensor | None:
        """``scale_factor * z`` ``[B, C, h, w]`` (module dtype and device) from a batch of cached latents (the unscaled
        latent under ``"cached_latent"``, its first stage's sha256 under ``"first_stage_sha256"``), or None for a batch
        without them; latents of another first stage raise :class:`~ldm.data.latent_format.FirstStageMismatchError`."""
        if CACHED_LATENT_KEY not in batch:
            return None
        check_first_stage(batch[FIRST_STAGE_SHA_KEY], self.first_stage_model)
        z = torch.as_tensor(batch[CACHED_LATENT_KEY])
        if bs is not None:
            z = z[:bs]
        z = z.to(device=self.device, dtype=self.dtype, memory_format=torch.contiguous_format)
        return self.get_first_stage_encoding(z).detach().to(self.dtype)

    def on_train_batch_start(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        """With ``scale_by_std``: set ``scale_factor = 1 / std(z)`` from the very first batch (rank 0's, broadcast)."""
        first = self.global_step == 0 and batch_idx == 0 and not self.restarted_from_ckpt
        if not (self.scale_by_std and first) or float(self.scale_factor) != 1.0:  # != 1: already set (resumed, loaded)
            return
        z = self.cached_first_stage_encoding(batch)
        if z is None:
            x = super().get_input(batch, self.first_stage_key)
            z = self.get_first_stage_encoding(self.encode_first_stage(x)).detach()
        std = z.flatten().float().std()
        if self._trainer is not None and self._trainer.world_size > 1:
            # a CPU tensor: a pickled CUDA tensor would be unpickled on cuda:0 on every rank
            std = self.trainer.strategy.broadcast(std.cpu(), src=0)
        self.scale_factor.fill_(1.0 / float(std))
        logger.info("scale_by_std: scale_factor set to %.6f", float(self.scale_factor))

    # -------------------------------------------------------------------------------------------------- conditioning
    def get_learned_conditioning(self, c: Any) -> Any:
        """Encode raw conditioning ``c`` with the cond stage."""
        if self.cond_stage_model is None:
            raise ValueError("this model is unconditional (cond_stage_config: __is_unconditional__); pass cond=None")
        if self.cond_stage_forward is not None:
            return getattr(self.cond_stage_model, self.cond_stage_forward)(c)
        if callable(getattr(self.cond_stage_model, "encode", None)):
            c = self.cond_stage_model.encode(c)
            return c if isinstance(c, torch.Tensor) else c.mode()  # a distribution (KL first stage): its mode
        return self.cond_stage_model(c)

    def get_input(  # type: ignore[override]
        self,
        batch: Mapping[str, Any],
        k: str,
        return_first_stage_outputs: bool = False,
        force_c_encode: bool = False,
        cond_key: str | None = None,
        return_original_cond: bool = False,
        bs: int | None = None,
    ) -> list[Any]:
        """``[z, c]`` (plus ``x, xrec`` and the raw conditioning when asked) for a batch, as in latent-diffusion; a
        batch of cached latents holds no image, so its reconstruction stands in for ``x``."""
        x = None
        z = self.cached_first_stage_encoding(batch, bs)
        if z is None:
            x = super().get_input(batch, k)
            if bs is not None:
                x = x[:bs]
            # in the module's dtype: under bf16 autocast (bf16-mixed) the encoder returns bfloat16, and noising a bf16
            # latent (and regressing bf16-rounded noise) loses a large share of the signal at small t
            z = self.get_first_stage_encoding(self.encode_first_stage(x)).detach().to(self.dtype)
        xc = c = None
        if self.model.conditioning_key is not None:
            cond_key = cond_key or self.cond_stage_key
            if cond_key == self.first_stage_key:
                if x is None:
                    raise ValueError(
                        f"cond_stage_key={cond_key!r} conditions on the image, which a batch of cached "
                        "latents does not hold; train this model from images"
                    )
                xc = x
            elif cond_key == "class_label":
                xc = batch
            elif cond_key in TEXT_COND_KEYS:
                if cond_key not in batch:
                    raise KeyError(
                        f"batch has no key {cond_key!r} (keys: {sorted(batch)}); cond_stage_key={cond_key!r} "
                        "needs a dataset with captions, e.g. ImageFolderDataset(captions='required')"
                    )
                xc = text_batch(batch[cond_key], cond_key)
                if bs is not None:
                    xc = xc[:bs]  # before encoding: only the captions used are encoded
            else:
                xc = super().get_input(batch, cond_key)
            c = self.get_learned_conditioning(xc) if (not self.cond_stage_trainable or force_c_encode) else xc
            if isinstance(c, torch.Tensor):
                c = c.to(self.device)
            if bs is not None and isinstance(c, (torch.Tensor, list)):
                c = c[:bs]
        out: list[Any] = [z, c]
        if return_first_stage_outputs:
            xrec = self.decode_first_stage(z)
            out.extend([xrec if x is None else x, xrec])
        if return_original_cond:
            out.append(xc)
        return out

    def shared_step(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, c = self.get_input(batch, self.first_stage_key)
        return self(x, c)

    def apply_ucg(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> Mapping[str, Any]:
        """``batch`` with ``ucg_training``'s caption dropout applied (a new dict), in training mode only; draws come from
        ``generator``, else the global RNG, which ``main.py`` reseeds per step (a resumed run drops the same captions)."""
        if not self.training or not self.ucg_training:
            return batch
        out = dict(batch)
        for key, entry in self.ucg_training.items():
            if key not in out:
                raise KeyError(
                    f"ucg_training drops batch[{key!r}], but the batch has no such key (keys: {sorted(out)}); "
                    "use the cond_stage_key (usually caption) as ucg_training's key"
                )
            out[key] = drop_captions(text_batch(out[key], key), entry["p"], entry["val"], generator)
        return out

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        """DDPM's training step on the batch after caption dropout (:meth:`apply_ucg`; SD2 applies it here too)."""
        return super().training_step(self.apply_ucg(batch), batch_idx)

    def forward(
        self, x: torch.Tensor, c: Any, *args: Any, generator: torch.Generator | None = None, **kwargs: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss for a clean latent batch ``x`` ``[B, C, h, w]`` with conditioning ``c``; as :meth:`DDPM.forward`."""
        t = self.sample_training_timesteps(x.shape[0], x.device, generator)
        c = self.training_conditioning(c)
        if generator is not None and not args and "noise" not in kwargs:
            kwargs["noise"] = training_noise(x, generator)
        return self.p_losses(x, c, t, *args, **kwargs)

    def p_losses(  # type: ignore[override]
        self, x_start: torch.Tensor, cond: Any, t: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training loss for latents ``x_start`` ``[B, C, h, w]`` with conditioning ``cond`` at timesteps ``t`` ``[B]``;
        returns ``(loss, log_dict)`` (latent-diffusion's signature)."""
        return self._loss_terms(x_start, t, noise, cond)

    def _validation_losses(self, batch: Mapping[str, Any], batch_idx: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z, c = self.get_input(batch, self.first_stage_key)
        gen = self.validation_generator(batch_idx)
        t = self.sample_training_timesteps(z.shape[0], z.device, gen)
        return self.p_losses(z, self.training_conditioning(c), t, noise=training_noise(z, gen))

    def training_conditioning(self, c: Any) -> Any:
        """``c`` from :meth:`get_input` as the UNet takes it in a loss: encoded here when the cond stage trains with the
        model (``cond_stage_trainable``; :meth:`get_input` left it raw so that its gradient flows), else unchanged."""
        if self.model.conditioning_key is not None and self.cond_stage_trainable:
            return self.get_learned_conditioning(c)
        return c

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """Network output for latents ``x_noisy`` ``[B, C, h, w]`` at ``t`` ``[B]``; ``cond`` is a tensor, a list of
        tensors or a dict ``{c_concat: [...], c_crossattn: [...]}``."""
        if self.model.conditioning_key is None:
            if cond is not None:
                raise ValueError("this model is unconditional; pass cond=None")
            return self.model(x_noisy, t)
        if not isinstance(cond, dict):
            key = "c_concat" if self.model.conditioning_key == "concat" else "c_crossattn"
            cond = {key: cond if isinstance(cond, list) else [cond]}
        return self.model(x_noisy, t, **cond)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The UNet (and logvar when learned), plus a trainable cond stage."""
        params = super().trainable_parameters()
        if self.cond_stage_trainable:
            params += list(self.cond_stage_model.parameters())
        return params

    # ------------------------------------------------------------------------------------------------------- images
    @torch.no_grad()
    def log_images(
        self,
        batch: Mapping[str, Any],
        N: int = 8,  # noqa: N803 (CompVis name)
        sample: bool = True,
        ddim_steps: int = 50,
        ddim_eta: float = 0.0,
        plot_diffusion_rows: bool = True,
        n_diffusion_rows: int = 5,
        seed: int = 0,
    ) -> dict[str, torch.Tensor]:
        """Images ``[N, 3, H, W]`` in [-1, 1]: inputs, first-stage reconstruction, the forward-diffusion row and
        DDIM samples from pure noise (EMA weights)."""
        z, c, x, xrec = self.get_input(batch, self.first_stage_key, return_first_stage_outputs=True, bs=N)
        log: dict[str, torch.Tensor] = {"inputs": x, "reconstruction": xrec}
        gen = torch.Generator().manual_seed(seed)
        if plot_diffusion_rows:
            ts = torch.linspace(0, self.num_timesteps - 1, n_diffusion_rows).long()
            noise = torch.randn(z[:1].shape, generator=gen).to(z)
            row = [self.decode_first_stage(self.q_sample(z[:1], t.repeat(1).to(z.device), noise)) for t in ts]
            log["diffusion_row"] = torch.cat(row)
        if sample:
            plan = build_plan(NoiseSchedule.from_model(self), self.num_timesteps - 1, [ModelDenoiser(self)], z.device,
                              ddim_steps=ddim_steps, eta=ddim_eta)  # fmt: skip
            with self.ema_scope("log_images"):
                samples, _ = run_steps(plan, randn(tuple(z.shape), z, gen), generators=gen, cond=c)
            log["samples"] = self.decode_first_stage(samples)
        return log
