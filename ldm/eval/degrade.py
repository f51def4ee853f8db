"""Seeded, parameterised image degradations (the artifact families the evaluation sweeps over) and their registry.

Every random number comes from the ``seed`` (an ``int``: a CPU generator, so one seed degrades alike on every device).
Sizes are fractions of the shorter side (blur: pixels), checked when a degradation is built, before any image is read.
"""

from __future__ import annotations

import abc
import inspect
import io
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.cli import decimal_float, decimal_int
from ldm.imageio import from_uint8, to_uint8
from ldm.util import accepted_keywords, instantiate_from_config

_RANGE_TOLERANCE = 1e-2

# Bounds of the parameters: counts cost time (patches: one search of the image each) or memory (blobs: a full-size map
# each, BLOB_CHUNK at a time); spatial fractions beyond MAX_FRACTION of the shorter side change nothing more.
MAX_COUNT = 256  # n_patches, n_blobs
MAX_SIGMA = 1024.0  # blur sigma in pixels (each image also bounds it by its longer side)
MAX_FRACTION = 4.0  # amplitude, scale, radius: fractions of the shorter side (of the box, for local degradations)
FRACTION_UNIT = " (a fraction of the image's or box's shorter side)"


def seed_generator(seed: int | torch.Generator) -> torch.Generator:
    """``seed`` itself when it is a generator, else a new CPU generator seeded with it."""
    if isinstance(seed, torch.Generator):
        return seed
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return torch.Generator(device="cpu").manual_seed(int(seed))
    raise TypeError(f"seed must be an int or a torch.Generator, got {type(seed).__name__}")


def prepare_input(images: torch.Tensor, seed: int | torch.Generator) -> tuple[torch.Tensor, torch.Generator]:
    """``images`` as float32/float64 (other float dtypes as float32) and the generator of ``seed``; ValueError unless
    ``images`` is a floating ``[B, 3, H, W]`` tensor in [-1, 1]."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected images [B, 3, H, W], got {shape}; use apply_to_uint8 for HWC uint8 arrays")
    if not images.is_floating_point():
        raise ValueError(f"expected floating images in [-1, 1], got dtype {images.dtype}; convert with x / 127.5 - 1")
    if images.numel():
        lo, hi = float(images.min()), float(images.max())
        if lo < -1 - _RANGE_TOLERANCE or hi > 1 + _RANGE_TOLERANCE:
            raise ValueError(
                f"expected images in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]; uint8 images convert with x / 127.5 - 1"
            )
    return (images if images.dtype in (torch.float32, torch.float64) else images.float()), seed_generator(seed)


def _show(value: Any) -> str:
    """``repr(value)``, shortened when it is long (a 400-digit integer)."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}... ({len(text)} characters)"


def check_positive(name: str, value: float, allow_zero: bool = False, at_most: float | None = None, unit: str = "") -> None:
    """Raise ValueError unless ``value`` is a finite number > 0 (>= 0 with ``allow_zero``) and at most ``at_most``
    (``unit``: what the number measures, for the message, e.g. ``" (pixels)"``)."""
    bound = ">= 0" if allow_zero else "> 0"
    numeric = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    try:
        finite = numeric and math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        finite = at_most is not None  # then the upper bound names the range
    if not finite or not (value >= 0 if allow_zero else value > 0):
        raise ValueError(f"{name} must be a finite number {bound}{unit}, got {_show(value)}")
    if at_most is not None and value > at_most:
        raise ValueError(f"{name} must be in {'[' if allow_zero else '('}0, {at_most:g}]{unit}, got {_show(value)}")


