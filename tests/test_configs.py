"""Every YAML under configs/ parses, passes main.py's structure checks, and instantiates with tiny overrides.

Tiny overrides keep each config's structure (targets, conditioning, windows, losses, data classes, callbacks) and
shrink only the sizes: UNet widths, the first stage's ddconfig, codebook sizes, image sizes; ``ckpt_path`` entries
(real weights that CI does not have) are removed.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.train.cli import check_config_structure
from ldm.train.trainer import build_callbacks, default_lightning_config
from ldm.util import instantiate_from_config

from conftest import TINY_DDCONFIG, TINY_UNET_PARAMS

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def shrink(node: Any, image_root: str, clip_root: str | None = None) -> Any:
    """A copy of a config subtree with tiny sizes (see the module docstring)."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "ckpt_path":
                continue
            if key == "unet_config":
                params = dict(value["params"])
                keep = {
                    k: params[k]
                    for k in ("in_channels", "out_channels", "num_classes", "context_dim", "use_spatial_transformer")
                    if k in params
                }
                value = {"target": value["target"], "params": {**TINY_UNET_PARAMS, **keep}}
            elif key == "ddconfig":
                value = {
                    **TINY_DDCONFIG,
                    "double_z": value.get("double_z", False),
                    "ch_mult": TINY_DDCONFIG["ch_mult"][: len(value["ch_mult"])],
                }
            elif key == "n_embed":
                value = 64
            elif key in ("image_size",) and isinstance(value, int):
                value = 8
            elif key == "size" and isinstance(value, int):
                value = 32
            elif key == "root":
                value = image_root
            elif key in ("batch_size",):
                value = 2
            elif key in ("num_workers",):
                value = 0
            elif key == "n_samples":
                value = 4
            elif key == "perceptual_weight":
                value = 0.0
            elif key == "version" and clip_root is not None:  # FrozenCLIPEmbedder's local CLIP folder
                value = clip_root
            out[key] = shrink(value, image_root, clip_root)
        return out
    if isinstance(node, list):
        return [shrink(v, image_root, clip_root) for v in node]
    return node


@pytest.fixture(scope="module")
def image_root(tmp_path_factory, photos) -> str:
    root = tmp_path_factory.mktemp("images")
    for i in range(6):
        Image.fromarray(photos[i % len(photos)][::4, ::4]).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(f"photo {i}", encoding="utf-8")  # captions, for captions: required
    return str(root)


@pytest.fixture(scope="module")
def clip_root(tmp_path_factory) -> str:
    """A config-only CLIP folder for FrozenCLIPEmbedder (a letters-only tokenizer and a 1-layer CLIPTextConfig), 768
    wide as SD v1's, so that configs/stable-diffusion/* keep their UNet's context_dim; nothing is downloaded."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("clip")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({c + end: 2 + i for i, (c, end) in enumerate((c, end) for end in ("", "</w>") for c in "abcdefgh")})
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    transformers.CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=768,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=12,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    ).save_pretrained(str(root))
    return str(root)


def test_configs_exist():
    names = {p.relative_to(ROOT / "configs").as_posix() for p in CONFIGS}
    assert {
        "latesteps_500_750.yaml",
        "latesteps_750_1000.yaml",
        "latesteps_500_1000.yaml",
        "autoencoder/vq_f4.yaml",
        "latent-diffusion/celebahq-ldm-vq-4.yaml",
    } <= names
    assert any(n.startswith("quickstart/") for n in names)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(ROOT / "configs").as_posix())
def test_config_parses_and_instantiates_tiny(path, image_root, clip_root):
    cfg = OmegaConf.load(path)
    check_config_structure(cfg)
    plain = OmegaConf.to_container(cfg, resolve=True)
    tiny = shrink(copy.deepcopy(plain), image_root, clip_root)
    torch.manual_seed(0)
    model = instantiate_from_config(tiny["model"])
    if hasattr(model, "t_min"):  # late-steps windows are kept as written
        assert [model.t_min, model.t_max] == [plain["model"]["params"]["t_min"], plain["model"]["params"]["t_max"]]
        comment = path.read_text().splitlines()[0].lower()
        assert "step" in comment and "t = 1000 - k" in path.read_text(), "configs must state the step <-> t mapping"
    if "data" in tiny:
        data = instantiate_from_config(tiny["data"])
        data.setup("fit")
        batch = next(iter(data.train_dataloader()))
        image = batch[model.first_stage_key if hasattr(model, "first_stage_key") else "image"]
        assert image.ndim == 4 and image.shape[-1] == 3 and -1.0 <= float(image.min()) <= float(image.max()) <= 1.0
        if hasattr(model, "shared_step"):
            loss, _ = model.shared_step(batch)
            assert torch.isfinite(loss)
    lightning = OmegaConf.merge(default_lightning_config().lightning, tiny.get("lightning", {}))  # as main.py does
    callbacks = build_callbacks(lightning, model, ckptdir=str(Path(image_root) / "ckpt"), has_validation=True)
    assert callbacks


def test_window_configs_state_their_windows():
    expect = {"latesteps_500_750.yaml": (250, 500), "latesteps_750_1000.yaml": (0, 250), "latesteps_500_1000.yaml": (0, 500)}
    for name, window in expect.items():
        for folder in ("", "quickstart/", "synthetic/"):
            path = ROOT / "configs" / f"{folder}{name}"  # every window has a real-size and a tiny CPU config
            params = OmegaConf.load(path).model.params
            assert (params.t_min, params.t_max) == window, path


def test_shrink_keeps_structure():
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "latesteps_500_750.yaml"), resolve=True)
    tiny = shrink(cfg, "/data")
    assert tiny["model"]["target"] == cfg["model"]["target"]
    assert "ckpt_path" not in tiny["model"]["params"]["first_stage_config"]["params"]
    assert np.isclose(tiny["model"]["params"]["linear_end"], 0.0195)


@pytest.mark.parametrize(
    "path",
    [
        *sorted((ROOT / "configs" / "quickstart").glob("latesteps_*.yaml")),
        *sorted((ROOT / "configs" / "synthetic").glob("latesteps_*.yaml")),
        ROOT / "configs" / "synthetic" / "full_range.yaml",
    ],
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_quickstart_first_stage_is_the_quickstart_vq(path):
    """The late-steps configs restore their folder's vq_f4.yaml checkpoint: their first_stage_config must build that
    network (a dropped attention block or another codebook size would not load)."""
    vq = OmegaConf.to_container(OmegaConf.load(path.parent / "vq_f4.yaml").model.params)
    first = OmegaConf.to_container(OmegaConf.load(path).model.params.first_stage_config.params)
    assert first["ddconfig"] == vq["ddconfig"]
    assert (first["embed_dim"], first["n_embed"]) == (vq["embed_dim"], vq["n_embed"])
