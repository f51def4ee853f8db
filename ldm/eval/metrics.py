"""Image metrics: per-image PSNR / SSIM / MSE and LPIPS (whole, inside and outside a mask), the seam along a mask's
boundary, and set-level FID / KID.  Images are ``[B, 3, H, W]`` in ``value_range``, clipped to it as a saved image would
be; per-image metrics are float64 CPU tensors ``[B]``.  Pretrained networks are read from disk only, never downloaded:
without their weights a metric is :class:`Skipped`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ldm.checkpoint import load_state_dict
from ldm.modules.lpips import (
    LPIPS_BACKBONE_FILES,
    LPIPS_MIN_SIDE,
    TORCHVISION_WEIGHTS_URL,
    PerceptualWeightsMissingError,
    build_lpips,
    lpips_backbone_path,
)

logger = logging.getLogger(__name__)

MINUS_ONE_ONE: tuple[float, float] = (-1.0, 1.0)

# torch-fidelity's Inception-v3 port of the TF FID network (the reference FID/KID feature extractor).
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"


@dataclass(frozen=True)
class Skipped:
    """A metric that was not computed, with the reason (for CSV cells and summary tables)."""

    reason: str

    def __str__(self) -> str:
        return f"skipped: {self.reason}"


def hub_checkpoint_path(filename: str) -> Path:
    """Where ``torch.hub`` caches a weights file (``$TORCH_HOME/hub/checkpoints/<filename>``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def _prepare(a: torch.Tensor, b: torch.Tensor, value_range: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Two batches of one shape as float64 clipped to ``value_range`` (as a saved image would be), on ``a``'s device."""
    lo, hi = value_range
    return a.detach().double().clamp(lo, hi), b.detach().double().clamp(lo, hi).to(a.device)


def mse(images: torch.Tensor, reference: torch.Tensor, value_range: tuple[float, float] = MINUS_ONE_ONE) -> torch.Tensor:
    """Per-image mean squared error ``[B]`` over channels and pixels, in the units of ``value_range``."""
    a, b = _prepare(images, reference, value_range)
    return ((a - b) ** 2).mean(dim=(1, 2, 3)).cpu()


def psnr(images: torch.Tensor, reference: torch.Tensor, value_range: tuple[float, float] = MINUS_ONE_ONE) -> torch.Tensor:
    """Per-image PSNR ``[B]`` in dB, ``10 log10(data_range^2 / MSE)`` with ``data_range = high - low``."""
    # imported here: torchmetrics takes seconds to import, which every CLI's usage error would wait for
    from torchmetrics.functional.image import peak_signal_noise_ratio

    a, b = _prepare(images, reference, value_range)
    return peak_signal_noise_ratio(a, b, data_range=value_range, reduction="none", dim=(1, 2, 3)).double().cpu()


SSIM_RADIUS = 5  # the 11x11 window of torchmetrics' default: int(3.5 * sigma + 0.5) px each side of the centre
SSIM_SIGMA = 1.5
SSIM_MIN_SIDE = 2 * SSIM_RADIUS + 1


def _ssim_skipped(shape: torch.Size) -> Skipped:
    return Skipped(f"SSIM: images {tuple(shape)} are smaller than its 11x11 window")


def separable_filter(x: torch.Tensor, taps: list[float]) -> torch.Tensor:
    """``x`` ``[B, C, H, W]`` filtered with ``taps`` (odd length) along W, then along H, reflected borders (scipy's
    ``mode="mirror"``), as shifted slices: 2k instead of a 2-D float64 ``conv2d``'s k^2 multiplies per pixel."""
    r, (h, w) = len(taps) // 2, x.shape[-2:]
    x = F.pad(x, (r, r, 0, 0), mode="reflect")
    x = sum(taps[j] * x[..., j : j + w] for j in range(len(taps)))
    x = F.pad(x, (0, 0, r, r), mode="reflect")
    return sum(taps[j] * x[..., j : j + h, :] for j in range(len(taps)))


def _ssim_map(a: torch.Tensor, b: torch.Tensor, data_range: float) -> torch.Tensor:
    """The SSIM map ``[B, C, H, W]`` of two float64 batches, as torchmetrics' ``structural_similarity_index_measure``
    (Gaussian window, reflected borders, variances clamped at 0, constants ``(0.01 R)^2`` and ``(0.03 R)^2``)."""
    if a.shape[0] == 0:  # nothing to split the five stacked maps from
        return torch.empty_like(a)
    taps = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=torch.float64)
    window = torch.exp(-((taps / SSIM_SIGMA) ** 2) / 2)
    stack = torch.cat((a, b, a * a, b * b, a * b))
    mu_a, mu_b, aa, bb, ab = separable_filter(stack, (window / window.sum()).tolist()).split(a.shape[0])
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    var_a = torch.clamp(aa - mu_a**2, min=0.0)
    var_b = torch.clamp(bb - mu_b**2, min=0.0)
    cov = ab - mu_a * mu_b
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))


