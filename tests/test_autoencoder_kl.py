"""AutoencoderKL, DiagonalGaussianDistribution, LPIPSWithDiscriminator: closed forms, float64 conformance, Lightning-2
training and resume, CompVis / Stable Diffusion v1 key lists, refinement (posterior mean) and tiling, bad checkpoints."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader

from ldm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ldm.models.autoencoder import AutoencoderKL, VQModelInterface
from ldm.models.tiling import TilingConfig, tileable, tiled_decode, tiled_encode
from ldm.modules.distributions import DiagonalGaussianDistribution, normal_kl
from ldm.modules.losses import LPIPSWithDiscriminator
from ldm.refine.first_stage import FirstStage
from ldm.train.callbacks import StepSeeding
from ldm.util import ConfigError, instantiate_from_config

from conftest import TINY_DDCONFIG, TINY_UNET_PARAMS, photo_crops, tiny_ldm_params
from warm_python import run_python

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "tests" / "reference"
IDENTITY = {"target": "torch.nn.Identity"}
TINY_KL_DDCONFIG = {**TINY_DDCONFIG, "double_z": True, "z_channels": 4}  # f4: 32x32 -> 8x8x4


def kl_lossconfig(disc_start: int = 0, **params) -> dict:
    """KL loss without a perceptual network and with a small discriminator (CPU-sized)."""
    base = {"disc_start": disc_start, "perceptual_weight": 0.0, "disc_num_layers": 2, "disc_ndf": 8, "kl_weight": 1e-6}
    return {"target": "ldm.modules.losses.LPIPSWithDiscriminator", "params": {**base, **params}}


def tiny_kl(lossconfig: dict | None = None, ddconfig: dict | None = None, **kwargs) -> AutoencoderKL:
    return AutoencoderKL(
        ddconfig=copy.deepcopy(ddconfig or TINY_KL_DDCONFIG),
        lossconfig=lossconfig if lossconfig is not None else IDENTITY,
        embed_dim=4,
        **kwargs,
    )


def image_loader(x: torch.Tensor, batch_size: int) -> DataLoader:
    """Batches of ``{"image": HWC float array in [-1, 1]}``, as the project's datasets yield them."""
    return DataLoader([{"image": img.permute(1, 2, 0).numpy()} for img in x], batch_size=batch_size, shuffle=False)


def cpu_trainer(**kwargs) -> pl.Trainer:
    defaults = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "log_every_n_steps": 1,
    }
    return pl.Trainer(**{**defaults, **kwargs})


def moments(batch: int = 2, channels: int = 3, side: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 2 * channels, side, side, generator=g, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------ the distribution


def test_distribution_sample_mode_and_clamp_match_closed_forms():
    params = moments()
    dist = DiagonalGaussianDistribution(params)
    mean, logvar = params[:, :3], params[:, 3:]
    assert torch.equal(dist.mode(), mean) and torch.equal(dist.mean, mean)
    torch.testing.assert_close(dist.std, torch.exp(0.5 * logvar), rtol=0, atol=0)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float32)
    torch.testing.assert_close(dist.sample(generator=torch.Generator().manual_seed(7)), mean + dist.std * eps.double())
    assert torch.equal(dist.sample(torch.Generator().manual_seed(7)), dist.sample(torch.Generator().manual_seed(7)))
    # log-variance clamped to [-30, 20] as CompVis does
    extreme = params.clone()
    extreme[:, 3] = 100.0
    extreme[:, 4] = -100.0
    clamped = DiagonalGaussianDistribution(extreme)
    assert float(clamped.logvar[:, 0].max()) == 20.0 and float(clamped.logvar[:, 1].min()) == -30.0
    assert torch.isfinite(clamped.var).all() and bool((clamped.std > 0).all())
    point = DiagonalGaussianDistribution(params, deterministic=True)
    assert torch.equal(point.sample(torch.Generator().manual_seed(1)), mean)
    assert torch.equal(point.kl(), torch.zeros(2, dtype=torch.float64)) and not point.nll(mean).any()