def check_count(name: str, value: int, lo: int, hi: int, why: str = "") -> None:
    """Raise ValueError unless ``value`` is an integer in ``[lo, hi]`` (``why``: the bound's reason)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}]{why}, got {_show(value)}")


class Degradation(abc.ABC):
    """Maps images ``[B, 3, H, W]`` in [-1, 1] to a degraded copy (same shape, dtype and device, clipped to [-1, 1]).
    Subclasses set ``name`` and implement ``_apply``."""

    name: ClassVar[str] = ""
    stochastic: bool = True  # whether the output depends on the seed (JPEG's does not)

    def params(self) -> dict[str, Any]:
        """Constructor parameters (by default the attributes of their names)."""
        return {k: getattr(self, k) for k in accepted_keywords(type(self)).params}

    @property
    def spec(self) -> str:
        """``"name:key=value,..."``; :func:`degradation_from_spec` rebuilds the same degradation from it."""
        items = ",".join(f"{k}={v}" for k, v in self.params().items())
        return f"{self.name}:{items}" if items else self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.params().items())})"

    def __call__(self, images: torch.Tensor, seed: int | torch.Generator) -> torch.Tensor:
        work, generator = prepare_input(images, seed)
        with torch.no_grad():
            out = self._apply(work, generator)
        return out.clamp(-1.0, 1.0).to(images.dtype)

    @abc.abstractmethod
    def _apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Degrade float32/float64 ``[B, 3, H, W]`` images, drawing all randomness from ``generator``."""