def ssim(images: torch.Tensor, reference: torch.Tensor, value_range: tuple[float, float] = MINUS_ONE_ONE) -> torch.Tensor:
    """Per-image SSIM ``[B]`` (11x11 Gaussian window of sigma 1.5, ``data_range = high - low``, float64) of images of
    at least 11 px on each side."""
    a, b = _prepare(images, reference, value_range)
    return _ssim_map(a, b, float(value_range[1]) - float(value_range[0])).flatten(1).mean(-1).cpu()


def _region_mean(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-image weighted mean ``[B]`` of ``values`` ``[B, C, H, W]`` by ``weight`` ``[B, 1, H, W]`` (nan: empty)."""
    total = (values * weight).sum(dim=(1, 2, 3))
    count = weight.sum(dim=(1, 2, 3)) * values.shape[1]
    return torch.where(count > 0, total / count.clamp_min(1e-300), torch.full_like(total, float("nan")))


def masked_metrics(
    images: torch.Tensor,
    reference: torch.Tensor,
    mask: torch.Tensor,
    *,
    lpips: LPIPSMetric | Skipped | None = None,
    value_range: tuple[float, float] = MINUS_ONE_ONE,
) -> dict[str, Any]:
    """``{mse, psnr, ssim}_in`` / ``_out`` (with ``lpips`` also ``lpips_in`` / ``lpips_out``) of ``images`` against
    ``reference`` inside and outside ``mask`` ``[B, 1, H, W]`` (1 = inside; grey values weight a pixel into both).  MSE
    is mask-weighted, PSNR computed from it (``inf``: unchanged, ``nan``: empty region), SSIM the region's mean of the
    SSIM map; LPIPS (no per-pixel map) compares the image with the other region replaced by the reference's pixels."""
    a, b = _prepare(images, reference, value_range)
    m = mask.detach().to(a.device, torch.float64)
    data_range = float(value_range[1]) - float(value_range[0])
    ssim_map = _ssim_map(a, b, data_range) if min(a.shape[-2:]) >= SSIM_MIN_SIDE else None
    out: dict[str, Any] = {}
    for suffix, weight in (("in", m), ("out", 1.0 - m)):
        err = _region_mean((a - b) ** 2, weight)
        out[f"mse_{suffix}"] = err.cpu()
        out[f"psnr_{suffix}"] = (10.0 * torch.log10(data_range**2 / err)).cpu()
        out[f"ssim_{suffix}"] = _ssim_skipped(a.shape[-2:]) if ssim_map is None else _region_mean(ssim_map, weight).cpu()
        if lpips is not None:
            region = a * weight + b * (1.0 - weight)
            out[f"lpips_{suffix}"] = _lpips(lpips, region, b, value_range)
    return out


def seam_energy(
    images: torch.Tensor, inputs: torch.Tensor, mask: torch.Tensor, value_range: tuple[float, float] = MINUS_ONE_ONE
) -> torch.Tensor:
    """How abruptly an edit changes at the edge of its mask: per image ``[B]``, the mean over all pairs of 4-neighbour
    pixels that straddle the mask's boundary (mask > 0 and mask == 0) of the squared jump of the edit ``images -
    inputs`` across the pair, averaged over channels (units of ``value_range``, squared); ``nan`` without a boundary."""
    a, b = _prepare(images, inputs, value_range)
    inside = mask.to(a.device) > 0
    edit = a - b
    total = torch.zeros(a.shape[0], dtype=torch.float64, device=a.device)
    pairs = torch.zeros_like(total)
    for dim in (2, 3):
        n = a.shape[dim] - 1
        straddle = (inside.narrow(dim, 0, n) != inside.narrow(dim, 1, n)).double()
        jump = (edit.narrow(dim, 1, n) - edit.narrow(dim, 0, n)) ** 2
        total += (jump.mean(dim=1, keepdim=True) * straddle).sum(dim=(1, 2, 3))
        pairs += straddle.sum(dim=(1, 2, 3))
    return torch.where(pairs > 0, total / pairs.clamp_min(1), torch.full_like(total, float("nan"))).cpu()


class LPIPSMetric:
    """LPIPS (v0.1 linear heads) over a locally stored torchvision backbone, from :func:`load_lpips`:
    ``metric(images, reference)`` -> per-image distances ``[B]`` of images of at least :attr:`min_side` px on each side
    (:meth:`skipped` says why smaller ones get no value)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval()
        self.net = str(getattr(model, "pnet_type", "vgg"))
        self.min_side = LPIPS_MIN_SIDE.get(self.net, 1)

    def to(self, device: torch.device | str) -> LPIPSMetric:
        """The metric with its network on ``device`` (built on the CPU before the refiner chose its device)."""
        self.model = self.model.to(device)
        return self

    def skipped(self, shape: tuple[int, ...] | torch.Size) -> Skipped | None:
        """The :class:`Skipped` value for images of ``shape`` (``[..., H, W]``) too small for the backbone, or None."""
        if min(shape[-2:]) >= self.min_side:
            return None
        return Skipped(
            f"LPIPS: images {tuple(shape[-2:])} are smaller than the {self.min_side} px its {self.net} backbone needs"
        )

    def __call__(
        self, images: torch.Tensor, reference: torch.Tensor, value_range: tuple[float, float] = MINUS_ONE_ONE
    ) -> torch.Tensor:
        too_small = self.skipped(images.shape)
        if too_small is not None:
            raise ValueError(too_small.reason)
        a, b = _prepare(images, reference, value_range)
        lo, hi = value_range
        param = next(self.model.parameters())
        a, b = (((t - lo) / (hi - lo) * 2 - 1).to(param.device, param.dtype) for t in (a, b))
        with torch.no_grad():
            return self.model(a, b).reshape(a.shape[0]).double().cpu()


def _lpips(
    lpips: LPIPSMetric | Skipped, images: torch.Tensor, reference: torch.Tensor, value_range: tuple[float, float]
) -> torch.Tensor | Skipped:
    """LPIPS of ``images`` against ``reference``, or the :class:`Skipped` value (no weights, or images too small)."""
    if isinstance(lpips, Skipped):
        return lpips
    return lpips.skipped(images.shape) or lpips(images, reference, value_range)


def load_lpips(
    net: str = "vgg", backbone_weights: str | os.PathLike | None = None, device: torch.device | str | None = None
) -> LPIPSMetric | Skipped:
    """LPIPS with the ``net`` backbone (``"vgg"``, ``"alex"`` or ``"squeeze"``; the VQ loss's perceptual network), or
    :class:`Skipped` when its weights are not on disk.  ``backbone_weights``: a torchvision ImageNet state dict (by
    default torch hub's cache is looked at); a file that exists but is not such a state dict raises."""
    path = Path(backbone_weights) if backbone_weights is not None else lpips_backbone_path(net)
    try:
        model = build_lpips(net, pretrained=True, backbone_path=path)
    except PerceptualWeightsMissingError as exc:  # its message advises training; here the fix is another file
        url = f"{TORCHVISION_WEIGHTS_URL}{LPIPS_BACKBONE_FILES[net]}"
        return Skipped(
            f"LPIPS: {exc.missing} (fetch {url} on a machine with internet access and pass it as "
            "backbone_weights; evaluate.py: --lpips-weights)"
        )
    if device is not None:
        model = model.to(device)
    return LPIPSMetric(model)


def _features(
    extractor: torch.nn.Module, images: torch.Tensor, value_range: tuple[float, float], batch_size: int
) -> torch.Tensor:
    device = next(extractor.parameters(), images).device
    lo, hi = value_range
    unit = (images.detach().float().clamp(lo, hi) - lo) / (hi - lo)
    chunks = []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            batch = (unit[start : start + batch_size] * 255).round().to(torch.uint8).to(device)  # as saved images
            chunks.append(extractor(batch).reshape(batch.shape[0], -1).double().cpu())
    return torch.cat(chunks)


def load_inception(weights: str | os.PathLike | None = None) -> torch.nn.Module | Skipped:
    """torch-fidelity's FID Inception-v3 (2048-d pool features) from a local weights file (default: torch-fidelity's
    in the torch hub cache), or :class:`Skipped`.  The file is first read with the project's safe loader (tensors
    only), since torch-fidelity itself unpickles it unrestricted."""
    if importlib.util.find_spec("torch_fidelity") is None:
        return Skipped("FID/KID: torch-fidelity is not installed (pip install torch-fidelity provides the Inception network)")
    path = Path(weights) if weights is not None else hub_checkpoint_path(INCEPTION_WEIGHTS_FILE)
    if not path.is_file():
        return Skipped(
            f"FID/KID: Inception weights not found at {path}; put torch-fidelity's {INCEPTION_WEIGHTS_FILE} there or "
            "pass its path (this project never downloads weights)"
        )
    load_state_dict(path)
    from torchmetrics.image.fid import NoTrainInceptionV3

    extractor = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(path))
    logger.info("FID Inception loaded from %s", path)
    return extractor


def fid_kid(
    real: torch.Tensor,
    fake: torch.Tensor,
    *,
    feature_extractor: torch.nn.Module | Skipped | None = None,
    inception_weights: str | os.PathLike | None = None,
    value_range: tuple[float, float] = MINUS_ONE_ONE,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    seed: int = 0,
    batch_size: int = 32,
) -> dict[str, float] | Skipped:
    """``{"fid", "kid_mean", "kid_std"}`` between image sets ``real`` ``[N, 3, H, W]`` and ``fake`` ``[M, 3, H', W']``
    (torchmetrics), or :class:`Skipped`.  ``feature_extractor`` maps ``uint8 [n, 3, H, W]`` to ``[n, D]`` (default:
    :func:`load_inception`'s).  KID draws ``kid_subsets`` subsets of ``min(kid_subset_size, N, M)`` images with
    ``seed`` (the global RNG is restored)."""
    n_real, n_fake = int(real.shape[0]), int(fake.shape[0])
    if min(n_real, n_fake) < 2:
        return Skipped(f"FID/KID: need at least 2 images per set, got {n_real} real and {n_fake} generated")
    if feature_extractor is None:
        feature_extractor = load_inception(inception_weights)
    if isinstance(feature_extractor, Skipped):
        return feature_extractor
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    f_real = _features(feature_extractor, real, value_range, batch_size)
    f_fake = _features(feature_extractor, fake, value_range, batch_size)
    identity = torch.nn.Identity()  # FID and KID share one pass of the real extractor
    identity.num_features = f_real.shape[1]
    fid = FrechetInceptionDistance(feature=identity)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # KID's note that it buffers all features
        kid = KernelInceptionDistance(feature=identity, subsets=kid_subsets, subset_size=min(kid_subset_size, n_real, n_fake))
    for metric in (fid, kid):
        metric.update(f_real, real=True)
        metric.update(f_fake, real=False)
    with torch.random.fork_rng(devices=[]):  # KID's subset draws use the CPU generator; CUDA's is left alone
        torch.default_generator.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std)}