def test_distribution_kl_and_nll_equal_torch_distributions():
    a, b = DiagonalGaussianDistribution(moments(seed=1)), DiagonalGaussianDistribution(moments(seed=2))
    qa = torch.distributions.Normal(a.mean, a.std)
    qb = torch.distributions.Normal(b.mean, b.std)
    standard = torch.distributions.Normal(torch.zeros_like(a.mean), torch.ones_like(a.mean))
    sum_chw = lambda t: t.sum(dim=(1, 2, 3))  # noqa: E731
    torch.testing.assert_close(a.kl(), sum_chw(torch.distributions.kl_divergence(qa, standard)))
    torch.testing.assert_close(a.kl(b), sum_chw(torch.distributions.kl_divergence(qa, qb)))
    x = torch.randn(a.mean.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a.nll(x), -sum_chw(qa.log_prob(x)))
    torch.testing.assert_close(a.nll(x, dims=[1]), -qa.log_prob(x).sum(dim=1))
    torch.testing.assert_close(sum_chw(normal_kl(a.mean, a.logvar, b.mean, b.logvar)), a.kl(b))


# ------------------------------------------------------------------------------------ the network against float64


def test_encode_decode_forward_equal_a_float64_composition():
    """encode = split(quant_conv(encoder(x))), decode = decoder(post_quant_conv(z)), forward = decode(sample or mean);
    the 1x1 convolutions and the Gaussian are recomputed in float64 from the weights; float32 agrees with float64."""
    torch.manual_seed(0)
    model = tiny_kl().eval()
    double = copy.deepcopy(model).double()
    x = photo_crops(2, 32)
    with torch.no_grad():
        h = double.encoder(x.double())
        w, b = double.quant_conv.weight[:, :, 0, 0], double.quant_conv.bias
        moments64 = torch.einsum("oc,bchw->bohw", w, h) + b[None, :, None, None]
        post = double.encode(x.double())
        torch.testing.assert_close(post.parameters, moments64, rtol=1e-12, atol=1e-12)
        assert post.mean.shape == (2, 4, 8, 8) and model.downsampling_factor == 4
        z = post.mode()
        pw, pb = double.post_quant_conv.weight[:, :, 0, 0], double.post_quant_conv.bias
        img64 = double.decoder(torch.einsum("oc,bchw->bohw", pw, z) + pb[None, :, None, None])
        torch.testing.assert_close(double.decode(z), img64, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(double(x.double(), sample_posterior=False)[0], img64, rtol=1e-12, atol=1e-12)
        eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(5)).double()
        sampled = double.decode(z + torch.exp(0.5 * post.logvar) * eps)
        torch.testing.assert_close(double(x.double(), generator=torch.Generator().manual_seed(5))[0], sampled)
        out32, post32 = model(x, sample_posterior=False)
        torch.testing.assert_close(post32.parameters.double(), moments64, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out32.double(), img64, rtol=1e-4, atol=1e-4)


def test_generator_loss_equals_the_float64_formula():
    """CompVis' objective: sum over pixels of |x - x_rec| / exp(logvar) + logvar, per image, + kl_weight * KL, + the
    adaptive-weighted GAN term from disc_start on; the discriminator loss is hinge."""
    torch.manual_seed(0)
    loss = (
        LPIPSWithDiscriminator(
            disc_start=3, logvar_init=0.5, kl_weight=0.01, perceptual_weight=0.0, disc_num_layers=2, disc_ndf=8, disc_weight=0.7
        )
        .double()
        .eval()
    )
    x, xrec = photo_crops(2, 16).double(), photo_crops(2, 16, seed=1).double()
    post = DiagonalGaussianDistribution(moments())
    nll = ((x - xrec).abs() / math.exp(0.5) + 0.5).sum() / 2
    kl = 0.5 * (post.mean**2 + post.var - 1 - post.logvar).sum() / 2
    before, log = loss(x, xrec, post, 0, 2, split="val")
    torch.testing.assert_close(before, nll + 0.01 * kl)
    torch.testing.assert_close(log["val/rec_loss"], (x - xrec).abs().mean())
    assert float(log["val/g_loss"]) == 0.0 and float(log["val/disc_factor"]) == 0.0
    after, log = loss(x, xrec, post, 0, 3)  # no last layer: the fixed disc_weight
    torch.testing.assert_close(after, nll + 0.01 * kl + 0.7 * -loss.discriminator(xrec).mean())
    d_loss, _ = loss(x, xrec, post, 1, 3)
    real, fake = loss.discriminator(x), loss.discriminator(xrec)
    torch.testing.assert_close(d_loss, 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean()))
    assert float(loss(x, xrec, post, 1, 2)[0]) == 0.0  # before disc_start: not run
    weights = torch.rand(1, 3, 16, 16, dtype=torch.float64)
    weighted, _ = loss(x, xrec, post, 0, 0, weights=weights)
    torch.testing.assert_close(weighted, (weights * ((x - xrec).abs() / math.exp(0.5) + 0.5)).sum() / 2 + 0.01 * kl)


