"""Classifier-free guidance as a :class:`~ldm.sampling.denoisers.Denoiser` that closes over its conditioning, so a plan
and the loop carry it unchanged (the loop's own ``cond`` stays None).  It wraps ``ChunkedDenoiser(AutocastDenoiser(...))``
from outside: chunking slices ``x`` alone (a wrapper inside could not tell whose conditioning it holds), and the two
branches combine in float32."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ldm.sampling.denoisers import Denoiser, stack_cond
from ldm.sampling.plan import RefinePlan

Cond = Any  # a tensor [B, ...], a list of tensors, or a dict of such (LatentDiffusion.apply_model's forms)


def _for_batch(cond: Cond, batch: int) -> Cond:  # a batch of one broadcast to ``batch`` (a view: no copy)
    if isinstance(cond, torch.Tensor):
        return cond if cond.shape[0] == batch else cond.expand(batch, *cond.shape[1:])
    if isinstance(cond, dict):
        return {k: _for_batch(v, batch) for k, v in cond.items()}
    return [_for_batch(c, batch) for c in cond]


class GuidedDenoiser:
    """Classifier-free guidance around ``inner`` (an expert's denoiser): ``eps_u + scale * (eps_c - eps_u)``, both
    branches in one call on ``[uncond, cond]`` (``2B`` samples).  At scale 1 (0) only the conditional (unconditional)
    branch runs: exact, and half the cost.

    ``cond``, ``uncond``: as ``apply_model`` takes them, batch ``B`` or 1 (broadcast), on the model's device and dtype;
    ``uncond`` has the same nesting, None only at scale 1 (checked where made: :func:`ldm.refine.conditioning.encode_prompts`).
    """

    def __init__(self, inner: Denoiser, cond: Cond, uncond: Cond | None, scale: float):
        self.inner = inner
        self.scale = float(scale)
        self.cond = cond
        self.uncond = uncond
        self._stacked: tuple[int, Cond] | None = None  # (batch, [uncond, cond]) built on the first call

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """eps ``[B, C, h, w]`` for ``x`` ``[B, C, h, w]`` at ``t`` ``[B]``; ``cond`` must be None (held here)."""
        if cond is not None:
            raise ValueError("GuidedDenoiser holds its own conditioning; run the plan with cond=None")
        batch = x.shape[0]
        if self.scale == 1.0:  # the conditional model, exactly; the unconditional branch is not run
            return self.inner(x, t, _for_batch(self.cond, batch))
        if self.scale == 0.0:  # the unconditional model, exactly
            return self.inner(x, t, _for_batch(self.uncond, batch))
        if self._stacked is None or self._stacked[0] != batch:
            # built once per batch size and reused by every step (a copy of both embeddings, not one per step)
            self._stacked = (batch, stack_cond(_for_batch(self.uncond, batch), _for_batch(self.cond, batch)))
        eps_u, eps_c = self.inner(torch.cat([x, x]), torch.cat([t, t]), self._stacked[1]).to(x.dtype).chunk(2)
        return eps_u + self.scale * (eps_c - eps_u)


@dataclass(frozen=True)
class Guidance:
    """One expert's guidance (:class:`GuidedDenoiser`'s arguments)."""

    cond: Cond
    uncond: Cond | None
    scale: float

    def sample(self, index: int) -> Guidance:
        """Sample ``index``'s rows alone (tensor conditionings)."""
        rows = slice(index, index + 1)
        return Guidance(self.cond[rows], None if self.uncond is None else self.uncond[rows], self.scale)


def guided_plan(plan: RefinePlan, guidance: Guidance | Sequence[Guidance | None]) -> RefinePlan:
    """A copy of ``plan`` (coefficient tensors shared) whose every step runs its expert's denoiser wrapped once with
    that expert's guidance: one :class:`Guidance` for every expert, or one per expert in ``plan.expert_names`` order
    (None: that expert's steps stay unguided)."""
    per_expert = [guidance] * len(plan.expert_names) if isinstance(guidance, Guidance) else list(guidance)
    wrapped: dict[int, Denoiser] = {}
    steps = []
    for expert, denoiser in zip(plan.experts, plan.denoisers):
        if expert not in wrapped:
            g = per_expert[expert]
            wrapped[expert] = denoiser if g is None else GuidedDenoiser(denoiser, g.cond, g.uncond, g.scale)
        steps.append(wrapped[expert])
    return dataclasses.replace(plan, denoisers=tuple(steps))
