"""The UNet: diffusers ``UNet2DModel`` config <-> CompVis ``UNetModel`` parameters, and the key map (README,
"diffusers interop").  The skeleton also serves the cross-attention UNet of :mod:`ldm.convert.sd_map`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from ldm.checkpoint import is_int
from ldm.convert.common import (
    MAX_CHANNELS,
    MAX_LAYERS,
    MAX_TIMESTEPS,
    DiffusersFormatError,
    Options,
    ParamMap,
    conv_pair,
    linear_from_conv1x1,
    refusal,
)

UNET_CLASS = "UNet2DModel"
UNET_TARGET = "ldm.modules.diffusionmodules.openaimodel.UNetModel"
# the UNet2DModel.__init__ defaults of diffusers 0.42 that UNet2DConditionModel shares
UNET_COMMON_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "class_embed_type": None,
    "num_class_embeds": None,
}
# UNet2DModel.__init__ defaults of diffusers 0.42 (used for keys a config.json leaves out)
UNET_DEFAULTS: dict[str, Any] = {
    **UNET_COMMON_DEFAULTS,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896],
    "downsample_type": "conv",
    "upsample_type": "conv",
    "attn_norm_num_groups": None,
    "add_attention": True,
    "num_train_timesteps": None,
}
DOWN_TYPES = ("DownBlock2D", "AttnDownBlock2D")
UP_TYPES = ("UpBlock2D", "AttnUpBlock2D")
# a window expert's [t_min, t_max) in unet/config.json (diffusers passes "_" keys to no constructor)
WINDOW_KEY = "_latesteps_window"


@dataclass(frozen=True)
class UNetLayout:
    """An unconditional LDM UNet in CompVis' names (``channel_mult[0] == 1``).  ``attention``: per level, whether its
    blocks have self-attention; ``head_channels``: channels per head (None: one head); ``scale_shift``:
    ``use_scale_shift_norm``; ``image_size``: latent side (metadata); ``new_attention_order``: the ``qkv`` row order.
    """

    in_channels: int
    out_channels: int
    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attention: tuple[bool, ...]
    head_channels: int | None
    scale_shift: bool
    image_size: int
    dropout: float = 0.0
    new_attention_order: bool = False

    def channels(self, level: int) -> int:
        return self.model_channels * self.channel_mult[level]

    def ldm_params(self) -> dict[str, Any]:
        """``unet_config.params`` of this project's ``UNetModel``."""
        return {
            "image_size": self.image_size,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "model_channels": self.model_channels,
            "attention_resolutions": [2**i for i, a in enumerate(self.attention) if a],
            "num_res_blocks": self.num_res_blocks,
            "channel_mult": list(self.channel_mult),
            "dropout": self.dropout,
            "use_scale_shift_norm": self.scale_shift,
            **self.ldm_attention(),
        }

    def ldm_attention(self) -> dict[str, Any]:
        heads = {"num_heads": 1} if self.head_channels is None else {"num_head_channels": self.head_channels}
        return {"use_new_attention_order": self.new_attention_order, **heads}

    def diffusers_levels(self, down_types: tuple[str, str], up_types: tuple[str, str]) -> dict[str, Any]:
        """A diffusers UNet config's sizes and levels (``*_types``: plain, attention block names)."""
        levels = range(len(self.channel_mult))
        return {
            "sample_size": self.image_size,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": [down_types[self.attention[i]] for i in levels],
            "up_block_types": [up_types[self.attention[i]] for i in reversed(levels)],
            "block_out_channels": [self.channels(i) for i in levels],
            "layers_per_block": self.num_res_blocks,
            "dropout": self.dropout,
        }

    def diffusers_config(self) -> dict[str, Any]:
        """``unet/config.json`` of the equivalent ``UNet2DModel``, every option written out."""
        return {
            **UNET_DEFAULTS,
            **self.diffusers_levels(DOWN_TYPES, UP_TYPES),
            "_class_name": UNET_CLASS,
            "attention_head_dim": self.head_channels,
            "attn_norm_num_groups": 32,
            "resnet_time_scale_shift": "scale_shift" if self.scale_shift else "default",
        }

    # ------------------------------------------------------------------------------------------------------ key map
    def param_maps(self) -> list[ParamMap]:
        """Every UNet tensor: LDM key (inside ``UNetModel``) <-> diffusers key(s) (inside ``UNet2DModel``)."""
        maps = conv_pair("input_blocks.0.0", "conv_in")
        maps += conv_pair("time_embed.0", "time_embedding.linear_1") + conv_pair("time_embed.2", "time_embedding.linear_2")
        ch = self.model_channels
        skips = [ch]
        block = 1
        last = len(self.channel_mult) - 1
        for level in range(last + 1):
            out = self.channels(level)
            for j in range(self.num_res_blocks):
                maps += _resblock(f"input_blocks.{block}.0", f"down_blocks.{level}.resnets.{j}", ch != out)
                ch = out
                if self.attention[level]:
                    maps += self._attention(f"input_blocks.{block}.1", f"down_blocks.{level}.attentions.{j}", ch)
                skips.append(ch)
                block += 1
            if level != last:
                maps += conv_pair(f"input_blocks.{block}.0.op", f"down_blocks.{level}.downsamplers.0.conv")
                skips.append(ch)
                block += 1
        maps += _resblock("middle_block.0", "mid_block.resnets.0", False)
        maps += self._attention("middle_block.1", "mid_block.attentions.0", ch)
        maps += _resblock("middle_block.2", "mid_block.resnets.1", False)
        block = 0
        for k, level in enumerate(reversed(range(last + 1))):
            out = self.channels(level)
            for j in range(self.num_res_blocks + 1):
                maps += _resblock(f"output_blocks.{block}.0", f"up_blocks.{k}.resnets.{j}", ch + skips.pop() != out)
                ch = out
                index = 1
                if self.attention[level]:
                    maps += self._attention(f"output_blocks.{block}.1", f"up_blocks.{k}.attentions.{j}", ch)
                    index = 2
                if level and j == self.num_res_blocks:
                    maps += conv_pair(f"output_blocks.{block}.{index}.conv", f"up_blocks.{k}.upsamplers.0.conv")
                block += 1
        return maps + conv_pair("out.0", "conv_norm_out") + conv_pair("out.2", "conv_out")

    def _attention(self, ldm: str, diffusers: str, channels: int) -> list[ParamMap]:
        heads = 1 if self.head_channels is None else channels // self.head_channels
        order = self.new_attention_order
        qkv = [
            ParamMap(f"{ldm}.qkv.{p}", tuple(f"{diffusers}.{n}.{p}" for n in ("to_q", "to_k", "to_v")), "qkv", heads, order)
            for p in ("weight", "bias")
        ]
        norm = conv_pair(f"{ldm}.norm", f"{diffusers}.group_norm")
        return norm + qkv + linear_from_conv1x1(f"{ldm}.proj_out", f"{diffusers}.to_out.0")


