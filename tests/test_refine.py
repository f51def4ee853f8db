"""The refinement Python API: loading experts from checkpoints safely, determinism, sizes, alpha, faithfulness."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.checkpoint import CheckpointError, UnsafeCheckpointError, load_checkpoint, save_checkpoint, sha256_file
from ldm.models.diffusion.latesteps import LateStepsLatentDiffusion
from ldm.refine import Refiner
from ldm.util import ConfigError, instantiate_from_config

from conftest import (
    LATESTEPS_TARGET,
    build_tiny_expert,
    photo_crops,
    tiny_expert_config,
    tiny_first_stage_config,
    tiny_ldm_params,
)


class TrustedLDM(LateStepsLatentDiffusion):
    """A model class outside the allow-list (it lives in a test module): built only with trust_config=True."""


@pytest.fixture(scope="module")
def refiner(expert_checkpoints):
    return Refiner.from_checkpoints(expert_checkpoints, device="cpu")


@pytest.fixture(scope="module")
def crops():
    return photo_crops(4, 32, seed=5)


class PoolingFirstStage(torch.nn.Module):
    """A parameter-free f4 "autoencoder": 4x4 average pooling and nearest upsampling.

    The tiny random VQ of conftest decodes almost every latent to the same image (its codebook is a tiny ball), so
    pixel-space faithfulness cannot be measured through it; this first stage reconstructs photos closely (blocky).
    """

    downsampling_factor = 4

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(x, 4)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(z, scale_factor=4, mode="nearest")


@pytest.fixture(scope="module")
def trained_full_range():
    """A tiny full-range LatentDiffusion on :class:`PoolingFirstStage`, trained briefly (40 AdamW steps)."""
    torch.manual_seed(0)
    params = tiny_ldm_params(use_ema=False, first_stage_config={"target": f"{__name__}.PoolingFirstStage"})
    model = instantiate_from_config({"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params})
    with torch.no_grad():
        z = model.get_first_stage_encoding(model.encode_first_stage(photo_crops(32, 32, seed=3)))
    opt = torch.optim.AdamW(model.model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(40):
        idx = torch.randint(0, z.shape[0], (8,), generator=gen)
        t = torch.randint(0, model.num_timesteps, (8,), generator=gen)
        noise = torch.randn(8, *z.shape[1:], generator=gen)
        loss = model.per_sample_loss(z[idx], t, noise).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False)


def _rewrite(src, dst, **changes):
    """Copy checkpoint ``src`` to ``dst`` with top-level entries replaced (None removes an entry)."""
    ckpt = load_checkpoint(src)
    for key, value in changes.items():
        if value is None:
            ckpt.pop(key, None)
        else:
            ckpt[key] = value
    save_checkpoint(ckpt, dst)
    return dst


# ------------------------------------------------------------------------------------------------------------ loading
def test_from_checkpoints_reads_config_window_hash_and_shares_the_first_stage(refiner, expert_checkpoints):
    assert [e.window for e in refiner.experts] == [(250, 500), (0, 250)]
    assert [c.sha256 for c in refiner.checkpoints] == [sha256_file(p) for p in expert_checkpoints]
    assert all(c.config_source == "checkpoint" and c.ema and c.target == LATESTEPS_TARGET for c in refiner.checkpoints)
    assert refiner.experts[0].model.first_stage_model is refiner.experts[1].model.first_stage_model
    assert not hasattr(refiner.experts[0].model, "model_ema")  # EMA swapped in, then dropped
    assert refiner.factor == 8  # VQ f4 x UNet 2
    assert not any(p.requires_grad for p in refiner.model.parameters())


def test_config_from_yaml_for_checkpoints_without_one(refiner, expert_checkpoints, tmp_path, crops, caplog):
    from omegaconf import OmegaConf

    bare = _rewrite(expert_checkpoints[0], tmp_path / "bare.ckpt", config=None)
    with pytest.raises(ConfigError, match="holds no model config.*--config"):
        Refiner.from_checkpoints([bare, expert_checkpoints[1]], device="cpu")
    yaml_path = tmp_path / "expert.yaml"
    OmegaConf.save(OmegaConf.create(tiny_expert_config(250, 500)), yaml_path)
    with caplog.at_level(logging.WARNING, logger="ldm.refine.refiner"):
        Refiner.from_checkpoints(expert_checkpoints, device="cpu", config=str(tmp_path / "missing.yaml"))
    assert "config=" in caplog.text and "is not used: every checkpoint holds its own model config" in caplog.text
    caplog.clear()  # it is silently ignored no more; a mixed chain uses it and says nothing
    from_yaml = Refiner.from_checkpoints([bare, expert_checkpoints[1]], device="cpu", config=str(yaml_path))
    assert "is not used" not in caplog.text
    assert from_yaml.checkpoints[0].config_source == str(yaml_path)
    assert from_yaml.checkpoints[1].config_source == "checkpoint"
    ref = refiner.refine_tensors(crops[:1], 400, seeds=3, ddim_steps=10)
    assert torch.equal(from_yaml.refine_tensors(crops[:1], 400, seeds=3, ddim_steps=10), ref)


@pytest.mark.parametrize("where", ["model", "first_stage"])
def test_forbidden_target_is_refused_unless_trusted(expert_checkpoints, tmp_path, where):
    cfg = tiny_expert_config(250, 500)
    if where == "model":
        cfg["model"]["target"] = f"{__name__}.TrustedLDM"
    else:
        cfg["model"]["params"]["first_stage_config"]["target"] = "subprocess.Popen"
    path = _rewrite(expert_checkpoints[0], tmp_path / "foreign.ckpt", config=cfg)
    with pytest.raises(ConfigError, match="allow-list.*--trust-config") as err:
        Refiner.from_checkpoints([path, expert_checkpoints[1]], device="cpu")
    assert "foreign.ckpt" in str(err.value)
    if where == "model":
        trusted = Refiner.from_checkpoints([path, expert_checkpoints[1]], device="cpu", trust_config=True)
        assert type(trusted.experts[0].model) is TrustedLDM


def test_shape_mismatch_names_the_keys(expert_checkpoints, tmp_path):
    cfg = tiny_expert_config(250, 500)
    cfg["model"]["params"]["unet_config"]["params"]["model_channels"] = 64
    path = _rewrite(expert_checkpoints[0], tmp_path / "mismatch.ckpt", config=cfg)
    with pytest.raises(CheckpointError, match="config and checkpoint disagree") as err:
        Refiner.from_checkpoints([path], device="cpu")
    assert "model.diffusion_model." in str(err.value) and "checkpoint [32" in str(err.value)


def test_malicious_pickle_is_refused_without_side_effect(expert_checkpoints, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    ckpt = load_checkpoint(expert_checkpoints[0])
    ckpt["callbacks"] = Evil()
    path = tmp_path / "evil.ckpt"
    torch.save(ckpt, path)
    for trust in (False, True):
        with pytest.raises(UnsafeCheckpointError, match="refused"):
            Refiner.from_checkpoints([path], device="cpu", trust_config=trust)
    assert not marker.exists()


def test_missing_truncated_and_wrong_kind_checkpoints(expert_checkpoints, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Refiner.from_checkpoints([expert_checkpoints[0], tmp_path / "nope.ckpt"], device="cpu")
    data = expert_checkpoints[0].read_bytes()
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        Refiner.from_checkpoints([truncated], device="cpu")
    shapes = load_checkpoint(expert_checkpoints[0])
    first_stage = {k[len("first_stage_model.") :]: v for k, v in shapes["state_dict"].items() if "first_stage" in k}
    vq = tmp_path / "vq.ckpt"
    save_checkpoint({"state_dict": first_stage, "config": {"model": tiny_first_stage_config()}}, vq)
    with pytest.raises(CheckpointError, match="wrong kind.*not a latent diffusion model"):
        Refiner.from_checkpoints([vq], device="cpu")
    only_first = _rewrite(expert_checkpoints[0], tmp_path / "only_first.ckpt", state_dict=first_stage)
    with pytest.raises(CheckpointError, match="lacks .* weights"):
        Refiner.from_checkpoints([only_first], device="cpu")


def test_ema_weights_are_used_when_asked(tmp_path, crops, caplog):
    model = build_tiny_expert(0, 1000, seed=3)
    with torch.no_grad():
        for p in model.model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # training weights now differ from the EMA copy
    path = tmp_path / "ema.ckpt"
    cfg = tiny_expert_config(0, 1000)
    save_checkpoint({"state_dict": model.state_dict(), "config": cfg, "window": [0, 1000]}, path)
    with_ema = Refiner.from_checkpoints([path], device="cpu")
    no_ema = Refiner.from_checkpoints([path], device="cpu", ema=False)
    shadow = dict(model.model_ema.named_buffers())
    for name, p in with_ema.model.model.named_parameters():
        assert torch.equal(p, shadow[name.replace(".", "")])
    for name, p in no_ema.model.model.named_parameters():
        assert torch.equal(p, dict(model.model.named_parameters())[name])
    a = with_ema.refine_tensors(crops[:1], 300, ddim_steps=10)
    b = no_ema.refine_tensors(crops[:1], 300, ddim_steps=10)
    assert not torch.equal(a, b)
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("model_ema.")}
    save_checkpoint({"state_dict": sd, "config": cfg}, tmp_path / "no_ema.ckpt")
    with caplog.at_level(logging.WARNING, logger="ldm"):
        plain = Refiner.from_checkpoints([tmp_path / "no_ema.ckpt"], device="cpu")
    assert any("no EMA weights" in r.getMessage() for r in caplog.records)
    assert not plain.checkpoints[0].ema


def test_device_and_precision_are_checked_before_reading_files(tmp_path):
    with pytest.raises(ValueError, match="fp16.*CUDA"):
        Refiner.from_checkpoints([tmp_path / "missing.ckpt"], device="cpu", precision="fp16")
    with pytest.raises(ValueError, match="precision"):
        Refiner.from_checkpoints([tmp_path / "missing.ckpt"], device="cpu", precision="fp8")
    with pytest.raises(ValueError, match="device"):
        Refiner.from_checkpoints([tmp_path / "missing.ckpt"], device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            Refiner.from_checkpoints([tmp_path / "missing.ckpt"], device="cuda")


# ---------------------------------------------------------------------------------------------------------- refining
def test_each_step_is_run_by_its_expert(refiner, crops, monkeypatch):
    seen = []
    for name, expert in zip(("shapes", "details"), refiner.experts):
        original = expert.model.apply_model

        def spy(x, t, cond=None, _name=name, _original=original):
            seen.append((_name, int(t[0])))
            return _original(x, t, cond)

        monkeypatch.setattr(expert.model, "apply_model", spy)
    refiner.refine_tensors(crops[:1], 500, ddim_steps=50)
    assert seen == [("shapes", t) for t in range(481, 250, -20)] + [("details", t) for t in range(241, 0, -20)]


def test_effective_start_is_reported(refiner, crops, caplog):
    plan = refiner.plan(500, 50)
    assert plan.effective_start == 481 and plan.timesteps == tuple(range(481, 0, -20))
    assert plan.describe_routing() == (
        "t 481-261 (steps 519-739): latesteps_500_750.ckpt; t 241-1 (steps 759-999): latesteps_750_1000.ckpt"
    )
    with caplog.at_level(logging.INFO, logger="ldm"):
        refiner.refine_tensors(crops[:1], 500, ddim_steps=50)
    assert any("start_t=500 (step 500) -> first DDIM grid step at t=481" in r.getMessage() for r in caplog.records)


def test_same_seed_is_bit_identical_batched_or_not(refiner, crops):
    x = crops[:3, :, :29, :23]
    for eta in (0.0, 1.0):
        batched = refiner.refine_tensors(x, 400, seeds=[7, 8, 9], ddim_steps=10, eta=eta)
        again = refiner.refine_tensors(x, 400, seeds=[7, 8, 9], ddim_steps=10, eta=eta)
        alone = torch.cat(
            [refiner.refine_tensors(x[i : i + 1], 400, seeds=[s], ddim_steps=10, eta=eta) for i, s in enumerate((7, 8, 9))]
        )
        assert torch.equal(batched, again) and torch.equal(batched, alone)
        other = refiner.refine_tensors(x[:1], 400, seeds=[10], ddim_steps=10, eta=eta)
        assert not torch.allclose(other, batched[:1])
    assert batched.shape == x.shape and batched.dtype == torch.float32
    assert batched.min() >= -1 and batched.max() <= 1
    # the plan is built once per set of arguments and reused by later calls
    assert refiner.plan(400, 10, 0.0) is refiner.plan(400, 10, 0) and refiner.plan(400, 10, 1.0) is not refiner.plan(400, 10)


def test_faithfulness_grows_as_start_t_falls(trained_full_range, crops):
    refiner = Refiner([trained_full_range], device="cpu", batch_invariant=False)  # plain LDM: one expert on [0, T)
    assert refiner.experts[0].window == (0, 1000)
    reconstruction = float(
        (trained_full_range.decode_first_stage(trained_full_range.encode_first_stage(crops)) - crops).abs().mean()
    )
    distance = [
        float((refiner.refine_tensors(crops, s, seeds=0, ddim_steps=25) - crops).abs().mean()) for s in (50, 200, 500, 800)
    ]
    assert distance == sorted(distance) and len(set(distance)) == 4, distance
    assert reconstruction < distance[0] < 2 * reconstruction  # start_t=50 stays close to what the first stage keeps


@pytest.mark.parametrize("size", [(37, 53), (1, 1), (3, 5), (40, 16)])
def test_any_size_and_rgba_round_trip(refiner, photos, size):
    h, w = size
    rgb = photos[1][::6, ::6][:h, :w]
    alpha = (np.arange(h * w).reshape(h, w) % 256).astype(np.uint8)
    image = Image.fromarray(np.dstack([rgb, alpha]))
    out = refiner(image, start_t=300, seed=1, ddim_steps=10)
    assert out.mode == "RGBA" and out.size == (w, h)
    assert np.array_equal(np.asarray(out)[..., 3], alpha)
    plain = refiner(Image.fromarray(rgb).convert("L"), start_t=300, seed=1, ddim_steps=10)
    assert plain.mode == "RGB" and plain.size == (w, h)


def test_sixteen_bit_and_tensor_inputs(refiner, crops):
    gray16 = Image.fromarray((np.linspace(0, 65535, 24 * 20).reshape(24, 20)).astype(np.uint16))
    out = refiner(gray16, start_t=200, ddim_steps=10)
    assert out.mode == "RGB" and out.size == (20, 24)
    single = refiner(crops[0], start_t=200, seed=4, ddim_steps=10)
    assert single.shape == crops[0].shape
    assert torch.equal(single, refiner.refine_tensors(crops[:1], 200, seeds=4, ddim_steps=10)[0])
    with pytest.raises(TypeError, match="PIL.Image or a torch.Tensor"):
        refiner(np.zeros((8, 8, 3)))


def test_bf16_autocast_on_cpu_stays_close(refiner, crops):
    bf16 = Refiner(refiner.experts, device="cpu", precision="bf16")
    a = refiner.refine_tensors(crops[:1], 300, ddim_steps=10)
    b = bf16.refine_tensors(crops[:1], 300, ddim_steps=10)
    assert b.dtype == torch.float32
    assert float((a - b).abs().mean()) < 0.05


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"start_t": 0}, "start_t"),
        ({"start_t": 1000}, "start_t"),
        ({"start_t": 2.5}, "start_t"),
        ({"start_t": True}, "start_t"),
        ({"ddim_steps": 0}, "ddim_steps"),
        ({"ddim_steps": 1001}, "ddim_steps"),
        ({"eta": -0.1}, "eta"),
        ({"eta": float("nan")}, "eta"),
        ({"seeds": [1, 2]}, "seeds for a batch of 1"),
        ({"seeds": -1}, "seed"),
        ({"seeds": 1.0}, "seeds must be an int or one int per sample, got float"),  # was "not iterable"
        ({"seeds": "1"}, "seeds must be an int or one int per sample, got str '1'"),  # was read as the seed list ['1']
        ({"sampler": ["ddim"]}, r"sampler=\['ddim'\] is unknown"),
        ({"start_t": None, "strength": np.float32(2)}, r"strength=np.float32\(2.0\) must be a number in"),
        ({"region_padding": 8}, "region_padding given, but they would do nothing here"),
        ({"region_size": 64, "mask_blur": 9}, "region_size, mask_blur given, but they would do nothing"),
    ],
)
def test_bad_arguments_are_refused(refiner, crops, kwargs, match):
    with pytest.raises(ValueError, match=match):
        refiner.refine_tensors(crops[:1], **{"start_t": 300, "ddim_steps": 10, **kwargs})


def test_outputs_are_plain_tensors_and_a_channels_last_input_gives_the_same_bytes(refiner, crops):
    """inference_mode made outputs refuse in-place ops and autograd (CompVis' no_grad does not); a channels_last view
    of the same values took other kernels (differences up to 5e-6)."""
    x = crops[:2, :, :16, :16].contiguous()
    out = refiner.refine_tensors(x, 300, seeds=[1, 2], ddim_steps=4, eta=1.0)
    assert not out.is_inference() and torch.equal(out.clone().mul_(0.5), out * 0.5)
    assert torch.equal(refiner.refine_tensors(x.to(memory_format=torch.channels_last), 300, seeds=[1, 2], ddim_steps=4,
                                              eta=1.0), out)  # fmt: skip
    assert torch.equal(refiner.refine_tensors(x, 300, seeds=torch.tensor([1, 2]), ddim_steps=4, eta=1.0), out)


def test_a_request_the_tensor_call_cannot_honour_is_refused(refiner, crops):
    """n_samples (one file per sample in refine_files) was dropped silently, and so were region options."""
    from ldm.refine.regions import Box
    from ldm.refine.request import RefineRequest

    x = crops[:1, :, :16, :16]
    with pytest.raises(ValueError, match=r"n_samples=4: Refiner.refine returns one sample per row"):
        refiner.refine(x, RefineRequest(start_t=300, ddim_steps=4, n_samples=4))
    with pytest.raises(ValueError, match=r"pass boxes=\[Box\(...\)\]"):
        refiner(x[0], start_t=300, boxes=Box(0, 0, 4, 4))
    with pytest.raises(ValueError, match="a mask path is not read here"):
        refiner(x[0], start_t=300, mask="mask.png")
    with pytest.raises(ValueError, match="mask_dilate given, but they would do nothing"):
        refiner(x[0], start_t=300, mask_dilate=3)
    boxed = refiner(x[0], start_t=300, ddim_steps=4, boxes=[Box(0, 0, 4, 4)], mask_dilate=2)  # still runs
    assert torch.equal(boxed[:, 8:, 8:], x[0, :, 8:, 8:])
    # a box's own start above start_t raises the plan's start (a stripped request planned from 100 and refused the map)
    own = refiner(x[0], start_t=100, ddim_steps=4, boxes=[Box(0, 0, 4, 4, 300), Box(8, 8, 12, 12)])
    assert torch.equal(own[:, 4:8, 4:8], x[0, :, 4:8, 4:8]) and not torch.equal(own[:, :4, :4], x[0, :, :4, :4])


def test_plan_refuses_a_list_argument_in_one_line(refiner):
    with pytest.raises(ValueError, match=r"sampler=\['ddim'\] must be a single value, not a list"):  # "unhashable type"
        refiner.plan(300, sampler=["ddim"])


def test_bad_tensors_are_refused(refiner, crops):
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        refiner.refine_tensors(crops[:1] * 3)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        refiner.refine_tensors(crops[:1, :2])
    with pytest.raises(ValueError, match="float"):
        refiner.refine_tensors(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


def test_outside_window_via_the_api(expert_checkpoints, crops):
    strict = Refiner.from_checkpoints(expert_checkpoints, device="cpu")
    with pytest.raises(ValueError, match=r"start_t=800 .* outside every expert window"):
        strict.refine_tensors(crops[:1], 800, ddim_steps=10)
    lenient = Refiner(strict.experts, device="cpu", allow_outside_window=True)
    out = lenient.refine_tensors(crops[:1], 800, ddim_steps=10)
    assert out.shape == crops[:1].shape


def test_refine_runs_with_sockets_disabled(refiner, crops, monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted during refinement")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    paths = [c.path for c in refiner.checkpoints]
    fresh = Refiner.from_checkpoints(paths, device="cpu")
    assert fresh.refine_tensors(crops[:1], 300, ddim_steps=10).shape == crops[:1].shape
