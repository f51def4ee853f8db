"""VQGAN loss: GAN losses and adaptive weight against hand computations, codebook statistics, LPIPS offline."""

from __future__ import annotations

import math

import pytest
import torch

from ldm.checkpoint import load_state_dict, save_checkpoint
from ldm.modules.losses.vqperceptual import (
    VQLPIPSWithDiscriminator,
    adaptive_disc_weight,
    codebook_usage,
    hinge_d_loss,
    vanilla_d_loss,
)
from ldm.modules.lpips import (
    LPIPS_MIN_SIDE,
    PerceptualWeightsMissingError,
    build_lpips,
    lpips_backbone_path,
    lpips_linear_path,
)

SMALL_DISC = {"disc_num_layers": 2, "disc_ndf": 8}


@pytest.fixture
def offline_torch_home(tmp_path, monkeypatch):
    """An empty torch hub cache, and any attempt to download through torch hub fails the test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def no_download(*args, **kwargs):
        raise AssertionError(f"tried to download {args[:1]}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    return tmp_path / "torch_home"


def images(seed: int, n: int = 2, size: int = 32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=gen) * 2 - 1


# ---------------------------------------------------------------------------------------------------------- GAN math


def test_hinge_d_loss_hand_values():
    real = torch.tensor([[2.0, 0.5]])
    fake = torch.tensor([[-2.0, 0.3]])
    # relu(1 - real) = [0, 0.5] -> mean 0.25; relu(1 + fake) = [0, 1.3] -> mean 0.65
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.65), abs=1e-7)


def test_vanilla_d_loss_hand_values():
    real = torch.tensor([[2.0, 0.5]])
    fake = torch.tensor([[-2.0, 0.3]])

    def softplus(v: float) -> float:
        return math.log1p(math.exp(v))

    expected = 0.5 * ((softplus(-2.0) + softplus(-0.5)) / 2 + (softplus(-2.0) + softplus(0.3)) / 2)
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected, abs=1e-6)


def test_adaptive_weight_matches_analytic_gradient_norms():
    # nll = <a, w>, g = <b, w>: the gradients w.r.t. w are a and b, so the weight is |a| / (|b| + 1e-4).
    w = torch.tensor([0.3, -1.2, 2.0], requires_grad=True)
    a = torch.tensor([3.0, 0.0, 4.0])
    b = torch.tensor([1.0, 2.0, 2.0])
    weight = adaptive_disc_weight((a * w).sum(), (b * w).sum(), w, disc_weight=0.75)
    assert weight.item() == pytest.approx(0.75 * 5.0 / (3.0 + 1e-4), rel=1e-6)
    assert not weight.requires_grad


def test_adaptive_weight_is_clamped():
    w = torch.tensor([1.0, 1.0], requires_grad=True)
    weight = adaptive_disc_weight((torch.tensor([10.0, 0.0]) * w).sum(), (0.0 * w).sum(), w)
    assert weight.item() == pytest.approx(1e4)  # 10 / 1e-4 = 1e5, clamped


def test_adaptive_weight_inside_generator_loss():
    """The loss's logged d_weight equals the formula on gradients computed separately through a tiny 'decoder'."""
    torch.manual_seed(0)
    loss_fn = VQLPIPSWithDiscriminator(disc_start=0, perceptual_weight=0.0, disc_weight=0.5, **SMALL_DISC)
    last = torch.nn.Conv2d(4, 3, 3, padding=1)
    feats, x = torch.randn(2, 4, 32, 32), images(1)
    xrec = last(feats)
    _, log = loss_fn(torch.tensor(0.1), x, xrec, 0, global_step=0, last_layer=last.weight)
    nll_grad = torch.autograd.grad((x - last(feats)).abs().mean(), last.weight)[0]
    g_grad = torch.autograd.grad(-loss_fn.discriminator(last(feats)).mean(), last.weight)[0]
    expected = 0.5 * min(nll_grad.norm().item() / (g_grad.norm().item() + 1e-4), 1e4)
    assert log["train/d_weight"].item() == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------------------------------- full loss terms