# -------------------------------------------------------------------------------------------------------- training


class Snapshots(pl.Callback):
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.rows.append(
            {
                "disc": {k: v.clone() for k, v in pl_module.loss.discriminator.state_dict().items()},
                "conv_out": pl_module.decoder.conv_out.weight.detach().clone(),
                "global_step": trainer.global_step,
                "generator_steps": pl_module.generator_steps,
                "aeloss": float(trainer.callback_metrics["aeloss_step"]),
            }
        )


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_manual_optimization_steps_both_optimizers_from_disc_start():
    pl.seed_everything(0)
    model = tiny_kl(kl_lossconfig(disc_start=2))
    model.learning_rate = 1e-3
    disc_init = {k: v.clone() for k, v in model.loss.discriminator.state_dict().items()}
    logvar = model.loss.logvar.detach().clone()
    snaps = Snapshots()
    cpu_trainer(max_epochs=1, callbacks=[snaps]).fit(model, image_loader(photo_crops(8, 32), 2))
    assert [r["generator_steps"] for r in snaps.rows] == [1, 2, 3, 4]
    assert [r["global_step"] for r in snaps.rows] == [1, 2, 4, 6]  # 1 optimizer step per batch, 2 from disc_start
    assert same_state(snaps.rows[1]["disc"], disc_init) and not same_state(snaps.rows[2]["disc"], disc_init)
    assert not same_state(snaps.rows[3]["disc"], snaps.rows[2]["disc"])
    assert all(not torch.equal(a["conv_out"], b["conv_out"]) for a, b in zip(snaps.rows, snaps.rows[1:]))
    assert all(math.isfinite(r["aeloss"]) for r in snaps.rows)
    opt_ae, opt_disc = (opt.optimizer for opt in model.optimizers())
    assert {float(s["step"]) for s in opt_ae.state.values()} == {4.0}
    assert {float(s["step"]) for s in opt_disc.state.values()} == {2.0}
    assert torch.equal(model.loss.logvar, logvar)  # latent-diffusion's optimizers leave logvar at logvar_init
    metrics = cpu_trainer().validate(model, image_loader(photo_crops(4, 32), 2), verbose=False)[0]
    for key in ("val/rec_loss", "val/kl_loss", "val/nll_loss", "val/disc_loss"):
        assert math.isfinite(metrics[key]), key
    images = model.log_images(next(iter(image_loader(photo_crops(4, 32), 4))), N=3)
    assert set(images) == {"inputs", "reconstructions", "samples"}
    assert all(v.shape == (3, 3, 32, 32) for v in images.values())


def test_a_few_steps_lower_the_reconstruction_error():
    pl.seed_everything(0)
    model = tiny_kl(kl_lossconfig(disc_start=10_000))
    model.learning_rate = 2e-3
    x = photo_crops(4, 32)

    def l1() -> float:
        with torch.no_grad():
            return float((model.eval()(x, sample_posterior=False)[0] - x).abs().mean())

    before = l1()
    cpu_trainer(max_epochs=15).fit(model.train(), image_loader(x, 4))
    assert model.generator_steps == 15
    assert l1() < 0.8 * before, (before, l1())