def compute_metrics(
    refined: torch.Tensor,
    clean: torch.Tensor | None = None,
    degraded: torch.Tensor | None = None,
    *,
    lpips: LPIPSMetric | Skipped | None = None,
    value_range: tuple[float, float] = MINUS_ONE_ONE,
) -> dict[str, Any]:
    """Per-image metrics of ``refined`` ``[B, 3, H, W]``: ``{mse, psnr, ssim}_clean`` (distance to ``clean``) and
    ``_input`` (faithfulness to ``degraded``) for the references given; with ``lpips`` also ``lpips_clean`` /
    ``lpips_input``.  SSIM is :class:`Skipped` under 11 px, LPIPS under :data:`ldm.modules.lpips.LPIPS_MIN_SIDE`."""
    out: dict[str, Any] = {}
    for suffix, reference in (("clean", clean), ("input", degraded)):
        if reference is None:
            continue
        out[f"mse_{suffix}"] = mse(refined, reference, value_range)
        out[f"psnr_{suffix}"] = psnr(refined, reference, value_range)
        too_small = min(refined.shape[-2:]) < SSIM_MIN_SIDE
        out[f"ssim_{suffix}"] = _ssim_skipped(refined.shape[-2:]) if too_small else ssim(refined, reference, value_range)
        if lpips is not None:
            out[f"lpips_{suffix}"] = _lpips(lpips, refined, reference, value_range)
    return out
