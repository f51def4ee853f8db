"""The VQ first stage: diffusers ``VQModel`` config <-> CompVis ``VQModelInterface`` parameters, and the key map
(README, "diffusers interop").  :class:`CoderLayout` also serves the KL autoencoder of :mod:`ldm.convert.sd_map`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from ldm.convert.common import (
    MAX_CHANNELS,
    MAX_CODES,
    MAX_LAYERS,
    DiffusersFormatError,
    Options,
    ParamMap,
    conv_pair,
    linear_from_conv1x1,
    refusal,
)

VQ_CLASS = "VQModel"
VQ_TARGET = "ldm.models.autoencoder.VQModelInterface"
# the encoder's and decoder's defaults in diffusers 0.42, VQModel's and AutoencoderKL's alike
CODER_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"],
    "block_out_channels": [64],
    "layers_per_block": 1,
    "act_fn": "silu",
    "sample_size": 32,
    "norm_num_groups": 32,
    "mid_block_add_attention": True,
}
# VQModel.__init__ defaults of diffusers 0.42 (used for keys a config.json leaves out); scaling_factor is handled apart
VQ_DEFAULTS: dict[str, Any] = {
    **CODER_DEFAULTS,
    "latent_channels": 3,
    "num_vq_embeddings": 256,
    "vq_embed_dim": None,
    "norm_type": "group",
    "lookup_from_codebook": False,
    "force_upcast": False,
}
DOWN_TYPES = ("DownEncoderBlock2D", "AttnDownEncoderBlock2D")
UP_TYPES = ("UpDecoderBlock2D", "AttnUpDecoderBlock2D")


@dataclass(frozen=True)
class CoderLayout:
    """The CompVis ``Encoder`` / ``Decoder`` of a VQ or KL first stage (``ch_mult[0] == 1``: diffusers' first block
    keeps ``conv_in``'s width).  ``attention``: per level, self-attention in its blocks; ``mid_attention``: in the mid
    blocks; ``resolution``: the image side of ``attn_resolutions = resolution // 2**level``.
    """

    in_channels: int
    out_channels: int
    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attention: tuple[bool, ...]
    mid_attention: bool
    resolution: int

    def ldm_coder(self, z_channels: int, double_z: bool) -> dict[str, Any]:
        return {
            "double_z": double_z,
            "z_channels": z_channels,
            "resolution": self.resolution,
            "in_channels": self.in_channels,
            "out_ch": self.out_channels,
            "ch": self.ch,
            "ch_mult": list(self.ch_mult),
            "num_res_blocks": self.num_res_blocks,
            "attn_resolutions": [self.resolution // 2**i for i, a in enumerate(self.attention) if a],
            "dropout": 0.0,
            "attn_type": "vanilla" if self.mid_attention else "none",
        }

    def diffusers_coder(self) -> dict[str, Any]:
        levels = range(len(self.ch_mult))
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": [DOWN_TYPES[self.attention[i]] for i in levels],
            "up_block_types": [UP_TYPES[self.attention[i]] for i in reversed(levels)],
            "block_out_channels": [self.ch * m for m in self.ch_mult],
            "layers_per_block": self.num_res_blocks,
            "sample_size": self.resolution,
            "mid_block_add_attention": self.mid_attention,
        }

    def coder_maps(self, between: list[ParamMap]) -> list[ParamMap]:
        """``encoder.*`` and ``decoder.*`` tensors with ``between`` (``quant_conv``, ...) in the middle."""
        ch, ch_mult, attention = self.ch, self.ch_mult, self.attention
        last = len(ch_mult) - 1
        maps = conv_pair("encoder.conv_in", "encoder.conv_in")
        block_in = ch
        for level in range(last + 1):
            out = ch * ch_mult[level]
            for j in range(self.num_res_blocks):
                maps += _resnet(f"encoder.down.{level}.block.{j}", f"encoder.down_blocks.{level}.resnets.{j}", block_in != out)
                block_in = out
                if attention[level]:
                    maps += _attention(f"encoder.down.{level}.attn.{j}", f"encoder.down_blocks.{level}.attentions.{j}")
            if level != last:
                maps += conv_pair(f"encoder.down.{level}.downsample.conv", f"encoder.down_blocks.{level}.downsamplers.0.conv")
        maps += _mid("encoder", self.mid_attention) + conv_pair("encoder.norm_out", "encoder.conv_norm_out")
        maps += conv_pair("encoder.conv_out", "encoder.conv_out")
        maps += between + conv_pair("decoder.conv_in", "decoder.conv_in")
        maps += _mid("decoder", self.mid_attention)
        for k, level in enumerate(reversed(range(last + 1))):  # diffusers numbers the decoder's levels from the bottom
            out = ch * ch_mult[level]
            for j in range(self.num_res_blocks + 1):
                maps += _resnet(f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{k}.resnets.{j}", block_in != out)
                block_in = out
                if attention[level]:
                    maps += _attention(f"decoder.up.{level}.attn.{j}", f"decoder.up_blocks.{k}.attentions.{j}")
            if level:
                maps += conv_pair(f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{k}.upsamplers.0.conv")
        return maps + conv_pair("decoder.norm_out", "decoder.conv_norm_out") + conv_pair("decoder.conv_out", "decoder.conv_out")


@dataclass(frozen=True)
class VQLayout(CoderLayout):
    """A VQ first stage: ``z_channels`` leave the encoder; ``embed_dim`` (``quant_conv``'s output) is the codebook's
    and the latent's width; ``n_embed`` the codebook size."""

    z_channels: int
    embed_dim: int
    n_embed: int

    def ldm_params(self) -> dict[str, Any]:
        """``first_stage_config.params`` (frozen: ``torch.nn.Identity`` loss)."""
        return {
            "embed_dim": self.embed_dim,
            "n_embed": self.n_embed,
            "ddconfig": self.ldm_coder(self.z_channels, double_z=False),
            "lossconfig": {"target": "torch.nn.Identity"},
        }

    def diffusers_config(self, scaling_factor: float) -> dict[str, Any]:
        """``vqvae/config.json`` of the equivalent ``VQModel``, every option written out."""
        return {
            **VQ_DEFAULTS,
            **self.diffusers_coder(),
            "_class_name": VQ_CLASS,
            "latent_channels": self.z_channels,
            "num_vq_embeddings": self.n_embed,
            "vq_embed_dim": self.embed_dim,
            "scaling_factor": scaling_factor,
        }

    def param_maps(self) -> list[ParamMap]:
        between = conv_pair("quant_conv", "quant_conv") + conv_pair("quantize.embedding", "quantize.embedding", bias=False)
        return self.coder_maps(between + conv_pair("post_quant_conv", "post_quant_conv"))


def _mid(part: str, mid_attention: bool) -> list[ParamMap]:
    maps = _resnet(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", False)
    if mid_attention:
        maps += _attention(f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0")
    return maps + _resnet(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", False)


def _resnet(ldm: str, diffusers: str, has_shortcut: bool) -> list[ParamMap]:
    maps = [m for n in ("norm1", "conv1", "norm2", "conv2") for m in conv_pair(f"{ldm}.{n}", f"{diffusers}.{n}")]
    if has_shortcut:
        maps += conv_pair(f"{ldm}.nin_shortcut", f"{diffusers}.conv_shortcut")
    return maps


def _attention(ldm: str, diffusers: str) -> list[ParamMap]:
    maps = conv_pair(f"{ldm}.norm", f"{diffusers}.group_norm")
    for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
        maps += linear_from_conv1x1(f"{ldm}.{a}", f"{diffusers}.{b}")
    return maps


# ----------------------------------------------------------------------------------------------------- from diffusers
def vq_layout_from_config(data: Mapping[str, Any], source: str) -> VQLayout:
    """Validate a ``VQModel`` config (untrusted JSON; ``scaling_factor`` is read elsewhere); a ``DiffusersFormatError``
    names the first option this project cannot represent, or a bad value."""
    cls = data.get("_class_name", VQ_CLASS)
    if cls != VQ_CLASS:
        why = (
            "a KL autoencoder (Stable Diffusion's VAE)"
            if cls in ("AutoencoderKL", "AsymmetricAutoencoderKL")
            else "not a VQ autoencoder"
        )
        raise DiffusersFormatError(
            f"{source}: _class_name={cls!r} is {why}; this project's first stage is a VQ autoencoder (diffusers VQModel)"
        )
    opt = Options(data, source, VQ_DEFAULTS)
    opt.choice("norm_type", ["group"], "spatially-normalized decoders (MoVQ) are not supported")
    opt.flag("lookup_from_codebook")
    coder = coder_from_options(opt)
    z_channels = opt.integer("latent_channels", 1, MAX_CHANNELS)
    embed_dim = z_channels if opt.get("vq_embed_dim") is None else opt.integer("vq_embed_dim", 1, MAX_CHANNELS)
    layout = VQLayout(
        **coder, z_channels=z_channels, embed_dim=embed_dim, n_embed=opt.integer("num_vq_embeddings", 1, MAX_CODES)
    )
    opt.finish()
    return layout


def coder_from_options(opt: Options) -> dict[str, Any]:
    opt.flag("force_upcast")
    opt.ignore("scaling_factor")
    opt.choice("norm_num_groups", [32], "CompVis' first stage normalizes with 32 groups")
    opt.choice("act_fn", ["silu", "swish"])
    widths, attention = opt.levels(
        DOWN_TYPES,
        UP_TYPES,
        ("CompVis' encoder has ResNet (+ attention) levels", "CompVis' decoder has ResNet (+ attention) levels"),
        "CompVis' encoder and decoder share attn_resolutions",
        "ch * ch_mult",
    )
    mid_attention = opt.flag("mid_block_add_attention")
    if any(attention) and not mid_attention:
        raise opt.fail(
            "mid_block_add_attention",
            False,
            "with attention blocks is not supported (CompVis' attn_type 'none' removes every attention block)",
        )
    resolution = opt.side("sample_size") or opt.defaults["sample_size"]  # sample_size: null
    if any(attention) and resolution % 2 ** (len(widths) - 1):
        raise opt.fail(
            "sample_size",
            resolution,
            f"must be a multiple of {2 ** (len(widths) - 1)} to place the attention levels (CompVis' attn_resolutions)",
        )
    return {
        "in_channels": opt.integer("in_channels", 1, MAX_CHANNELS),
        "out_channels": opt.integer("out_channels", 1, MAX_CHANNELS),
        "ch": widths[0],
        "ch_mult": tuple(w // widths[0] for w in widths),
        "num_res_blocks": opt.integer("layers_per_block", 1, MAX_LAYERS),
        "attention": attention,
        "mid_attention": mid_attention,
        "resolution": resolution,
    }


# ---------------------------------------------------------------------------------------------------- from a model
def vq_layout_from_model(first_stage: nn.Module) -> VQLayout:
    """The layout of this project's VQ first stage; refuses what diffusers' ``VQModel`` cannot hold."""
    from ldm.models.autoencoder import VQModel

    refuse = refusal("first stage", "VQModel")
    if not isinstance(first_stage, VQModel):
        raise refuse(f"it is a {type(first_stage).__name__}, not a VQ autoencoder (ldm.models.autoencoder.VQModel)")
    if getattr(first_stage.quantize, "remap", None) is not None:
        raise refuse("a remapped codebook (remap=...) is not supported")
    dd = first_stage.ddconfig
    if dd.get("double_z", True):
        raise refuse(f"ddconfig double_z={dd.get('double_z', True)}: need double_z false")
    return VQLayout(
        **coder_from_model(first_stage, refuse),
        z_channels=int(dd["z_channels"]),
        embed_dim=int(first_stage.embed_dim),
        n_embed=int(first_stage.n_embed),
    )


def coder_from_model(first_stage: nn.Module, refuse: Callable[[str], DiffusersFormatError]) -> dict[str, Any]:
    """The :class:`CoderLayout` fields of a CompVis first stage; ``refuse(what)`` makes the error."""
    dd = first_stage.ddconfig
    if tuple(dd["ch_mult"])[0] != 1:
        raise refuse(f"ddconfig ch_mult={list(dd['ch_mult'])} must start with 1")
    if not dd.get("resamp_with_conv", True) or dd.get("tanh_out", False) or dd.get("give_pre_end", False):
        raise refuse("resamp_with_conv=False, tanh_out or give_pre_end are not supported")
    encoder, decoder = first_stage.encoder, first_stage.decoder
    attention = tuple(len(d.attn) > 0 for d in encoder.down)
    if tuple(len(u.attn) > 0 for u in decoder.up) != attention:
        raise refuse(
            f"attn_resolutions={list(dd['attn_resolutions'])} put encoder and decoder attention at different "
            f"levels (resolution={dd['resolution']} is not a multiple of 2**(levels-1))"
        )
    return {
        "in_channels": int(dd["in_channels"]),
        "out_channels": int(dd["out_ch"]),
        "ch": int(dd["ch"]),
        "ch_mult": tuple(int(m) for m in dd["ch_mult"]),
        "num_res_blocks": int(dd["num_res_blocks"]),
        "attention": attention,
        "mid_attention": not isinstance(encoder.mid.attn_1, nn.Identity),
        "resolution": int(dd["resolution"]),
    }