def test_resume_gives_the_weights_of_the_uninterrupted_run(tmp_path):
    """4 batches at once, or 2 + checkpoint + 2 in a new process-like setup: identical weights (posterior samples come
    from the global RNG, which StepSeeding reseeds from the step as main.py does)."""
    loader = image_loader(photo_crops(4, 32), 2)

    def fresh() -> AutoencoderKL:
        torch.manual_seed(0)
        model = tiny_kl(kl_lossconfig(disc_start=1))
        model.learning_rate = 1e-3
        return model

    full = fresh()
    cpu_trainer(max_epochs=2, callbacks=[StepSeeding(123)]).fit(full, loader)
    first = fresh()
    trainer = cpu_trainer(max_epochs=1, callbacks=[StepSeeding(123)])
    trainer.fit(first, loader)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    assert load_checkpoint(tmp_path / "last.ckpt")["generator_steps"] == 2
    resumed = fresh()
    cpu_trainer(max_epochs=2, callbacks=[StepSeeding(123)]).fit(resumed, loader, ckpt_path=str(tmp_path / "last.ckpt"))
    assert resumed.generator_steps == full.generator_steps == 4
    assert not same_state(first.state_dict(), full.state_dict())
    assert same_state(resumed.state_dict(), full.state_dict())


def test_configure_optimizers_groups_and_errors():
    model = tiny_kl(kl_lossconfig())
    with pytest.raises(ConfigError, match="learning_rate"):
        model.configure_optimizers()
    model.learning_rate = 2e-4
    opt_ae, opt_disc = model.configure_optimizers()
    ae_ids = {id(p) for g in opt_ae.param_groups for p in g["params"]}
    assert ae_ids == {id(p) for n, p in model.named_parameters() if not n.startswith("loss.")}
    assert {id(p) for g in opt_disc.param_groups for p in g["params"]} == {id(p) for p in model.loss.discriminator.parameters()}
    frozen = tiny_kl()
    frozen.learning_rate = 1e-4
    with pytest.raises(ConfigError, match="LPIPSWithDiscriminator"):
        frozen.configure_optimizers()
    with pytest.raises(ConfigError, match="double_z: true"):
        tiny_kl(ddconfig={**TINY_KL_DDCONFIG, "double_z": False})
    with pytest.raises(ConfigError, match="colorize_nlabels"):
        tiny_kl(colorize_nlabels=3)


# ------------------------------------------------------------------------------------------------------- key lists


def _shapes(module: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def _meta_state_dict(shapes: dict[str, list[int]], non_float32: dict[str, str]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta", dtype=getattr(torch, non_float32.get(k, "float32"))) for k, s in shapes.items()}


def _kl_f8_params(lossconfig: dict | None = None) -> dict:
    params = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "autoencoder" / "kl_f8.yaml").model.params)
    if lossconfig is not None:
        params["lossconfig"] = lossconfig
    return params


@pytest.mark.filterwarnings("ignore:for lin.*copying from a non-meta parameter")  # LPIPS' linear layers, on meta
def test_kl_f8_with_its_training_loss_has_compvis_keys():
    """configs/autoencoder/kl_f8.yaml built full size on the meta device: every key and shape of CompVis' kl-f8
    (autoencoder and loss.*: logvar, LPIPS, discriminator), and a state dict of those keys loads strict."""
    ref = json.loads((REFERENCE / "kl_f8_keys.json").read_text())
    params = _kl_f8_params()
    assert params["ddconfig"] == ref["_meta"]["ddconfig"] and params["embed_dim"] == ref["_meta"]["embed_dim"]
    params["lossconfig"]["params"]["perceptual_pretrained"] = False  # no VGG weights offline; same keys
    with torch.device("meta"):
        model = AutoencoderKL(**params)
    assert _shapes(model) == ref["autoencoder_kl"]
    sd = model.state_dict()
    assert {k: str(v.dtype).replace("torch.", "") for k, v in sd.items() if v.dtype != torch.float32} == ref["_meta"][
        "non_float32"
    ]
    assert sum(v.numel() for k, v in sd.items() if not k.startswith("loss.")) == ref["_meta"]["num_params_autoencoder"]
    result = model.load_state_dict(
        _meta_state_dict(ref["autoencoder_kl"], ref["_meta"]["non_float32"]), strict=True, assign=True
    )
    assert not result.missing_keys and not result.unexpected_keys


