"""The diffusers key maps and config readers at real size and on untrusted values: :mod:`ldm.convert.unet_map` with
its twin :mod:`ldm.convert.vq_map` (celebahq-ldm-vq-4's UNet and VQ-f4, on the meta device) and, on every value a
config.json can hold, their readers and :mod:`ldm.convert.schedule`'s.

Nothing is allocated or downloaded: the models are built on the meta device, the configs are dicts.
"""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("diffusers", reason="diffusers is the optional extra pip install -e .[diffusers]")

from diffusers import UNet2DModel, VQModel  # noqa: E402
from test_diffusers_convert import compvis_ddim  # noqa: E402

from ldm.convert.common import DiffusersFormatError  # noqa: E402
from ldm.convert.schedule import SCHEDULER_DEFAULTS, schedule_from_config  # noqa: E402
from ldm.convert.unet_map import UNET_DEFAULTS, unet_layout_from_config  # noqa: E402
from ldm.convert.vq_map import VQ_DEFAULTS, vq_layout_from_config  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402

# ------------------------------------------------------------------------------------------------ real-size key maps
CELEBAHQ_UNET = dict(
    sample_size=64,
    in_channels=3,
    out_channels=3,
    block_out_channels=(224, 448, 672, 896),
    layers_per_block=2,
    attention_head_dim=32,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
)
VQ_F4 = dict(
    block_out_channels=(128, 256, 512),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=2,
    latent_channels=3,
    num_vq_embeddings=8192,
    sample_size=256,
)


def test_real_size_maps_match_diffusers_and_compvis_modules_on_the_meta_device():
    """celebahq-ldm-vq-4 as published in diffusers layout: every tensor's key and shape, on both sides, without
    allocating 1.1 GB."""
    with torch.device("meta"):
        unet, vq = UNet2DModel(**CELEBAHQ_UNET), VQModel(**VQ_F4)
    unet_layout, _ = unet_layout_from_config({**CELEBAHQ_UNET, "_class_name": "UNet2DModel"}, "unet/config.json")
    vq_layout = vq_layout_from_config({**VQ_F4, "_class_name": "VQModel"}, "vqvae/config.json")
    params = unet_layout.ldm_params()
    assert (params["model_channels"], params["channel_mult"], params["attention_resolutions"]) == (224, [1, 2, 3, 4], [2, 4, 8])
    assert params["num_head_channels"] == 32 and vq_layout.ldm_params()["ddconfig"]["ch_mult"] == [1, 2, 4]
    cfg = {
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": {
            "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": params},
            "first_stage_config": {"target": "ldm.models.autoencoder.VQModelInterface", "params": vq_layout.ldm_params()},
            "cond_stage_config": "__is_unconditional__",
            "use_ema": False,
        },
    }
    with torch.device("meta"):
        ldm = instantiate_from_config(cfg)
    for ours, theirs, maps in (
        (ldm.model.diffusion_model, unet, unet_layout.param_maps()),
        (ldm.first_stage_model, vq, vq_layout.param_maps()),
    ):
        own = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
        implied = {k: s for m in maps for k, s in zip(m.diffusers, m.diffusers_shapes(own[m.ldm]))}
        assert set(own) == {m.ldm for m in maps}
        assert implied == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}


# ------------------------------------------------------------------------------------------- untrusted config values
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None)
@given(
    part=st.sampled_from(["unet", "vqvae", "scheduler"]),
    key=st.text(max_size=3)
    | st.sampled_from(
        sorted({*UNET_DEFAULTS, *VQ_DEFAULTS, *SCHEDULER_DEFAULTS, "_class_name", "trained_betas", "scaling_factor"})
    ),
    value=JSON_VALUES,
)
def test_any_config_value_is_converted_or_refused_in_one_line(part, key, value):
    """Whatever an untrusted config.json holds, the validators answer with a layout or a one-line DiffusersFormatError
    (no TypeError/KeyError/OverflowError from deep inside, nothing allocated)."""
    base = {
        "unet": {**CELEBAHQ_UNET, "_class_name": "UNet2DModel"},
        "vqvae": {**VQ_F4, "_class_name": "VQModel"},
        "scheduler": compvis_ddim().config,
    }[part]
    data = {**json.loads(json.dumps(dict(base))), key: value}
    read = {"unet": unet_layout_from_config, "vqvae": vq_layout_from_config, "scheduler": schedule_from_config}[part]
    try:
        read(data, f"{part}/config.json")
    except DiffusersFormatError as exc:
        assert "\n" not in str(exc) and f"{part}/config.json" in str(exc)
