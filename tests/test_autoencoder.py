"""VQModel / VQModelInterface: shapes, codebook round trip, Lightning-2 training, CompVis checkpoints, configs."""

from __future__ import annotations

import copy
import csv
import json
import math
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from ldm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ldm.models.autoencoder import VQModel, VQModelInterface
from ldm.modules.lpips import PerceptualWeightsMissingError
from ldm.util import ConfigError, instantiate_from_config

from conftest import TINY_DDCONFIG, photo_crops
from warm_python import run_python

REPO = Path(__file__).resolve().parents[1]
REFERENCE_KEYS = REPO / "tests" / "reference" / "vq_f4_keys.json"  # copy of the shared CompVis key list
IDENTITY = {"target": "torch.nn.Identity"}


def gan_lossconfig(disc_start: int = 0, **params) -> dict:
    """VQGAN loss without a perceptual network and with a small discriminator (CPU-sized)."""
    base = {"disc_start": disc_start, "perceptual_weight": 0.0, "disc_num_layers": 2, "disc_ndf": 8}
    return {"target": "ldm.modules.losses.VQLPIPSWithDiscriminator", "params": {**base, **params}}


def tiny_vq(lossconfig: dict | None = None, cls: type = VQModel, n_embed: int = 64, **kwargs) -> VQModel:
    return cls(
        ddconfig=copy.deepcopy(TINY_DDCONFIG),
        lossconfig=lossconfig if lossconfig is not None else IDENTITY,
        n_embed=n_embed,
        embed_dim=3,
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


def csv_metrics(log_dir: Path) -> list[dict[str, str]]:
    (path,) = log_dir.rglob("metrics.csv")
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ------------------------------------------------------------------------------------------------ shapes and codes


def test_encode_decode_shapes_f4_256_to_64():
    ddconfig = {**TINY_DDCONFIG, "resolution": 256, "ch": 32, "ch_mult": [1, 2, 4]}
    model = VQModelInterface(ddconfig=ddconfig, lossconfig=IDENTITY, n_embed=16, embed_dim=3).eval()
    assert model.downsampling_factor == 4
    x = torch.rand(1, 3, 256, 256) * 2 - 1
    with torch.no_grad():
        h = model.encode(x)
        assert h.shape == (1, 3, 64, 64)
        assert model.decode(h).shape == (1, 3, 256, 256)
        quant, emb_loss, (_, _, indices) = VQModel.encode(model, x)
    assert quant.shape == (1, 3, 64, 64) and emb_loss.ndim == 0 and indices.numel() == 64 * 64


def test_decode_code_round_trip():
    torch.manual_seed(0)
    model = tiny_vq(n_embed=32).eval()
    x = photo_crops(2, 32)
    with torch.no_grad():
        quant, _, (_, _, indices) = model.encode(x)
        codes = indices.reshape(2, 8, 8)
        # the quantized latent is exactly the codebook rows of the indices (up to z + (z_q - z) rounding)
        rows = model.quantize.embedding.weight[codes].permute(0, 3, 1, 2)
        torch.testing.assert_close(quant, rows, rtol=0, atol=1e-6)
        torch.testing.assert_close(model.decode_code(codes), model.decode(quant), rtol=0, atol=1e-5)
    sane = tiny_vq(n_embed=32, sane_index_shape=True).eval()
    sane.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(sane.encode(x)[2][2], codes)


def test_get_input_takes_hwc_batches_and_rejects_chw():
    model = tiny_vq()
    x = photo_crops(2, 32)
    batch = next(iter(image_loader(x, 2)))
    torch.testing.assert_close(model.get_input(batch, "image"), x)
    with pytest.raises(ValueError, match="HWC"):
        model.get_input({"image": x}, "image")
    with pytest.raises(KeyError, match="image_key"):
        model.get_input({"jpg": x}, "image")


# -------------------------------------------------------------------------------------------------------- training


class SnapshotCallback(pl.Callback):
    """After every batch: discriminator state, decoder output weight, step counters."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.rows.append(
            {
                "disc": {k: v.clone() for k, v in pl_module.loss.discriminator.state_dict().items()},
                "conv_out": pl_module.decoder.conv_out.weight.detach().clone(),
                "global_step": trainer.global_step,
                "generator_steps": pl_module.generator_steps,
            }
        )


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_manual_optimization_steps_both_optimizers_from_disc_start(tmp_path):
    pl.seed_everything(0)
    model = tiny_vq(gan_lossconfig(disc_start=2))
    model.learning_rate = 1e-3
    disc_init = {k: v.clone() for k, v in model.loss.discriminator.state_dict().items()}
    conv_init = model.decoder.conv_out.weight.detach().clone()
    snaps = SnapshotCallback()
    trainer = cpu_trainer(
        max_epochs=1, callbacks=[snaps], logger=pl.loggers.CSVLogger(tmp_path, name="vq"), enable_checkpointing=False
    )
    trainer.fit(model, image_loader(photo_crops(8, 32), 2))

    # disc_start counts batches: batches 0, 1 leave the discriminator (weights and BatchNorm statistics) untouched
    assert [r["generator_steps"] for r in snaps.rows] == [1, 2, 3, 4]
    assert same_state(snaps.rows[0]["disc"], disc_init) and same_state(snaps.rows[1]["disc"], disc_init)
    assert not same_state(snaps.rows[2]["disc"], snaps.rows[1]["disc"])
    assert not same_state(snaps.rows[3]["disc"], snaps.rows[2]["disc"])
    # the autoencoder moves every batch
    previous = conv_init
    for row in snaps.rows:
        assert not torch.equal(row["conv_out"], previous)
        previous = row["conv_out"]
    # Lightning 2 counts optimizer steps: 1 per batch before disc_start, 2 after
    assert [r["global_step"] for r in snaps.rows] == [1, 2, 4, 6]
    opt_ae, opt_disc = (opt.optimizer for opt in model.optimizers())
    assert {float(s["step"]) for s in opt_ae.state.values()} == {4.0}
    assert {float(s["step"]) for s in opt_disc.state.values()} == {2.0}

    rows = csv_metrics(tmp_path)
    ae_losses = [float(r["train/aeloss_step"]) for r in rows if r.get("train/aeloss_step")]
    disc_losses = [float(r["train/disc_loss_step"]) for r in rows if r.get("train/disc_loss_step")]
    assert len(ae_losses) == 4 and all(math.isfinite(v) for v in ae_losses)
    assert len(disc_losses) == 2 and all(math.isfinite(v) for v in disc_losses)
    usage = [float(r["train/codebook_usage_step"]) for r in rows if r.get("train/codebook_usage_step")]
    assert usage and all(0 < u <= 1 for u in usage)


def test_generator_steps_survive_resume(tmp_path):
    pl.seed_everything(0)
    loader = image_loader(photo_crops(8, 32), 2)
    model = tiny_vq(gan_lossconfig(disc_start=6))
    model.learning_rate = 1e-3
    first = cpu_trainer(max_epochs=1)
    first.fit(model, loader)
    ckpt = tmp_path / "last.ckpt"
    first.save_checkpoint(ckpt)
    assert model.generator_steps == 4 and first.global_step == 4

    resumed = tiny_vq(gan_lossconfig(disc_start=6))
    resumed.learning_rate = 1e-3
    second = cpu_trainer(max_epochs=3)
    second.fit(resumed, loader, ckpt_path=str(ckpt))
    assert resumed.generator_steps == 12
    assert second.global_step == 12 + (12 - 6)
    opt_disc = resumed.optimizers()[1].optimizer
    assert {float(s["step"]) for s in opt_disc.state.values()} == {6.0}


def test_checkpoint_without_generator_steps_falls_back_to_global_step():
    model = tiny_vq(gan_lossconfig())
    model.on_load_checkpoint({"global_step": 7})
    assert model.generator_steps == 7
    saved: dict = {}
    model.on_save_checkpoint(saved)
    assert saved["generator_steps"] == 7


def test_validation_and_log_images():
    pl.seed_everything(0)
    model = tiny_vq(gan_lossconfig(disc_start=0))
    x = photo_crops(4, 32)
    metrics = cpu_trainer().validate(model, image_loader(x, 2), verbose=False)[0]
    for key in ("val/rec_loss", "val/quant_loss", "val/disc_loss", "val/perplexity", "val/codebook_usage"):
        assert math.isfinite(metrics[key]), key
    assert 0 < metrics["val/codebook_usage"] <= 1 and 1 <= metrics["val/perplexity"] <= 64
    images = model.log_images(next(iter(image_loader(x, 4))), N=3)
    assert set(images) == {"inputs", "reconstructions"}
    assert images["inputs"].shape == images["reconstructions"].shape == (3, 3, 32, 32)
    assert set(model.log_images({"image": x.permute(0, 2, 3, 1)}, only_inputs=True)) == {"inputs"}


def test_configure_optimizers_groups_and_errors():
    model = tiny_vq(gan_lossconfig())
    with pytest.raises(ConfigError, match="learning_rate"):
        model.configure_optimizers()
    model.learning_rate = 2e-4
    opt_ae, opt_disc = model.configure_optimizers()
    ae_ids = {id(p) for g in opt_ae.param_groups for p in g["params"]}
    disc_ids = {id(p) for g in opt_disc.param_groups for p in g["params"]}
    expected_ae = {id(p) for n, p in model.named_parameters() if not n.startswith("loss.")}
    assert ae_ids == expected_ae
    assert disc_ids == {id(p) for p in model.loss.discriminator.parameters()}
    for opt in (opt_ae, opt_disc):
        assert opt.param_groups[0]["lr"] == 2e-4 and opt.param_groups[0]["betas"] == (0.5, 0.9)
    frozen = tiny_vq()
    frozen.learning_rate = 1e-4
    with pytest.raises(ConfigError, match="VQLPIPSWithDiscriminator"):
        frozen.configure_optimizers()


def test_lossconfig_codebook_size_must_agree():
    assert tiny_vq(gan_lossconfig(), n_embed=48).loss.n_classes == 48
    with pytest.raises(ValueError, match="n_classes"):
        tiny_vq(gan_lossconfig(n_classes=16), n_embed=48)


@pytest.mark.slow
def test_overfit_photo_crops_lowers_reconstruction_loss():
    """60 batches on 8 real 32x32 crops: the L1 reconstruction error falls by more than a third."""
    pl.seed_everything(0)
    model = tiny_vq(gan_lossconfig(disc_start=10_000))
    model.learning_rate = 1e-3
    x = photo_crops(8, 32)

    def l1() -> float:
        model.eval()
        with torch.no_grad():
            error = (model(x)[0] - x).abs().mean().item()
        model.train()
        return error

    before = l1()
    cpu_trainer(max_epochs=60).fit(model, image_loader(x, 8))
    after = l1()
    assert model.generator_steps == 60
    assert after < 0.65 * before, (before, after)


# ----------------------------------------------------------------------------------------------------- checkpoints


def write_compvis_checkpoint(path: Path) -> VQModel:
    """A VQ checkpoint in CompVis' layout: Lightning dict, unprefixed model keys, plus training ``loss.*`` keys."""
    torch.manual_seed(3)
    source = tiny_vq(gan_lossconfig()).eval()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.01 * torch.randn_like(p))
    state = source.state_dict()
    state["loss.perceptual_loss.lin0.model.1.weight"] = torch.rand(1, 64, 1, 1)  # taming's LPIPS, not in this model
    state["loss.perceptual_loss.scaling_layer.shift"] = torch.zeros(1, 3, 1, 1)
    assert any(k.startswith("loss.discriminator.") for k in state)
    save_checkpoint({"state_dict": state, "global_step": 5, "epoch": 0, "pytorch-lightning_version": "1.4.2"}, path)
    return source


