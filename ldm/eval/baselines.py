"""Baselines the sweep runs next to the refiners: ``identity``, a classical filter of :data:`FILTERS` and
``autoencoder`` (the first-stage round trip every refined image also passes through: it separates what the diffusion
steps add from what the autoencoder does)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

FILTERS = ("nl_means", "bilateral", "median")

ImageMap = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Baseline:
    """A named deterministic image map ``[B, 3, H, W] -> [B, 3, H, W]`` (in [-1, 1]) and a one-line description."""

    name: str
    apply: ImageMap
    description: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.apply(images)


def identity_baseline() -> Baseline:
    """The degraded input, unchanged."""
    return Baseline("identity", torch.clone, "the degraded input, unchanged")


def estimate_noise_sigma(img: np.ndarray) -> float:
    """Gaussian noise standard deviation of ``img`` ``[H, W, C]`` (in its own units), averaged over channels: Donoho &
    Johnstone (1994), ``median(|HH|) / 0.6745`` with ``HH`` the diagonal Haar detail coefficients ``(a - b - c + d) / 2``
    of 2x2 blocks (``skimage.restoration.estimate_sigma`` without PyWavelets); 0 under 2x2 px."""
    h, w = (img.shape[0] // 2) * 2, (img.shape[1] // 2) * 2
    if h == 0 or w == 0:
        return 0.0
    x = np.asarray(img[:h, :w], dtype=np.float64)
    hh = (x[0::2, 0::2] - x[0::2, 1::2] - x[1::2, 0::2] + x[1::2, 1::2]) / 2.0
    per_channel = np.median(np.abs(hh.reshape(-1, hh.shape[-1])), axis=0) / 0.6744897501960817
    return float(per_channel.mean())


def _nl_means(img: np.ndarray) -> np.ndarray:
    """scikit-image's recommended ``h = 0.8 sigma`` for its fast mode: a clean-looking image is left almost unchanged."""
    from skimage.restoration import denoise_nl_means

    sigma = estimate_noise_sigma(img)
    if not np.isfinite(sigma) or sigma <= 0.0:
        return img
    return denoise_nl_means(img, patch_size=5, patch_distance=6, h=0.8 * sigma, sigma=sigma, fast_mode=True, channel_axis=-1)


def _bilateral(img: np.ndarray) -> np.ndarray:
    from skimage.restoration import denoise_bilateral

    return denoise_bilateral(img, sigma_spatial=1, mode="reflect", channel_axis=-1)


def _median(img: np.ndarray) -> np.ndarray:
    from scipy.ndimage import median_filter

    return median_filter(img, size=(3, 3, 1), mode="mirror")


_FILTER_FUNCTIONS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], str]] = {
    "nl_means": (_nl_means, "non-local means (5x5 patches, 6 px search, h = 0.8 x estimated sigma)"),
    "bilateral": (_bilateral, "bilateral filter (spatial sigma 1 px, colour sigma = image std, reflected borders)"),
    "median": (_median, "3x3 median filter per channel"),
}


def _per_image(fn: Callable[[np.ndarray], np.ndarray]) -> ImageMap:
    """Lift ``fn`` (float64 ``[H, W, 3]`` in [0, 1] -> same) to batches of model images."""

    def apply(images: torch.Tensor) -> torch.Tensor:
        unit = ((images.detach().to("cpu", torch.float64).clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
        out = np.stack([np.clip(fn(np.ascontiguousarray(img)), 0.0, 1.0) for img in unit])
        return (torch.from_numpy(out).permute(0, 3, 1, 2) * 2 - 1).to(images.device, images.dtype)

    return apply


def filter_baseline(name: str = "nl_means") -> Baseline:
    """The classical filter ``name`` (one of :data:`FILTERS`) as a :class:`Baseline` named after it."""
    fn, description = _FILTER_FUNCTIONS[name]
    return Baseline(name, _per_image(fn), description)


def autoencoder_baseline(model: torch.nn.Module) -> Baseline:
    """Encode and decode through ``model``'s first stage (a LatentDiffusion, typically ``refiner.model``), padded as
    refinement pads; images are moved to its device and back."""
    from ldm.imageio import crop_padding, pad_to_multiple

    def apply(images: torch.Tensor) -> torch.Tensor:
        param = next(model.parameters())
        factor = int(model.downsampling_factor)
        x, padding = pad_to_multiple(images.to(param.device, torch.float32).clamp(-1, 1), factor, mode="reflect")
        with torch.inference_mode():
            z = model.get_first_stage_encoding(model.encode_first_stage(x))
            out = model.decode_first_stage(z).float()
        return crop_padding(out, padding).clamp(-1, 1).to(images.device, images.dtype)

    return Baseline("autoencoder", apply, "encode + decode through the refiner's first stage (no diffusion steps)")


def default_baselines(model: torch.nn.Module | None, filter_name: str | None = "nl_means") -> list[Baseline]:
    """``identity``, the classical filter ``filter_name`` (None: none) and, given a model, its ``autoencoder``."""
    baselines = [identity_baseline()]
    if filter_name is not None:
        baselines.append(filter_baseline(filter_name))
    if model is not None:
        baselines.append(autoencoder_baseline(model))
    return baselines
