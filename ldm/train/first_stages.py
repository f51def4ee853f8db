"""What to tell a user whose first-stage checkpoint is missing: re-exported from :mod:`ldm.models.first_stages`, where
it lives so that ``ldm.models.autoencoder`` imports nothing from ``ldm.train``."""

from ldm.models.first_stages import (
    COMPVIS_FIRST_STAGES,
    COMPVIS_URL,
    CONFIGS,
    FIRST_STAGE_CKPT_KEY,
    NETWORK_KEYS,
    REPO,
    compvis_name,
    missing_first_stage_hint,
    training_configs,
)

__all__ = [
    "COMPVIS_FIRST_STAGES",
    "COMPVIS_URL",
    "CONFIGS",
    "FIRST_STAGE_CKPT_KEY",
    "NETWORK_KEYS",
    "REPO",
    "compvis_name",
    "missing_first_stage_hint",
    "training_configs",
]