def assert_reproduces(source: VQModel, loaded: VQModelInterface) -> None:
    x = photo_crops(2, 32)
    with torch.no_grad():
        h = loaded.encode(x)
        assert torch.equal(h, source.encode_to_prequant(x))
        assert torch.equal(loaded.decode(h), source.decode(source.quantize(h)[0]))
        assert torch.equal(loaded.decode(h, force_not_quantize=True), source.decode(h))


def test_compvis_layout_checkpoint_loads_into_interface(tmp_path, caplog):
    ckpt = tmp_path / "model.ckpt"
    source = write_compvis_checkpoint(ckpt)
    direct = tiny_vq(cls=VQModelInterface, ckpt_path=str(ckpt)).eval()
    assert_reproduces(source, direct)
    assert "dropping" in caplog.text and "loss.*" in caplog.text

    first_stage_config = {
        "target": "ldm.models.autoencoder.VQModelInterface",
        "params": {
            "embed_dim": 3,
            "n_embed": 64,
            "ddconfig": dict(TINY_DDCONFIG),
            "lossconfig": IDENTITY,
            "ckpt_path": str(ckpt),
        },
    }
    via_config = instantiate_from_config(OmegaConf.create(first_stage_config)).eval()
    assert isinstance(via_config, VQModelInterface)
    assert_reproduces(source, via_config)


