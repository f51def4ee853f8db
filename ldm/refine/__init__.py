"""Refinement with late-steps experts: the Python API (:class:`Refiner`) behind ``scripts/refine.py``, the app and the
evaluation; README, "Python API", shows its use."""

from ldm.imageio.prompt import Prompt
from ldm.refine.loading import CheckpointInfo, load_expert, resolve_device
from ldm.refine.refiner import Refiner
from ldm.sampling import RefinePlan

__all__ = ["CheckpointInfo", "Prompt", "RefinePlan", "Refiner", "load_expert", "resolve_device"]
