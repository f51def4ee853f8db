"""Refinement with late-steps experts: the Python API (:class:`Refiner`; README, "Python API")."""

from ldm.imageio.prompt import Prompt
from ldm.refine.refiner import Refiner

__all__ = ["Prompt", "Refiner"]
