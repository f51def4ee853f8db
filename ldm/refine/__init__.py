"""Refinement with late-steps experts: the Python API (:class:`Refiner`) behind ``scripts/refine.py``, the app and the
evaluation; README, "Python API", shows its use."""

from ldm.imageio.prompt import Prompt
from ldm.refine.refiner import Refiner

__all__ = ["Prompt", "Refiner"]