def _draw(fn: Any, shape: tuple[int, ...], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """``fn`` (``torch.rand`` / ``torch.randn``) on the generator's device, moved to ``like``'s."""
    return fn(shape, generator=generator, device=generator.device).to(like.device, like.dtype)


def randint(high: int, generator: torch.Generator) -> int:
    return int(torch.randint(high, (1,), generator=generator, device=generator.device))


def _load_first_stage(first_stage: Any) -> torch.nn.Module:
    if isinstance(first_stage, (str, os.PathLike)):
        from ldm.refine.loading import load_yaml_model_config

        path = Path(first_stage)
        if not path.is_file():
            raise FileNotFoundError(
                f"first_stage={str(path)!r} is not a file; pass a YAML config (target/params, or a latent-diffusion "
                "config with a top-level 'model' entry) or an already built VQModel / VQModelInterface"
            )
        first_stage = load_yaml_model_config(path)  # a ConfigError naming the file for bad YAML
    if isinstance(first_stage, Mapping) or (hasattr(first_stage, "keys") and "target" in first_stage):
        first_stage = instantiate_from_config(first_stage)
    from ldm.models.autoencoder import IdentityFirstStage

    if isinstance(first_stage, IdentityFirstStage):
        raise TypeError(
            "first_stage is an IdentityFirstStage, the first stage of a pixel-space model: it has no VQ codebook to "
            "round-trip through; vq_roundtrip and local_vq need a VQ first stage: pass first_stage=<VQ config.yaml> "
            "or choose another degradation"
        )
    missing = [a for a in ("encode", "decode", "quantize") if not hasattr(first_stage, a)]
    if missing or not hasattr(first_stage.quantize, "embedding"):
        raise TypeError(
            f"first_stage {type(first_stage).__name__} lacks {missing or ['quantize.embedding']}; expected a VQModel or "
            "VQModelInterface (encode, decode and a VectorQuantizer at .quantize)"
        )
    return first_stage


class VQRoundTrip(Degradation):
    """Encode, quantize and decode through a VQ first stage (a ``VQModelInterface`` or ``VQModel``, a config mapping
    or a YAML path).  ``codebook_fraction < 1`` allows only a seeded random subset of ``max(1, round(fraction *
    n_embed))`` codebook entries (one subset per call).  Sides are edge-padded to the downsampling factor."""

    name = "vq_roundtrip"

    def __init__(self, first_stage: Any, codebook_fraction: float = 1.0):
        check_positive("codebook_fraction", codebook_fraction, at_most=1.0)
        self._first_stage_arg = first_stage
        self.first_stage = _load_first_stage(first_stage)
        self.codebook_fraction = float(codebook_fraction)

    @property
    def stochastic(self) -> bool:
        return self.codebook_fraction < 1.0

    def params(self) -> dict[str, Any]:
        source = self._first_stage_arg
        label = str(source) if isinstance(source, (str, os.PathLike)) else type(self.first_stage).__name__
        return {"first_stage": label, "codebook_fraction": self.codebook_fraction}

    def _apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        fs = self.first_stage
        param = next(fs.parameters())
        codebook = fs.quantize.embedding.weight.detach()
        if self.codebook_fraction < 1.0:
            keep = max(1, round(self.codebook_fraction * codebook.shape[0]))
            subset = torch.randperm(codebook.shape[0], generator=generator, device=generator.device)[:keep]
            codebook = codebook[subset.to(codebook.device)]
        codebook = codebook.to(param.dtype)
        f = int(getattr(fs, "downsampling_factor", 1))
        b, _, h, w = images.shape
        pad_h, pad_w = (-h) % f, (-w) % f
        x = images.to(param.device, param.dtype)
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        was_training = fs.training
        fs.eval()
        try:
            latent = fs.encode_to_prequant(x) if hasattr(fs, "encode_to_prequant") else fs.encode(x)
            if isinstance(latent, tuple):
                raise TypeError(f"{type(fs).__name__}.encode returned a tuple, not the pre-quantization latent")
            flat = latent.permute(0, 2, 3, 1).reshape(-1, latent.shape[1])
            index = torch.cdist(flat.float(), codebook.float()).argmin(dim=1)
            quant = codebook[index].reshape(latent.shape[0], latent.shape[2], latent.shape[3], -1).permute(0, 3, 1, 2)
            interface = "force_not_quantize" in inspect.signature(fs.decode).parameters
            out = fs.decode(quant.contiguous(), force_not_quantize=True) if interface else fs.decode(quant.contiguous())
        finally:
            fs.train(was_training)
        if out.shape[-2:] != x.shape[-2:]:
            raise ValueError(
                f"first stage decoded {tuple(x.shape[-2:])} to {tuple(out.shape[-2:])}; set its downsampling_factor "
                "or pass images whose sides are multiples of it"
            )
        return out[:, :, :h, :w].to(images.device, images.dtype)


class JPEG(Degradation):
    """JPEG compression at ``quality`` (1-100, PIL's scale; 4:2:0 chroma subsampling), through 8-bit RGB; the seed
    does not change the output."""

    name = "jpeg"
    stochastic = False

    def __init__(self, quality: int = 20):
        check_count("quality", quality, 1, 100)
        self.quality = int(quality)

    def _apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        out = []
        for arr in to_uint8_hwc(images):
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG", quality=self.quality, subsampling=2)
            buf.seek(0)
            with Image.open(buf) as im:
                out.append(np.asarray(im.convert("RGB")))
        return from_uint8_hwc(np.stack(out)).to(images.device, images.dtype)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[B, C, H, W]`` by ``sigma`` pixels (edge-replicated borders, kernel radius
    ``ceil(3 sigma)``).  ValueError for ``sigma`` above the image's longer side: a nearly flat image at the cost of a
    kernel and padding of ``6 sigma`` pixels (tens of GB for 1e9)."""
    if sigma == 0:
        return images
    if sigma > max(images.shape[-2:]):
        raise ValueError(
            f"blur sigma={sigma:g} px is larger than the {images.shape[-1]}x{images.shape[-2]} image (its kernel would be "
            f"{2 * math.ceil(3 * sigma) + 1:.3g} px wide); use sigma <= {max(images.shape[-2:])}"
        )
    c, r = images.shape[1], max(1, math.ceil(3.0 * sigma))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float64) / sigma) ** 2)
    k = (k / k.sum()).to(images.device, images.dtype)
    x = F.pad(images, (r, r, 0, 0), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.pad(x, (0, 0, r, r), mode="replicate")
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


class BlurNoise(Degradation):
    """Gaussian blur of ``sigma`` pixels, then i.i.d. Gaussian noise of std ``noise_std`` per pixel and channel
    ([-1, 1] units: 0.1 is about 12.75 / 255)."""

    name = "blur_noise"

    def __init__(self, sigma: float = 1.5, noise_std: float = 0.05):
        check_positive("sigma", sigma, allow_zero=True, at_most=MAX_SIGMA, unit=" (pixels)")
        check_positive("noise_std", noise_std, allow_zero=True)
        if sigma == 0 and noise_std == 0:
            raise ValueError("blur_noise with sigma=0 and noise_std=0 does nothing; set at least one > 0")
        self.sigma = float(sigma)
        self.noise_std = float(noise_std)

    @property
    def stochastic(self) -> bool:
        return self.noise_std > 0

    def _apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        out = gaussian_blur(images, self.sigma)
        if self.noise_std > 0:
            out = out + self.noise_std * _draw(torch.randn, tuple(out.shape), generator, out)
        return out


class ElasticWarp(Degradation):
    """Local elastic warp (a shape error): per image, Gaussian noise on a lattice of spacing ``scale`` is bicubically
    upsampled to a displacement field ``[2, H, W]`` whose largest displacement is ``amplitude`` (both fractions of the
    shorter side), then the image is resampled bilinearly (``grid_sample``, reflected borders)."""

    name = "elastic_warp"

    def __init__(self, amplitude: float = 0.03, scale: float = 0.25):
        check_positive("amplitude", amplitude, at_most=MAX_FRACTION, unit=FRACTION_UNIT)
        check_positive("scale", scale, at_most=MAX_FRACTION, unit=FRACTION_UNIT)
        self.amplitude = float(amplitude)
        self.scale = float(scale)

    def displacement(self, b: int, h: int, w: int, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
        """Displacement field ``[B, 2, H, W]`` in pixels (channel 0: x, channel 1: y)."""
        side = min(h, w)
        spacing = max(self.scale * side, 1.0)
        gh, gw = math.ceil((h - 1) / spacing) + 2, math.ceil((w - 1) / spacing) + 2
        coarse = _draw(torch.randn, (b, 2, gh, gw), generator, like)
        field = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)
        peak = field.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
        return field / peak * (self.amplitude * side)

    def _apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        b, _, h, w = images.shape
        disp = self.displacement(b, h, w, generator, images)
        ys = (2 * torch.arange(h, device=images.device, dtype=images.dtype) + 1) / h - 1
        xs = (2 * torch.arange(w, device=images.device, dtype=images.dtype) + 1) / w - 1
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        grid = torch.stack([gx + disp[:, 0] * (2.0 / w), gy + disp[:, 1] * (2.0 / h)], dim=-1)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def feather_window(p: int, feather: float, like: torch.Tensor) -> torch.Tensor:
    """``[p, p]`` blending weight: 1 inside, a raised-cosine taper over ``feather * p`` pixels at each edge."""
    ramp = max(int(round(feather * p)), 0)
    w = torch.ones(p, dtype=torch.float64)
    if ramp:
        t = (torch.arange(ramp, dtype=torch.float64) + 0.5) / ramp
        taper = 0.5 - 0.5 * torch.cos(math.pi * t)
        w[:ramp] = taper
        w[p - ramp :] = taper.flip(0)
    return torch.outer(w, w).to(like.device, like.dtype)


class PatchShuffle(Degradation):
    """Composition error: ``n_patches`` times, copy (``mode="duplicate"``) or exchange (``mode="swap"``) two
    non-overlapping square patches of side ``patch_size`` (fraction of the shorter side, at least 2 px), blended in
    with a raised-cosine edge over ``feather`` of their side (0: hard seams)."""

    name = "patch_shuffle"
    MODES: ClassVar[tuple[str, ...]] = ("duplicate", "swap")

    def __init__(self, n_patches: int = 2, patch_size: float = 0.25, mode: str = "duplicate", feather: float = 0.25):
        check_count("n_patches", n_patches, 1, MAX_COUNT, " (each patch searches the image once)")
        check_positive("patch_size", patch_size)
        if patch_size > 0.5:
            raise ValueError(f"patch_size must be <= 0.5 of the shorter side (two patches must fit), got {patch_size}")
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {list(self.MODES)}, got {mode!r}")
        check_positive("feather", feather, allow_zero=True)
        if feather > 0.5:
            raise ValueError(f"feather must be in [0, 0.5] (a fraction of the patch side per edge), got {feather}")
        self.n_patches = int(n_patches)
        self.patch_size = float(patch_size)
        self.mode = mode
        self.feather = float(feather)

    def patch_pairs(self, h: int, w: int, generator: torch.Generator) -> tuple[int, list[tuple[int, int, int, int]]]:
        """Patch side ``p`` and ``n_patches`` pairs ``(src_y, src_x, dst_y, dst_x)`` of disjoint patches (positions
        uniform among those that admit a disjoint partner)."""
        p = max(2, round(self.patch_size * min(h, w)))
        ys, xs = torch.arange(max(h - p + 1, 0)), torch.arange(max(w - p + 1, 0))
        src_ok = ((ys >= p) | (ys + 2 * p <= h))[:, None] | ((xs >= p) | (xs + 2 * p <= w))[None, :]
        if not src_ok.any():
            raise ValueError(f"patch side {p} px does not leave room for two disjoint patches in {h}x{w}")

        def pick(ok: torch.Tensor) -> tuple[int, int]:
            flat = ok.flatten().nonzero().squeeze(1)
            return divmod(int(flat[randint(flat.numel(), generator)]), ok.shape[1])

        pairs = []
        for _ in range(self.n_patches):
            sy, sx = pick(src_ok)
            dy, dx = pick(((ys - sy).abs() >= p)[:, None] | ((xs - sx).abs() >= p)[None, :])
            pairs.append((sy, sx, dy, dx))
        return p, pairs

    def _apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        out = images.clone()
        _, _, h, w = images.shape
        for i in range(images.shape[0]):
            p, pairs = self.patch_pairs(h, w, generator)
            mask = feather_window(p, self.feather, images)
            for sy, sx, dy, dx in pairs:
                src = out[i, :, sy : sy + p, sx : sx + p].clone()
                dst = out[i, :, dy : dy + p, dx : dx + p].clone()
                out[i, :, dy : dy + p, dx : dx + p] = mask * src + (1 - mask) * dst
                if self.mode == "swap":
                    out[i, :, sy : sy + p, sx : sx + p] = mask * dst + (1 - mask) * src
        return out


class ColourBlotches(Degradation):
    """Smooth colour shifts in ``n_blobs`` Gaussian blobs, each with a uniform random centre, a radius (Gaussian
    sigma) of ``radius * U(0.5, 1.5)`` of the shorter side and an additive RGB shift of Euclidean norm ``strength``
    ([-1, 1] units) in a uniformly random direction."""

    name = "colour_blotches"
    BLOB_CHUNK: ClassVar[int] = 16

    def __init__(self, n_blobs: int = 3, radius: float = 0.15, strength: float = 0.4):
        check_count("n_blobs", n_blobs, 1, MAX_COUNT, " (each blob is a full-size map per image)")
        check_positive("radius", radius, at_most=MAX_FRACTION, unit=FRACTION_UNIT)
        check_positive("strength", strength)
        self.n_blobs = int(n_blobs)
        self.radius = float(radius)
        self.strength = float(strength)

    def _apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        b, _, h, w = images.shape
        k = self.n_blobs
        u = _draw(torch.rand, (b, k, 3), generator, images)
        cy, cx = u[..., 0] * h, u[..., 1] * w
        sigma = self.radius * min(h, w) * (0.5 + u[..., 2])
        direction = _draw(torch.randn, (b, k, 3), generator, images)
        shift = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12) * self.strength
        ys = torch.arange(h, device=images.device, dtype=images.dtype) + 0.5
        xs = torch.arange(w, device=images.device, dtype=images.dtype) + 0.5
        out = images
        for i in range(0, k, self.BLOB_CHUNK):  # memory: BLOB_CHUNK full-size maps per image, whatever n_blobs is
            c = slice(i, i + self.BLOB_CHUNK)
            d2 = (ys.view(1, 1, h, 1) - cy[:, c, None, None]) ** 2 + (xs.view(1, 1, 1, w) - cx[:, c, None, None]) ** 2
            blobs = torch.exp(-0.5 * d2 / sigma[:, c, None, None] ** 2)
            out = out + torch.einsum("bkc,bkhw->bchw", shift[:, c], blobs)
        return out


# name -> class; :mod:`ldm.eval.local_degrade` adds the local ones (``ldm.eval`` imports it)
DEGRADATIONS: dict[str, type[Degradation]] = {
    cls.name: cls for cls in (VQRoundTrip, JPEG, BlurNoise, ElasticWarp, PatchShuffle, ColourBlotches)
}


def degradation_parameters(name: str) -> dict[str, Any]:
    """``{param: default}`` of a registered degradation (``inspect.Parameter.empty`` when required)."""
    return {k: default for k, (_, default) in accepted_keywords(DEGRADATIONS[name]).params.items()}


def describe_degradation(name: str) -> str:
    """``"jpeg(quality=30)"``: a registered degradation's name with its parameters and defaults."""
    parts = [k if v is inspect.Parameter.empty else f"{k}={v!r}" for k, v in degradation_parameters(name).items()]
    return f"{name}({', '.join(parts)})"


def build_degradation(name: str, **params: Any) -> Degradation:
    """The degradation registered as ``name``, built with ``params``; KeyError (unknown name) and TypeError (unknown or
    missing parameters) list what is valid."""
    if name not in DEGRADATIONS:
        listing = "; ".join(describe_degradation(n) for n in sorted(DEGRADATIONS))
        raise KeyError(f"unknown degradation {name!r}; valid: {listing}")
    expected = degradation_parameters(name)
    unknown = sorted(set(params) - set(expected))
    missing = sorted(k for k, v in expected.items() if v is inspect.Parameter.empty and k not in params)
    if unknown or missing:
        what = (f"unknown parameters {unknown}" if unknown else "") + (", " if unknown and missing else "")
        what += f"missing required parameters {missing}" if missing else ""
        raise TypeError(f"degradation {name!r}: {what}; it takes {describe_degradation(name)}")
    return DEGRADATIONS[name](**params)


def _parse_value(text: str) -> Any:
    """An integer or a number of ASCII digits (``int()`` would also read ``５０`` or ``1_0``), else the string."""
    for cast in (decimal_int, decimal_float):
        try:
            return cast(text)
        except ValueError:
            continue
    return text


def split_spec(spec: str, unique: bool = True) -> tuple[str, dict[str, str]]:
    """``"name:key=value,..."`` -> ``(name, {key: value})``, stripped; ``unique``: a repeated key is an error."""
    name, _, rest = spec.partition(":")
    items: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"degradation spec {spec!r}: {item!r} is not key=value; format is name:key=value,key=value")
        if unique and key.strip() in items:
            raise ValueError(f"degradation spec {spec!r}: {key.strip()!r} is given twice")
        items[key.strip()] = value.strip()
    return name.strip(), items


def degradation_from_spec(spec: str) -> Degradation:
    """A degradation from ``"name"`` or ``"name:key=value,..."`` (numbers parsed as int, then float; anything else
    stays a string, e.g. ``vq_roundtrip:first_stage=configs/autoencoder/vq_f8.yaml``)."""
    name, items = split_spec(spec)
    return build_degradation(name, **{key: _parse_value(value) for key, value in items.items()})


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """``[B, 3, H, W]`` in [-1, 1] -> ``[B, H, W, 3]`` uint8 (rounded, clipped)."""
    return to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()


def from_uint8_hwc(arrays: np.ndarray) -> torch.Tensor:
    """``[B, H, W, 3]`` uint8 -> ``[B, 3, H, W]`` float32 in [-1, 1]."""
    return from_uint8(np.array(arrays, dtype=np.uint8, copy=True)).permute(0, 3, 1, 2)