@pytest.mark.parametrize("pixel_loss", ["l1", "l2"])
def test_generator_loss_before_disc_start_is_reconstruction_plus_codebook(pixel_loss, monkeypatch):
    loss_fn = VQLPIPSWithDiscriminator(
        disc_start=10, perceptual_weight=0.0, codebook_weight=2.0, pixelloss_weight=3.0, pixel_loss=pixel_loss, **SMALL_DISC
    )

    def not_before_disc_start(_):
        raise AssertionError("discriminator ran before disc_start")

    monkeypatch.setattr(loss_fn.discriminator, "forward", not_before_disc_start)
    x, xrec = images(0), images(1)
    diff = (x - xrec).double()
    pixel = diff.abs().mean() if pixel_loss == "l1" else diff.pow(2).mean()
    loss, log = loss_fn(torch.tensor(0.25), x, xrec, 0, global_step=9, last_layer=None)
    assert loss.item() == pytest.approx(3.0 * pixel.item() + 2.0 * 0.25, rel=1e-5)
    assert log["train/rec_loss"].item() == pytest.approx(3.0 * pixel.item(), rel=1e-5)
    assert log["train/g_loss"].item() == 0.0 and log["train/disc_factor"].item() == 0.0
    d_loss, d_log = loss_fn(torch.tensor(0.25), x, xrec, 1, global_step=9)
    assert d_loss.item() == 0.0 and not d_loss.requires_grad
    assert set(d_log) == {"train/disc_loss", "train/logits_real", "train/logits_fake"}


@pytest.mark.parametrize("disc_loss", ["hinge", "vanilla"])
def test_discriminator_loss_after_disc_start(disc_loss):
    torch.manual_seed(0)
    loss_fn = VQLPIPSWithDiscriminator(disc_start=5, perceptual_weight=0.0, disc_factor=0.5, disc_loss=disc_loss, **SMALL_DISC)
    loss_fn.eval()  # fixed BatchNorm statistics, so the independent evaluation sees the same discriminator
    x, xrec = images(0), images(1)
    d_loss, log = loss_fn(torch.tensor(0.0), x, xrec, 1, global_step=5, split="val")
    real, fake = loss_fn.discriminator(x), loss_fn.discriminator(xrec)
    reference = hinge_d_loss if disc_loss == "hinge" else vanilla_d_loss
    assert d_loss.item() == pytest.approx(0.5 * reference(real, fake).item(), rel=1e-6)
    assert log["val/logits_real"].item() == pytest.approx(real.mean().item(), rel=1e-6)


def test_generator_without_last_layer_uses_fixed_weight_and_no_grad_gives_zero():
    loss_fn = VQLPIPSWithDiscriminator(disc_start=0, perceptual_weight=0.0, disc_weight=0.75, **SMALL_DISC)
    x, xrec = images(0), images(1)
    _, log = loss_fn(torch.tensor(0.0), x, xrec, 0, global_step=0)
    assert log["train/d_weight"].item() == 0.75
    with torch.no_grad():
        _, log = loss_fn(torch.tensor(0.0), x, xrec, 0, global_step=0, last_layer=torch.zeros(1), split="val")
    assert log["val/d_weight"].item() == 0.0


def test_codebook_usage_statistics():
    perplexity, share = codebook_usage(torch.tensor([0, 0, 1, 1]), 4)
    assert perplexity.item() == pytest.approx(2.0) and share.item() == 0.5
    perplexity, share = codebook_usage(torch.arange(8).reshape(2, 4), 8)
    assert perplexity.item() == pytest.approx(8.0) and share.item() == 1.0
    perplexity, share = codebook_usage(torch.full((3, 5), 2), 16)
    assert perplexity.item() == pytest.approx(1.0) and share.item() == 1 / 16


def test_loss_logs_codebook_usage_only_with_a_codebook_size():
    loss_fn = VQLPIPSWithDiscriminator(disc_start=10, perceptual_weight=0.0, **SMALL_DISC)
    x = images(0)
    loss_fn.set_codebook_size(4)
    _, log = loss_fn(torch.tensor(0.0), x, x, 0, 0, predicted_indices=torch.tensor([1, 2]))
    assert log["train/codebook_usage"].item() == 0.5 and log["train/perplexity"].item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="differs"):
        loss_fn.set_codebook_size(8)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"disc_loss": "wgan"}, "disc_loss"), ({"pixel_loss": "l3"}, "pixel_loss"), ({"disc_conditional": True}, "conditional")],
)
def test_invalid_options_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VQLPIPSWithDiscriminator(disc_start=0, perceptual_weight=0.0, **kwargs)


# ------------------------------------------------------------------------------------------------- LPIPS, offline


def test_perceptual_weight_zero_builds_no_backbone(monkeypatch):
    import lpips

    def no_lpips(*args, **kwargs):
        raise AssertionError("an LPIPS network was built although perceptual_weight is 0")

    monkeypatch.setattr(lpips, "LPIPS", no_lpips)
    loss_fn = VQLPIPSWithDiscriminator(disc_start=0, perceptual_weight=0.0)
    assert loss_fn.perceptual_loss is None
    assert not any(k.startswith("perceptual_loss.") for k in loss_fn.state_dict())


