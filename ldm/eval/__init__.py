"""Evaluation of refinement: seeded degradations (:mod:`ldm.eval.degrade`, local ones in :mod:`ldm.eval.local_degrade`),
image metrics (:mod:`ldm.eval.metrics`) and realism (:mod:`ldm.eval.swd`).  Importing the package registers the local
degradations in :data:`ldm.eval.degrade.DEGRADATIONS`, so the registry is complete whenever ``ldm.eval`` is imported.
"""

from ldm.eval import local_degrade

__all__ = ["local_degrade"]
