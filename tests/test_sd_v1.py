"""Stable Diffusion v1 checkpoints as late-steps experts: configs/stable-diffusion/*.yaml.

Full sizes are built on the meta device only (shapes, no memory) and compared with the reference key lists of
tests/reference/sd_v1_{unet,vae,text_encoder}_keys.json (built from CompVis/stable-diffusion's and transformers' own
code, see their ``_meta``).  Loading and training use the same configs with tiny sizes and a tiny CLIP folder written
by the test; nothing is downloaded.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import string
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from warm_python import run_python

transformers = pytest.importorskip("transformers")

from ldm.checkpoint import (  # noqa: E402
    EMA_SCALAR_KEYS,
    has_ema_weights,
    load_checkpoint,
    load_state_dict,
    load_weights,
)
from ldm.models.diffusion.latent import LatentDiffusion  # noqa: E402
from ldm.refine.loading import load_expert  # noqa: E402
from ldm.untrusted import check_untrusted_model  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "tests" / "reference"
V1_INFERENCE = ROOT / "configs" / "stable-diffusion" / "v1-inference.yaml"
V1_WINDOW = ROOT / "configs" / "stable-diffusion" / "latesteps_v1_0_250.yaml"
# CompVis DDPM.register_schedule's persistent buffers (stable-diffusion@21f890f9 ldm/models/diffusion/ddpm.py), each
# [timesteps]; lvlb_weights is persistent=False and logvar a plain tensor, so neither is in a checkpoint.
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
POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"
D = 32  # tiny CLIP width = the tiny UNet's context_dim


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def write_clip_folder(folder: Path, **text_config: Any) -> Path:
    """A config-only CLIP folder (as FrozenCLIPEmbedder reads it): a letters-only BPE tokenizer saved with
    CLIPTokenizer.save_pretrained, and CLIPTextConfig(**text_config).save_pretrained (no weights file)."""
    src = folder / "src"
    src.mkdir(parents=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in string.ascii_lowercase:
            vocab[c + suffix] = len(vocab)
    (src / "vocab.json").write_text(json.dumps(vocab))
    (src / "merges.txt").write_text("#version: 0.2\n")
    transformers.CLIPTokenizer.from_pretrained(str(src), local_files_only=True).save_pretrained(str(folder))
    shutil.rmtree(src)
    transformers.CLIPTextConfig(**text_config).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def full_clip_dir(tmp_path_factory) -> Path:
    """openai/clip-vit-large-patch14's text config (SD v1's), config only."""
    meta = json.loads((REFERENCE / "sd_v1_text_encoder_keys.json").read_text())["_meta"]
    config = {k: v for k, v in meta["text_config"].items() if k != "projection_dim"}  # CLIPModel's, not the text's
    return write_clip_folder(tmp_path_factory.mktemp("clip_full"), **config)


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory) -> Path:
    return write_clip_folder(
        tmp_path_factory.mktemp("clip_tiny"),
        vocab_size=54,
        hidden_size=D,
        intermediate_size=2 * D,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def model_config(path: Path, clip_dir: Path) -> dict[str, Any]:
    """The model section of a shipped YAML (``base_learning_rate`` is main.py's), with the CLIP folder set."""
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)["model"]
    cfg.pop("base_learning_rate")
    cfg["params"]["cond_stage_config"]["params"]["version"] = str(clip_dir)
    return cfg


TINY_UNET = {"model_channels": 32, "channel_mult": [1, 2], "attention_resolutions": [1], "num_res_blocks": 1, "context_dim": D}
TINY_VAE = {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "resolution": 16}