def test_missing_lpips_backbone_gives_a_clear_error(offline_torch_home):
    expected = offline_torch_home / "hub" / "checkpoints" / "vgg16-397923af.pth"
    assert lpips_backbone_path("vgg") == expected
    with pytest.raises(PerceptualWeightsMissingError) as info:
        VQLPIPSWithDiscriminator(disc_start=0, perceptual_weight=1.0)
    message = str(info.value)
    assert str(expected) in message
    assert "perceptual_weight: 0" in message
    assert "https://download.pytorch.org/models/vgg16-397923af.pth" in message
    assert "perceptual_backbone_path" in message


def test_lpips_with_random_backbone_exercises_the_perceptual_path(offline_torch_home):
    torch.manual_seed(0)
    loss_fn = VQLPIPSWithDiscriminator(
        disc_start=100, perceptual_weight=1.0, perceptual_net="alex", perceptual_pretrained=False, **SMALL_DISC
    )
    loss_fn.train()
    lpips_net = loss_fn.perceptual_loss
    assert not lpips_net.training  # frozen network stays in eval mode (no dropout) when the model trains
    assert all(not p.requires_grad for p in lpips_net.parameters())
    linear = load_state_dict(lpips_linear_path("alex"))
    assert torch.equal(lpips_net.lin0.model[1].weight, linear["lin0.model.1.weight"])
    x = images(0)
    xrec = images(1).requires_grad_(True)
    _, same = loss_fn(torch.tensor(0.0), x, x.clone(), 0, 0)
    assert same["train/p_loss"].item() == pytest.approx(0.0, abs=1e-6)
    loss, log = loss_fn(torch.tensor(0.0), x, xrec, 0, 0)
    assert log["train/p_loss"].item() > 0
    assert log["train/rec_loss"].item() == pytest.approx(log["train/pixel_loss"].item() + log["train/p_loss"].item(), rel=1e-5)
    loss.backward()
    assert xrec.grad is not None and torch.isfinite(xrec.grad).all() and xrec.grad.abs().sum() > 0


def test_lpips_loads_backbone_from_the_local_torch_hub_cache(offline_torch_home):
    """A backbone file in torch hub's cache (here: a randomly initialised torchvision AlexNet) is what LPIPS uses."""
    import torchvision

    torch.manual_seed(1)
    source = torchvision.models.alexnet(weights=None).state_dict()
    save_checkpoint(source, lpips_backbone_path("alex"))
    loss_fn = VQLPIPSWithDiscriminator(disc_start=0, perceptual_weight=1.0, perceptual_net="alex", **SMALL_DISC)
    net = loss_fn.perceptual_loss.net
    assert torch.equal(net.slice1[0].weight, source["features.0.weight"])
    assert torch.equal(net.slice5._modules["10"].bias, source["features.10.bias"])


def test_lpips_backbone_path_option_and_wrong_file(tmp_path, offline_torch_home):
    bogus = tmp_path / "not_vgg.pth"
    save_checkpoint({"classifier.weight": torch.zeros(2, 2)}, bogus)
    with pytest.raises(ValueError, match="features"):
        VQLPIPSWithDiscriminator(
            disc_start=0, perceptual_weight=1.0, perceptual_net="alex", perceptual_backbone_path=str(bogus)
        )
    with pytest.raises(ValueError, match="perceptual_net"):
        VQLPIPSWithDiscriminator(disc_start=0, perceptual_weight=1.0, perceptual_net="resnet")


@pytest.mark.parametrize("net", ["vgg", "alex", "squeeze"])
def test_lpips_min_side_is_the_smallest_side_each_backbone_runs_on(net):
    """LPIPS_MIN_SIDE, by which evaluation skips LPIPS on small images, is where the backbone stops running: one pixel
    less on either side is its RuntimeError (its strided convolutions and poolings leave no pixel)."""
    model = build_lpips(net, pretrained=False)
    side, other = LPIPS_MIN_SIDE[net], LPIPS_MIN_SIDE[net] + 9
    with torch.no_grad():
        for shape in ((side, other), (other, side), (side, side)):
            assert torch.isfinite(model(torch.rand(1, 3, *shape) * 2 - 1, torch.zeros(1, 3, *shape))).all()
        for shape in ((side - 1, other), (other, side - 1)):
            with pytest.raises(RuntimeError):
                model(torch.zeros(1, 3, *shape), torch.zeros(1, 3, *shape))
