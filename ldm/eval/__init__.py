"""Evaluation of refinement: degradations, metrics, realism (SWD) and the sweep.  Importing the package registers the
local degradations in :data:`ldm.eval.degrade.DEGRADATIONS`."""

from ldm.eval import local_degrade

__all__ = ["local_degrade"]
