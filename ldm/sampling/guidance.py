"""Classifier-free guidance as a :class:`~ldm.sampling.denoisers.Denoiser` that closes over its conditioning.

:class:`GuidedDenoiser` holds the conditional and the unconditional conditioning (e.g. text embeddings ``[B, L, D]``
for cross-attention, in any form ``LatentDiffusion.apply_model`` takes: a tensor, a list of tensors, or a dict
``{"c_crossattn": [...], "c_concat": [...]}``) and a scale ``s``, and returns

    eps = eps_u + s * (eps_c - eps_u)

with both branches in **one** call of the inner denoiser on the batch ``[uncond, cond]`` (``2B`` samples).  Because it
closes over its conditioning, the plan and the loop (:mod:`ldm.sampling.plan`, :mod:`ldm.sampling.loop`) carry it
unchanged: the loop's own ``cond`` argument stays None.

Shortcuts, each exact (no arithmetic on the network's output):

* ``s == 1``: the conditional model alone (``eps_u + 1 * (eps_c - eps_u)`` equals ``eps_c`` up to rounding; skipping
  the unconditional branch halves the cost and makes it bit for bit the conditional model);
* ``s == 0``: the unconditional model alone.

Composition (outermost first), as :func:`guided_plan` builds it from a plan's per-step denoisers::

    GuidedDenoiser(ChunkedDenoiser(AutocastDenoiser(ModelDenoiser(expert))))

* Guidance must be **outside** ``ChunkedDenoiser``: the chunked wrapper slices ``x`` along the batch, and a wrapper
  inside it would see a slice without knowing which samples' conditioning it holds.  With ``ChunkedDenoiser(1)`` (the
  Refiner's batch-invariant CPU mode) the one batched call becomes ``2B`` calls of one sample each; every sample's
  result then does not depend on the batch, as without guidance.  ``ChunkedDenoiser`` slices tensor conditioning only:
  pass the cross-attention context as a tensor (``apply_model`` wraps it as ``{"c_crossattn": [context]}``).
* Guidance outside ``AutocastDenoiser`` combines the two branches in ``x``'s dtype (float32), not in bf16.
* Routing: a plan resolves the expert of each step once; :func:`guided_plan` wraps each expert's denoiser with that
  expert's :class:`Guidance` (one per expert, or one shared), so each expert gets the conditioning, and an expert
  given None stays unguided.
* Region refinement: the loop holds pixels that have not started at ``q_sample(z0, level)`` outside the denoiser;
  guidance only changes eps, so held pixels stay held.

Conditioning is used as given: put it on the model's device (and in its dtype) before building the wrapper.  A batch
of one is broadcast to the latent's batch (one prompt for every image).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ldm.imageio.prompt import check_guidance_scale
from ldm.sampling.denoisers import Denoiser
from ldm.sampling.plan import RefinePlan

Cond = Any  # a tensor [B, ...], a list of tensors, or a dict of such (LatentDiffusion.apply_model's forms)


def _structure(cond: Cond, where: str) -> Any:
    """A description of ``cond``'s nesting and each tensor's per-sample shape, to compare cond with uncond."""
    if isinstance(cond, torch.Tensor):
        if cond.ndim == 0:
            raise ValueError(f"{where} is a 0-d tensor; conditioning needs a batch dimension first ([B, ...])")
        return tuple(cond.shape[1:])
    if isinstance(cond, (list, tuple)):
        return [_structure(c, f"{where}[{i}]") for i, c in enumerate(cond)]
    if isinstance(cond, dict):
        return {k: _structure(v, f"{where}[{k!r}]") for k, v in sorted(cond.items())}
    raise ValueError(
        f"{where} is a {type(cond).__name__}; conditioning must be a tensor [B, ...], a list of tensors or a dict of "
        "them (the forms LatentDiffusion.apply_model takes)"
    )


def _batches(cond: Cond) -> set[int]:
    if isinstance(cond, torch.Tensor):
        return {int(cond.shape[0])}
    values = cond.values() if isinstance(cond, dict) else cond
    return set().union(*(_batches(c) for c in values)) if values else set()


def _for_batch(cond: Cond, batch: int) -> Cond:
    """``cond`` with a batch of one broadcast to ``batch`` (a view: no copy)."""
    if isinstance(cond, torch.Tensor):
        return cond if cond.shape[0] == batch else cond.expand(batch, *cond.shape[1:])
    if isinstance(cond, dict):
        return {k: _for_batch(v, batch) for k, v in cond.items()}
    return [_for_batch(c, batch) for c in cond]


def _stack(uncond: Cond, cond: Cond) -> Cond:
    """``[uncond, cond]`` along the batch, keeping the nesting (lists stay lists: apply_model concatenates them)."""
    if isinstance(cond, torch.Tensor):
        return torch.cat([uncond, cond])
    if isinstance(cond, dict):
        return {k: _stack(uncond[k], cond[k]) for k in cond}
    return [_stack(u, c) for u, c in zip(uncond, cond)]


class GuidedDenoiser:
    """Classifier-free guidance around ``inner``: ``eps_u + scale * (eps_c - eps_u)`` in one batched call.

    Args:
        inner: the expert's denoiser ``(x [N, C, h, w], t [N], cond) -> eps [N, C, h, w]``.
        cond: the conditional conditioning, batch ``B`` or 1.  uncond: the unconditional one (the empty or negative
            prompt's embedding), the same nesting and per-sample shapes, batch ``B`` or 1; may be None only at scale 1.
        scale: ``s``, finite and ``>= 0`` (1: the conditional model, exactly; 0: the unconditional model, exactly).

    Raises:
        ValueError: a scale outside what is allowed, no uncond at a scale other than 1, conditioning that is not a
            tensor / list / dict of tensors, or cond and uncond of different nesting, shapes or batch sizes.
    """

    def __init__(self, inner: Denoiser, cond: Cond, uncond: Cond | None, scale: float):
        self.inner = inner
        self.scale = check_guidance_scale(scale)
        shape = _structure(cond, "cond")
        if uncond is None and self.scale != 1.0:
            raise ValueError(
                f"guidance scale {self.scale:g} needs unconditional conditioning (the empty or negative prompt's "
                "embedding); pass uncond, or use scale 1 (the conditional model, no guidance)"
            )
        if uncond is not None and _structure(uncond, "uncond") != shape:
            raise ValueError(
                f"cond and uncond differ in nesting or per-sample shape ({shape} vs {_structure(uncond, 'uncond')}); "
                "encode both prompts with the same text encoder and pad to the same length"
            )
        batches = _batches(cond) | (set() if uncond is None else _batches(uncond))
        if len(batches - {1}) > 1:
            raise ValueError(f"cond and uncond hold different batch sizes {sorted(batches)}; use one size B (or 1)")
        self.cond = cond
        self.uncond = uncond
        self._batch = max(batches, default=1)
        self._stacked: tuple[int, Cond] | None = None  # (batch, [uncond, cond]) built on the first call

    def _check_batch(self, batch: int) -> None:
        if self._batch not in (1, batch):
            raise ValueError(
                f"the guidance conditioning has batch {self._batch} but the latent has {batch}: give one embedding "
                "per image (or one for all); GuidedDenoiser must wrap ChunkedDenoiser, not be wrapped by it"
            )

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """eps ``[B, C, h, w]`` for ``x`` ``[B, C, h, w]`` at ``t`` ``[B]``; ``cond`` must be None (held here)."""
        if cond is not None:
            raise ValueError("GuidedDenoiser holds its own conditioning; run the plan with cond=None")
        batch = x.shape[0]
        self._check_batch(batch)
        if self.scale == 1.0:  # the conditional model, exactly; the unconditional branch is not run
            return self.inner(x, t, _for_batch(self.cond, batch))
        if self.scale == 0.0:  # the unconditional model, exactly
            return self.inner(x, t, _for_batch(self.uncond, batch))
        if self._stacked is None or self._stacked[0] != batch:
            # built once per batch size and reused by every step (a copy of both embeddings, not one per step)
            self._stacked = (batch, _stack(_for_batch(self.uncond, batch), _for_batch(self.cond, batch)))
        eps = self.inner(torch.cat([x, x]), torch.cat([t, t]), self._stacked[1]).to(x.dtype)
        eps_u, eps_c = eps.chunk(2)
        return eps_u + self.scale * (eps_c - eps_u)


@dataclass(frozen=True)
class Guidance:
    """One expert's guidance: its conditional and unconditional conditioning and the scale (see
    :class:`GuidedDenoiser`; checked when it wraps a denoiser)."""

    cond: Cond
    uncond: Cond | None
    scale: float

    def wrap(self, inner: Denoiser) -> GuidedDenoiser:
        return GuidedDenoiser(inner, self.cond, self.uncond, self.scale)


def guided_plan(plan: RefinePlan, guidance: Guidance | Sequence[Guidance | None]) -> RefinePlan:
    """A copy of ``plan`` whose every step runs its expert's denoiser wrapped with that expert's guidance.

    Args:
        plan: a built plan (its steps, routing and coefficients are kept; the coefficient tensors are shared).
        guidance: one :class:`Guidance` for every expert, or one per expert in the plan's expert order
            (``plan.expert_names``); None leaves that expert's steps unguided (an unconditional expert).

    Each expert's denoiser is wrapped once and shared by its steps.  Raises ValueError for a per-expert list of the
    wrong length, or conditioning :class:`GuidedDenoiser` refuses.
    """
    n_experts = len(plan.expert_names)
    if isinstance(guidance, Guidance):
        per_expert: Sequence[Guidance | None] = [guidance] * n_experts
    else:
        per_expert = list(guidance)
        if len(per_expert) != n_experts:
            raise ValueError(
                f"got guidance for {len(per_expert)} expert(s) but the plan has {n_experts} "
                f"({', '.join(plan.expert_names)}): give one Guidance (or None) per expert, or one for all"
            )
    wrapped: dict[int, Denoiser] = {}
    steps = []
    for expert, denoiser in zip(plan.experts, plan.denoisers):
        if expert not in wrapped:
            g = per_expert[expert]
            wrapped[expert] = denoiser if g is None else g.wrap(denoiser)
        steps.append(wrapped[expert])
    return dataclasses.replace(plan, denoisers=tuple(steps))
