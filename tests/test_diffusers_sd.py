"""diffusers Stable Diffusion v1 folders (ldm.convert.from_diffusers, export_diffusers): import against diffusers' and
transformers' own models, refinement against a diffusers DDIM loop with the prompt (guidance scale 1 and > 1),
export -> import round trips, refused variants (SD 2.x, SDXL, v-prediction, inpainting, non-SD UNets) and the CLI.

A tiny random SD-shaped pipeline is built with diffusers' classes (UNet2DConditionModel 32/64 with cross-attention on
a 32-wide CLIPTextModel, a 2-level AutoencoderKL, a letters-only CLIPTokenizer, DDIMScheduler) and saved with
``save_pretrained`` (float32); nothing downloads.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

diffusers = pytest.importorskip("diffusers", reason="diffusers is the optional extra pip install -e .[diffusers]")
transformers = pytest.importorskip("transformers")

from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from safetensors.torch import load_file  # noqa: E402

from ldm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint  # noqa: E402
from ldm.convert.common import DiffusersFormatError  # noqa: E402
from ldm.convert.diffusers import checkpoint_to_diffusers, diffusers_to_checkpoint, load_diffusers_expert  # noqa: E402
from ldm.convert.from_diffusers import sd_to_checkpoint  # noqa: E402
from ldm.convert.sd_map import (  # noqa: E402
    COND_UNET_DEFAULTS,
    KL_DEFAULTS,
    check_text_config,
    cond_unet_layout_from_config,
    kl_layout_from_config,
)
from ldm.refine.loading import load_expert  # noqa: E402
from ldm.sampling import NoiseSchedule, build_plan, run_tail  # noqa: E402
from ldm.sampling.denoisers import ModelDenoiser  # noqa: E402
from ldm.sampling.guidance import Guidance, guided_plan  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402

from conftest import photo_crops  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
D = 32  # the tiny CLIP's width = the UNet's cross_attention_dim
PROMPT = "a red fox in the snow"
SUPPORTED = "supported: Stable Diffusion v1.x folders"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


# --------------------------------------------------------------------------------------------------------- builders
def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter drawn at random (zero-initialised layers would hide a wrong map)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return module.eval()


def tiny_tokenizer(folder: Path):
    """A letters-only BPE CLIP tokenizer (as tests/test_sd_v1.py writes it)."""
    folder.mkdir(parents=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in string.ascii_lowercase:
            vocab[c + suffix] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def tiny_unet(**overrides) -> UNet2DConditionModel:
    kwargs = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=D,
        attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    kwargs.update(overrides)
    return randomize(UNet2DConditionModel(**kwargs), 1)


def save_sd(folder: Path, unet: UNet2DConditionModel | None = None) -> Path:
    """A tiny SD v1-shaped pipeline saved as diffusers saves it (SD v1's schedule, CompVis' DDIM settings)."""
    text = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
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
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        sample_size=16,
        layers_per_block=1,
    )
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    StableDiffusionPipeline(
        vae=randomize(vae, 2),
        text_encoder=randomize(text, 3),
        tokenizer=tiny_tokenizer(folder.parent / f"{folder.name}_tok"),
        unet=unet or tiny_unet(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(folder)
    return folder


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is ...:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory) -> Path:
    return save_sd(tmp_path_factory.mktemp("diffusers_sd") / "sd")


@pytest.fixture(scope="module")
def sd_expert(sd_folder):
    return load_diffusers_expert(sd_folder)[0]


@pytest.fixture(scope="module")
def theirs(sd_folder):
    """diffusers' and transformers' own modules, loaded from the folder."""
    return {
        "unet": UNet2DConditionModel.from_pretrained(sd_folder, subfolder="unet").eval(),
        "vae": AutoencoderKL.from_pretrained(sd_folder, subfolder="vae").eval(),
        "text": transformers.CLIPTextModel.from_pretrained(str(sd_folder / "text_encoder"), local_files_only=True).eval(),
        "tokenizer": transformers.CLIPTokenizer.from_pretrained(str(sd_folder / "tokenizer"), local_files_only=True),
    }


def embed(theirs, prompt: str) -> torch.Tensor:
    """diffusers' StableDiffusionPipeline prompt encoding: pad to 77 tokens, the text model's last hidden state."""
    ids = theirs["tokenizer"]([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return theirs["text"](ids.input_ids).last_hidden_state


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------------------------------ import
def test_every_weight_maps_strict_both_ways(sd_folder):
    ckpt = diffusers_to_checkpoint(sd_folder)
    cfg = ckpt["config"]["model"]
    params = cfg["params"]
    assert cfg["target"] == "ldm.models.diffusion.ddpm.LatentDiffusion" and "window" not in ckpt
    assert params["conditioning_key"] == "crossattn" and params["scale_factor"] == 0.18215
    assert (params["beta_schedule"], params["linear_start"], params["linear_end"]) == ("linear", 0.00085, 0.012)
    assert params["cond_stage_config"] == {
        "target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
        "params": {"version": os.path.abspath(sd_folder)},
    }
    unet_params = params["unet_config"]["params"]
    assert (unet_params["num_heads"], unet_params["context_dim"], unet_params["attention_resolutions"]) == (4, D, [1])
    assert params["first_stage_config"]["params"]["ddconfig"]["double_z"] is True
    # no leftovers: every tensor of the three files became exactly one model tensor, and the model has no other
    files = {
        part: load_file(sd_folder / part / name)
        for part, name in (
            ("unet", "diffusion_pytorch_model.safetensors"),
            ("vae", "diffusion_pytorch_model.safetensors"),
            ("text_encoder", "model.safetensors"),
        )
    }
    state = ckpt["state_dict"]
    prefixes = {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "text_encoder": "cond_stage_model."}
    for part, tensors in files.items():
        ours = [k for k in state if k.startswith(prefixes[part])]
        assert len(ours) == len(tensors), part
        assert sum(state[k].numel() for k in ours) == sum(t.numel() for t in tensors.values()), part
    fresh = instantiate_from_config({**cfg, "params": {**params, "use_ema": False}})
    assert set(state) == set(fresh.state_dict())
    for k, v in fresh.state_dict().items():
        assert state[k].shape == v.shape, k


def test_unet_equals_diffusers_unet_with_text_context(sd_expert, theirs):
    x = torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    t = torch.tensor([0, 250, 999])
    context = torch.randn((3, 7, D), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ours = sd_expert.model.apply_model(x, t, context)  # LatentDiffusion wraps it as c_crossattn
        torch.testing.assert_close(ours, theirs["unet"](x, t, encoder_hidden_states=context).sample, rtol=1e-5, atol=1e-5)


def test_vae_encode_mean_and_decode_equal_diffusers(sd_expert, theirs):
    x = photo_crops(2, 16, seed=2)
    ours = sd_expert.model.first_stage_model
    with torch.no_grad():
        posterior = ours.encode(x)
        reference = theirs["vae"].encode(x).latent_dist
        torch.testing.assert_close(posterior.mode(), reference.mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(posterior.logvar, reference.logvar, rtol=1e-5, atol=1e-5)
        z = reference.mean
        torch.testing.assert_close(ours.decode(z), theirs["vae"].decode(z).sample, rtol=1e-5, atol=1e-5)
        # LatentDiffusion scales as SD pipelines do: latents * scaling_factor in, / scaling_factor out
        scaled = z * theirs["vae"].config.scaling_factor
        torch.testing.assert_close(
            sd_expert.model.decode_first_stage(scaled), theirs["vae"].decode(z).sample, rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("prompt", [PROMPT, ""])
def test_text_embedding_equals_clip_last_hidden_state(sd_expert, theirs, prompt):
    with torch.no_grad():
        ours = sd_expert.model.get_learned_conditioning([prompt])
    assert ours.shape == (1, 77, D)
    torch.testing.assert_close(ours, embed(theirs, prompt), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_refinement_with_the_prompt_equals_a_diffusers_ddim_loop(sd_expert, sd_folder, theirs, scale):
    """This project's plan + guidance + loop against diffusers' DDIMScheduler stepping diffusers' UNet, with
    classifier-free guidance computed here as eps_u + s (eps_c - eps_u) (the empty prompt as unconditional)."""
    model = sd_expert.model
    x = photo_crops(1, 16, seed=3)
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        cond, uncond = model.get_learned_conditioning([PROMPT]), model.get_learned_conditioning([""])
        plan = build_plan(NoiseSchedule.from_model(model), 400, [ModelDenoiser(model)], "cpu", ddim_steps=10)
        plan = guided_plan(plan, Guidance(cond, uncond, scale))
        z0 = model.scale_factor * model.encode_first_stage(x).mode()  # refinement encodes with the posterior mean
        z, _ = run_tail(plan, z0, noise)
        ours = model.decode_first_stage(z)

    unet, vae = theirs["unet"], theirs["vae"]
    scheduler = DDIMScheduler.from_pretrained(sd_folder, subfolder="scheduler")
    scheduler.set_timesteps(10)
    tail = [t for t in scheduler.timesteps if int(t) <= 400]
    assert [int(t) for t in tail] == list(plan.timesteps) == [301, 201, 101, 1]
    text_c, text_u = embed(theirs, PROMPT), embed(theirs, "")
    with torch.no_grad():
        latents = scheduler.add_noise(vae.encode(x).latent_dist.mean * vae.config.scaling_factor, noise, tail[0].reshape(1))
        for t in tail:
            eps_c = unet(latents, t, encoder_hidden_states=text_c).sample
            eps = eps_c
            if scale != 1.0:
                eps_u = unet(latents, t, encoder_hidden_states=text_u).sample
                eps = eps_u + scale * (eps_c - eps_u)
            latents = scheduler.step(eps, t, latents, eta=0.0).prev_sample
        image = vae.decode(latents / vae.config.scaling_factor).sample
    torch.testing.assert_close(z, latents, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours, image, rtol=1e-4, atol=1e-4)


def test_converted_checkpoint_loads_in_the_refiner_and_refines_with_the_prompt(sd_folder, tmp_path):
    from ldm.refine import Prompt, Refiner
    from ldm.refine.request import RefineRequest

    path = tmp_path / "sd.ckpt"
    save_checkpoint(diffusers_to_checkpoint(sd_folder), path)
    expert, info = load_expert(path)  # the embedded config passes the untrusted-config checks
    direct, _ = load_diffusers_expert(sd_folder)
    own = direct.model.state_dict()
    assert info.config_source == "checkpoint" and expert.window == (0, 1000)
    assert all(torch.equal(v, own[k]) for k, v in expert.model.state_dict().items())
    refiner = Refiner.from_checkpoints([path], device="cpu")
    x = photo_crops(1, 16, seed=4)
    request = RefineRequest(start_t=300, ddim_steps=10, prompt=Prompt(PROMPT, guidance_scale=2.0), seed=3)
    a, b = refiner.refine(x, request), refiner.refine(x, request)
    assert a.shape == x.shape and torch.isfinite(a).all() and torch.equal(a, b)
    other = RefineRequest(start_t=300, ddim_steps=10, prompt=Prompt("snow", guidance_scale=2.0), seed=3)
    assert not torch.equal(a, refiner.refine(x, other))


def test_a_kl_first_stage_encodes_with_its_mean_or_a_sample_seeded_per_sample(sd_folder, tmp_path):
    from ldm.refine import Prompt, Refiner
    from ldm.refine.request import RefineRequest

    path = tmp_path / "sd.ckpt"
    save_checkpoint(diffusers_to_checkpoint(sd_folder), path)
    mean = Refiner.from_checkpoints([path], device="cpu")
    sampled = Refiner.from_checkpoints([path], device="cpu", first_stage_posterior="sample")
    x = photo_crops(2, 16, seed=5)
    request = RefineRequest(start_t=200, tail_steps=2, prompt=Prompt(PROMPT, guidance_scale=1.0))
    a = sampled.refine(x, request, [3, 4])
    assert torch.equal(a, sampled.refine(x, request, [3, 4]))  # seeded
    assert torch.equal(a[1:], sampled.refine(x[1:], request, [4]))  # each sample's draw from its own generator
    assert not torch.equal(a, mean.refine(x, request, [3, 4]))  # a sample is not the mean
    with pytest.raises(ValueError, match="first_stage_posterior='mode' must be one of"):
        Refiner.from_checkpoints([path], device="cpu", first_stage_posterior="mode")


# ------------------------------------------------------------------------------------------------------------ export
@pytest.fixture(scope="module")
def window_expert(sd_folder, tmp_path_factory) -> Path:
    """An SD-shaped window expert (t in [0, 250)) saved as main.py saves it, its EMA different from its weights."""
    base = diffusers_to_checkpoint(sd_folder)
    cfg = json.loads(json.dumps(base["config"]["model"]))
    cfg["target"] = "ldm.models.diffusion.latesteps.LateStepsLatentDiffusion"
    cfg["params"].update(t_min=0, t_max=250, use_ema=True)
    model = instantiate_from_config(cfg)
    model.load_state_dict(base["state_dict"], strict=False)
    model.model_ema = type(model.model_ema)(model.model)
    with torch.no_grad():
        for buf in model.model_ema.buffers():
            if buf.is_floating_point() and buf.ndim:
                buf.add_(0.05)
    path = tmp_path_factory.mktemp("sd_window") / "sd_0_250.ckpt"
    save_checkpoint({"state_dict": model.state_dict(), "config": {"model": cfg}, "window": [0, 250]}, path)
    return path


def test_export_import_round_trip_is_bit_exact(window_expert, tmp_path):
    out, info = checkpoint_to_diffusers(window_expert, tmp_path / "exported")
    assert info.ema and info.window == (0, 250)
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert json.loads((out / "unet" / "config.json").read_text())["_latesteps_window"] == [0, 250]
    back = diffusers_to_checkpoint(out)
    assert back["window"] == [0, 250]
    assert back["config"]["model"]["target"] == "ldm.models.diffusion.latesteps.LateStepsLatentDiffusion"
    source, _ = load_expert(window_expert, ema=True)  # the EMA weights, as exported
    want = source.model.state_dict()
    assert set(back["state_dict"]) == set(want)
    differ = [k for k in want if not torch.equal(back["state_dict"][k], want[k])]
    assert not differ, differ[:5]
    path = tmp_path / "back.ckpt"
    save_checkpoint(back, path)
    again, _ = checkpoint_to_diffusers(path, tmp_path / "again")
    for rel in (
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "unet/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        "scheduler/scheduler_config.json",
        "model_index.json",
    ):
        assert (out / rel).read_bytes() == (again / rel).read_bytes(), rel


def test_exported_folder_loads_in_diffusers_with_equal_outputs(window_expert, tmp_path):
    out, _ = checkpoint_to_diffusers(window_expert, tmp_path / "exported")
    model = load_expert(window_expert)[0].model
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    assert pipe.vae.config.scaling_factor == 0.18215 and pipe.unet.config["_latesteps_window"] == [0, 250]
    text = transformers.CLIPTextModel.from_pretrained(str(out / "text_encoder"), local_files_only=True).eval()
    ids = pipe.tokenizer([PROMPT], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    x = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([3, 200])
    with torch.no_grad():
        context = model.get_learned_conditioning([PROMPT])
        torch.testing.assert_close(text(ids).last_hidden_state, context, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            pipe.unet.eval()(x, t, encoder_hidden_states=context.expand(2, -1, -1)).sample,
            model.apply_model(x, t, context.expand(2, -1, -1)),
            rtol=1e-5,
            atol=1e-5,
        )
        image = photo_crops(1, 16)
        torch.testing.assert_close(
            pipe.vae.eval().encode(image).latent_dist.mean, model.first_stage_model.encode(image).mode(), rtol=1e-5, atol=1e-5
        )
    torch.testing.assert_close(pipe.scheduler.alphas_cumprod, model.alphas_cumprod, rtol=1e-5, atol=0.0)


# ------------------------------------------------------------------------------------------------------------ refused
def _replace_unet(folder: Path, unet, cls: str) -> None:
    shutil.rmtree(folder / "unet")
    unet.save_pretrained(folder / "unet")
    edit_json(folder / "model_index.json", unet=["diffusers", cls])


REFUSED = {
    "sd2_linear_projection": (
        lambda f: edit_json(f / "unet" / "config.json", use_linear_projection=True),
        "use_linear_projection=True is not supported",
    ),
    "v_prediction": (
        lambda f: edit_json(f / "scheduler" / "scheduler_config.json", prediction_type="v_prediction"),
        "prediction_type='v_prediction' is not supported",
    ),
    "sdxl_addition_embed": (
        lambda f: edit_json(f / "unet" / "config.json", addition_embed_type="text_time"),
        "addition_embed_type='text_time' is not supported",
    ),
    "sdxl_second_text_encoder": (
        lambda f: edit_json(f / "model_index.json", text_encoder_2=["transformers", "CLIPTextModelWithProjection"]),
        "component 'text_encoder_2' (CLIPTextModelWithProjection) is not part of a Stable Diffusion v1 pipeline",
    ),
    "unconditional_unet": (
        lambda f: _replace_unet(
            f,
            UNet2DModel(
                sample_size=8,
                in_channels=4,
                out_channels=4,
                block_out_channels=(32, 64),
                down_block_types=("DownBlock2D",) * 2,
                up_block_types=("UpBlock2D",) * 2,
            ),
            "UNet2DModel",
        ),
        "_class_name='UNet2DModel' is not a Stable Diffusion UNet",
    ),
    "inpainting": (
        lambda f: edit_json(f / "unet" / "config.json", in_channels=9),
        "differs from in_channels=9: inpainting / depth UNets",
    ),
    "no_tokenizer": (lambda f: shutil.rmtree(f / "tokenizer"), "tokenizer/ holds no CLIP tokenizer"),
    "vq_first_stage": (
        lambda f: edit_json(f / "vae" / "config.json", _class_name="VQModel"),
        "_class_name='VQModel' is not a KL autoencoder",
    ),
    "text_width": (
        lambda f: edit_json(f / "unet" / "config.json", cross_attention_dim=64),
        "cross_attention_dim=64 but the text encoder's hidden_size is 32",
    ),
    "huge_text_encoder": (
        lambda f: edit_json(f / "text_encoder" / "config.json", num_hidden_layers=10**9),
        "num_hidden_layers=1000000000 must be an integer in [1, 64]",
    ),
}


@pytest.fixture(scope="module")
def refused_folders(sd_folder, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sd_refused")
    folders = {}
    for name, (damage, _) in REFUSED.items():
        folders[name] = root / name
        shutil.copytree(sd_folder, folders[name])
        damage(folders[name])
    return folders


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_unsupported_variants_are_refused_in_one_line(name, refused_folders):
    with pytest.raises(CheckpointError) as excinfo:
        load_expert(refused_folders[name])  # the refine entry point dispatches folders to the converter
    message = one_line_error(excinfo)
    assert REFUSED[name][1] in message and str(refused_folders[name]) in message, message
    if name in ("sd2_linear_projection", "sdxl_addition_embed", "sdxl_second_text_encoder", "unconditional_unet"):
        assert SUPPORTED in message


def test_a_path_that_is_not_a_folder_is_named_as_such(tmp_path):
    (tmp_path / "file.txt").write_text("not a folder")
    for path in (tmp_path / "missing", tmp_path / "file.txt"):
        with pytest.raises(DiffusersFormatError, match=f"^{re.escape(str(path))} is not a folder$"):
            sd_to_checkpoint(path)


# -------------------------------------------------------------------------------------------------------------- CLI
def test_convert_cli_both_directions_in_a_subprocess(sd_folder, refused_folders, tmp_path):
    """One interpreter runs the CLI four times (import, export, and a refused folder exits 2 in one line, before
    writing)."""
    code = f"""
