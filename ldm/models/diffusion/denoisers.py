"""The denoisers (:class:`Denoiser` and its wrappers), re-exported from :mod:`ldm.sampling.denoisers`, where they
live next to the sampler that steps with them."""

from ldm.sampling.denoisers import AutocastDenoiser, CFGDenoiser, ChunkedDenoiser, Denoiser, ModelDenoiser

__all__ = ["AutocastDenoiser", "CFGDenoiser", "ChunkedDenoiser", "Denoiser", "ModelDenoiser"]