def test_stable_diffusion_v1_vae_has_sd_keys_and_loads_strict_from_first_stage_model_prefix(tmp_path):
    ref = json.loads((REFERENCE / "sd_v1_vae_keys.json").read_text())
    params = _kl_f8_params(IDENTITY)
    assert params["ddconfig"] == ref["_meta"]["ddconfig"]
    with torch.device("meta"):
        model = instantiate_from_config({"target": "ldm.models.autoencoder.AutoencoderKL", "params": params})
    assert isinstance(model, AutoencoderKL) and _shapes(model) == ref["autoencoder_kl"]
    prefix = ref["_meta"]["prefix_in_checkpoint"]
    ldm_sd = {prefix + k: v for k, v in _meta_state_dict(ref["autoencoder_kl"], {}).items()}
    stripped = {k[len(prefix) :]: v for k, v in ldm_sd.items()}
    result = model.load_state_dict(stripped, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_latent_diffusion_checkpoint_loads_through_init_from_ckpt(tmp_path, caplog):
    """A tiny first stage saved as LatentDiffusion / SD saves it (``first_stage_model.*``, no loss) and as CompVis'
    training checkpoint (unprefixed, with ``loss.*``) both load and reproduce the network."""
    torch.manual_seed(3)
    source = tiny_kl(kl_lossconfig()).eval()
    ae = {k: v for k, v in source.state_dict().items() if not k.startswith("loss.")}
    save_checkpoint({"state_dict": {f"first_stage_model.{k}": v for k, v in ae.items()}}, tmp_path / "sd.ckpt")
    compvis = dict(source.state_dict())
    compvis["loss.perceptual_loss.lin0.model.1.weight"] = torch.rand(1, 64, 1, 1)  # LPIPS this loss does not build
    save_checkpoint({"state_dict": compvis, "global_step": 5}, tmp_path / "compvis.ckpt")
    x = photo_crops(1, 32)
    for name in ("sd.ckpt", "compvis.ckpt"):
        loaded = tiny_kl(ckpt_path=str(tmp_path / name)).eval()
        with torch.no_grad():
            assert torch.equal(loaded(x, sample_posterior=False)[0], source(x, sample_posterior=False)[0])
    trained = tiny_kl(kl_lossconfig(), ckpt_path=str(tmp_path / "compvis.ckpt"))
    assert same_state(trained.loss.discriminator.state_dict(), source.loss.discriminator.state_dict())
    assert "dropping 1 training-loss keys" in caplog.text


# ------------------------------------------------------------------------------------------- bad first stages


def test_vq_checkpoint_given_as_kl_and_kl_given_as_vq_are_one_line_errors(tmp_path):
    torch.manual_seed(0)
    vq = VQModelInterface(ddconfig=dict(TINY_DDCONFIG), lossconfig=IDENTITY, n_embed=16, embed_dim=3)
    save_checkpoint({"state_dict": vq.state_dict()}, tmp_path / "vq.ckpt")
    for ignore_keys in ([], ["quantize"]):  # ignoring the codebook does not hide what the file is
        with pytest.raises(CheckpointError) as info:
            AutoencoderKL(ddconfig=dict(TINY_KL_DDCONFIG), lossconfig=IDENTITY, embed_dim=3,
                          ckpt_path=str(tmp_path / "vq.ckpt"), ignore_keys=ignore_keys)  # fmt: skip
        message = str(info.value)
        assert "\n" not in message and "VQ autoencoder" in message and "AutoencoderKL" in message
        assert "VQModelInterface" in message

    kl = AutoencoderKL(ddconfig=dict(TINY_KL_DDCONFIG, z_channels=3), lossconfig=IDENTITY, embed_dim=3)
    save_checkpoint({"state_dict": kl.state_dict()}, tmp_path / "kl.ckpt")
    with pytest.raises(CheckpointError) as info:
        VQModelInterface(
            ddconfig=dict(TINY_DDCONFIG), lossconfig=IDENTITY, n_embed=16, embed_dim=3, ckpt_path=str(tmp_path / "kl.ckpt")
        )
    message = str(info.value)
    assert "\n" not in message and "is an AutoencoderKL" in message and "not a VQ" in message
    assert "target: ldm.models.autoencoder.AutoencoderKL" in message and "double_z: true" in message


def test_missing_kl_f8_checkpoint_names_the_download_and_the_config(tmp_path):
    missing = tmp_path / "models" / "first_stage_models" / "kl-f8" / "model.ckpt"
    with pytest.raises(CheckpointError) as info:
        tiny_kl(ckpt_path=str(missing))
    message = str(info.value)
    assert "kl-f8.zip" in message and "configs/autoencoder/kl_f8.yaml" in message


# -------------------------------------------------------------------------------------- refinement and tiling


def tiny_kl_ldm() -> torch.nn.Module:
    torch.manual_seed(0)
    first_stage = {
        "target": "ldm.models.autoencoder.AutoencoderKL",
        "params": {"embed_dim": 4, "ddconfig": dict(TINY_KL_DDCONFIG), "lossconfig": IDENTITY},
    }
    unet = {
        "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
        "params": {**TINY_UNET_PARAMS, "in_channels": 4, "out_channels": 4},
    }
    params = tiny_ldm_params(channels=4, scale_factor=0.5, first_stage_config=first_stage, unet_config=unet)
    return instantiate_from_config({"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}).eval()


def test_refinement_encodes_with_the_posterior_mean_and_decodes_without_quantizing():
    model = tiny_kl_ldm()
    x = photo_crops(2, 32)
    stage = FirstStage(model, None, False, contextlib.nullcontext)
    z = stage.encode(x)
    assert torch.equal(z, stage.encode(x))  # deterministic
    with torch.no_grad():
        posterior = model.first_stage_model.encode(x)
        torch.testing.assert_close(z, 0.5 * posterior.mean, rtol=0, atol=0)
        torch.testing.assert_close(stage.decode(z), model.first_stage_model.decode(posterior.mean), rtol=0, atol=0)
    one_at_a_time = FirstStage(model, None, True, contextlib.nullcontext)  # batch invariance: the mean too
    assert torch.equal(one_at_a_time.encode(x[1:]), one_at_a_time.encode(x)[1:])
    torch.testing.assert_close(one_at_a_time.encode(x), z, rtol=1e-5, atol=1e-6)  # other batch size, other kernels

    def draw() -> torch.Tensor:
        first_stage = FirstStage(
            model, None, False, contextlib.nullcontext, posterior="sample", generator=torch.Generator().manual_seed(4)
        )
        return first_stage.encode(x)

    sampled = draw()
    assert torch.equal(sampled, draw()) and not torch.equal(sampled, z)
    eps = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(sampled, 0.5 * (posterior.mean + posterior.std * eps))
    with pytest.raises(ValueError, match="'mean'"):
        FirstStage(model, None, False, contextlib.nullcontext, posterior="median")


def test_tiled_kl_encode_decode_agree_with_untiled():
    """As for VQ (tests/test_tiling.py): with exact GroupNorm statistics (from an untiled pass on an image that fits
    ``stat_side``) and an overlap wider than the receptive field, tiles reproduce the untiled network; the refiner's
    FirstStage tiles a KL first stage with the posterior mean."""
    torch.manual_seed(0)
    kl = tiny_kl(ddconfig={**TINY_KL_DDCONFIG, "ch_mult": [1, 2]}).eval()  # f2: receptive field inside the overlap
    assert tileable(kl)
    x = photo_crops(1, 96)
    cfg = TilingConfig(min_side=32, tile=48, overlap=32, stat_side=96, stat_passes=0)
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max())  # noqa: E731
    with torch.no_grad():
        ref = kl.encode(x)
        tiled = tiled_encode(kl, x, cfg, 2)
        assert isinstance(tiled, DiagonalGaussianDistribution)
        assert rel(tiled.mean, ref.mean) < 1e-4 and rel(tiled.logvar, ref.logvar) < 1e-4
        img_ref, img_tiled = kl.decode(ref.mean), tiled_decode(kl, ref.mean, cfg, 2)
    assert img_tiled.shape == img_ref.shape and rel(img_tiled, img_ref) < 1e-2, rel(img_tiled, img_ref)

    # the refiner's FirstStage routes a KL first stage through the tiled passes, with the posterior mean
    model = tiny_kl_ldm()
    image = photo_crops(1, 64)
    tiling = TilingConfig(min_side=32, tile=32, overlap=16)  # statistics from the whole (small) image: exact
    stage = FirstStage(model, tiling, False, contextlib.nullcontext)
    z = stage.encode(image)
    assert torch.equal(z, stage.encode(image)) and z.shape == (1, 4, 16, 16)
    kl_f4 = model.first_stage_model
    with torch.no_grad():
        assert torch.equal(z, 0.5 * tiled_encode(kl_f4, image, tiling, 4).mode())
        assert torch.equal(stage.decode(z), tiled_decode(kl_f4, z / 0.5, tiling, 4))
    untiled = FirstStage(model, None, False, contextlib.nullcontext)
    assert not torch.equal(untiled.encode(image), z) and rel(z, untiled.encode(image)) < 0.5  # tiles lack context


# --------------------------------------------------------------------------------------------------------- configs


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    crops = ((photo_crops(8, 48, seed=2) + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    for i, crop in enumerate(crops):
        Image.fromarray(crop).save(root / f"img{i}.png")
    return root


def tiny_overrides(name: str, image_root: Path) -> list[str]:
    """Dotlist overrides shrinking configs/autoencoder/<name> to CPU size (structure, targets and data kept)."""
    return [
        "model.params.ddconfig.ch=32",
        "model.params.ddconfig.num_res_blocks=1",
        "model.params.ddconfig.resolution=32",
        "model.params.lossconfig.params.perceptual_weight=0",
        "model.params.lossconfig.params.disc_num_layers=2",
        "model.params.lossconfig.params.disc_ndf=8",
        "model.params.lossconfig.params.disc_start=1",
        "data.params.batch_size=2",
        "data.params.num_workers=0",
        f"data.params.train.params.root={image_root}",
        f"data.params.validation.params.root={image_root}",
        "data.params.train.params.size=32",
        "data.params.validation.params.size=32",
    ]


@pytest.mark.parametrize("name,factor,channels", [("kl_f8.yaml", 8, 4), ("kl_f4.yaml", 4, 3)])
def test_configs_build_tiny_and_train_a_few_batches(name, factor, channels, image_root):
    base = OmegaConf.load(REPO / "configs" / "autoencoder" / name)
    assert base.model.target == "ldm.models.autoencoder.AutoencoderKL"
    assert base.model.params.lossconfig.target == "ldm.modules.losses.LPIPSWithDiscriminator"
    config = OmegaConf.merge(base, OmegaConf.from_dotlist(tiny_overrides(name, image_root)))
    pl.seed_everything(0)
    model = instantiate_from_config(config.model)
    assert isinstance(model, AutoencoderKL) and model.downsampling_factor == factor
    assert model.embed_dim == channels and model.loss.perceptual_loss is None
    model.learning_rate = config.model.base_learning_rate * config.data.params.batch_size
    snaps = Snapshots()
    cpu_trainer(max_steps=5, limit_val_batches=0, callbacks=[snaps]).fit(model, datamodule=instantiate_from_config(config.data))
    assert [r["generator_steps"] for r in snaps.rows] == [1, 2, 3]  # 1 + 2 + 2 optimizer steps (disc_start 1)
    with torch.no_grad():
        assert model.encode(photo_crops(1, 32)).mean.shape == (1, channels, 32 // factor, 32 // factor)


@pytest.mark.slow
def test_main_py_trains_kl_f8_tiny_and_its_checkpoint_serves_as_first_stage(tmp_path, image_root):
    cmd = [
        sys.executable,
        "main.py",
        "--base",
        "configs/autoencoder/kl_f8.yaml",
        "-t",
        "--no-test",
        "-l",
        str(tmp_path / "logs"),
        "lightning.trainer.max_steps=4",
        "lightning.trainer.limit_val_batches=1",
        "lightning.trainer.accelerator=cpu",
        "lightning.trainer.benchmark=false",
        *tiny_overrides("kl_f8.yaml", image_root),
    ]
    result = run_python(cmd[1:], cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (last,) = (tmp_path / "logs").rglob("checkpoints/last.ckpt")
    checkpoint = load_checkpoint(last)
    assert checkpoint["generator_steps"] == 3 and checkpoint["global_step"] == 5
    ddconfig = {**_kl_f8_params()["ddconfig"], "ch": 32, "num_res_blocks": 1, "resolution": 32}
    first_stage = AutoencoderKL(ddconfig=ddconfig, lossconfig=IDENTITY, embed_dim=4, ckpt_path=str(last)).eval()
    torch.testing.assert_close(first_stage.post_quant_conv.weight, checkpoint["state_dict"]["post_quant_conv.weight"])
    with torch.no_grad():
        assert first_stage(photo_crops(1, 32), sample_posterior=False)[0].shape == (1, 3, 32, 32)