import sys
sys.path.insert(0, {str(REPO / "scripts")!r})
from convert_diffusers import main
t = {str(tmp_path)!r}
print("RC", main(["--from-diffusers", {str(sd_folder)!r}, "--out", t + "/sd.ckpt"]))
print("RC", main(["--to-diffusers", t + "/sd.ckpt", "--out", t + "/exported"]))
try:
    main(["--from-diffusers", {str(sd_folder)!r}, "--out", t + "/sd.ckpt"])
except SystemExit as exc:
    print("RC", exc.code)
print("RC", main(["--from-diffusers", {str(refused_folders["sd2_linear_projection"])!r}, "--out", t + "/sd2.ckpt"]))
"""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert [line for line in proc.stdout.splitlines() if line.startswith("RC")] == ["RC 0", "RC 0", "RC 2", "RC 2"], (
        proc.stdout + proc.stderr
    )
    assert "text-conditioned" in proc.stdout and "scale_factor 0.18215" in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("convert_diffusers.py: error:")]
    assert len(errors) == 2 and "already exists" in errors[0] and "use_linear_projection=True" in errors[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "sd.ckpt"]  # nothing else, no temp folder
    for part, name in (("unet", "diffusion_pytorch_model.safetensors"), ("vae", "diffusion_pytorch_model.safetensors")):
        a, b = load_file(sd_folder / part / name), load_file(tmp_path / "exported" / part / name)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), part
    a = load_file(sd_folder / "text_encoder" / "model.safetensors")  # transformers 5 saves without text_model.
    b = load_file(tmp_path / "exported" / "text_encoder" / "model.safetensors")
    assert {"text_model." + k for k in a} == set(b) and all(torch.equal(a[k], b["text_model." + k]) for k in a)
    assert load_checkpoint(tmp_path / "sd.ckpt")["config"]["model"]["params"]["conditioning_key"] == "crossattn"


def test_clip_dir_names_another_local_clip_folder(sd_folder, tmp_path):
    """--clip-dir: the checkpoint's text encoder reads a copy of the tokenizer and text config (no weights needed: the
    checkpoint holds them), so the diffusers folder may go."""
    clip = tmp_path / "clip"
    shutil.copytree(sd_folder / "tokenizer", clip / "tokenizer")
    (clip / "text_encoder").mkdir()
    shutil.copy(sd_folder / "text_encoder" / "config.json", clip / "text_encoder" / "config.json")
    ckpt = diffusers_to_checkpoint(sd_folder, clip_dir=clip)
    assert ckpt["config"]["model"]["params"]["cond_stage_config"]["params"]["version"] == str(clip)
    path = tmp_path / "sd.ckpt"
    save_checkpoint(ckpt, path)
    expert, _ = load_expert(path)
    with torch.no_grad():
        ours = expert.model.get_learned_conditioning([PROMPT])
    direct, _ = load_diffusers_expert(sd_folder)
    with torch.no_grad():
        torch.testing.assert_close(ours, direct.model.get_learned_conditioning([PROMPT]), rtol=0, atol=0)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
SD_UNET = dict(tiny_unet().config)


def test_an_unknown_text_encoder_activation_is_refused_before_transformers_builds_it():
    """hidden_act='x' ended convert_diffusers.py and refine.py in transformers' KeyError traceback."""
    config = {"architectures": ["CLIPTextModel"], "hidden_size": 32, "num_attention_heads": 4}
    check_text_config({**config, "hidden_act": "gelu"}, "text_encoder/config.json")
    for bad in ("x", 3, None):
        with pytest.raises(DiffusersFormatError, match=r"^text_encoder/config.json: hidden_act=.* is not an activation"):
            check_text_config({**config, "hidden_act": bad}, "text_encoder/config.json")