def _resblock(ldm: str, diffusers: str, has_skip: bool) -> list[ParamMap]:
    pairs = [
        ("in_layers.0", "norm1"),
        ("in_layers.2", "conv1"),
        ("emb_layers.1", "time_emb_proj"),
        ("out_layers.0", "norm2"),
        ("out_layers.3", "conv2"),
    ]
    if has_skip:
        pairs.append(("skip_connection", "conv_shortcut"))
    return [m for a, b in pairs for m in conv_pair(f"{ldm}.{a}", f"{diffusers}.{b}")]


# ----------------------------------------------------------------------------------------------------- from diffusers
def unet_layout_from_config(data: Mapping[str, Any], source: str) -> tuple[UNetLayout, tuple[int, int] | None]:
    """Validate a ``UNet2DModel`` config (untrusted JSON): its layout and recorded window (or None).  A
    ``DiffusersFormatError`` names the first option this project cannot represent, or a bad value."""
    cls = data.get("_class_name", UNET_CLASS)
    if cls != UNET_CLASS:
        why = (
            "a conditional UNet (cross-attention on text or other context)"
            if cls == "UNet2DConditionModel"
            else "not an unconditional UNet2DModel"
        )
        raise DiffusersFormatError(
            f"{source}: _class_name={cls!r} is {why}; this project converts unconditional latent diffusion UNets "
            "(UNet2DModel) only"
        )
    opt = Options(data, source, UNET_DEFAULTS)
    for key in ("class_embed_type", "num_class_embeds"):
        opt.choice(key, [None], "class-conditional UNets are not supported (this project's models are unconditional)")
    opt.choice("center_input_sample", [False])
    opt.choice("add_attention", [True], "CompVis' middle block always has attention")
    opt.choice("downsample_type", ["conv"], "ResNet downsampling (resblock_updown) is not supported")
    opt.choice("upsample_type", ["conv"], "ResNet upsampling (resblock_updown) is not supported")
    shift = opt.choice("resnet_time_scale_shift", ["default", "scale_shift"])
    # the mid block's attention has a GroupNorm unless scale_shift leaves attn_norm_num_groups unset
    allowed_attn_groups = [None, 32] if shift == "default" else [32]
    opt.choice("attn_norm_num_groups", allowed_attn_groups, "CompVis' attention always normalizes with 32 groups")
    opt.ignore("num_train_timesteps")  # used only by the "learned" time embedding, refused above
    fields, widths = unet_options(
        opt,
        (DOWN_TYPES, UP_TYPES),
        ("UNetMidBlock2D", "CompVis' UNet always has a middle block"),
        "only plain and self-attention blocks map",
        "the UNet must predict the noise (or x0) of its input latent (learned variance, extra input channels are not "
        "supported)",
    )
    head_dim = opt.get("attention_head_dim")
    if head_dim is not None:
        head_dim = opt.integer("attention_head_dim", 1, MAX_CHANNELS)
        attended = [w for w, a in zip(widths, fields["attention"]) if a] + [widths[-1]]
        if any(w % head_dim for w in attended):
            raise opt.fail("attention_head_dim", head_dim, f"does not divide the attention widths {attended}")
    layout = UNetLayout(
        **fields,
        num_res_blocks=opt.integer("layers_per_block", 1, MAX_LAYERS),
        head_channels=head_dim,
        scale_shift=shift == "scale_shift",
    )
    window = window_from_config(data.get(WINDOW_KEY), source)
    opt.finish()
    return layout, window


