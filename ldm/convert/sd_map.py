"""Stable Diffusion v1's networks: diffusers ``UNet2DConditionModel`` / ``AutoencoderKL`` / transformers
``CLIPTextModel`` configs <-> this project's ``UNetModel`` (with ``SpatialTransformer``), ``AutoencoderKL`` and
``FrozenCLIPEmbedder``, and the key maps.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from ldm.checkpoint import is_int
from ldm.convert.common import MAX_CHANNELS, MAX_LAYERS, DiffusersFormatError, Options, ParamMap, conv_pair, refusal
from ldm.convert.unet_map import (
    UNET_COMMON_DEFAULTS,
    WINDOW_KEY,
    UNetLayout,
    unet_fields,
    unet_modules,
    unet_options,
    window_from_config,
)
from ldm.convert.vq_map import CODER_DEFAULTS, CoderLayout, coder_from_model, coder_from_options
from ldm.modules.encoders.modules import clip_text_config_problem

COND_UNET_CLASS = "UNet2DConditionModel"
KL_CLASS = "AutoencoderKL"
KL_TARGET = "ldm.models.autoencoder.AutoencoderKL"
CLIP_TARGET = "ldm.modules.encoders.modules.FrozenCLIPEmbedder"
CLIP_PREFIX = "transformer.text_model."  # inside FrozenCLIPEmbedder (SD v1's cond_stage_model.*)
SUPPORTED = (
    "supported: Stable Diffusion v1.x folders (UNet2DConditionModel with 1x1-conv proj_in/proj_out, "
    "AutoencoderKL, CLIPTextModel + CLIPTokenizer, epsilon or sample prediction)"
)
# UNet2DConditionModel.__init__ defaults of diffusers 0.42 (used for keys a config.json leaves out)
COND_UNET_DEFAULTS: dict[str, Any] = {
    **UNET_COMMON_DEFAULTS,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "only_cross_attention": False,
    "block_out_channels": [320, 640, 1280, 1280],
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "use_linear_projection": False,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "upcast_attention": False,
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
}
COND_DOWN_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D")
COND_UP_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")
# AutoencoderKL.__init__ defaults of diffusers 0.42; scaling_factor is read apart (LatentDiffusion's scale_factor)
KL_DEFAULTS: dict[str, Any] = {
    **CODER_DEFAULTS,
    "latent_channels": 4,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "force_upcast": True,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
}


@dataclass(frozen=True)
class CrossAttnUNetLayout(UNetLayout):
    """An SD v1-style UNet: a ``SpatialTransformer`` wherever it has attention, with ``num_heads`` heads (None:
    ``head_channels`` per head), ``depth`` blocks and the text embedding width ``context_dim``."""

    num_heads: int | None = None
    context_dim: int = 768
    depth: int = 1

    def ldm_attention(self) -> dict[str, Any]:
        heads = {"num_heads": self.num_heads} if self.num_heads is not None else {"num_head_channels": self.head_channels}
        return {
            **heads,
            "use_spatial_transformer": True,
            "transformer_depth": self.depth,
            "context_dim": self.context_dim,
            "legacy": False,
        }

    def diffusers_config(self) -> dict[str, Any]:
        widths = [self.channels(i) for i in range(len(self.channel_mult))]
        heads: int | list[int] = (
            self.num_heads if self.num_heads is not None else [max(1, w // int(self.head_channels or w)) for w in widths]
        )
        return {
            **COND_UNET_DEFAULTS,
            **self.diffusers_levels(COND_DOWN_TYPES, COND_UP_TYPES),
            "_class_name": COND_UNET_CLASS,
            "cross_attention_dim": self.context_dim,
            "transformer_layers_per_block": self.depth,
            "attention_head_dim": heads,
        }

    def _attention(self, ldm: str, diffusers: str, channels: int) -> list[ParamMap]:
        maps: list[ParamMap] = []
        for name in ("norm", "proj_in", "proj_out"):
            maps += conv_pair(f"{ldm}.{name}", f"{diffusers}.{name}")
        for d in range(self.depth):
            block = f"transformer_blocks.{d}"
            for name in ("norm1", "norm2", "norm3", "attn1.to_out.0", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2"):
                maps += conv_pair(f"{ldm}.{block}.{name}", f"{diffusers}.{block}.{name}")
            for name in (f"attn{a}.to_{p}" for a in (1, 2) for p in "qkv"):  # CompVis' q/k/v have no bias
                maps += conv_pair(f"{ldm}.{block}.{name}", f"{diffusers}.{block}.{name}", bias=False)
        return maps


def cond_unet_layout_from_config(data: Mapping[str, Any], source: str) -> tuple[CrossAttnUNetLayout, tuple[int, int] | None]:
    """:func:`~ldm.convert.unet_map.unet_layout_from_config` of an SD v1-style ``UNet2DConditionModel`` config."""
    cls = data.get("_class_name", COND_UNET_CLASS)
    if cls != COND_UNET_CLASS:
        raise DiffusersFormatError(
            f"{source}: _class_name={cls!r} is not a Stable Diffusion UNet ({COND_UNET_CLASS}); {SUPPORTED}"
        )
    opt = Options(data, source, COND_UNET_DEFAULTS)
    opt.choice("use_linear_projection", [False], f"(Stable Diffusion 2.x's linear proj_in/proj_out); {SUPPORTED}")
    opt.choice("addition_embed_type", [None], f"(SDXL's extra text/size conditioning); {SUPPORTED}")
    for key in (
        "addition_time_embed_dim",
        "projection_class_embeddings_input_dim",
        "class_embed_type",
        "num_class_embeds",
        "encoder_hid_dim",
        "encoder_hid_dim_type",
        "time_cond_proj_dim",
        "time_embedding_act_fn",
        "timestep_post_act",
        "cross_attention_norm",
        "reverse_transformer_layers_per_block",
        "num_attention_heads",
    ):
        opt.choice(key, [None], f"is not supported (extra conditioning or layout options SD v1 lacks); {SUPPORTED}")
    for key in (
        "only_cross_attention",
        "dual_cross_attention",
        "upcast_attention",
        "center_input_sample",
        "resnet_skip_time_act",
        "class_embeddings_concat",
    ):
        opt.choice(key, [False], f"is not supported; {SUPPORTED}")
    opt.choice("mid_block_only_cross_attention", [None, False], "is not supported")
    opt.choice("attention_type", ["default"], "(gated/IP-adapter attention) is not supported")
    opt.choice("resnet_out_scale_factor", [1, 1.0])
    opt.choice("conv_in_kernel", [3])
    opt.choice("conv_out_kernel", [3])
    opt.choice("resnet_time_scale_shift", ["default"], f"is not supported; {SUPPORTED}")
    opt.ignore("addition_embed_type_num_heads")  # used only with addition_embed_type, refused above
    fields, widths = unet_options(
        opt,
        (COND_DOWN_TYPES, COND_UP_TYPES),
        ("UNetMidBlock2DCrossAttn", "CompVis' middle block always has a transformer"),
        SUPPORTED,
        f"inpainting / depth UNets (extra input channels) are not supported; {SUPPORTED}",
    )
    num_heads, head_channels = _heads(opt, widths, fields["attention"])
    layout = CrossAttnUNetLayout(
        **fields,
        num_res_blocks=_same_int(opt, "layers_per_block", len(widths), MAX_LAYERS),
        head_channels=head_channels,
        scale_shift=False,
        num_heads=num_heads,
        context_dim=_same_int(opt, "cross_attention_dim", len(widths), MAX_CHANNELS),
        depth=_same_int(opt, "transformer_layers_per_block", len(widths), MAX_LAYERS),
    )
    window = window_from_config(data.get(WINDOW_KEY), source)
    opt.finish()
    return layout, window


def cond_unet_layout_from_model(unet: nn.Module) -> CrossAttnUNetLayout:
    """:func:`~ldm.convert.unet_map.unet_layout_from_model` of a UNet with ``SpatialTransformer`` attention (SD v1)."""
    from ldm.modules.attention import SpatialTransformer
    from ldm.modules.diffusionmodules.openaimodel import AttentionBlock, Downsample, ResBlock

    modules, refuse = unet_modules(unet, COND_UNET_CLASS)
    transformers = [m for m in modules if isinstance(m, SpatialTransformer)]
    if not transformers or any(isinstance(m, AttentionBlock) for m in modules):
        raise refuse("its attention is not cross-attention everywhere (use_spatial_transformer with context_dim)")
    if not isinstance(unet.input_blocks[0][0], nn.Conv2d):
        raise refuse("only 2-D UNets (dims=2) are supported")
    resblocks = [m for m in modules if isinstance(m, ResBlock)]
    if any(r.updown for r in resblocks) or any(isinstance(m, Downsample) and not isinstance(m.op, nn.Conv2d) for m in modules):
        raise refuse("ResNet up/down sampling (resblock_updown) and pooling (conv_resample=False) are not supported")
    if resblocks[0].use_scale_shift_norm:
        raise refuse("use_scale_shift_norm=True is not supported (SD v1's UNet does not use it)")
    if unet.channel_mult[0] != 1:
        raise refuse(f"channel_mult={list(unet.channel_mult)} must start with 1")
    blocks = [b for t in transformers for b in t.transformer_blocks]
    depths = {len(t.transformer_blocks) for t in transformers}
    heads = {b.attn1.heads for b in blocks}
    head_dims = {b.attn1.to_q.out_features // b.attn1.heads for b in blocks}
    widths = {t.proj_in.in_channels: b.attn1.to_q.out_features for t in transformers for b in t.transformer_blocks}
    contexts = {b.attn2.to_k.in_features for b in blocks}
    if len(depths) != 1 or len(contexts) != 1 or any(c != w for c, w in widths.items()):
        raise refuse("its transformers differ in depth or context width, or their inner width is not their channels")
    if not isinstance(transformers[0].proj_in, nn.Conv2d):
        raise refuse("linear proj_in/proj_out (SD 2.x) are not supported")
    if len(heads) == 1:
        num_heads, head_channels = heads.pop(), None
    elif len(head_dims) == 1:
        num_heads, head_channels = None, head_dims.pop()
    else:
        raise refuse(
            f"its transformers have {sorted(heads)} heads of {sorted(head_dims)} channels; "
            "UNet2DConditionModel needs one number of heads or one head width"
        )
    return CrossAttnUNetLayout(
        **unet_fields(unet),
        head_channels=head_channels,
        scale_shift=False,
        num_heads=num_heads,
        context_dim=int(contexts.pop()),
        depth=int(depths.pop()),
    )


def _same_int(opt: Options, key: str, levels: int, hi: int) -> int:
    """An option given as one integer or as one per level (all equal: CompVis has one value)."""
    value = opt.get(key)
    if isinstance(value, (list, tuple)):
        if len(value) != levels or len(set(map(repr, value))) != 1:
            raise opt.fail(
                key,
                value,
                f"must be one integer (or {levels} equal ones): CompVis' UNet has one value for every level; {SUPPORTED}",
            )
        value = value[0]
    if not is_int(value) or not 1 <= value <= hi:
        raise opt.fail(key, value, f"must be an integer in [1, {hi}]")
    return value


def _heads(opt: Options, widths: tuple[int, ...], attention: tuple[bool, ...]) -> tuple[int | None, int | None]:
    """``(num_heads, num_head_channels)`` (one None) from ``attention_head_dim``, which in ``UNet2DConditionModel``
    is, despite its name, the number of heads per level."""
    value = opt.get("attention_head_dim")
    per_level = list(value) if isinstance(value, (list, tuple)) else [value] * len(widths)
    if len(per_level) != len(widths) or not all(is_int(h) and 1 <= h <= MAX_CHANNELS for h in per_level):
        raise opt.fail(
            "attention_head_dim",
            value,
            f"must be an integer in [1, {MAX_CHANNELS}] or one per level (diffusers' name for the number of heads)",
        )
    used = [(w, h) for w, h, a in zip(widths, per_level, attention) if a] + [(widths[-1], per_level[-1])]  # + mid
    if any(w % h for w, h in used):
        raise opt.fail("attention_head_dim", value, f"(heads) does not divide the attention widths {[w for w, _ in used]}")
    if len({h for _, h in used}) == 1:
        return used[0][1], None
    if len({w // h for w, h in used}) == 1:
        return None, used[0][0] // used[0][1]
    raise opt.fail(
        "attention_head_dim",
        value,
        "gives neither one number of heads nor one head width for every "
        "attention level (CompVis' num_heads / num_head_channels)",
    )


# ---------------------------------------------------------------------------------------------------------- the VAE
@dataclass(frozen=True)
class KLLayout(CoderLayout):
    """SD v1's VAE: ``z_channels`` is also ``embed_dim`` (diffusers' ``AutoencoderKL`` has one latent width)."""

    z_channels: int

    def ldm_params(self) -> dict[str, Any]:
        """``first_stage_config.params`` (frozen: ``torch.nn.Identity`` loss)."""
        ddconfig = self.ldm_coder(self.z_channels, double_z=True)
        return {"embed_dim": self.z_channels, "ddconfig": ddconfig, "lossconfig": {"target": "torch.nn.Identity"}}

    def diffusers_config(self, scaling_factor: float) -> dict[str, Any]:
        return {
            **KL_DEFAULTS,
            **self.diffusers_coder(),
            "_class_name": KL_CLASS,
            "latent_channels": self.z_channels,
            "scaling_factor": scaling_factor,
        }

    def param_maps(self) -> list[ParamMap]:
        return self.coder_maps(conv_pair("quant_conv", "quant_conv") + conv_pair("post_quant_conv", "post_quant_conv"))


def kl_layout_from_config(data: Mapping[str, Any], source: str) -> KLLayout:
    """:func:`~ldm.convert.vq_map.vq_layout_from_config` of an ``AutoencoderKL`` config."""
    cls = data.get("_class_name", KL_CLASS)
    if cls != KL_CLASS:
        raise DiffusersFormatError(f"{source}: _class_name={cls!r} is not a KL autoencoder (AutoencoderKL); {SUPPORTED}")
    opt = Options(data, source, KL_DEFAULTS)
    for key in ("shift_factor", "latents_mean", "latents_std"):
        opt.choice(
            key, [None], "is not supported (a latent normalisation of SD3/SDXL-style VAEs; SD v1 scales by scaling_factor only)"
        )
    opt.choice("use_quant_conv", [True], "CompVis' AutoencoderKL always has quant_conv")
    opt.choice("use_post_quant_conv", [True], "CompVis' AutoencoderKL always has post_quant_conv")
    coder = coder_from_options(opt)
    layout = KLLayout(**coder, z_channels=opt.integer("latent_channels", 1, MAX_CHANNELS))
    opt.finish()
    return layout


def kl_layout_from_model(first_stage: nn.Module) -> KLLayout:
    """:func:`~ldm.convert.vq_map.vq_layout_from_model` of this project's ``AutoencoderKL``."""
    from ldm.models.autoencoder import AutoencoderKL

    refuse = refusal("first stage", "AutoencoderKL")
    if not isinstance(first_stage, AutoencoderKL):
        raise refuse(f"it is a {type(first_stage).__name__}, not ldm.models.autoencoder.AutoencoderKL")
    z_channels = int(first_stage.ddconfig["z_channels"])
    if int(first_stage.embed_dim) != z_channels:
        raise refuse(
            f"embed_dim={first_stage.embed_dim} differs from z_channels={z_channels} (diffusers' AutoencoderKL "
            "has one latent width)"
        )
    return KLLayout(**coder_from_model(first_stage, refuse), z_channels=z_channels)


