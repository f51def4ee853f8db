"""The windowed model: timestep draws, validation, window in checkpoints, finetuning into another window, learning."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from ldm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ldm.data.embedded import EmbeddedPhotos
from ldm.models.diffusion.base import draw_window_timesteps
from ldm.models.diffusion.latesteps import stratified_window_timesteps
from ldm.modules.diffusionmodules.util import make_beta_schedule
from ldm.util import instantiate_from_config
from ldm.windows import steps_to_window, validate_window, window_to_steps

from conftest import LATESTEPS_TARGET, build_tiny_expert, tiny_ldm_params


def build(t_min: int, t_max: int, **overrides):
    torch.manual_seed(0)
    return instantiate_from_config(
        {"target": LATESTEPS_TARGET, "params": tiny_ldm_params(t_min=t_min, t_max=t_max, **overrides)}
    )


def test_step_naming_maps_to_timesteps():
    assert steps_to_window(500, 750) == (250, 500)
    assert steps_to_window(750, 1000) == (0, 250)
    assert steps_to_window(500, 1000) == (0, 500)
    assert window_to_steps(250, 500) == (500, 750)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 999), st.integers(1, 1000), st.integers(1, 64), st.integers(0, 2**31 - 1))
def test_drawn_timesteps_lie_in_window(a, b, n, seed):
    t_min, t_max = min(a, b - 1), max(a + 1, b) if a >= b else b
    t_min, t_max = validate_window(t_min, t_max, 1000)
    t = draw_window_timesteps(n, t_min, t_max, "cpu", torch.Generator().manual_seed(seed))
    assert t.dtype == torch.long and t.shape == (n,)
    assert int(t.min()) >= t_min and int(t.max()) < t_max


def test_draws_cover_the_window_uniformly():
    t = draw_window_timesteps(40_000, 250, 500, "cpu", torch.Generator().manual_seed(0))
    counts = torch.bincount(t - 250, minlength=250).float()
    assert counts.min() > 0 and int(t.min()) == 250 and int(t.max()) == 499
    assert counts.std() / counts.mean() < 0.15


def test_loss_only_sees_window_timesteps(monkeypatch):
    model = build(250, 500)
    seen = []
    original = model.apply_model

    def spy(x, t, cond=None):
        seen.append(t.clone())
        return original(x, t, cond)

    monkeypatch.setattr(model, "apply_model", spy)
    z = torch.randn(64, 3, 8, 8)
    with torch.no_grad():
        for _ in range(4):
            model(z, None)
    ts = torch.cat(seen)
    assert ts.numel() == 256 and int(ts.min()) >= 250 and int(ts.max()) < 500


@pytest.mark.parametrize("t_min,t_max", [(-1, 10), (10, 10), (500, 250), (0, 1001), (1.5, 10), ("0", 250), (True, 5)])
def test_invalid_windows_rejected_with_step_hint(t_min, t_max):
    with pytest.raises(ValueError, match=r"0 <= t_min < t_max <= 1000.*steps 500-750 -> t_min=250, t_max=500"):
        build(t_min, t_max)


def test_stratified_validation_draws_hit_every_band():
    t, band = stratified_window_timesteps(12, 250, 500, 4, torch.Generator().manual_seed(0))
    edges = [250, 312, 375, 438, 500]
    for ti, bi in zip(t.tolist(), band.tolist()):
        assert edges[bi] <= ti < edges[bi + 1]
    assert sorted(set(band.tolist())) == [0, 1, 2, 3]


def test_validation_logs_window_and_bands():
    model = build(250, 500)
    logged = {}
    model.log = lambda name, value, **kw: logged.setdefault(name, float(value))  # type: ignore[method-assign]
    batch = next(iter(DataLoader(EmbeddedPhotos(size=32, split="validation", n_samples=8), batch_size=8)))
    model.validation_step(batch, 0)
    assert {"val/loss_window", "val/loss_window_ema"} <= set(logged)
    assert {f"val/loss_band_{lo}_{hi}" for lo, hi in model.band_edges()} <= set(logged)
    again = {}
    model.log = lambda name, value, **kw: again.setdefault(name, float(value))  # type: ignore[method-assign]
    model.validation_step(batch, 0)
    assert again == logged  # fixed draws: comparable across epochs
    sizes = {}
    model.log = lambda name, value, **kw: sizes.setdefault(name, (float(value), kw["batch_size"]))  # type: ignore[method-assign]
    model.validation_step({k: v[:2] for k, v in batch.items()}, 0)  # 2 samples, 4 bands: every key still logged
    assert set(sizes) == set(logged)
    assert sorted(n for _, n in (sizes[f"val/loss_band_{lo}_{hi}"] for lo, hi in model.band_edges())) == [0, 0, 1, 1]


def test_window_survives_checkpoint_and_finetune_into_next_window(tmp_path):
    shapes = build_tiny_expert(250, 500)
    ckpt = {"state_dict": shapes.state_dict()}
    shapes.on_save_checkpoint(ckpt)
    assert ckpt["window"] == [250, 500]
    path = tmp_path / "shapes.ckpt"
    save_checkpoint(ckpt, path)
    assert load_checkpoint(path)["window"] == [250, 500]

    details = build(0, 250, ckpt_path=str(path))
    assert details.window() == (0, 250)
    for k, v in shapes.state_dict().items():
        assert torch.equal(v, details.state_dict()[k]), k  # UNet, EMA and first stage all arrive
    with pytest.raises(CheckpointError, match="noise schedule differs"):
        build(0, 250, ckpt_path=str(path), linear_start=0.001)


def test_finetune_from_full_range_ldm_checkpoint(tmp_path):
    full = instantiate_from_config({"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": tiny_ldm_params()})
    with torch.no_grad():
        full.model.diffusion_model.out[2].weight.normal_()
    path = tmp_path / "full.ckpt"
    save_checkpoint({"state_dict": full.state_dict(), "global_step": 100}, path)
    window = build(250, 500, ckpt_path=str(path))
    assert torch.equal(window.model.diffusion_model.out[2].weight, full.model.diffusion_model.out[2].weight)
    assert window.first_stage_model.state_dict().keys() == full.first_stage_model.state_dict().keys()


def test_log_images_shows_window_refinement():
    model = build_tiny_expert(250, 500)
    batch = next(iter(DataLoader(EmbeddedPhotos(size=32, split="validation", n_samples=2), batch_size=2)))
    logs = model.log_images(batch, N=2, ddim_steps=50)
    assert set(logs) == {"inputs", "reconstruction", "noised_to_t_max", "window_refined", "window_pred_x0"}
    assert all(v.shape == (2, 3, 32, 32) and torch.isfinite(v).all() for v in logs.values())


@pytest.mark.slow
def test_training_lowers_window_validation_loss():
    """A tiny window model trained 200 steps on the embedded photos lowers its held-out window loss.

    The (frozen) first stage encodes the training crops once; the steps then run the model's own training path
    (window timestep draw -> q_sample -> UNet -> loss) on minibatches of those latents.
    """
    torch.manual_seed(0)
    model = build(250, 500, use_ema=False)
    model.learning_rate = 2e-3
    opt = model.configure_optimizers()
    train_batch = next(iter(DataLoader(EmbeddedPhotos(size=32, split="train", n_samples=128, seed=0), batch_size=128)))
    val_batch = next(iter(DataLoader(EmbeddedPhotos(size=32, split="validation", n_samples=32), batch_size=32)))
    latents, _ = model.get_input(train_batch, "image")
    gen = torch.Generator().manual_seed(0)

    def val_loss() -> float:
        model.eval()
        value = float(model.window_losses(val_batch, 0)["loss_window"][0])
        model.train()
        return value

    before = val_loss()
    for _ in range(200):
        idx = torch.randint(0, latents.shape[0], (16,), generator=gen)
        loss, _ = model(latents[idx], None, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = val_loss()
    assert after < 0.8 * before, (before, after)


def test_window_is_checked_against_the_length_of_given_betas():
    betas = make_beta_schedule("linear", 500, linear_start=0.0015, linear_end=0.0195).tolist()
    model = build(250, 500, given_betas=betas)
    assert model.num_timesteps == 500 and model.window() == (250, 500)
    with pytest.raises(ValueError, match="t_max"):
        build(250, 600, given_betas=betas)


# ---------------------------------------------------------------------------------------------------------------------
# pixel space: latent-diffusion's IdentityFirstStage


def test_pixel_space_expert_trains_saves_and_refines_regions(tmp_path):
    """A window model on IdentityFirstStage is a pixel-space diffusion model: it trains, its checkpoint loads through
    the refiner (the untrusted-config allow-list admits the identity first stage), and region refinement keeps every
    pixel outside the mask exact."""
    from ldm.models.autoencoder import IdentityFirstStage
    from ldm.refine import Refiner

    params = tiny_ldm_params(
        t_min=0,
        t_max=500,
        image_size=16,
        scale_factor=1.0,
        first_stage_config={"target": "ldm.models.autoencoder.IdentityFirstStage"},
    )
    params["unet_config"] = {**params["unet_config"], "params": {**params["unet_config"]["params"], "image_size": 16}}
    config = {"model": {"target": LATESTEPS_TARGET, "params": params}}
    torch.manual_seed(0)
    model = instantiate_from_config(config["model"])
    assert isinstance(model.first_stage_model, IdentityFirstStage) and model.downsampling_factor == 1
    x = torch.rand(2, 16, 16, 3) * 2 - 1
    loss, _ = model.shared_step({"image": x})
    loss.backward()
    assert torch.isfinite(loss) and model.model.diffusion_model.out[2].weight.grad is not None
    z = model.get_first_stage_encoding(model.encode_first_stage(x.permute(0, 3, 1, 2)))
    assert torch.equal(z, x.permute(0, 3, 1, 2)) and torch.equal(model.decode_first_stage(z), z)
    path = tmp_path / "pixel.ckpt"
    save_checkpoint({"state_dict": model.state_dict(), "config": config, "window": [0, 500], "global_step": 0}, path)
    refiner = Refiner.from_checkpoints([path], device="cpu")
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    start = torch.zeros(1, 1, 16, 16, dtype=torch.long)
    start[..., 4:12, 4:12] = 300
    out = refiner.refine_tensors(image, 300, [0], 20, start_map=start)
    assert out.shape == image.shape and torch.equal(out[..., :4, :], image[..., :4, :])
    assert not torch.equal(out[..., 6:10, 6:10], image[..., 6:10, 6:10])


def test_identity_first_stage_answers_as_latent_diffusion_s():
    from ldm.models.autoencoder import IdentityFirstStage

    x = torch.randn(2, 3, 4, 4)
    assert IdentityFirstStage().quantize(x) is x
    quant, loss, info = IdentityFirstStage(vq_interface=True).quantize(x)
    assert quant is x and loss is None and info == (None, None, None)
    assert IdentityFirstStage()(x) is x and list(IdentityFirstStage().state_dict()) == []


def test_a_resume_into_another_window_names_both_windows_half_open(caplog):
    """The warning printed the saved window as a list, "[250, 500]", a closed interval the window is not."""
    model = build(0, 250)
    with caplog.at_level("WARNING", logger="ldm.models.diffusion.latesteps"):
        model.on_load_checkpoint({"window": [250, 500], "state_dict": {}})
    assert "checkpoint was trained on window t in [250, 500); this run trains [0, 250)" in caplog.text