def unet_options(
    opt: Options, types: tuple[tuple[str, str], tuple[str, str]], mid_block: tuple[str, str], why: str, out_why: str
) -> tuple[dict[str, Any], tuple[int, ...]]:
    """The :class:`UNetLayout` fields both diffusers UNet configs give alike, and ``block_out_channels``.  ``types``:
    (plain, attention) block names down and up, ``why`` refuses others; ``mid_block``: the allowed ``mid_block_type``
    and why; ``out_why``: why ``out_channels`` must equal ``in_channels``."""
    opt.choice("time_embedding_type", ["positional"], "CompVis' UNet uses the sinusoidal (positional) embedding")
    opt.choice("flip_sin_to_cos", [True], "CompVis' timestep embedding puts the cosine half first")
    opt.choice("freq_shift", [0, 0.0], "CompVis' timestep embedding uses frequencies exp(-ln(10000) i / half)")
    opt.choice("mid_block_type", [mid_block[0]], mid_block[1])
    opt.choice("mid_block_scale_factor", [1, 1.0])
    opt.choice("downsample_padding", [1], "CompVis downsamples with a padded stride-2 conv")
    opt.choice("act_fn", ["silu", "swish"])
    opt.choice("norm_num_groups", [32], "CompVis' GroupNorm has 32 groups")
    opt.choice("norm_eps", [1e-5], "CompVis' UNet GroupNorm uses eps 1e-5")
    widths, attention = opt.levels(
        *types,
        (why, why),
        "CompVis' UNet has attention at the same resolutions on the way down and up",
        "model_channels * channel_mult",
    )
    embed_dim = opt.get("time_embedding_dim")
    if embed_dim is not None and embed_dim != 4 * widths[0]:
        raise opt.fail(
            "time_embedding_dim",
            embed_dim,
            f"is not supported: CompVis' time embedding has 4 * block_out_channels[0] = {4 * widths[0]} channels",
        )
    in_ch = opt.integer("in_channels", 1, MAX_CHANNELS)
    out_ch = opt.integer("out_channels", 1, MAX_CHANNELS)
    if out_ch != in_ch:
        raise opt.fail("out_channels", out_ch, f"differs from in_channels={in_ch}: {out_why}")
    fields = {
        "in_channels": in_ch,
        "out_channels": out_ch,
        "model_channels": widths[0],
        "channel_mult": tuple(w // widths[0] for w in widths),
        "attention": attention,
        "image_size": opt.side("sample_size") or 0,
        "dropout": opt.number("dropout", 0.0, 1.0),
    }
    return fields, widths


def window_from_config(value: Any, source: str) -> tuple[int, int] | None:
    """The ``[t_min, t_max]`` a UNet config records, or None; checked against the schedule later."""
    if value is None:
        return None
    ok = isinstance(value, (list, tuple)) and len(value) == 2
    if not ok or not all(is_int(v) and 0 <= v <= MAX_TIMESTEPS for v in value):
        raise DiffusersFormatError(f"{source}: {WINDOW_KEY}={value!r} must be [t_min, t_max] (integer timesteps)")
    return int(value[0]), int(value[1])


# ---------------------------------------------------------------------------------------------------- from a model
def unet_layout_from_model(unet: nn.Module) -> UNetLayout:
    """The layout of a CompVis ``UNetModel``; a ``DiffusersFormatError`` refuses what ``UNet2DModel`` cannot hold."""
    from ldm.modules.attention import SpatialTransformer
    from ldm.modules.diffusionmodules.openaimodel import AttentionBlock, Downsample, ResBlock

    modules, refuse = unet_modules(unet, "UNet2DModel")
    if any(isinstance(m, SpatialTransformer) for m in modules):
        raise refuse("it has cross-attention (use_spatial_transformer), which UNet2DModel lacks")
    if not isinstance(unet.input_blocks[0][0], nn.Conv2d):
        raise refuse("only 2-D UNets (dims=2) are supported")
    resblocks = [m for m in modules if isinstance(m, ResBlock)]
    if any(r.updown for r in resblocks):
        raise refuse("ResNet up/down sampling (resblock_updown=True) is not supported")
    if any(isinstance(m, Downsample) and not isinstance(m.op, nn.Conv2d) for m in modules):
        raise refuse("pooling downsampling (conv_resample=False) is not supported")
    if unet.channel_mult[0] != 1:
        raise refuse(
            f"channel_mult={list(unet.channel_mult)} must start with 1 (UNet2DModel's first block keeps the input conv's width)"
        )
    attns = [m for m in modules if isinstance(m, AttentionBlock)]
    head_dims = {a.channels // a.num_heads for a in attns}
    heads = {a.num_heads for a in attns}
    if heads == {1}:
        head_channels = None
    elif len(head_dims) == 1:
        head_channels = head_dims.pop()
    else:
        raise refuse(
            f"its attention blocks have {sorted(head_dims)} channels per head; UNet2DModel has one "
            "attention_head_dim (set num_head_channels, or num_heads=1)"
        )
    return UNetLayout(
        **unet_fields(unet),
        head_channels=head_channels,
        scale_shift=bool(resblocks[0].use_scale_shift_norm),
        new_attention_order=bool(attns[0].use_new_attention_order),
    )


def unet_modules(unet: nn.Module, cls: str) -> tuple[list[nn.Module], Callable[[str], DiffusersFormatError]]:
    """``unet.modules()`` and ``refuse(what)``; refuses all but a CompVis ``UNetModel`` without class labels or codes."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    refuse = refusal("UNet", cls)
    if not isinstance(unet, UNetModel):
        raise refuse(f"it is a {type(unet).__name__}, not ldm.modules.diffusionmodules.openaimodel.UNetModel")
    if unet.num_classes is not None or unet.predict_codebook_ids:
        raise refuse("class-conditional UNets (num_classes) and codebook predictors (n_embed) are not supported")
    return list(unet.modules()), refuse


def unet_fields(unet: nn.Module) -> dict[str, Any]:
    """The :class:`UNetLayout` fields every CompVis ``UNetModel`` states the same way."""
    from ldm.modules.diffusionmodules.openaimodel import ResBlock

    resblock = next(m for m in unet.modules() if isinstance(m, ResBlock))
    return {
        "in_channels": int(unet.in_channels),
        "out_channels": int(unet.out_channels),
        "model_channels": int(unet.model_channels),
        "channel_mult": tuple(int(m) for m in unet.channel_mult),
        "num_res_blocks": int(unet.num_res_blocks),
        "attention": tuple(2**i in unet.attention_resolutions for i in range(len(unet.channel_mult))),
        "image_size": int(unet.image_size),
        "dropout": float(resblock.out_layers[2].p),
    }