@settings(max_examples=150, deadline=None)
@given(
    part=st.sampled_from(["unet", "vae", "text_encoder"]),
    key=st.text(max_size=3)
    | st.sampled_from(
        sorted(
            {
                *COND_UNET_DEFAULTS,
                *KL_DEFAULTS,
                "hidden_size",
                "num_attention_heads",
                "num_hidden_layers",
                "hidden_act",
                "architectures",
                "model_type",
                "_class_name",
            }
        )
    ),
    value=JSON_VALUES,
)
def test_any_sd_config_value_is_converted_or_refused_in_one_line(part, key, value):
    """Whatever an untrusted config.json holds, the validators answer with a layout or a one-line DiffusersFormatError."""
    base = {
        "unet": {**SD_UNET, "_class_name": "UNet2DConditionModel"},
        "vae": {
            **KL_DEFAULTS,
            "_class_name": "AutoencoderKL",
            "block_out_channels": [32, 64],
            "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2,
        },
        "text_encoder": {"architectures": ["CLIPTextModel"], "hidden_size": 32, "num_attention_heads": 4},
    }[part]
    data = {**json.loads(json.dumps({k: v for k, v in base.items() if k != "_use_default_values"})), key: value}
    read = {"unet": cond_unet_layout_from_config, "vae": kl_layout_from_config, "text_encoder": check_text_config}[part]
    try:
        read(data, f"{part}/config.json")
    except DiffusersFormatError as exc:
        assert "\n" not in str(exc) and f"{part}/config.json" in str(exc)
