"""Refinement with late-steps experts: the Python API behind ``scripts/refine.py``, the quickstart and the evaluation.

    from ldm.refine import Refiner

    refiner = Refiner.from_checkpoints(["latesteps_500_750.ckpt", "latesteps_750_1000.ckpt"], device="auto")
    refined = refiner(Image.open("artifact.png"), start_t=500, seed=0)        # PIL in, PIL out (alpha kept)
    batch = refiner.refine_tensors(x, start_t=500, seeds=[0, 1, 2])           # [B, 3, H, W] in [-1, 1]
    sd = Refiner.from_checkpoints("sd_late.ckpt")                               # a text-conditioned expert
    refined = sd(Image.open("a.png"), start_t=200, prompt=Prompt("a photo of a cat", "blurry", 5.0))

Modules: :mod:`ldm.refine.loading` (checkpoints -> experts, safely), :mod:`ldm.refine.refiner` (:class:`Refiner`),
:mod:`ldm.refine.batch` (files in, PNGs with metadata out; what the CLI runs), :mod:`ldm.refine.conditioning`
(prompts for text-conditioned experts: the rules, encoding, guidance).
"""

from ldm.imageio.prompt import Prompt
from ldm.refine.loading import CheckpointInfo, load_expert, resolve_device
from ldm.refine.refiner import Refiner
from ldm.sampling import RefinePlan

__all__ = ["CheckpointInfo", "Prompt", "RefinePlan", "Refiner", "load_expert", "resolve_device"]