def tiny_sd(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` with SD v1's structure kept (SpatialTransformer with cross-attention, KL-f8 layout, CLIP) and tiny
    sizes: UNet 32/64 channels, VAE downsampling by 2, the tiny CLIP's width as context."""
    cfg = copy.deepcopy(cfg)
    params = cfg["params"]
    params.pop("ckpt_path", None)
    params["unet_config"]["params"].update(TINY_UNET)
    params["first_stage_config"]["params"]["ddconfig"].update(TINY_VAE)
    params["image_size"] = 8
    return cfg


def expected_sd_v1_keys() -> dict[str, tuple[int, ...]]:
    """An SD v1 checkpoint's state dict (key -> shape), from the reference lists, without checkpoint-only keys."""
    keys: dict[str, tuple[int, ...]] = {}
    for name, section, prefix in (
        ("sd_v1_unet_keys.json", "unet", "model.diffusion_model."),
        ("sd_v1_vae_keys.json", "autoencoder_kl", "first_stage_model."),
        ("sd_v1_text_encoder_keys.json", "text_encoder", ""),
    ):
        data = json.loads((REFERENCE / name).read_text())
        assert data["_meta"]["count"] == len(data[section])
        keys.update({prefix + k: tuple(v) for k, v in data[section].items()})
    keys.update({name: (1000,) for name in SCHEDULE_BUFFERS})
    return keys


def shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------------------------- full sizes (meta)
def test_unet_of_v1_inference_is_sd_v1s_unet_key_for_key(tiny_clip_dir):
    reference = json.loads((REFERENCE / "sd_v1_unet_keys.json").read_text())
    unet_cfg = model_config(V1_INFERENCE, tiny_clip_dir)["params"]["unet_config"]
    assert unet_cfg["params"] == reference["_meta"]["unet_config_params"]
    with torch.device("meta"):
        unet = instantiate_from_config(unet_cfg)
    ours = shapes(unet)
    assert list(ours) == list(reference["unet"])  # same keys in CompVis' registration order
    assert ours == {k: tuple(v) for k, v in reference["unet"].items()}
    assert sum(p.numel() for p in unet.parameters()) == reference["_meta"]["num_params"] == 859_520_964
    block = "input_blocks.1.1."
    assert ours[block + "proj_in.weight"] == (320, 320, 1, 1)  # v1: 1x1 convs (SD 2: linear)
    assert ours[block + "transformer_blocks.0.attn2.to_k.weight"] == (320, 768)  # cross-attention on CLIP's 768
    assert block + "transformer_blocks.0.attn1.to_q.bias" not in ours


def test_v1_inference_builds_an_sd_v1_checkpoints_state_dict(full_clip_dir):
    with torch.device("meta"):
        model = instantiate_from_config(model_config(V1_INFERENCE, full_clip_dir))
    assert type(model) is LatentDiffusion  # ldm.models.diffusion.ddpm.LatentDiffusion is this class
    assert shapes(model) == expected_sd_v1_keys()
    text = json.loads((REFERENCE / "sd_v1_text_encoder_keys.json").read_text())["_meta"]
    assert POSITION_IDS in text["checkpoint_only"] and POSITION_IDS not in model.state_dict()
    assert model.scale_factor == 0.18215 and model.downsampling_factor == 8 and model.cond_stage_key == "txt"
    assert not model.use_ema and model.model.conditioning_key == "crossattn"
    # CompVis' "linear" schedule is linear in sqrt(beta): betas = linspace(sqrt(0.00085), sqrt(0.012), 1000) ** 2
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    assert torch.allclose(model.betas.double(), betas, rtol=1e-6, atol=0)
    assert torch.allclose(model.alphas_cumprod.double(), torch.cumprod(1 - betas, 0), rtol=1e-5, atol=0)


def test_sd_v1_config_stored_in_a_checkpoint_passes_the_untrusted_checks(full_clip_dir):
    """The dry run load_expert runs on a config read from a checkpoint (every class allowed, every shape checked on the
    meta device), against a full-size SD v1 state dict of meta tensors: released files add position_ids and LitEma's
    two scalars to what the model holds."""
    cfg = model_config(V1_INFERENCE, full_clip_dir)
    cfg["params"]["use_ema"] = False
    state_dict: dict[str, torch.Tensor] = {k: torch.empty(s, device="meta") for k, s in expected_sd_v1_keys().items()}
    with torch.device("meta"):
        schedule = instantiate_from_config(copy.deepcopy(cfg))
    state_dict.update({name: getattr(schedule, name).detach().cpu().clone() for name in SCHEDULE_BUFFERS})
    state_dict[POSITION_IDS] = torch.arange(77)[None]
    state_dict.update({EMA_SCALAR_KEYS[0]: torch.tensor(0.9999), EMA_SCALAR_KEYS[1]: torch.tensor(470000)})
    check_untrusted_model(cfg, state_dict, "checkpoint sd-v1.ckpt")  # raises on anything refused


# ---------------------------------------------------------------------------------------------- tiny SD-shaped files
@pytest.fixture(scope="module")
def tiny_cfg(tiny_clip_dir) -> dict[str, Any]:
    return tiny_sd(model_config(V1_INFERENCE, tiny_clip_dir))


@pytest.fixture(scope="module")
def sd_files(tmp_path_factory, tiny_cfg, tiny_clip_dir) -> dict[str, Any]:
    """A tiny SD-v1-layout model saved as an original-style .ckpt ({"state_dict": ...}) and as a .safetensors of the
    flat state dict, both with the transformers-4 position_ids; plus an EMA-only-release variant (LitEma's scalars)."""
    folder = tmp_path_factory.mktemp("sd_files")
    torch.manual_seed(0)
    model = instantiate_from_config(copy.deepcopy(tiny_cfg))
    with torch.no_grad():  # the UNet's zero-initialised output convs too: every tensor distinguishable
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    state_dict = {**weights, POSITION_IDS: torch.arange(77)[None]}
    from safetensors.torch import save_file

    paths = {
        "ckpt": folder / "sd-tiny.ckpt",
        "safetensors": folder / "sd-tiny.safetensors",
        "emaonly": folder / "sd-tiny-emaonly.ckpt",
    }
    torch.save({"state_dict": state_dict, "global_step": 470000, "epoch": 6}, paths["ckpt"])
    save_file(state_dict, str(paths["safetensors"]))
    ema_scalars = {EMA_SCALAR_KEYS[0]: torch.tensor(0.9999), EMA_SCALAR_KEYS[1]: torch.tensor(470000, dtype=torch.int)}
    torch.save({"state_dict": {**state_dict, **ema_scalars}, "global_step": 470000}, paths["emaonly"])
    config = folder / "v1-tiny.yaml"
    OmegaConf.save(OmegaConf.create({"model": tiny_cfg}), config)
    return {"paths": paths, "weights": weights, "config": config}


def assert_same_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], prefixes: tuple[str, ...] = ("",)):
    own = model.state_dict()
    checked = [k for k in weights if k.startswith(prefixes)]
    assert checked and all(torch.equal(own[k], weights[k]) for k in checked)


@pytest.mark.parametrize("kind", ["ckpt", "safetensors"])
def test_sd_v1_file_loads_key_for_key_strict_through_the_safe_loader(sd_files, tiny_cfg, kind):
    state_dict = load_state_dict(sd_files["paths"][kind])
    assert set(state_dict) == set(sd_files["weights"]) | {POSITION_IDS}
    torch.manual_seed(1)
    model = instantiate_from_config(copy.deepcopy(tiny_cfg))
    missing, unexpected = load_weights(model, state_dict, strict=True, source=kind)
    assert missing == [] and unexpected == []  # position_ids: dropped by FrozenCLIPEmbedder's pre-hook
    assert_same_weights(model, sd_files["weights"])


def test_ema_only_release_has_no_ema_weights(sd_files):
    state_dict = load_state_dict(sd_files["paths"]["emaonly"])
    assert not has_ema_weights(state_dict)
    assert has_ema_weights({**state_dict, "model_ema.diffusion_modelout0weight": torch.zeros(1)})


def test_window_init_from_an_ema_only_release_starts_the_ema_from_the_loaded_unet(sd_files, tiny_clip_dir):
    """latesteps_v1_0_250.yaml ignores the file's model_ema.* (ignore_keys): the EMA starts from the loaded UNet with a
    fresh warm-up, not from the random initialisation (the file holds LitEma's scalars but no EMA weights)."""
    cfg = tiny_sd(model_config(V1_WINDOW, tiny_clip_dir))
    cfg["params"]["ckpt_path"] = str(sd_files["paths"]["emaonly"])
    model = instantiate_from_config(cfg)
    assert_same_weights(model, sd_files["weights"], ("model.", "first_stage_model.", "cond_stage_model."))
    shadow = dict(model.model_ema.named_buffers())
    for name, param in model.model.named_parameters():
        assert torch.equal(shadow[model.model_ema.m_name2s_name[name]], param)
    assert int(model.model_ema.num_updates) == 0


@pytest.mark.parametrize("kind", ["ckpt", "safetensors"])
def test_refiner_loads_an_sd_v1_file_with_the_yaml(sd_files, kind):
    expert, info = load_expert(sd_files["paths"][kind], config=sd_files["config"])
    assert expert.window == (0, 1000) and info.config_source.endswith("v1-tiny.yaml")
    assert not hasattr(expert.model, "model_ema")
    assert_same_weights(expert.model, sd_files["weights"])


def test_refiner_uses_the_model_weights_of_an_ema_only_release(sd_files):
    expert, _ = load_expert(sd_files["paths"]["emaonly"], config=sd_files["config"])
    assert_same_weights(expert.model, sd_files["weights"], ("model.",))


# ------------------------------------------------------------------------------------------------ the window config
def test_window_config_trains_only_the_unet_on_its_window(tiny_clip_dir, sd_files, photos):
    cfg = tiny_sd(model_config(V1_WINDOW, tiny_clip_dir))
    cfg["params"]["ckpt_path"] = str(sd_files["paths"]["ckpt"])
    params = cfg["params"]
    assert (params["t_min"], params["t_max"]) == (0, 250) and params["use_ema"]
    assert params["unet_config"]["params"]["use_checkpoint"] and not params["cond_stage_trainable"]
    assert params["ucg_training"] == {"caption": {"p": 0.1, "val": ""}} and params["cond_stage_key"] == "caption"
    torch.manual_seed(0)
    model = instantiate_from_config(cfg).train()
    seen: list[torch.Tensor] = []
    p_losses = model.p_losses

    def spy(x_start, cond, t, *args, **kwargs):
        seen.append(t)
        assert cond.shape == (x_start.shape[0], 77, D)  # CLIP features of the (possibly dropped) captions
        return p_losses(x_start, cond, t, *args, **kwargs)

    model.p_losses = spy
    images = torch.from_numpy(np.stack([photos[i % len(photos)][:16, 16 * i : 16 * i + 16] for i in range(4)]))
    images = images.float() / 127.5 - 1.0  # [4, 16, 16, 3] in [-1, 1], as ImageFolderDataset gives
    batch = {"image": images, "caption": ["a cat", "", "zebra", "a dog"]}
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):  # LatentDiffusion.training_step without Lightning's logging: caption dropout, then the loss
        model.zero_grad(set_to_none=True)
        loss, _ = model.shared_step(model.apply_ucg(batch, gen))
        loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    unet = {n for n, _ in model.named_parameters() if n.startswith("model.diffusion_model.")}
    assert with_grad == unet  # every UNet parameter, nothing of the VAE or the text encoder
    assert not any(p.requires_grad for p in model.first_stage_model.parameters())
    assert not any(p.requires_grad for p in model.cond_stage_model.parameters())
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for n, p in model.named_parameters() if n in unet}
    t = torch.cat(seen)
    assert t.numel() == 8 and int(t.min()) >= 0 and int(t.max()) < 250


# Shrinks the shipped window config for a CPU run of main.py; everything else (targets, window, EMA, captions, caption
# dropout, frozen stages, gradient checkpointing, bf16-mixed) is the shipped config's.
WINDOW_OVERLAY = """
model:
  base_learning_rate: 1.0e-03
  params:
    ckpt_path: {ckpt}
    image_size: 8
    scheduler_config: null
    unet_config:
      params: {unet}
    first_stage_config:
      params:
        ddconfig: {vae}
    cond_stage_config:
      params:
        version: {clip}
data:
  params:
    batch_size: 2
    num_workers: 0
    train:
      params: {{root: {root}, size: 16, val_fraction: 0.25}}
    validation:
      params: {{root: {root}, size: 16, val_fraction: 0.25}}
lightning:
  trainer:
    accelerator: cpu
    devices: 1
    max_steps: 2
    num_sanity_val_steps: 0
    limit_val_batches: 1
    val_check_interval: 2
    enable_progress_bar: false
    enable_model_summary: false
    log_every_n_steps: 1
    benchmark: false
  callbacks:
    image_logger:
      params: {{batch_frequency: 1000}}
"""


def test_window_config_finetunes_with_main_py_and_refines(tmp_path, tiny_clip_dir, sd_files, photos):
    root = tmp_path / "images"
    root.mkdir()
    for i in range(8):
        Image.fromarray(photos[i % len(photos)][:24, 24 * i : 24 * i + 24]).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(f"photo number {string.ascii_lowercase[i]}\n", encoding="utf-8")
    overlay = tmp_path / "tiny.yaml"
    overlay.write_text(
        WINDOW_OVERLAY.format(
            ckpt=sd_files["paths"]["emaonly"],
            unet=json.dumps(TINY_UNET),
            vae=json.dumps(TINY_VAE),
            clip=tiny_clip_dir,
            root=root,
        )
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("LATESTEPS_LOGDIR", None)
    argv = [ROOT / "main.py", "-b", V1_WINDOW, overlay, "-t", "-l", tmp_path / "logs"]
    result = run_python(argv, cwd=tmp_path, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    (run,) = (tmp_path / "logs").iterdir()
    last = run / "checkpoints" / "last.ckpt"
    ckpt = load_checkpoint(last)
    assert ckpt["global_step"] == 2 and ckpt["window"] == [0, 250]
    stored = ckpt["config"]["model"]["params"]
    assert stored["ucg_training"]["caption"]["p"] == 0.1 and stored["unet_config"]["params"]["use_checkpoint"]
    saved = ckpt["state_dict"]
    frozen = [k for k in sd_files["weights"] if k.startswith(("first_stage_model.", "cond_stage_model."))]
    assert frozen and all(torch.equal(saved[k], sd_files["weights"][k]) for k in frozen)
    unet = [k for k in sd_files["weights"] if k.startswith("model.diffusion_model.")]
    assert any(not torch.equal(saved[k], sd_files["weights"][k]) for k in unet)  # trained
    assert has_ema_weights(saved) and int(saved["model_ema.num_updates"]) == 2
    # the refiner builds it from the config stored in the checkpoint (untrusted: allow-list, dry run, shapes)
    expert, info = load_expert(last)
    assert expert.window == (0, 250) and info.config_source == "checkpoint" and info.ema
