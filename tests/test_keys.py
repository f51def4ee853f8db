"""The real CompVis architectures build exactly the state-dict keys and shapes of the released checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.util import instantiate_from_config

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference"
if not REFERENCE.exists():  # CI clones the repository alone; the reference lists travel inside tests/
    REFERENCE = ROOT / "tests" / "reference"


def _reference(name: str) -> dict:
    return json.loads((REFERENCE / name).read_text())


def _shapes(module: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def celebahq_config():
    cfg = OmegaConf.load(ROOT / "configs" / "latent-diffusion" / "celebahq-ldm-vq-4.yaml")
    del cfg.model.params.first_stage_config.params["ckpt_path"]
    return cfg


def test_unet_keys_equal_reference(celebahq_config):
    ref = _reference("ldm_keys_celebahq_vq4.json")
    with torch.device("meta"):
        unet = instantiate_from_config(celebahq_config.model.params.unet_config)
    assert _shapes(unet) == ref["unet"]
    assert sum(p.numel() for p in unet.parameters()) == ref["_meta"]["unet_num_params"]


def test_latent_diffusion_keys_equal_reference(celebahq_config):
    ref = _reference("ldm_keys_celebahq_vq4.json")
    with torch.device("meta"):
        model = instantiate_from_config(celebahq_config.model)
    shapes = _shapes(model)
    assert set(shapes) == set(ref["latent_diffusion"])
    assert shapes == ref["latent_diffusion"]
    sd = model.state_dict()
    assert sd["model_ema.num_updates"].dtype == torch.int32
    non_f32 = {k: str(v.dtype).replace("torch.", "") for k, v in sd.items() if v.dtype != torch.float32}
    assert non_f32 == ref["_meta"]["non_float32_in_full"]
    # the schedule buffers are real CPU values even when the networks live on the meta device
    assert model.betas.device.type == "cpu" and torch.isfinite(model.betas).all()


def test_vq_f4_keys_equal_reference():
    ref = _reference("vq_f4_keys.json")
    cfg = OmegaConf.load(ROOT / "configs" / "autoencoder" / "vq_f4.yaml")
    params = OmegaConf.to_container(cfg.model.params, resolve=True)
    params["lossconfig"] = {"target": "torch.nn.Identity"}
    params.pop("ckpt_path", None)
    with torch.device("meta"):
        vq = instantiate_from_config({"target": "ldm.models.autoencoder.VQModel", "params": params})
    assert _shapes(vq) == ref["vq_model"]
    assert sum(p.numel() for p in vq.parameters()) == ref["_meta"]["num_params"]