def test_checkpoint_of_another_ddconfig_is_refused_not_silently_truncated(tmp_path):
    """A first stage trained with the middle attention block, loaded into one without it (the quick start's VQ before
    and after it dropped the block): its attention weights must not be dropped in silence."""
    ckpt = tmp_path / "model.ckpt"
    write_compvis_checkpoint(ckpt)
    without_attention = dict(TINY_DDCONFIG, attn_type="none")
    with pytest.raises(CheckpointError, match=r"autoencoder weights this model lacks \(first: \['encoder.mid.attn_1"):
        VQModelInterface(ddconfig=without_attention, lossconfig=IDENTITY, n_embed=64, embed_dim=3, ckpt_path=str(ckpt))
    dropped = VQModelInterface(
        ddconfig=without_attention,
        lossconfig=IDENTITY,
        n_embed=64,
        embed_dim=3,
        ckpt_path=str(ckpt),
        ignore_keys=["encoder.mid.attn_1", "decoder.mid.attn_1"],
    )
    assert not any(".attn_1." in k for k in dropped.state_dict())


def test_checkpoint_restores_discriminator_when_the_loss_matches(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    source = write_compvis_checkpoint(ckpt)
    resumed = tiny_vq(gan_lossconfig(), ckpt_path=str(ckpt))
    assert same_state(resumed.loss.discriminator.state_dict(), source.loss.discriminator.state_dict())
    smaller_disc = tiny_vq(gan_lossconfig(disc_ndf=4), ckpt_path=str(ckpt))  # other shapes: loss keys dropped
    assert torch.equal(smaller_disc.quantize.embedding.weight, source.quantize.embedding.weight)


def test_a_first_stage_checkpoint_with_nan_weights_is_refused(tmp_path):
    """A NaN first stage gave scale_by_std a NaN scale_factor and trained NaN losses to exit 0."""
    source = write_compvis_checkpoint(tmp_path / "vq.ckpt")
    state = {k: v.clone() for k, v in source.state_dict().items()}
    state["decoder.conv_out.weight"][0] = float("nan")
    save_checkpoint({"state_dict": state}, tmp_path / "nan.ckpt")
    with pytest.raises(CheckpointError, match=r"nan.ckpt'?: 1 tensors hold NaN or inf \(first: \['decoder.conv_out"):
        tiny_vq(cls=VQModelInterface, ckpt_path=str(tmp_path / "nan.ckpt"))


def test_latent_diffusion_checkpoint_prefix_is_understood(tmp_path):
    source = write_compvis_checkpoint(tmp_path / "vq.ckpt")
    ldm_ckpt = tmp_path / "ldm.ckpt"
    state = {f"first_stage_model.{k}": v for k, v in source.state_dict().items() if not k.startswith("loss.")}
    state["model.diffusion_model.out.0.weight"] = torch.zeros(3)
    save_checkpoint({"state_dict": state}, ldm_ckpt)
    assert_reproduces(source, tiny_vq(cls=VQModelInterface, ckpt_path=str(ldm_ckpt)).eval())


def test_missing_ckpt_path_says_where_to_put_it_or_how_to_train(tmp_path):
    missing = tmp_path / "models" / "first_stage_models" / "vq-f4" / "model.ckpt"
    with pytest.raises(CheckpointError) as info:
        tiny_vq(cls=VQModelInterface, ckpt_path=str(missing))
    message = str(info.value)
    assert str(missing) in message
    assert "models/first_stage_models/vq-f4/model.ckpt" in message
    assert "python main.py --base configs/autoencoder/vq_f4.yaml -t" in message


# --------------------------------------------------------------------------------------------------------- configs


def test_real_vq_f4_config_keys_equal_the_shared_reference(monkeypatch, tmp_path):
    reference = json.loads(REFERENCE_KEYS.read_text())
    config = OmegaConf.load(REPO / "configs" / "autoencoder" / "vq_f4.yaml")
    params = OmegaConf.to_container(config.model.params, resolve=True)
    assert params["ddconfig"] == reference["_meta"]["ddconfig"]
    assert (params["n_embed"], params["embed_dim"]) == (8192, 3)
    real_loss = params["lossconfig"]
    params["lossconfig"] = IDENTITY
    with torch.device("meta"):
        model = instantiate_from_config({"target": config.model.target, "params": params})
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == reference["vq_model"]
    assert sum(p.numel() for p in model.parameters()) == reference["_meta"]["num_params"]
    # the real loss (LPIPS on VGG16) fails offline with the clear message, not with a download attempt
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(PerceptualWeightsMissingError, match="perceptual_weight: 0"):
        instantiate_from_config(real_loss)


def test_tiny_config_trains_a_few_batches_on_its_data_section():
    config = OmegaConf.load(REPO / "configs" / "autoencoder" / "vq_f4_tiny.yaml")
    config.data.params.train.params.n_samples = 6
    config.data.params.validation.params.n_samples = 2
    config.data.params.batch_size = 2
    pl.seed_everything(0)
    model = instantiate_from_config(config.model)
    assert model.downsampling_factor == 4 and model.loss.perceptual_loss is None
    model.learning_rate = config.model.base_learning_rate * config.data.params.batch_size
    snaps = SnapshotCallback()
    cpu_trainer(max_steps=3, callbacks=[snaps]).fit(model, datamodule=instantiate_from_config(config.data))
    assert [r["generator_steps"] for r in snaps.rows] == [1, 2, 3]


@pytest.mark.slow
def test_main_py_trains_the_tiny_vq_and_its_checkpoint_serves_as_first_stage(tmp_path):
    cmd = [
        sys.executable,
        "main.py",
        "--base",
        "configs/autoencoder/vq_f4_tiny.yaml",
        "-t",
        "--no-test",
        "-l",
        str(tmp_path / "logs"),
        "lightning.trainer.max_steps=4",
        "lightning.trainer.limit_val_batches=1",
        "data.params.train.params.n_samples=16",
        "data.params.validation.params.n_samples=8",
    ]
    result = run_python(cmd[1:], cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (last,) = (tmp_path / "logs").rglob("checkpoints/last.ckpt")
    checkpoint = load_checkpoint(last)
    assert checkpoint["generator_steps"] == 4
    config = OmegaConf.load(REPO / "configs" / "autoencoder" / "vq_f4_tiny.yaml").model.params
    first_stage = VQModelInterface(
        ddconfig=config.ddconfig, lossconfig=IDENTITY, n_embed=config.n_embed, embed_dim=config.embed_dim, ckpt_path=str(last)
    ).eval()
    torch.testing.assert_close(first_stage.post_quant_conv.weight, checkpoint["state_dict"]["post_quant_conv.weight"])
    with torch.no_grad():
        assert first_stage.decode(first_stage.encode(photo_crops(1, 32))).shape == (1, 3, 32, 32)


def test_chunked_quantization_equals_taming_quantizer():
    from taming.modules.vqvae.quantize import VectorQuantizer2

    from ldm.models.autoencoder import quantize_latent

    torch.manual_seed(0)
    quantizer = VectorQuantizer2(n_e=64, e_dim=3, beta=0.25, legacy=False).eval()
    h = torch.randn(2, 3, 13, 11)
    expected = quantizer(h)[0]
    for chunk in (1, 7, 4096):  # blocks smaller than, not dividing, and larger than the 286 latent vectors
        assert torch.equal(quantize_latent(quantizer, h, chunk=chunk), expected)


def test_quantization_under_bf16_autocast_picks_the_float32_codes():
    """Refinement decodes under autocast: the nearest-code search must not run in bfloat16 (with 8192 close codes a
    bf16 matmul picks another code for a large share of the vectors)."""
    from taming.modules.vqvae.quantize import VectorQuantizer2

    from ldm.models.autoencoder import quantize_latent

    torch.manual_seed(0)
    quantizer = VectorQuantizer2(n_e=8192, e_dim=3, beta=0.25, legacy=False).eval()
    h = torch.randn(1, 3, 32, 32) * 0.01  # the codebook is U(-1/8192, 1/8192): latents near it
    expected = quantize_latent(quantizer, h)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        got = quantize_latent(quantizer, h)
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    half = quantize_latent(quantizer, h.bfloat16())  # a bf16 latent (bf16-true): fp32 search, bf16 result
    reference = quantize_latent(quantizer, h.bfloat16().float())
    # same codes; only the straight-through sum z + (z_q - z) rounds, by at most a bf16 ulp of |z|
    assert half.dtype == torch.bfloat16 and (half.float() - reference).abs().max() <= 2**-8 * h.abs().max()
    on_meta = copy.deepcopy(quantizer).to("meta")  # no autocast on the meta device: nothing to disable there
    assert quantize_latent(on_meta, h.to("meta")).device.type == "meta"


def test_vq_training_quantizes_in_float32_under_bf16_autocast():
    """VQModel.forward / encode (training, bf16-mixed) pick the same codes as without autocast, and the codebook
    loss still reaches the encoder through the straight-through estimator."""
    torch.manual_seed(0)
    model = tiny_vq(n_embed=8192)
    h = torch.randn(2, 3, 8, 8) * 0.01
    _, _, (_, _, expected) = model.quantize_prequant(h)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        quant, diff, (_, _, indices) = model.quantize_prequant(h.bfloat16())
        x = photo_crops(2, 32).requires_grad_(False)
        xrec, codebook_loss = model(x)
    assert torch.equal(indices, model.quantize_prequant(h.bfloat16().float())[2][2])
    assert quant.dtype == torch.bfloat16 and diff.dtype == torch.float32
    assert torch.equal(model.quantize_prequant(h)[2][2], expected)
    (xrec.float().mean() + codebook_loss).backward()
    assert model.encoder.conv_in.weight.grad is not None and torch.isfinite(model.encoder.conv_in.weight.grad).all()