# ----------------------------------------------------------------------------------------------------- text encoder
def check_text_config(data: Mapping[str, Any], source: str) -> None:
    """Refuse a ``text_encoder/config.json`` that is not a bounded ``CLIPTextModel`` config (its sizes decide the build)."""
    arch = data.get("architectures")
    model_type = data.get("model_type", "clip_text_model")
    if (arch is not None and arch != ["CLIPTextModel"]) or model_type != "clip_text_model":
        raise DiffusersFormatError(
            f"{source}: architectures={arch!r}, model_type={model_type!r} is not a CLIPTextModel; {SUPPORTED}"
        )
    problem = clip_text_config_problem(data)
    if problem is not None:
        raise DiffusersFormatError(f"{source}: {problem}")


def text_param_maps(ldm_keys: list[str]) -> list[ParamMap]:
    """``FrozenCLIPEmbedder`` keys (``transformer.text_model.X``) <-> ``CLIPTextModel`` file keys (``text_model.X``)."""
    return [ParamMap(k, (k[len("transformer.") :],)) for k in ldm_keys if k.startswith(CLIP_PREFIX)]


def text_file_name(key: str) -> str:
    """A ``CLIPTextModel`` file key in the transformers 4 layout (``text_model.X``): transformers 5 saves ``X``."""
    return key if key.startswith("text_model.") else "text_model." + key
