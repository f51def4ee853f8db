"""The UNet: diffusers ``UNet2DModel`` config <-> CompVis ``UNetModel`` parameters, and the key map between them.

Which options correspond (diffusers -> ``ldm.modules.diffusionmodules.openaimodel.UNetModel``):

* ``block_out_channels`` = ``model_channels * channel_mult`` (``block_out_channels[0]`` is ``model_channels``: the
  input conv, the sinusoidal embedding width and ``time_embed_dim / 4`` all use it, so ``channel_mult[0]`` is 1);
* ``layers_per_block`` = ``num_res_blocks`` (up blocks have one more, in both);
* ``Attn{Down,Up}Block2D`` at level ``i`` = ``2**i`` in ``attention_resolutions`` (down and up mirrored); the mid
  block always has attention (``add_attention: true``);
* ``attention_head_dim: d`` = ``num_head_channels: d``; ``attention_head_dim: null`` = one head per block
  (``num_heads: 1``);
* ``resnet_time_scale_shift``: ``default`` = ``use_scale_shift_norm: false``, ``scale_shift`` = ``true`` (then
  ``attn_norm_num_groups: 32`` keeps the mid block's attention norm, which CompVis always has);
* the timestep embedding: ``time_embedding_type: positional``, ``flip_sin_to_cos: true`` (cosine half first) and
  ``freq_shift: 0`` (frequencies ``exp(-ln(10000) i / half)``) are CompVis' ``timestep_embedding``;
* fixed by CompVis' modules: ``norm_num_groups: 32``, ``norm_eps: 1e-5``, ``act_fn: silu``, ``downsample_padding: 1``,
  ``downsample_type``/``upsample_type: conv``, ``mid_block_scale_factor: 1``, ``center_input_sample: false``.

Refused: conditional UNets (``UNet2DConditionModel``: cross-attention), class conditioning (``class_embed_type``,
``num_class_embeds``), fourier/learned time embeddings, ResNet up/down sampling, and every other value listed above.
Key map (diffusers -> CompVis): ``conv_in`` -> ``input_blocks.0.0``; ``time_embedding.linear_{1,2}`` ->
``time_embed.{0,2}``; ``down_blocks.i.{resnets,attentions}.j`` -> ``input_blocks.k.{0,1}``;
``down_blocks.i.downsamplers.0.conv`` -> ``input_blocks.k.0.op``; ``mid_block.{resnets.0,attentions.0,resnets.1}`` ->
``middle_block.{0,1,2}``; ``up_blocks.i.*`` -> ``output_blocks.k.*`` (``upsamplers.0.conv`` -> the block's last
``conv``); ``conv_norm_out``/``conv_out`` -> ``out.0``/``out.2``.  In a ResNet: ``norm1, conv1, time_emb_proj, norm2,
conv2, conv_shortcut`` -> ``in_layers.0, in_layers.2, emb_layers.1, out_layers.0, out_layers.3, skip_connection``; in
attention: ``group_norm`` -> ``norm``, ``to_q/to_k/to_v`` -> ``qkv`` (fused), ``to_out.0`` -> ``proj_out``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from ldm.convert.common import (
    MAX_CHANNELS,
    MAX_LAYERS,
    MAX_LEVELS,
    MAX_TIMESTEPS,
    DiffusersFormatError,
    Options,
    ParamMap,
    conv_pair,
    linear_from_conv1x1,
)

UNET_CLASS = "UNet2DModel"
UNET_TARGET = "ldm.modules.diffusionmodules.openaimodel.UNetModel"
# UNet2DModel.__init__ defaults of diffusers 0.42 (used for keys a config.json leaves out)
UNET_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896],
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "num_train_timesteps": None,
}
DOWN_TYPES = ("DownBlock2D", "AttnDownBlock2D")
UP_TYPES = ("UpBlock2D", "AttnUpBlock2D")
# where this project records a window expert's [t_min, t_max) in unet/config.json (diffusers keeps "_" keys as
# metadata and passes nothing to the constructor)
WINDOW_KEY = "_latesteps_window"


@dataclass(frozen=True)
class UNetLayout:
    """What both formats need to know about an unconditional LDM UNet.

    Attributes:
        in_channels, out_channels: latent channels in and out.  model_channels: width of level 0.
        channel_mult: width multiple per level (``channel_mult[0] == 1``).  num_res_blocks: ResNets per down level.
        attention: per level, whether its blocks have self-attention.  head_channels: channels per attention head
            (None: one head per block).  scale_shift: ``use_scale_shift_norm``.  image_size: latent side (metadata).
        dropout: ResNet dropout (training only).  new_attention_order: the LDM ``qkv`` layout (see
            :mod:`ldm.convert.common`).
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

    def heads(self, channels: int) -> int:
        return 1 if self.head_channels is None else channels // self.head_channels

    def ldm_params(self) -> dict[str, Any]:
        """``unet_config.params`` of this project's ``UNetModel``."""
        params: dict[str, Any] = {
            "image_size": self.image_size,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "model_channels": self.model_channels,
            "attention_resolutions": [2**i for i, a in enumerate(self.attention) if a],
            "num_res_blocks": self.num_res_blocks,
            "channel_mult": list(self.channel_mult),
            "dropout": self.dropout,
            "use_scale_shift_norm": self.scale_shift,
            "use_new_attention_order": self.new_attention_order,
        }
        if self.head_channels is None:
            params["num_heads"] = 1
        else:
            params["num_head_channels"] = self.head_channels
        return params

    def diffusers_config(self) -> dict[str, Any]:
        """``unet/config.json`` of the equivalent ``UNet2DModel`` (every option written out, none left to defaults)."""
        levels = range(len(self.channel_mult))
        return {
            "_class_name": UNET_CLASS,
            "sample_size": self.image_size,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "center_input_sample": False,
            "time_embedding_type": "positional",
            "time_embedding_dim": None,
            "freq_shift": 0,
            "flip_sin_to_cos": True,
            "down_block_types": [DOWN_TYPES[self.attention[i]] for i in levels],
            "mid_block_type": "UNetMidBlock2D",
            "up_block_types": [UP_TYPES[self.attention[i]] for i in reversed(levels)],
            "block_out_channels": [self.channels(i) for i in levels],
            "layers_per_block": self.num_res_blocks,
            "mid_block_scale_factor": 1,
            "downsample_padding": 1,
            "downsample_type": "conv",
            "upsample_type": "conv",
            "dropout": self.dropout,
            "act_fn": "silu",
            "attention_head_dim": self.head_channels,
            "norm_num_groups": 32,
            "attn_norm_num_groups": 32,
            "norm_eps": 1e-5,
            "resnet_time_scale_shift": "scale_shift" if self.scale_shift else "default",
            "add_attention": True,
            "class_embed_type": None,
            "num_class_embeds": None,
            "num_train_timesteps": None,
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
        heads, order = self.heads(channels), self.new_attention_order
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
    """Validate a ``UNet2DModel`` config (untrusted JSON) and return its layout and the recorded window, if any.

    Raises:
        DiffusersFormatError: naming the first option that this project cannot represent, or a bad value.
    """
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
    opt.choice("time_embedding_type", ["positional"], "CompVis' UNet uses the sinusoidal (positional) embedding")
    opt.choice("flip_sin_to_cos", [True], "CompVis' timestep embedding puts the cosine half first")
    opt.choice("freq_shift", [0, 0.0], "CompVis' timestep embedding uses frequencies exp(-ln(10000) i / half)")
    opt.choice("center_input_sample", [False])
    opt.choice("mid_block_type", ["UNetMidBlock2D"], "CompVis' UNet always has a middle block")
    opt.choice("add_attention", [True], "CompVis' middle block always has attention")
    opt.choice("mid_block_scale_factor", [1, 1.0])
    opt.choice("downsample_padding", [1], "CompVis downsamples with a padded stride-2 conv")
    opt.choice("downsample_type", ["conv"], "ResNet downsampling (resblock_updown) is not supported")
    opt.choice("upsample_type", ["conv"], "ResNet upsampling (resblock_updown) is not supported")
    opt.choice("act_fn", ["silu", "swish"])
    opt.choice("norm_num_groups", [32], "CompVis' GroupNorm has 32 groups")
    opt.choice("norm_eps", [1e-5], "CompVis' UNet GroupNorm uses eps 1e-5")
    shift = opt.choice("resnet_time_scale_shift", ["default", "scale_shift"])
    # the mid block's attention has a GroupNorm unless scale_shift leaves attn_norm_num_groups unset
    allowed_attn_groups = [None, 32] if shift == "default" else [32]
    opt.choice("attn_norm_num_groups", allowed_attn_groups, "CompVis' attention always normalizes with 32 groups")
    opt.ignore("num_train_timesteps")  # used only by the "learned" time embedding, refused above
    down = opt.str_list("down_block_types", DOWN_TYPES, MAX_LEVELS, "only plain and self-attention blocks map")
    up = opt.str_list("up_block_types", UP_TYPES, MAX_LEVELS, "only plain and self-attention blocks map")
    widths = opt.int_list("block_out_channels", 32, MAX_CHANNELS, MAX_LEVELS)
    if len(down) != len(widths) or len(up) != len(widths):
        raise opt.fail(
            "block_out_channels",
            list(widths),
            f"has {len(widths)} levels but down_block_types has {len(down)} and up_block_types {len(up)}",
        )
    attention = tuple(t == "AttnDownBlock2D" for t in down)
    if tuple(t == "AttnUpBlock2D" for t in reversed(up)) != attention:
        raise opt.fail(
            "up_block_types",
            list(up),
            f"does not mirror down_block_types {list(down)}: CompVis' UNet has "
            "attention at the same resolutions on the way down and up",
        )
    base = widths[0]
    if any(w % base or w % 32 for w in widths):
        raise opt.fail(
            "block_out_channels",
            list(widths),
            "must be multiples of block_out_channels[0] (CompVis' model_channels * channel_mult) and of 32 (GroupNorm groups)",
        )
    embed_dim = opt.get("time_embedding_dim")
    if embed_dim is not None and embed_dim != 4 * base:
        raise opt.fail(
            "time_embedding_dim",
            embed_dim,
            f"is not supported: CompVis' time embedding has 4 * block_out_channels[0] = {4 * base} channels",
        )
    head_dim = opt.get("attention_head_dim")
    if head_dim is not None:
        head_dim = opt.integer("attention_head_dim", 1, MAX_CHANNELS)
        attended = [w for w, a in zip(widths, attention) if a] + [widths[-1]]
        if any(w % head_dim for w in attended):
            raise opt.fail("attention_head_dim", head_dim, f"does not divide the attention widths {attended}")
    in_ch = opt.integer("in_channels", 1, MAX_CHANNELS)
    out_ch = opt.integer("out_channels", 1, MAX_CHANNELS)
    if out_ch != in_ch:
        raise opt.fail(
            "out_channels",
            out_ch,
            f"differs from in_channels={in_ch}: the UNet must predict the noise "
            "(or x0) of its input latent (learned variance, extra input channels are not supported)",
        )
    layout = UNetLayout(
        in_channels=in_ch,
        out_channels=out_ch,
        model_channels=base,
        channel_mult=tuple(w // base for w in widths),
        num_res_blocks=opt.integer("layers_per_block", 1, MAX_LAYERS),
        attention=attention,
        head_channels=head_dim,
        scale_shift=shift == "scale_shift",
        image_size=opt.side("sample_size") or 0,
        dropout=opt.number("dropout", 0.0, 1.0),
    )
    window = window_from_config(data.get(WINDOW_KEY), source)
    opt.finish()
    return layout, window


def window_from_config(value: Any, source: str) -> tuple[int, int] | None:
    if value is None:
        return None
    ok = isinstance(value, (list, tuple)) and len(value) == 2
    if not ok or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_TIMESTEPS for v in value):
        raise DiffusersFormatError(f"{source}: {WINDOW_KEY}={value!r} must be [t_min, t_max] (integer timesteps)")
    return int(value[0]), int(value[1])


# ---------------------------------------------------------------------------------------------------- from a model
def unet_layout_from_model(unet: nn.Module) -> UNetLayout:
    """The layout of a CompVis ``UNetModel`` (read from its modules); refuses what ``UNet2DModel`` cannot hold.

    Raises:
        DiffusersFormatError: a conditional / class-conditional UNet, ResNet up/down sampling, ``channel_mult[0] != 1``,
            or attention heads that no single ``attention_head_dim`` describes.
    """
    from ldm.modules.attention import SpatialTransformer
    from ldm.modules.diffusionmodules.openaimodel import AttentionBlock, Downsample, ResBlock, UNetModel

    def refuse(what: str) -> DiffusersFormatError:
        return DiffusersFormatError(f"the UNet cannot be written as a diffusers UNet2DModel: {what}")

    if not isinstance(unet, UNetModel):
        raise refuse(f"it is a {type(unet).__name__}, not ldm.modules.diffusionmodules.openaimodel.UNetModel")
    if unet.num_classes is not None or unet.predict_codebook_ids:
        raise refuse("class-conditional UNets (num_classes) and codebook predictors (n_embed) are not supported")
    modules = list(unet.modules())
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
    levels = len(unet.channel_mult)
    attention = tuple(2**i in unet.attention_resolutions for i in range(levels))
    return UNetLayout(
        in_channels=int(unet.in_channels),
        out_channels=int(unet.out_channels),
        model_channels=int(unet.model_channels),
        channel_mult=tuple(int(m) for m in unet.channel_mult),
        num_res_blocks=int(unet.num_res_blocks),
        attention=attention,
        head_channels=head_channels,
        scale_shift=bool(resblocks[0].use_scale_shift_norm),
        image_size=int(unet.image_size),
        dropout=float(resblocks[0].out_layers[2].p),
        new_attention_order=bool(attns[0].use_new_attention_order),
    )
