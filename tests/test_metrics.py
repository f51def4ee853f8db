"""Metrics: hand-computed PSNR/MSE, SSIM against a float64 scipy reference, LPIPS/FID/KID offline behaviour."""

from __future__ import annotations

import importlib.util
import math
import socket

import numpy as np
import pytest
import torch
import torchvision
from scipy import linalg
from scipy.ndimage import gaussian_filter

from ldm.checkpoint import CheckpointError
from ldm.eval import metrics
from ldm.eval.metrics import (
    INCEPTION_WEIGHTS_FILE,
    LPIPSMetric,
    Skipped,
    compute_metrics,
    fid_kid,
    load_inception,
    load_lpips,
    masked_metrics,
    mse,
    psnr,
    seam_energy,
    ssim,
)
from ldm.modules.lpips import LPIPS_BACKBONE_FILES


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test (a candidate for conftest)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network connection attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    """Point torch's hub cache at an empty folder, so default weight look-ups find nothing."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


def _pair(seed: int = 0, shape=(2, 3, 32, 32), noise: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1
    return a, (a + noise * torch.randn(shape, generator=g, dtype=torch.float64)).clamp(-1, 1)


# ---------------------------------------------------------------------------------------------------------------------
# MSE / PSNR / SSIM


def test_mse_by_hand():
    a = torch.zeros(2, 3, 2, 2)
    b = torch.zeros(2, 3, 2, 2)
    b[0, 0, 0, 0] = 0.6  # one of 12 values differs by 0.6 -> 0.36 / 12
    b[1] = -0.5  # all 12 differ by 0.5 -> 0.25
    out = mse(a, b)
    assert out.shape == (2,) and out.dtype == torch.float64
    torch.testing.assert_close(out, torch.tensor([0.03, 0.25], dtype=torch.float64))


def test_psnr_of_known_mse_in_both_ranges():
    a = torch.zeros(3, 3, 8, 8)
    offsets = torch.tensor([0.1, 0.2, 0.5])
    b = a + offsets.view(3, 1, 1, 1)
    expected = torch.tensor([10 * math.log10(4 / c**2) for c in offsets.tolist()], dtype=torch.float64)
    torch.testing.assert_close(psnr(a, b), expected)  # data range 2 for [-1, 1]
    # the same pixels in [0, 1] (range 1) give the same PSNR
    torch.testing.assert_close(psnr((a + 1) / 2, (b + 1) / 2, value_range=(0.0, 1.0)), expected, rtol=1e-6, atol=1e-5)
    assert torch.isinf(psnr(a, a)).all()


def test_values_outside_range_are_clipped():
    a = torch.full((1, 3, 4, 4), 1.5)
    b = torch.ones(1, 3, 4, 4)
    assert mse(a, b).item() == 0.0
    assert mse(a, b, value_range=(0.0, 2.0)).item() == pytest.approx(0.25)


def test_ssim_identity_and_float64_reference():
    a, b = _pair()
    torch.testing.assert_close(ssim(a, a), torch.ones(2, dtype=torch.float64))

    def reference(x: np.ndarray, y: np.ndarray, data_range: float = 2.0) -> float:
        # Gaussian-window SSIM (sigma 1.5, radius 5) with mirrored borders, averaged over channels and all pixels
        f = lambda z: gaussian_filter(z, sigma=(0, 1.5, 1.5), mode="mirror", truncate=3.5)  # noqa: E731
        c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
        mx, my = f(x), f(y)
        vx, vy, cxy = f(x * x) - mx**2, f(y * y) - my**2, f(x * y) - mx * my
        return float((((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))).mean())

    expected = torch.tensor([reference(a[i].numpy(), b[i].numpy()) for i in range(2)], dtype=torch.float64)
    torch.testing.assert_close(ssim(a, b), expected, atol=1e-6, rtol=0)
    # more noise, lower SSIM
    assert (ssim(*_pair(noise=0.4)) < ssim(a, b)).all()


@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (1, 3, 11, 17), (3, 1, 40, 23), (2, 1, 11, 11), (2, 3, 19, 13, "T")])
def test_ssim_equals_torchmetrics_float64(shape):
    """The separable window gives torchmetrics' SSIM (its 2-D float64 convolution), per image and per pixel; also at
    the smallest size (11x11), with one channel and on non-contiguous (transposed) tensors ("T")."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    transpose, shape = shape[4:] == ("T",), shape[:4]
    g = torch.Generator().manual_seed(shape[-1])
    a = torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1
    b = (a + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)).clamp(-1, 1)
    if transpose:
        a, b = a.transpose(-1, -2), b.transpose(-1, -2)
        assert not a.is_contiguous()
        shape = tuple(a.shape)
    expected, expected_map = structural_similarity_index_measure(
        a, b, data_range=(-1.0, 1.0), reduction="none", return_full_image=True
    )
    torch.testing.assert_close(ssim(a, b), expected, atol=1e-12, rtol=0)
    mask = torch.zeros(shape[0], 1, *shape[-2:])
    mask[..., : shape[-2] // 2, :] = 1
    inside = masked_metrics(a, b, mask)["ssim_in"]
    torch.testing.assert_close(inside, expected_map[..., : shape[-2] // 2, :].flatten(1).mean(-1), atol=1e-12, rtol=0)


def test_empty_batches_give_empty_results():
    a, b = _pair()
    for name, fn in (("mse", mse), ("psnr", psnr), ("ssim", ssim)):
        value = fn(a[:0], b[:0])
        assert value.shape == (0,), name
    found = masked_metrics(a[:0], b[:0], torch.ones(0, 1, *a.shape[-2:]))
    assert all(v.shape == (0,) for v in found.values())


def test_compute_metrics_keys_and_per_image_shapes():
    refined, clean = _pair(1, shape=(3, 3, 16, 16))
    degraded = _pair(2, shape=(3, 3, 16, 16))[1]
    both = compute_metrics(refined, clean=clean, degraded=degraded)
    assert set(both) == {f"{m}_{r}" for m in ("mse", "psnr", "ssim") for r in ("clean", "input")}
    assert all(v.shape == (3,) for v in both.values())
    torch.testing.assert_close(both["psnr_input"], 10 * torch.log10(4 / both["mse_input"]))
    assert set(compute_metrics(refined, degraded=degraded)) == {"mse_input", "psnr_input", "ssim_input"}
    small = compute_metrics(refined[..., :8, :8], clean=clean[..., :8, :8])
    assert isinstance(small["ssim_clean"], Skipped) and "11x11" in small["ssim_clean"].reason
    skipped = Skipped("LPIPS: no weights")
    with_lpips = compute_metrics(refined, clean=clean, lpips=skipped)
    assert with_lpips["lpips_clean"] is skipped and "lpips_input" not in with_lpips


# ---------------------------------------------------------------------------------------------------------------------
# LPIPS


def test_lpips_skipped_without_weights(no_network, empty_torch_home, tmp_path):
    result = load_lpips("vgg")
    assert isinstance(result, Skipped)
    default = empty_torch_home / "hub" / "checkpoints" / LPIPS_BACKBONE_FILES["vgg"]
    assert str(default) in result.reason and "LPIPS" in result.reason
    missing = tmp_path / "nowhere.pth"
    result = load_lpips("alex", backbone_weights=missing)
    assert isinstance(result, Skipped) and str(missing) in result.reason
    assert str(result).startswith("skipped: ")
    # the note of an evaluation names its own fix, not the training config's (perceptual_weight: 0)
    assert "--lpips-weights" in result.reason and "perceptual_weight" not in result.reason
    with pytest.raises(ValueError, match="not an LPIPS backbone"):
        load_lpips("resnet")


@pytest.fixture
def alexnet_weights(tmp_path) -> tuple[str, dict]:
    """A torchvision AlexNet state dict (random weights) stored where the hub cache would hold it."""
    torch.manual_seed(0)
    state = torchvision.models.alexnet(weights=None).state_dict()
    path = tmp_path / LPIPS_BACKBONE_FILES["alex"]
    torch.save(state, path)
    return str(path), state


def test_lpips_with_local_backbone(no_network, alexnet_weights):
    path, state = alexnet_weights
    metric = load_lpips("alex", backbone_weights=path)
    assert isinstance(metric, LPIPSMetric)
    loaded = dict(metric.model.net.named_parameters())
    torch.testing.assert_close(loaded["slice1.0.weight"], state["features.0.weight"])
    torch.testing.assert_close(loaded["slice5.10.bias"], state["features.10.bias"])
    a, b = _pair(3, shape=(2, 3, 64, 64))
    same = metric(a, a)
    diff = metric(a, b)
    assert same.shape == diff.shape == (2,)
    assert (same.abs() < 1e-6).all() and (diff > 1e-4).all()
    torch.testing.assert_close(metric((a + 1) / 2, (b + 1) / 2, value_range=(0.0, 1.0)), diff)
    out = compute_metrics(b, clean=a, degraded=b, lpips=metric)
    torch.testing.assert_close(out["lpips_clean"], diff)
    assert (out["lpips_input"].abs() < 1e-6).all()


def test_lpips_rejects_wrong_file(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3, 3, 1, 1)}, path)
    with pytest.raises(CheckpointError, match="not a torchvision alex state dict"):
        load_lpips("alex", backbone_weights=path)


def test_lpips_weights_of_wrong_shapes_or_with_nan_are_one_line_errors(tmp_path, alexnet_weights):
    """Right keys, wrong shapes: load_state_dict's multi-line RuntimeError; a NaN: accepted, and every distance nan."""
    _, state = alexnet_weights
    shapes, nan = dict(state), dict(state)
    shapes["features.3.weight"] = torch.zeros(192, 64, 3, 3)
    nan["features.0.weight"] = state["features.0.weight"].clone()
    nan["features.0.weight"][0, 0, 0, 0] = float("nan")
    for name, sd, expected in (
        ("shapes.pth", shapes, r"features.3.weight has shape \(192, 64, 3, 3\), LPIPS needs \(192, 64, 5, 5\)"),
        ("nan.pth", nan, r"1 tensors hold NaN or inf \(first: \['features.0.weight'\]\), so every LPIPS distance"),
    ):
        torch.save(sd, tmp_path / name)
        with pytest.raises(CheckpointError, match=expected) as info:
            load_lpips("alex", backbone_weights=tmp_path / name)
        assert "\n" not in str(info.value) and name in str(info.value) and "alexnet-owt-7be5be79.pth" in str(info.value)


def test_lpips_skips_images_below_its_backbones_minimum(alexnet_weights):
    """alex needs 31 px (LPIPS_MIN_SIDE): smaller images were a RuntimeError traceback from its convolutions."""
    metric = load_lpips("alex", backbone_weights=alexnet_weights[0])
    assert metric.net == "alex" and metric.min_side == 31
    a, b = _pair(3, shape=(2, 3, 30, 40))
    out = compute_metrics(b, clean=a, degraded=b, lpips=metric)
    for key in ("lpips_clean", "lpips_input"):
        assert isinstance(out[key], Skipped), out[key]
        assert out[key].reason == "LPIPS: images (30, 40) are smaller than the 31 px its alex backbone needs"
    assert out["psnr_clean"].shape == (2,) and not isinstance(out["ssim_clean"], Skipped)  # the others are computed
    masked = masked_metrics(b, a, _box((2, 1, 30, 40), 4, 20, 4, 20), lpips=metric)
    assert isinstance(masked["lpips_in"], Skipped) and isinstance(masked["lpips_out"], Skipped)
    with pytest.raises(ValueError, match="smaller than the 31 px"):
        metric(a, b)
    a, b = _pair(3, shape=(2, 3, 31, 31))
    assert torch.isfinite(compute_metrics(b, clean=a, lpips=metric)["lpips_clean"]).all()


# ---------------------------------------------------------------------------------------------------------------------
# FID / KID


def test_fid_kid_skipped_without_torch_fidelity(no_network, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torch_fidelity" else real_find_spec(name, *a)
    )
    a, b = _pair()
    result = fid_kid(a, b)
    assert isinstance(result, Skipped) and "torch-fidelity is not installed" in result.reason


def test_fid_kid_skipped_without_inception_weights(no_network, empty_torch_home, monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "torch_fidelity" else real_find_spec(name, *a)
    )
    result = load_inception()
    assert isinstance(result, Skipped)
    assert str(empty_torch_home / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILE) in result.reason
    a, b = _pair()
    result = fid_kid(a, b, inception_weights=tmp_path / "incep.pth")
    assert isinstance(result, Skipped) and str(tmp_path / "incep.pth") in result.reason


def test_fid_kid_too_few_images():
    a, b = _pair(shape=(1, 3, 16, 16))
    result = fid_kid(a, b, feature_extractor=torch.nn.Flatten())
    assert isinstance(result, Skipped) and "at least 2 images" in result.reason


class _PooledConv(torch.nn.Module):
    """Tiny feature extractor on uint8 images: a random conv, ReLU and global average pool -> [n, 8]."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        assert images.dtype == torch.uint8
        return torch.relu(self.conv(images.float() / 255)).mean(dim=(2, 3))


def _reference_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_kid_with_custom_extractor_against_reference(no_network):
    torch.manual_seed(0)
    extractor = _PooledConv()
    g = torch.Generator().manual_seed(1)
    real = torch.rand(40, 3, 16, 16, generator=g) * 2 - 1
    fake = (real * 0.6 + 0.3 * torch.randn(40, 3, 16, 16, generator=g)).clamp(-1, 1)

    rng_before = torch.random.get_rng_state()
    result = fid_kid(real, fake, feature_extractor=extractor, kid_subset_size=20, kid_subsets=10, seed=3, batch_size=16)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert set(result) == {"fid", "kid_mean", "kid_std"}

    def feats(x: torch.Tensor) -> np.ndarray:
        u8 = ((x + 1) / 2 * 255).round().to(torch.uint8)
        with torch.no_grad():
            return extractor(u8).double().numpy()

    assert result["fid"] == pytest.approx(_reference_fid(feats(real), feats(fake)), rel=1e-4)
    assert result["kid_mean"] > 0 and result["kid_std"] > 0
    assert fid_kid(real, fake, feature_extractor=extractor, kid_subset_size=20, kid_subsets=10, seed=3) == result
    same = fid_kid(real, real, feature_extractor=extractor, kid_subset_size=40, kid_subsets=2)
    assert abs(same["fid"]) < 1e-6 and abs(same["kid_mean"]) < 1e-4


def test_skipped_is_a_value():
    assert Skipped("x") == Skipped("x") and str(Skipped("no weights")) == "skipped: no weights"
    assert metrics.hub_checkpoint_path("f.pth").name == "f.pth"


# ---------------------------------------------------------------------------------------------------------------------
# inside / outside a mask, seam


def _box(shape=(2, 1, 32, 32), y0=8, y1=20, x0=10, x1=26) -> torch.Tensor:
    mask = torch.zeros(shape, dtype=torch.float64)
    mask[..., y0:y1, x0:x1] = 1
    return mask


def test_masked_metrics_split_a_change_inside_the_box():
    """An offset d inside the box only: MSE_in = d^2, PSNR_in = 10 log10(4 / d^2), outside untouched (inf, SSIM 1)."""
    clean, _ = _pair(0)
    clean = clean * 0.5  # room for the offset without clipping
    mask = _box()
    changed = clean + 0.1 * mask
    out = masked_metrics(changed, clean, mask)
    torch.testing.assert_close(out["mse_in"], torch.full((2,), 0.01, dtype=torch.float64))
    torch.testing.assert_close(out["psnr_in"], torch.full((2,), 10 * math.log10(4 / 0.01), dtype=torch.float64))
    assert torch.equal(out["mse_out"], torch.zeros(2, dtype=torch.float64))
    assert torch.isinf(out["psnr_out"]).all()
    assert (out["ssim_in"] < 1).all() and (out["ssim_out"] > out["ssim_in"]).all()


def test_masked_metrics_with_a_full_mask_equal_the_whole_image_metrics():
    a, b = _pair(1)
    out = masked_metrics(a, b, torch.ones(2, 1, 32, 32))
    torch.testing.assert_close(out["psnr_in"], psnr(a, b))
    torch.testing.assert_close(out["ssim_in"], ssim(a, b))
    torch.testing.assert_close(out["mse_in"], mse(a, b))
    assert torch.isnan(out["psnr_out"]).all()  # an empty region


def test_masked_metrics_small_images_skip_ssim_and_pass_lpips_skips_through():
    a, b = _pair(2, shape=(1, 3, 8, 8))
    skipped = Skipped("LPIPS: no weights")
    out = masked_metrics(a, b, torch.ones(1, 1, 8, 8), lpips=skipped)
    assert isinstance(out["ssim_in"], Skipped) and out["lpips_in"] is skipped and out["lpips_out"] is skipped


def test_masked_lpips_counts_only_its_region(alexnet_weights):
    metric = load_lpips("alex", backbone_weights=alexnet_weights[0])
    a, b = _pair(3, shape=(2, 3, 64, 64))
    mask = _box((2, 1, 64, 64), 16, 48, 16, 48)
    edited = b * mask + a * (1 - mask)  # differs from a inside the box only
    out = masked_metrics(edited, a, mask, lpips=metric)
    assert (out["lpips_out"].abs() < 1e-6).all() and (out["lpips_in"] > 1e-4).all()


def test_seam_of_identity_is_zero_and_of_a_hard_paste_is_the_jump():
    """Brute force over every 4-neighbour pair that straddles the box edge: the squared jump of the edit."""
    x, y = _pair(4)[0], _pair(40)[0]  # two unrelated images
    mask = _box()
    pasted = x * (1 - mask) + y * mask
    assert torch.equal(seam_energy(x, x, mask), torch.zeros(2, dtype=torch.float64))
    inside = mask[:, 0].bool().numpy()
    edit = (pasted - x).numpy()
    expected = []
    for i in range(2):
        jumps = []
        for yy in range(32):
            for xx in range(32):
                for dy, dx in ((0, 1), (1, 0)):
                    y2, x2 = yy + dy, xx + dx
                    if y2 < 32 and x2 < 32 and inside[i, yy, xx] != inside[i, y2, x2]:
                        jumps.append(np.mean((edit[i, :, y2, x2] - edit[i, :, yy, xx]) ** 2))
        expected.append(np.mean(jumps))
    np.testing.assert_allclose(seam_energy(pasted, x, mask).numpy(), expected, rtol=1e-12)
    assert min(expected) > 0.3  # about 2/3, the mean squared difference of two uniform images


def test_seam_of_a_feathered_paste_is_far_below_a_hard_paste():
    x, y = _pair(5)
    mask = _box()
    ramp = torch.zeros(32, dtype=torch.float64)
    ramp[8:20] = torch.sin(torch.linspace(0, math.pi, 14, dtype=torch.float64)[1:-1])  # 0 at the edges, 1 in the middle
    cols = torch.zeros(32, dtype=torch.float64)
    cols[10:26] = torch.sin(torch.linspace(0, math.pi, 18, dtype=torch.float64)[1:-1])
    window = (ramp[:, None] * cols[None, :]).view(1, 1, 32, 32)
    smooth_y = x + 0.3 * (y - x).mean(dim=(2, 3), keepdim=True)  # a smooth (constant) edit
    feathered = x + window * (smooth_y - x)
    hard = x * (1 - mask) + smooth_y * mask
    assert (seam_energy(feathered, x, mask) < 0.05 * seam_energy(hard, x, mask)).all()


def test_seam_without_a_boundary_is_nan():
    x, y = _pair(6)
    assert torch.isnan(seam_energy(y, x, torch.zeros(2, 1, 32, 32))).all()
    assert torch.isnan(seam_energy(y, x, torch.ones(2, 1, 32, 32))).all()
