"""Evaluation of refinement: seeded degradations (:mod:`ldm.eval.degrade`) and image metrics (:mod:`ldm.eval.metrics`)."""

from ldm.eval.degrade import (
    DEGRADATIONS,
    JPEG,
    BlurNoise,
    ColourBlotches,
    Degradation,
    ElasticWarp,
    PatchShuffle,
    VQRoundTrip,
    build_degradation,
    degradation_from_spec,
    degradation_parameters,
)
from ldm.eval.degrade_files import apply_to_uint8, degrade_folder, file_seed
from ldm.eval.metrics import (
    LPIPSMetric,
    Skipped,
    compute_metrics,
    fid_kid,
    load_inception,
    load_lpips,
    mse,
    psnr,
    ssim,
)

__all__ = [
    "DEGRADATIONS",
    "JPEG",
    "BlurNoise",
    "ColourBlotches",
    "Degradation",
    "ElasticWarp",
    "LPIPSMetric",
    "PatchShuffle",
    "Skipped",
    "VQRoundTrip",
    "apply_to_uint8",
    "build_degradation",
    "compute_metrics",
    "degradation_from_spec",
    "degradation_parameters",
    "degrade_folder",
    "fid_kid",
    "file_seed",
    "load_inception",
    "load_lpips",
    "mse",
    "psnr",
    "ssim",
]
