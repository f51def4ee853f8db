"""diffusers interop (ldm.convert): import against diffusers' own models, refinement against a diffusers DDIM loop,
export -> import round trips, refused folders and window-model init.  The CLIs: test_convert_cli.py; the key maps at
real size and on untrusted config values: test_unet_map.py (both import this file's builders).

Tiny random models are built with diffusers' classes and saved with ``save_pretrained`` (float32); nothing downloads.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is the optional extra pip install -e .[diffusers]")

from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    LDMPipeline,
    UNet2DConditionModel,
    UNet2DModel,
    VQModel,
)
from safetensors.torch import load_file  # noqa: E402

from ldm.checkpoint import CheckpointError, UnsafeCheckpointError, load_checkpoint, save_checkpoint  # noqa: E402
from ldm.convert.common import DiffusersFormatError  # noqa: E402
from ldm.convert.diffusers import (  # noqa: E402
    checkpoint_to_diffusers,
    diffusers_to_checkpoint,
    export_diffusers,
    is_diffusers_folder,
    load_diffusers_expert,
)
from ldm.models.diffusion.ddim import DDIMSampler  # noqa: E402
from ldm.refine.loading import check_checkpoint_paths, load_expert  # noqa: E402
from ldm.sampling import NoiseSchedule, build_plan, run_tail  # noqa: E402
from ldm.sampling.denoisers import ModelDenoiser  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402

from conftest import build_tiny_expert, photo_crops, save_expert_checkpoint, tiny_expert_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TIMESTEPS = torch.tensor([0, 1, 250, 999])


# --------------------------------------------------------------------------------------------------------- builders
def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter drawn at random (diffusers and CompVis zero-init some layers, which would hide a wrong map)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return module.eval()


def tiny_unet(seed: int = 0, **overrides) -> UNet2DModel:
    kwargs = dict(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8,
    )
    kwargs.update(overrides)
    return randomize(UNet2DModel(**kwargs), seed)


def tiny_vq(seed: int = 1, **overrides) -> VQModel:
    kwargs = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=3,
        num_vq_embeddings=16,
        sample_size=16,
        scaling_factor=0.5,
    )
    kwargs.update(overrides)
    return randomize(VQModel(**kwargs), seed)


def compvis_ddim(**overrides) -> DDIMScheduler:
    """celebahq-ldm-vq-4's schedule, with the sampler options under which diffusers' DDIM is CompVis' DDIM."""
    kwargs = dict(
        beta_schedule="scaled_linear",
        beta_start=0.0015,
        beta_end=0.0195,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    kwargs.update(overrides)
    return DDIMScheduler(**kwargs)


def save_ldm(folder: Path, unet=None, vq=None, scheduler=None) -> Path:
    LDMPipeline(vqvae=vq or tiny_vq(), unet=unet or tiny_unet(), scheduler=scheduler or compvis_ddim()).save_pretrained(folder)
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
def ldm_folder(tmp_path_factory) -> Path:
    """The default tiny LDM folder: UNet 32/64 (attention at level 1, 8-channel heads), VQ f2 with 16 codes."""
    return save_ldm(tmp_path_factory.mktemp("diffusers") / "ldm")


@pytest.fixture(scope="module")
def converted(ldm_folder, tmp_path_factory) -> Path:
    """``ldm_folder`` converted and saved as a checkpoint."""
    path = tmp_path_factory.mktemp("converted") / "ldm.ckpt"
    save_checkpoint(diffusers_to_checkpoint(ldm_folder), path)
    return path


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------------------------------ import
UNET_VARIANTS = {
    "default": {},
    "scale_shift_one_head_three_levels": dict(
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        attention_head_dim=None,
        down_block_types=("AttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "AttnUpBlock2D"),
        resnet_time_scale_shift="scale_shift",
        attn_norm_num_groups=32,
    ),
    "wide_heads": dict(attention_head_dim=32, block_out_channels=(64, 128)),
}


@pytest.mark.parametrize("variant", sorted(UNET_VARIANTS))
def test_imported_unet_equals_diffusers_unet(variant, tmp_path):
    unet = tiny_unet(**UNET_VARIANTS[variant])
    expert, info = load_diffusers_expert(save_ldm(tmp_path / "ldm", unet=unet))
    ours = expert.model.model.diffusion_model
    x = torch.randn((len(TIMESTEPS), 3, 8, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():  # one batch, one timestep per sample
        torch.testing.assert_close(ours(x, TIMESTEPS), unet(x, TIMESTEPS).sample, rtol=1e-5, atol=1e-5)
    assert info.window == (0, 1000) and info.target == "ldm.models.diffusion.ddpm.LatentDiffusion"


VQ_VARIANTS = {
    "default": {},
    "attention_and_narrow_codebook": dict(
        down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        vq_embed_dim=3,
    ),
    "no_mid_attention_three_levels": dict(
        block_out_channels=(32, 32, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        mid_block_add_attention=False,
        sample_size=32,
    ),
}


@pytest.mark.parametrize("variant", sorted(VQ_VARIANTS))
def test_imported_first_stage_equals_diffusers_vqmodel(variant, tmp_path):
    vq = tiny_vq(**VQ_VARIANTS[variant])
    expert, _ = load_diffusers_expert(save_ldm(tmp_path / "ldm", vq=vq))
    ours = expert.model.first_stage_model
    x = photo_crops(2, 16)
    with torch.no_grad():
        # LDM's VQModelInterface.encode is the pre-quantization latent, as VQModel.encode's latents
        h_ours, h_theirs = ours.encode(x), vq.encode(x).latents
        torch.testing.assert_close(h_ours, h_theirs, rtol=1e-5, atol=1e-5)
        # both decoders snap to the codebook first, or not with force_not_quantize
        torch.testing.assert_close(ours.decode(h_theirs), vq.decode(h_theirs).sample, rtol=1e-5, atol=1e-5)
        plain = ours.decode(h_theirs, force_not_quantize=True)
        torch.testing.assert_close(plain, vq.decode(h_theirs, force_not_quantize=True).sample, rtol=1e-5, atol=1e-5)
    assert expert.model.scale_factor == 0.5


def test_refinement_equals_a_diffusers_ddim_loop(ldm_folder):
    expert, _ = load_diffusers_expert(ldm_folder)
    model = expert.model
    x = photo_crops(1, 16, seed=3)
    noise = torch.randn((1, 3, 8, 8), generator=torch.Generator().manual_seed(7))
    plan = build_plan(NoiseSchedule.from_model(model), 400, [ModelDenoiser(model)], "cpu", ddim_steps=10)
    with torch.no_grad():
        z, _ = run_tail(plan, model.get_first_stage_encoding(model.encode_first_stage(x)), noise)
        ours = model.decode_first_stage(z)

    unet = UNet2DModel.from_pretrained(ldm_folder, subfolder="unet").eval()
    vq = VQModel.from_pretrained(ldm_folder, subfolder="vqvae").eval()
    scheduler = DDIMScheduler.from_pretrained(ldm_folder, subfolder="scheduler")
    scheduler.set_timesteps(10)
    tail = [t for t in scheduler.timesteps if int(t) <= 400]
    assert [int(t) for t in tail] == list(plan.timesteps) == [301, 201, 101, 1]
    with torch.no_grad():
        latents = scheduler.add_noise(vq.encode(x).latents * vq.config.scaling_factor, noise, tail[0].reshape(1))
        for t in tail:
            latents = scheduler.step(unet(latents, t).sample, t, latents, eta=0.0).prev_sample
        theirs = vq.decode(latents / vq.config.scaling_factor).sample
    torch.testing.assert_close(z, latents, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_converted_checkpoint_is_what_main_py_writes_and_loads_as_a_full_range_expert(converted, ldm_folder):
    ckpt = load_checkpoint(converted)
    cfg = ckpt["config"]["model"]
    assert cfg["target"] == "ldm.models.diffusion.ddpm.LatentDiffusion" and "window" not in ckpt
    params = cfg["params"]
    assert (params["beta_schedule"], params["linear_start"], params["linear_end"]) == ("linear", 0.0015, 0.0195)
    assert params["scale_factor"] == 0.5 and params["cond_stage_config"] == "__is_unconditional__"
    assert params["unet_config"]["params"]["num_head_channels"] == 8
    assert params["unet_config"]["params"]["attention_resolutions"] == [2]
    keys = set(ckpt["state_dict"])
    assert {"betas", "model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.quantize.embedding.weight"} <= keys
    fresh = instantiate_from_config(cfg)  # every key of the model, nothing else (model_ema aside)
    assert keys == {k for k in fresh.state_dict() if not k.startswith("model_ema.")}
    for name in ("betas", "alphas_cumprod", "posterior_variance"):
        assert torch.equal(ckpt["state_dict"][name], fresh.state_dict()[name])
    expert, info = load_expert(converted)
    assert expert.window == (0, 1000) and info.config_source == "checkpoint"
    direct, _ = load_diffusers_expert(ldm_folder)
    for k, v in direct.model.state_dict().items():
        assert torch.equal(v, expert.model.state_dict()[k]), k


def test_a_converted_folder_initialises_a_window_model(converted):
    cfg = copy.deepcopy(load_checkpoint(converted)["config"]["model"])
    cfg["target"] = "ldm.models.diffusion.latesteps.LateStepsLatentDiffusion"
    cfg["params"].update(t_min=0, t_max=250, ckpt_path=str(converted))
    model = instantiate_from_config(cfg)  # init_from_ckpt raises if any UNet weight were missing
    source = load_checkpoint(converted)["state_dict"]
    for k, v in model.state_dict().items():
        if k.startswith(("model.diffusion_model.", "first_stage_model.")):
            assert torch.equal(v, source[k]), k
    with model.ema_scope():  # no EMA in the file: the EMA starts from the loaded weights
        assert torch.equal(model.model.diffusion_model.out[2].weight, source["model.diffusion_model.out.2.weight"])
    assert model.window() == (0, 250)


def test_scale_factor_defaults_to_one_without_scaling_factor_and_can_be_overridden(tmp_path):
    folder = save_ldm(tmp_path / "ldm")
    edit_json(folder / "vqvae" / "config.json", scaling_factor=...)  # as in hub folders converted before the key existed
    assert diffusers_to_checkpoint(folder)["config"]["model"]["params"]["scale_factor"] == 1.0
    assert diffusers_to_checkpoint(folder, scale_factor=0.25)["config"]["model"]["params"]["scale_factor"] == 0.25


def test_hub_style_folders_deprecated_attention_names_bin_weights_no_model_index(ldm_folder, tmp_path):
    """Folders converted by old diffusers: attention as query/key/value/proj_attn, .bin weights, no model_index."""
    folder = tmp_path / "old"
    shutil.copytree(ldm_folder, folder)
    (folder / "model_index.json").unlink()
    for part in ("unet", "vqvae"):
        tensors = load_file(folder / part / "diffusion_pytorch_model.safetensors")
        old = {}
        for key, value in tensors.items():
            for new, legacy in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
                key = key.replace(f".{new}.", f".{legacy}.")
            old[key] = value
        (folder / part / "diffusion_pytorch_model.safetensors").unlink()
        torch.save(old, folder / part / "diffusion_pytorch_model.bin")
    assert any(".query." in k for k in torch.load(folder / "unet" / "diffusion_pytorch_model.bin"))
    theirs = diffusers_to_checkpoint(folder)["state_dict"]
    ours = diffusers_to_checkpoint(ldm_folder)["state_dict"]
    assert set(theirs) == set(ours) and all(torch.equal(theirs[k], ours[k]) for k in ours)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_bin_that_would_run_code_is_refused(ldm_folder, tmp_path):
    folder = tmp_path / "evil"
    shutil.copytree(ldm_folder, folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with open(folder / "unet" / "diffusion_pytorch_model.bin", "wb") as fh:
        torch.save({"conv_in.weight": torch.zeros(1), "x": _RunsCode()}, fh)
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        diffusers_to_checkpoint(folder)


# ------------------------------------------------------------------------------------------------------------ export
@pytest.fixture(scope="module")
def window_expert(tmp_path_factory) -> Path:
    """A tiny steps 750-1000 expert (EMA different from the training weights), saved as main.py saves it."""
    model = build_tiny_expert(0, 250, seed=4)
    randomize(model.model, 9)
    with torch.no_grad():
        for buf in model.model_ema.buffers():
            if buf.is_floating_point() and buf.ndim:
                buf.add_(0.05)
    path = tmp_path_factory.mktemp("window") / "latesteps_750_1000.ckpt"
    save_expert_checkpoint(model, path)
    return path


def test_export_import_round_trip_is_bit_exact(window_expert, tmp_path):
    out, info = checkpoint_to_diffusers(window_expert, tmp_path / "exported")
    assert info.ema and info.window == (0, 250)
    assert json.loads((out / "unet" / "config.json").read_text())["_latesteps_window"] == [0, 250]
    back = diffusers_to_checkpoint(out)
    assert back["window"] == [0, 250]
    assert back["config"]["model"]["target"] == "ldm.models.diffusion.latesteps.LateStepsLatentDiffusion"
    source, _ = load_expert(window_expert, ema=True)  # the EMA weights, as exported
    want = {k: v for k, v in source.model.state_dict().items() if not k.startswith("model_ema.")}
    assert set(back["state_dict"]) == set(want)
    differ = [k for k in want if not torch.equal(back["state_dict"][k], want[k])]
    assert not differ, differ[:5]
    # and the other way: a re-export of the imported checkpoint writes the same bytes
    path = tmp_path / "back.ckpt"
    save_checkpoint(back, path)
    again, _ = checkpoint_to_diffusers(path, tmp_path / "again")
    for rel in (
        "unet/diffusion_pytorch_model.safetensors",
        "vqvae/diffusion_pytorch_model.safetensors",
        "unet/config.json",
        "vqvae/config.json",
        "scheduler/scheduler_config.json",
        "model_index.json",
    ):
        assert (out / rel).read_bytes() == (again / rel).read_bytes(), rel


def test_an_output_folder_made_during_the_export_is_not_replaced(window_expert, tmp_path, monkeypatch):
    """os.rename replaces an empty folder on Linux: one made while the weights were written was swapped silently."""
    import ldm.convert.diffusers as exporter

    out, write = tmp_path / "exported", exporter.atomic_write_bytes

    def write_and_race(path, payload):
        out.mkdir(exist_ok=True)
        write(path, payload)

    monkeypatch.setattr(exporter, "atomic_write_bytes", write_and_race)
    with pytest.raises(FileExistsError, match="exported already exists; choose a new folder name"):
        checkpoint_to_diffusers(window_expert, out)
    assert list(out.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["exported"]


EXPORT_VARIANTS = {
    "num_head_channels": {},
    "new_attention_order_scale_shift": dict(
        use_new_attention_order=True, use_scale_shift_norm=True, num_head_channels=-1, num_heads=4
    ),
    "one_head": dict(num_head_channels=-1, num_heads=1),
}


@pytest.mark.parametrize("variant", sorted(EXPORT_VARIANTS))
def test_exported_folder_loads_in_diffusers_with_equal_outputs(variant, tmp_path):
    cfg = tiny_expert_config(250, 500)["model"]
    cfg["params"]["unet_config"]["params"].update(EXPORT_VARIANTS[variant])
    cfg["params"]["scale_factor"] = 0.7
    torch.manual_seed(0)
    model = instantiate_from_config(cfg)
    randomize(model.model, 1)
    randomize(model.first_stage_model, 2)
    out = export_diffusers(model, tmp_path / "exported")

    unet = UNet2DModel.from_pretrained(out, subfolder="unet").eval()
    x = torch.randn((len(TIMESTEPS), 3, 8, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(unet(x, TIMESTEPS).sample, model.model.diffusion_model(x, TIMESTEPS), rtol=1e-5, atol=1e-5)
    vq = VQModel.from_pretrained(out, subfolder="vqvae").eval()
    image = photo_crops(2, 16)
    with torch.no_grad():
        h = model.first_stage_model.encode(image)
        torch.testing.assert_close(vq.encode(image).latents, h, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(vq.decode(h).sample, model.first_stage_model.decode(h), rtol=1e-5, atol=1e-5)
    scheduler = DDIMScheduler.from_pretrained(out, subfolder="scheduler")
    torch.testing.assert_close(scheduler.alphas_cumprod, model.alphas_cumprod, rtol=1e-5, atol=0.0)
    scheduler.set_timesteps(50)
    sampler = DDIMSampler(model)
    sampler.make_schedule(50)
    assert [int(t) for t in scheduler.timesteps] == [int(t) for t in sampler.ddim_timesteps[::-1]]
    pipe = LDMPipeline.from_pretrained(out)
    assert pipe.vqvae.config.scaling_factor == 0.7  # LDMPipeline divides by it before decoding (diffusers issue 6725)
    assert unet.config["_latesteps_window"] == [250, 500]


@pytest.mark.parametrize(
    "change, expected",
    [
        (dict(use_spatial_transformer=True, context_dim=16), "cross-attention"),
        (dict(num_classes=5), "class-conditional"),
        (dict(resblock_updown=True), "resblock_updown"),
        (dict(channel_mult=[2, 2]), "channel_mult=[2, 2] must start with 1"),
    ],
)
def test_export_refuses_models_diffusers_cannot_hold(change, expected, tmp_path):
    cfg = tiny_expert_config(0, 1000)["model"]
    cfg["params"]["unet_config"]["params"].update(change)
    model = instantiate_from_config(cfg)
    with pytest.raises(DiffusersFormatError) as excinfo:
        export_diffusers(model, tmp_path / "out")
    assert expected in one_line_error(excinfo)
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------------------ refused
def _conditional_unet(folder: Path) -> None:
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    shutil.rmtree(folder / "unet")
    unet.save_pretrained(folder / "unet")
    edit_json(folder / "model_index.json", unet=["diffusers", "UNet2DConditionModel"])


def _kl_vae(folder: Path) -> None:
    shutil.rmtree(folder / "vqvae")
    AutoencoderKL(block_out_channels=(32,), latent_channels=3).save_pretrained(folder / "vqvae")
    edit_json(folder / "model_index.json", vqvae=["diffusers", "AutoencoderKL"])


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


REFUSED = {
    "conditional_unet": (_conditional_unet, "UNet2DConditionModel' is a conditional UNet"),
    "kl_vae": (_kl_vae, "AutoencoderKL' is a KL autoencoder"),
    "class_conditional": (
        lambda f: edit_json(f / "unet" / "config.json", num_class_embeds=10),
        "num_class_embeds=10 is not supported",
    ),
    "text_encoder": (
        lambda f: edit_json(f / "model_index.json", bert=["latent_diffusion", "LDMBertModel"]),
        "component 'bert' (LDMBertModel) is not part of an unconditional LDM",
    ),
    "missing_scheduler_folder": (lambda f: shutil.rmtree(f / "scheduler"), "scheduler/scheduler_config.json is missing"),
    "missing_scheduler_entry": (lambda f: edit_json(f / "model_index.json", scheduler=...), "names no scheduler"),
    "missing_weights": (
        lambda f: (f / "vqvae" / "diffusion_pytorch_model.safetensors").unlink(),
        "vqvae/ holds no diffusion_pytorch_model.safetensors",
    ),
    "corrupt_json": (lambda f: (f / "unet" / "config.json").write_text("{not json"), "unet/config.json is not valid JSON"),
    "nan_in_json": (
        lambda f: (f / "scheduler" / "scheduler_config.json").write_text('{"beta_start": NaN}'),
        "is not valid JSON",
    ),
    "json_array": (lambda f: (f / "model_index.json").write_text("[1, 2]"), "holds a JSON list, not an object"),
    "huge_channels": (
        lambda f: edit_json(f / "unet" / "config.json", block_out_channels=[2**40, 2**41]),
        "block_out_channels=[1099511627776, 2199023255552] must be a list of 1 to 8 integers in [32, 16384]",
    ),
    "huge_codebook": (
        lambda f: edit_json(f / "vqvae" / "config.json", num_vq_embeddings=10**12),
        "num_vq_embeddings=1000000000000 must be an integer in [1, 1048576]",
    ),
    "config_and_weights_disagree": (
        lambda f: edit_json(f / "unet" / "config.json", block_out_channels=[64, 128]),
        "tensors differ in shape from what unet/config.json implies (conv_in.weight: "
        "file [32, 3, 3, 3] vs config [64, 3, 3, 3]",
    ),
    "truncated_weights": (
        lambda f: _truncate(f / "unet" / "diffusion_pytorch_model.safetensors"),
        "is not a readable safetensors file",
    ),
    "unknown_option": (
        lambda f: edit_json(f / "unet" / "config.json", use_linear_attention=True),
        "option(s) ['use_linear_attention'] are unknown to this converter",
    ),
    "v_prediction": (
        lambda f: edit_json(f / "scheduler" / "scheduler_config.json", prediction_type="v_prediction"),
        "prediction_type='v_prediction' is not supported",
    ),
    "zero_snr": (
        lambda f: edit_json(f / "scheduler" / "scheduler_config.json", rescale_betas_zero_snr=True),
        "rescale_betas_zero_snr=True is not supported",
    ),
    "fourier_time": (
        lambda f: edit_json(f / "unet" / "config.json", time_embedding_type="fourier"),
        "time_embedding_type='fourier' is not supported",
    ),
    "sin_first": (lambda f: edit_json(f / "unet" / "config.json", flip_sin_to_cos=False), "flip_sin_to_cos=False"),
    "spatial_norm": (lambda f: edit_json(f / "vqvae" / "config.json", norm_type="spatial"), "norm_type='spatial'"),
    "scale_shift_without_attention_norm": (
        lambda f: edit_json(f / "unet" / "config.json", resnet_time_scale_shift="scale_shift"),
        "attn_norm_num_groups=None is not supported",
    ),
    "latent_mismatch": (
        lambda f: edit_json(f / "unet" / "config.json", in_channels=4, out_channels=4),
        "in_channels=4 but the first stage's latent has 3 channels",
    ),
    "window_outside_schedule": (
        lambda f: edit_json(f / "unet" / "config.json", _latesteps_window=[0, 2000]),
        "_latesteps_window: window t_min=0, t_max=2000 is invalid",
    ),
}


def damaged_copies(ldm_folder: Path, root: Path, names: Iterable[str] = REFUSED) -> dict[str, Path]:
    """``{name: a copy of ldm_folder under root, damaged as REFUSED[name] says}``."""
    folders = {}
    for name in names:
        folders[name] = root / name
        shutil.copytree(ldm_folder, folders[name])
        REFUSED[name][0](folders[name])
    return folders


@pytest.fixture(scope="module")
def refused_folders(ldm_folder, tmp_path_factory) -> dict[str, Path]:
    return damaged_copies(ldm_folder, tmp_path_factory.mktemp("refused"))


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_folders_that_are_not_an_unconditional_ldm_are_refused_in_one_line(name, refused_folders):
    with pytest.raises(CheckpointError) as excinfo:
        load_expert(refused_folders[name])  # the refine entry point dispatches folders to the converter
    message = one_line_error(excinfo)
    assert REFUSED[name][1] in message and str(refused_folders[name]) in message


def test_folder_detection_and_path_check(ldm_folder, tmp_path):
    assert is_diffusers_folder(ldm_folder) and not is_diffusers_folder(tmp_path)
    assert not is_diffusers_folder(ldm_folder / "model_index.json")
    check_checkpoint_paths([ldm_folder])
    with pytest.raises(CheckpointError, match="is a directory; pass the .ckpt/.safetensors file inside it"):
        check_checkpoint_paths([tmp_path])


def test_main_py_names_a_diffusers_folder_given_as_ckpt_path(ldm_folder):
    spec = importlib.util.spec_from_file_location("main_script", REPO / "main.py")
    main_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(main_module)
    with pytest.raises(ValueError) as excinfo:
        main_module._check_init_checkpoints({"params": {"ckpt_path": str(ldm_folder)}}, "model")
    message = one_line_error(excinfo)
    assert "is a diffusers folder" in message and "scripts/convert_diffusers.py --from-diffusers" in message
