"""DDPM / LatentDiffusion: buffers, q_sample, losses, conditioning, init_from_ckpt, scale_by_std, autocast."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from ldm.checkpoint import CheckpointError, save_checkpoint
from ldm.models.diffusion.ddpm import DDPM, LatentDiffusion
from ldm.modules.diffusionmodules.util import make_beta_schedule, make_schedule_buffers
from ldm.util import ConfigError, instantiate_from_config

from conftest import TINY_UNET_PARAMS, photo_crops, tiny_ldm_params

LDM = "ldm.models.diffusion.ddpm.LatentDiffusion"
WINDOW = "ldm.models.diffusion.latesteps.LateStepsLatentDiffusion"


def build(**overrides) -> LatentDiffusion:
    torch.manual_seed(0)
    return instantiate_from_config({"target": LDM, "params": tiny_ldm_params(**overrides)})


def batch_of(n: int = 4, size: int = 32) -> dict[str, torch.Tensor]:
    return {"image": photo_crops(n, size).permute(0, 2, 3, 1)}


def test_buffers_are_float32_casts_of_float64_math():
    model = build()
    ref = make_schedule_buffers(make_beta_schedule("linear", 1000, 0.0015, 0.0195))
    for name in ("betas", "alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_mean_coef2"):
        buf = getattr(model, name)
        assert buf.dtype == torch.float32
        assert torch.equal(buf, ref[name].to(torch.float32)), name
    assert "lvlb_weights" not in model.state_dict()


def test_q_sample_matches_closed_form():
    model = build()
    x0 = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    eps = torch.randn_like(x0)
    t = torch.tensor([0, 499, 999])
    got = model.q_sample(x0.float(), t, eps.float()).double()
    acp = np.cumprod(1 - make_beta_schedule("linear", 1000, 0.0015, 0.0195).numpy())
    ref = torch.stack([np.sqrt(acp[i]) * x0[j] + np.sqrt(1 - acp[i]) * eps[j] for j, i in enumerate(t.tolist())])
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("parameterization", ["eps", "x0"])
@pytest.mark.parametrize("loss_type", ["l2", "l1"])
def test_p_losses_match_manual_computation(parameterization, loss_type):
    model = build(parameterization=parameterization, loss_type=loss_type)
    torch.nn.init.normal_(model.model.diffusion_model.out[2].weight, std=0.05)
    z = torch.randn(4, 3, 8, 8)
    eps = torch.randn_like(z)
    t = torch.tensor([1, 10, 300, 900])
    loss, log = model.p_losses(z, None, t, noise=eps)  # latent-diffusion's order: (x_start, cond, t, noise)
    out = model.apply_model(model.q_sample(z, t, eps), t)
    target = eps if parameterization == "eps" else z
    per = (out - target).abs() if loss_type == "l1" else (out - target) ** 2
    expected = per.mean(dim=(1, 2, 3)).mean()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(log["train/loss_simple"], expected)
    assert set(log) == {"train/loss_simple", "train/loss_vlb", "train/loss"}


def test_training_step_updates_only_the_unet_and_ema_tracks():
    model = build()
    opt = model.configure_optimizers()
    fs_before = copy.deepcopy(model.first_stage_model.state_dict())
    unet_before = model.model.diffusion_model.out[2].weight.clone()
    loss, _ = model.shared_step(batch_of())
    loss.backward()
    opt.step()
    model.model_ema(model.model)
    assert not torch.equal(unet_before, model.model.diffusion_model.out[2].weight)
    for k, v in model.first_stage_model.state_dict().items():
        assert torch.equal(v, fs_before[k]), k
    assert all(not p.requires_grad for p in model.first_stage_model.parameters())
    model.train()
    assert not model.first_stage_model.training and model.model.training
    assert int(model.model_ema.num_updates) == 1


def test_get_input_takes_hwc_batches_and_encodes():
    model = build()
    z, c, x, xrec = model.get_input(batch_of(2), "image", return_first_stage_outputs=True)
    assert z.shape == (2, 3, 8, 8) and c is None
    assert x.shape == xrec.shape == (2, 3, 32, 32)
    with pytest.raises(KeyError, match="first_stage_key"):
        model.get_input({"img": torch.zeros(1, 32, 32, 3)}, "image")


def test_conditioning_concat_crossattn_adm(monkeypatch):
    concat = build(
        cond_stage_config="__is_first_stage__",
        cond_stage_key="image",
        conditioning_key="concat",
        unet_config={
            "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
            "params": {**TINY_UNET_PARAMS, "in_channels": 6},
        },
    )
    loss, _ = concat.shared_step(batch_of(2))
    assert torch.isfinite(loss)

    cross_params = dict(
        cond_stage_config={
            "target": "ldm.modules.encoders.modules.ClassEmbedder",
            "params": {"embed_dim": 16, "n_classes": 10},
        },
        cond_stage_key="class_label",
        cond_stage_trainable=True,
        conditioning_key="crossattn",
        unet_config={
            "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
            "params": {**TINY_UNET_PARAMS, "use_spatial_transformer": True, "context_dim": 16},
        },
    )
    cross = build(**cross_params)
    batch = {**batch_of(2), "class": torch.tensor([1, 7])}
    loss, _ = cross.shared_step(batch)
    loss.backward()
    assert cross.cond_stage_model.embedding.weight.grad is not None
    assert any(
        p is cross.cond_stage_model.embedding.weight
        for g in [cross.configure_optimizers()]
        for p in g.param_groups[0]["params"]
    )
    # validation encodes a trainable cond stage's input as training does (it once handed the raw labels to the UNet),
    # in LatentDiffusion and in the window model, whose validation_step is its own
    window = instantiate_from_config(
        {"target": WINDOW, "params": {"t_min": 0, "t_max": 250, **tiny_ldm_params(**cross_params)}}
    )
    for model, keys in ((cross, {"val/loss", "val/loss_ema"}), (window, {"val/loss_window", "val/loss_window_ema"})):
        logged: list[dict] = []
        monkeypatch.setattr(model, "log_dict", lambda metrics, logged=logged, **kw: logged.append(metrics))
        monkeypatch.setattr(model, "log", lambda name, value, logged=logged, **kw: logged.append({name: value}))
        model.eval()  # as Lightning runs validation
        for _ in range(2):
            model.validation_step(batch, 0)
        values = {k: float(v) for entry in logged for k, v in entry.items()}
        assert keys <= set(values) and all(np.isfinite(v) for v in values.values())
        half = len(logged) // 2
        assert logged[:half] == logged[half:]  # noise and timesteps fixed by the batch index
    assert any(
        p is cross.cond_stage_model.embedding.weight
        for g in [cross.configure_optimizers()]
        for p in g.param_groups[0]["params"]
    )

    adm = build(
        cond_stage_config={"target": "ldm.modules.encoders.modules.ClassLabels", "params": {"n_classes": 10}},
        cond_stage_key="class_label",
        conditioning_key="adm",
        unet_config={
            "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
            "params": {**TINY_UNET_PARAMS, "num_classes": 10},
        },
    )
    loss, _ = adm.shared_step(batch)
    assert torch.isfinite(loss)
    # the labels are made on the model's device (a non-persistent buffer anchors it: no state-dict key)
    assert "cond_stage_model.device_anchor" in dict(adm.named_buffers())
    assert not any(k.startswith("cond_stage_model.") for k in adm.state_dict())
    import ldm.modules.encoders.modules as encoder_modules

    devices, original = [], torch.as_tensor

    def as_tensor(data, *args, device=None, **kwargs):
        devices.append(device)
        return original(data, *args, device=device, **kwargs)

    monkeypatch.setattr(encoder_modules.torch, "as_tensor", as_tensor, raising=True)
    labels = adm.get_learned_conditioning({"class": [3, 4]})  # "class_label": the whole batch goes in
    monkeypatch.undo()
    assert devices == [adm.cond_stage_model.device_anchor.device]
    assert labels.tolist() == [3, 4] and labels.device == adm.device and labels.dtype == torch.long


def test_init_from_ckpt_round_trip_and_schedule_mismatch(tmp_path):
    src = build()
    with torch.no_grad():
        for p in src.model.parameters():
            p.add_(0.01)
    path = tmp_path / "src.ckpt"
    save_checkpoint({"state_dict": src.state_dict(), "global_step": 5}, path)
    dst = build(ckpt_path=str(path))
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k
    assert dst.restarted_from_ckpt
    with pytest.raises(CheckpointError, match="noise schedule differs"):
        build(ckpt_path=str(path), linear_end=0.012)
    good = src.state_dict()["betas"]
    for bad, shown in [(good[0], r"\(\)"), (good[:0], r"\(0,\)"), (3, "int")]:  # IndexError/AttributeError before
        with pytest.raises(CheckpointError, match=rf"betas must be a 1-D tensor of T values, got {shown}"):
            dst.check_schedule_matches({"betas": bad}, "x.ckpt")
    with pytest.raises(CheckpointError, match="^resume checkpoint: noise schedule differs"):  # what main.py -r meets
        build(linear_end=0.012).on_load_checkpoint({"state_dict": src.state_dict()})
    nan = {**src.state_dict()}
    nan[next(k for k in nan if k.startswith("model.") and nan[k].is_floating_point())] = torch.tensor([float("nan")])
    save_checkpoint({"state_dict": nan}, tmp_path / "nan.ckpt")
    with pytest.raises(CheckpointError, match=r"1 tensors hold NaN or inf \(first: \['model\."):  # NaN losses, exit 0
        build(ckpt_path=str(tmp_path / "nan.ckpt"))
    with pytest.raises(CheckpointError, match=r"^resume checkpoint: 1 tensors hold NaN or inf"):  # main.py -r
        build().on_load_checkpoint({"state_dict": nan})
    unet_only_ckpt = tmp_path / "first_stage_only.ckpt"
    save_checkpoint(
        {"state_dict": {k: v for k, v in src.state_dict().items() if k.startswith("first_stage_model.")}}, unet_only_ckpt
    )
    with pytest.raises(CheckpointError, match="lacks .* UNet weights"):
        build(ckpt_path=str(unet_only_ckpt))
    partial = tmp_path / "partial.ckpt"
    save_checkpoint({"state_dict": {k: v for k, v in src.state_dict().items() if ".out." not in k}}, partial)
    with pytest.raises(CheckpointError, match="lacks .* UNet weights"):
        build(ckpt_path=str(partial))
    assert build(ckpt_path=str(partial), ignore_keys=["model.diffusion_model.out."]).restarted_from_ckpt
    only_unet = build(ckpt_path=str(path), load_only_unet=True)
    assert torch.equal(only_unet.model.diffusion_model.out[2].weight, src.model.diffusion_model.out[2].weight)


@pytest.mark.parametrize("load_only_unet", [False, True])
def test_init_from_a_checkpoint_without_ema_starts_the_ema_from_the_loaded_weights(tmp_path, load_only_unet):
    src = build()
    with torch.no_grad():
        for p in src.model.parameters():
            p.add_(0.01)
    path = tmp_path / "no_ema.ckpt"  # e.g. a converted diffusers model: one set of weights, no model_ema.*
    save_checkpoint({"state_dict": {k: v for k, v in src.state_dict().items() if not k.startswith("model_ema.")}}, path)
    dst = build(ckpt_path=str(path), load_only_unet=load_only_unet)
    with dst.ema_scope():  # was: the EMA kept the random initialisation it was copied from at construction
        for k, v in src.model.state_dict().items():
            assert torch.equal(dst.model.state_dict()[k], v), k
    assert int(dst.model_ema.num_updates) == 0


def test_strict_key_compatibility_with_itself(tmp_path):
    model = build()
    fresh = build()
    result = fresh.load_state_dict(model.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_scale_by_std_sets_unit_variance_latents():
    model = build(scale_by_std=True)
    batch = batch_of(4)
    model.on_train_batch_start(batch, 0)
    z, _ = model.get_input(batch, "image")
    assert float(model.scale_factor) != 1.0
    assert z.flatten().std().item() == pytest.approx(1.0, rel=1e-3)
    assert "scale_factor" in model.state_dict()


def test_bf16_autocast_forward():
    model = build()
    z = torch.randn(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.apply_model(z, torch.tensor([3, 400]))
    assert out.shape == z.shape and torch.isfinite(out.float()).all()


def test_bf16_mixed_training_noises_float32_latents():
    """Under bf16 autocast (Lightning's bf16-mixed) the encoder computes in bfloat16, but the latent that is noised
    and the noise that is regressed stay float32: at t=0 the noise scale is 0.01, below bf16's resolution of a latent."""
    model = build()
    batch = batch_of(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, _ = model.get_input(batch, model.first_stage_key)
    reference, _ = model.get_input(batch, model.first_stage_key)
    assert z.dtype == torch.float32
    torch.testing.assert_close(z, reference, rtol=0.05, atol=0.05)  # the bf16 encoder's rounding, nothing more
    t = torch.zeros(2, dtype=torch.long)
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        noised = model.q_sample(z, t, noise)
    expected = model.sqrt_alphas_cumprod[0].double() * z.double() + model.sqrt_one_minus_alphas_cumprod[0].double() * noise
    assert noised.dtype == torch.float32 and (noised.double() - expected).abs().max() < 1e-6


def test_config_errors_name_the_problem():
    with pytest.raises(ConfigError, match="no attribute 'LatentDiffusionn' \\(did you mean 'LatentDiffusion'\\?\\)"):
        instantiate_from_config({"target": "ldm.models.diffusion.ddpm.LatentDiffusionn"})
    with pytest.raises(ConfigError, match="unknown keys \\['parms'\\]"):
        instantiate_from_config({"target": LDM, "parms": {}})
    with pytest.raises(ConfigError, match="takes no argument 'timestepz' \\(did you mean 'timesteps'\\?\\)"):
        instantiate_from_config({"target": LDM, "params": tiny_ldm_params(timestepz=10)})
    with pytest.raises(ValueError, match="parameterization"):
        DDPM(unet_config={"target": "torch.nn.Identity"}, parameterization="v")


def test_forward_with_a_generator_is_reproducible():
    model = build()
    x = model.get_first_stage_encoding(model.encode_first_stage(photo_crops(2, 32)))
    losses = [model(x, None, generator=torch.Generator().manual_seed(seed))[0] for seed in (3, 3, 4)]
    assert torch.equal(losses[0], losses[1])  # timesteps and noise both come from the generator
    assert not torch.equal(losses[0], losses[2])


class CompVisStyleWindow(LatentDiffusion):
    """The late-steps method as it was first written: an edit of latent-diffusion's forward, verbatim signatures."""

    drawn: list = []

    def forward(self, x, c, *args, **kwargs):
        t = torch.randint(250, 500, (x.shape[0],), device=self.device).long()
        type(self).drawn.append(t.clone())
        if self.model.conditioning_key is not None:
            assert c is not None
            if self.cond_stage_trainable:
                c = self.get_learned_conditioning(c)
        return self.p_losses(x, c, t, *args, **kwargs)


def test_a_subclass_written_the_compvis_way_trains():
    torch.manual_seed(0)
    model = instantiate_from_config({"target": f"{__name__}.CompVisStyleWindow", "params": tiny_ldm_params()})
    torch.nn.init.normal_(model.model.diffusion_model.out[2].weight, std=0.05)
    model.learning_rate = 1e-3
    opt = model.configure_optimizers()
    before = model.model.diffusion_model.out[2].weight.clone()
    for _ in range(3):
        loss, log = model.shared_step(batch_of())  # get_input -> self(x, c) -> forward -> p_losses(x, c, t)
        assert torch.isfinite(loss) and set(log) == {"train/loss_simple", "train/loss_vlb", "train/loss"}
        opt.zero_grad()
        loss.backward()
        assert model.model.diffusion_model.out[2].weight.grad.abs().sum() > 0
        opt.step()
    drawn = torch.cat(CompVisStyleWindow.drawn)
    assert 250 <= int(drawn.min()) and int(drawn.max()) < 500
    assert not torch.equal(before, model.model.diffusion_model.out[2].weight)
    # the CompVis p_losses order on both classes: LatentDiffusion (x_start, cond, t, noise), DDPM (x_start, t, noise)
    z, t = torch.randn(2, 3, 8, 8), torch.tensor([260, 400])
    eps = torch.randn_like(z)
    assert torch.equal(model.p_losses(z, None, t, eps)[0], model.p_losses(z, None, t, noise=eps)[0])
    with pytest.raises(TypeError):
        model.p_losses(z, t, noise=eps)  # the old project order is refused, not silently misread
    # validation draws its own timesteps and noise: the CompVis forward (no generator argument) is not in its way
    logged = []
    model.log_dict = lambda metrics, **kw: logged.append(metrics)  # type: ignore[method-assign]
    model.eval()
    model.validation_step(batch_of(2), 0)
    assert all(torch.isfinite(v) for v in logged[0].values())


@pytest.mark.parametrize("marker", ["__is_first_stage__", "__is_unconditional__"])
def test_cond_stage_markers_instantiate_to_none_as_in_latent_diffusion(marker):
    assert instantiate_from_config(marker) is None


def test_latent_scale_of_a_scale_by_std_checkpoint_is_kept_or_the_mismatch_refused(tmp_path):
    src = build(scale_by_std=True)
    src.scale_factor.fill_(2.5)
    path = tmp_path / "std.ckpt"
    save_checkpoint({"state_dict": src.state_dict()}, path)
    assert float(build(ckpt_path=str(path), scale_by_std=True).scale_factor) == 2.5  # adopted, not re-estimated
    assert build(ckpt_path=str(path), scale_factor=2.5).scale_factor == 2.5
    with pytest.raises(CheckpointError, match=r"scale_factor=2\.5 \(scale_by_std\), this model uses scale_factor=1"):
        build(ckpt_path=str(path))


def test_scale_by_std_from_a_checkpoint_with_a_fixed_scale_says_which_scale_it_keeps(tmp_path, caplog):
    """A fixed-scale checkpoint records no ``scale_factor``; restarted from it, ``scale_by_std`` never estimates one
    (latent-diffusion's behaviour) and kept 1.0 without a word."""
    path = tmp_path / "fixed.ckpt"
    save_checkpoint({"state_dict": build(scale_factor=0.5).state_dict()}, path)
    with caplog.at_level("WARNING", logger="ldm.models.diffusion.latent"):
        model = build(ckpt_path=str(path), scale_by_std=True)
    assert float(model.scale_factor) == 1.0
    assert "records no scale_factor" in caplog.text and "keeping scale_factor=1 from the config" in caplog.text
    caplog.clear()
    src = build(scale_by_std=True)
    src.scale_factor.fill_(2.5)
    save_checkpoint({"state_dict": src.state_dict()}, path)
    with caplog.at_level("WARNING", logger="ldm.models.diffusion.latent"):
        build(ckpt_path=str(path), scale_by_std=True)
    assert "records no scale_factor" not in caplog.text
