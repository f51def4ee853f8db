"""The first stages, with CompVis' parameter names (``loss.*`` included): VQ autoencoders (``VQModel``,
``VQModelInterface``), the KL-regularised ``AutoencoderKL`` (kl-f4/kl-f8, Stable Diffusion v1's) and
``IdentityFirstStage``."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from einops import rearrange
from taming.modules.vqvae.quantize import VectorQuantizer2 as VectorQuantizer

from ldm.models.autoencoder_training import GANAutoencoder
from ldm.modules.codebook import restart_dead_codes
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.losses.contperceptual import LPIPSWithDiscriminator
from ldm.modules.losses.vqperceptual import VQLPIPSWithDiscriminator
from ldm.sampling.noise import Generators
from ldm.util import ConfigError


class VQModel(GANAutoencoder):
    """VQGAN: ``Encoder`` -> 1x1 ``quant_conv`` -> ``VectorQuantizer2`` -> 1x1 ``post_quant_conv`` -> ``Decoder``.

    Images are ``[B, 3, H, W]`` in [-1, 1]; latents ``[B, embed_dim, H / f, W / f]`` with ``f = 2 ** (len(ch_mult) - 1)``.
    ``dead_code_restart_every: N`` (0 = off, as in CompVis) restarts, every ``N`` batches, the codes no batch of that
    window chose; the window in progress is saved in checkpoints, so a resumed run restarts on time.
    """

    loss_class = VQLPIPSWithDiscriminator
    model_name = "VQModel"
    _load_messages = ("this model", "autoencoder", "is it a VQ checkpoint of this architecture?")

    def __init__(
        self,
        ddconfig: Mapping[str, Any],
        lossconfig: Mapping[str, Any],
        n_embed: int,
        embed_dim: int,
        ckpt_path: str | None = None,
        ignore_keys: Sequence[str] = (),
        image_key: str = "image",
        colorize_nlabels: int | None = None,
        monitor: str | None = None,
        remap: str | None = None,
        sane_index_shape: bool = False,
        beta: float = 0.25,
        unsafe_load: bool = False,
        dead_code_restart_every: int = 0,
        scheduler_config: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        if colorize_nlabels is not None:
            raise ValueError("colorize_nlabels (segmentation inputs) is not supported by this project")
        if isinstance(dead_code_restart_every, bool) or not isinstance(dead_code_restart_every, int):
            raise ConfigError(f"dead_code_restart_every={dead_code_restart_every!r} must be an integer number of batches")
        if dead_code_restart_every < 0 or (dead_code_restart_every and remap is not None):
            raise ConfigError(
                f"dead_code_restart_every={dead_code_restart_every} must be 0 (off) or a positive number of batches, "
                "and is not available with remap (the restarts need the codebook's own indices)"
            )
        self.dead_code_restart_every = dead_code_restart_every
        self.embed_dim = embed_dim
        self.n_embed = n_embed
        self._build_autoencoder(dict(ddconfig), lossconfig, image_key, scheduler_config, monitor)
        self.quantize = VectorQuantizer(n_embed, embed_dim, beta=beta, remap=remap, sane_index_shape=sane_index_shape)
        self.quant_conv = torch.nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = torch.nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        if isinstance(self.loss, VQLPIPSWithDiscriminator):
            self.loss.set_codebook_size(n_embed)
        # not in the state dict (CompVis' keys stay as they are): saved as checkpoint["code_usage"]
        self.register_buffer("code_usage", torch.zeros(n_embed, dtype=torch.long), persistent=False)
        self.code_window_batches = 0  # batches counted into code_usage since the last restart
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys, unsafe=unsafe_load)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """``x`` ``[B, 3, H, W]`` -> ``(quant [B, embed_dim, h, w], codebook_loss, (perplexity, encodings, indices))``."""
        return self.quantize_prequant(self.quant_conv(self.encoder(x)))

    def quantize_prequant(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """taming's ``VectorQuantizer2(h)`` in float32 with autocast off (under bf16-mixed its distance matmul would
        pick other codes than inference does); ``quant`` comes back in ``h``'s dtype."""
        with autocast_off(h.device.type):
            quant, diff, info = self.quantize(h.float())
        return quant.to(h.dtype), diff, info

    def encode_to_prequant(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-quantization latent ``[B, embed_dim, h, w]``."""
        return self.quant_conv(self.encoder(x))

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        """Quantized latent ``[B, embed_dim, h, w]`` -> image ``[B, 3, h * f, w * f]``."""
        return self.decoder(self.post_quant_conv(quant))

    def decode_code(self, code_b: torch.Tensor) -> torch.Tensor:
        """Codebook indices ``[B, h, w]`` (long) -> image ``[B, 3, h * f, w * f]``."""
        b, h, w = code_b.shape
        quant_b = self.quantize.get_codebook_entry(code_b.reshape(-1), (b, h, w, self.embed_dim))
        return self.decode(quant_b)

    def forward(
        self, x: torch.Tensor, return_pred_indices: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruct ``x``: returns ``(xrec, codebook_loss)`` (and the code indices when asked)."""
        quant, diff, (_, _, ind) = self.quantize_prequant(self.encode_to_prequant(x))
        dec = self.decoder(self.post_quant_conv(quant))
        return (dec, diff, ind) if return_pred_indices else (dec, diff)

    # ----------------------------------------------------------------------------------------------------- training
    def _autoencoder_loss(
        self, x: torch.Tensor, split: str, batch_idx: int | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], tuple]:
        xrec, qloss, ind = self(x, return_pred_indices=True)
        aeloss, log = self.loss(
            qloss, x, xrec, 0, self.generator_steps, last_layer=self.get_last_layer(), split=split, predicted_indices=ind
        )
        return aeloss, log, (xrec, qloss, ind)

    def _discriminator_loss(
        self, x: torch.Tensor, state: tuple, step: int, split: str
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        xrec, qloss, _ = state
        return self.loss(qloss, x, xrec.detach(), 1, step, split=split)

    def _after_autoencoder_step(self, x: torch.Tensor, state: tuple, log: dict[str, torch.Tensor]) -> None:
        if self.dead_code_restart_every:
            log["train/codes_restarted"] = self._count_and_restart_codes(x, state[2])

    @torch.no_grad()
    def _count_and_restart_codes(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Add this batch's code counts; after ``dead_code_restart_every`` batches restart the codes no batch chose and
        return how many.  Under DDP the counts are summed over ranks at every batch (so every checkpoint holds the
        window's global counts) and rank 0's restarted codebook is broadcast."""
        counts = torch.bincount(indices.flatten(), minlength=self.n_embed)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        distributed = distributed and torch.distributed.get_world_size() > 1
        if distributed:
            torch.distributed.all_reduce(counts)
        self.code_usage += counts
        self.code_window_batches += 1
        if self.code_window_batches < self.dead_code_restart_every:
            return torch.zeros((), device=self.device)
        candidates = rearrange(self.encode_to_prequant(x), "b c h w -> (b h w) c").float()
        codebook = self.quantize.embedding.weight
        dead = restart_dead_codes(codebook.data, self.code_usage, candidates)
        if distributed:
            torch.distributed.broadcast(codebook.data, src=0)
        self.code_usage.zero_()
        self.code_window_batches = 0
        return torch.full((), float(dead.numel()), device=self.device)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.dead_code_restart_every:
            checkpoint["code_usage"] = self.code_usage.detach().cpu().clone()
            checkpoint["code_window_batches"] = self.code_window_batches

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        usage, batches = checkpoint.get("code_usage"), checkpoint.get("code_window_batches")
        if isinstance(usage, torch.Tensor) and usage.shape == self.code_usage.shape and isinstance(batches, int):
            self.code_usage.copy_(usage)
            self.code_window_batches = max(0, batches)
        else:  # no window saved (restarts just enabled, an older checkpoint): a full window starts here
            self.code_usage.zero_()
            self.code_window_batches = 0

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], N: int = 8, only_inputs: bool = False) -> dict[str, torch.Tensor]:  # noqa: N803
        """``{"inputs", "reconstructions"}``: the first ``N`` images ``[N, 3, H, W]`` in [-1, 1] and their round trip."""
        x = self.get_input(batch, self.image_key)[:N]
        log = {"inputs": x}
        if not only_inputs:
            log["reconstructions"] = self(x)[0]
        return log


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast disabled on ``device_type`` (a null context where autocast does not exist, e.g. the meta device)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def quantize_latent(quantizer: torch.nn.Module, h: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Snap ``h`` ``[B, embed_dim, h, w]`` to the nearest codebook vectors: the ``z_q`` of taming's
    ``VectorQuantizer2(h)[0]`` (same distances, same straight-through form), in ``h``'s dtype.

    taming builds the whole ``[B*h*w, n_embed]`` distance matrix; this takes ``chunk`` latent vectors at a time.
    Distances are in float32 with autocast off: bfloat16 would snap many latent vectors to a different code.
    """
    z = h.permute(0, 2, 3, 1).contiguous()
    flat = z.view(-1, z.shape[-1])
    indices = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
    with autocast_off(h.device.type):
        codebook = quantizer.embedding.weight.float()
        codebook_sq = codebook.pow(2).sum(dim=1)
        for start in range(0, flat.shape[0], chunk):
            part = flat[start : start + chunk].float()
            d = part.pow(2).sum(dim=1, keepdim=True) + codebook_sq - 2 * torch.einsum("bd,dn->bn", part, codebook.t())
            indices[start : start + chunk] = d.argmin(dim=1)
    z_q = quantizer.embedding(indices).view(z.shape).to(z.dtype)
    z_q = z + (z_q - z).detach()
    return z_q.permute(0, 3, 1, 2).contiguous()


class VQModelInterface(VQModel):
    """The first stage as LatentDiffusion uses it: ``encode`` returns the pre-quantization latent and
    ``decode`` quantizes first (unless ``force_not_quantize``)."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """``x`` ``[B, 3, H, W]`` in [-1, 1] -> pre-quantization latent ``[B, embed_dim, H / f, W / f]``."""
        return self.encode_to_prequant(x)

    def decode(self, h: torch.Tensor, force_not_quantize: bool = False) -> torch.Tensor:  # type: ignore[override]
        """Latent ``[B, embed_dim, h, w]`` -> image ``[B, 3, h * f, w * f]``; snaps to the codebook first."""
        quant = h if force_not_quantize else quantize_latent(self.quantize, h)
        return self.decoder(self.post_quant_conv(quant))


class IdentityFirstStage(torch.nn.Module):
    """latent-diffusion's identity first stage: the "latent" is the image itself (``downsampling_factor`` 1), so a
    LatentDiffusion with it is a pixel-space diffusion model.  ``vq_interface`` makes :meth:`quantize` answer as a VQ
    quantizer does (CompVis' argument)."""

    downsampling_factor = 1

    def __init__(self, vq_interface: bool = False):
        super().__init__()
        if not isinstance(vq_interface, bool):
            raise ConfigError(f"vq_interface={vq_interface!r} must be true or false")
        self.vq_interface = vq_interface

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` itself (so are :meth:`encode` and :meth:`decode`)."""
        return x

    encode = decode = forward

    def quantize(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, None, tuple[None, None, None]]:
        """``x`` itself (with ``vq_interface``: ``(x, None, (None, None, None))`` as a VQ quantizer's answer)."""
        return (x, None, (None, None, None)) if self.vq_interface else x


VALIDATION_SEED = 1_000_003  # the posterior samples of validation batch i come from seed (i + 1) * this


class AutoencoderKL(GANAutoencoder):
    """latent-diffusion's ``AutoencoderKL``: images ``[B, 3, H, W]`` in [-1, 1] <-> latents ``[B, embed_dim, H / f, W / f]``
    with ``f = 2 ** (len(ch_mult) - 1)`` (8 for kl-f8), through a diagonal Gaussian posterior (nothing is quantized).
    """

    loss_class = LPIPSWithDiscriminator
    model_name = "AutoencoderKL"
    _load_messages = ("this AutoencoderKL", "AutoencoderKL", "is it a KL autoencoder of this architecture?")
    # latent-diffusion's log names
    aeloss_name = "aeloss"
    discloss_name = "discloss"
    log_dict_on_epoch = False

    def __init__(
        self,
        ddconfig: Mapping[str, Any],
        lossconfig: Mapping[str, Any],
        embed_dim: int,
        ckpt_path: str | None = None,
        ignore_keys: Sequence[str] = (),
        image_key: str = "image",
        colorize_nlabels: int | None = None,
        monitor: str | None = None,
        unsafe_load: bool = False,
        scheduler_config: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        if colorize_nlabels is not None:
            raise ConfigError("colorize_nlabels (segmentation inputs) is not supported by this project; remove it")
        if not ddconfig.get("double_z", True):
            raise ConfigError(
                "AutoencoderKL needs ddconfig.double_z: true (its encoder outputs a mean and a log-variance per latent "
                "channel); double_z: false is a VQ first stage's ddconfig (ldm.models.autoencoder.VQModel)"
            )
        if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim <= 0:
            raise ConfigError(f"embed_dim={embed_dim!r} must be a positive number of latent channels")
        self.embed_dim = embed_dim
        self._build_autoencoder({**dict(ddconfig), "double_z": True}, lossconfig, image_key, scheduler_config, monitor)
        z_channels = self.ddconfig["z_channels"]
        self.quant_conv = torch.nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = torch.nn.Conv2d(embed_dim, z_channels, 1)
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys, unsafe=unsafe_load)

    # ---------------------------------------------------------------------------------------------- the network
    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """``x`` ``[B, 3, H, W]`` in [-1, 1] -> the posterior over latents ``[B, embed_dim, H / f, W / f]``."""
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent ``[B, embed_dim, h, w]`` -> image ``[B, 3, h * f, w * f]`` (nothing is quantized)."""
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self,
        input: torch.Tensor,
        sample_posterior: bool = True,
        generator: Generators = None,  # noqa: A002 (CompVis)
    ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        """Reconstruct ``input`` ``[B, 3, H, W]`` from a posterior sample (from ``generator``; None: the global RNG,
        which main.py reseeds per step) or, with ``sample_posterior=False``, its mean.  Returns ``(xrec, posterior)``."""
        posterior = self.encode(input)
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    # ------------------------------------------------------------------------------------------------- training
    def _autoencoder_loss(
        self, x: torch.Tensor, split: str, batch_idx: int | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], tuple]:
        """Training reconstructs from a posterior sample of the global RNG (main.py reseeds it per step); validation
        from one fixed by ``batch_idx`` (comparable across epochs)."""
        gen = None if batch_idx is None else torch.Generator().manual_seed(VALIDATION_SEED * (batch_idx + 1))
        xrec, posterior = self(x, generator=gen)
        aeloss, log = self.loss(x, xrec, posterior, 0, self.generator_steps, last_layer=self.get_last_layer(), split=split)
        return aeloss, log, (xrec, posterior)

    def _discriminator_loss(
        self, x: torch.Tensor, state: tuple, step: int, split: str
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        xrec, posterior = state
        return self.loss(x, xrec.detach(), posterior, 1, step, split=split)

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], N: int = 8, only_inputs: bool = False) -> dict[str, torch.Tensor]:  # noqa: N803
        """``{"inputs", "reconstructions", "samples"}``, ``[N, 3, H, W]`` in [-1, 1]: the first ``N`` images, their
        round trip through the posterior mean, and decodes of latents drawn from the prior N(0, I) (seed 0)."""
        x = self.get_input(batch, self.image_key)[:N]
        log = {"inputs": x}
        if not only_inputs:
            xrec, posterior = self(x, sample_posterior=False)
            log["reconstructions"] = xrec
            prior = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(0)).to(posterior.mean)
            log["samples"] = self.decode(prior)
        return log
