"""Chained window experts: which expert serves each sampling step (by ``model.window()``: ``[t_min, t_max)``, or
``[0, T)`` for a full-range model), and whether experts can be chained at all."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ldm.sampling.denoisers import ModelDenoiser
from ldm.windows import Window, assign_windows, describe_window, format_timesteps, validate_window, window_to_steps

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointInfo:
    """What a refinement used from one checkpoint (written into output metadata); ``config_source`` is
    ``"checkpoint"`` or the YAML path the model was built from."""

    path: str
    sha256: str
    window: tuple[int, int]
    target: str
    global_step: int | None
    ema: bool
    config_source: str

    def as_dict(self, num_timesteps: int = 1000) -> dict[str, Any]:
        """JSON-ready description, with the window also as sampling steps."""
        a, b = window_to_steps(*self.window, num_timesteps)
        return {
            "path": self.path,
            "sha256": self.sha256,
            "window": list(self.window),
            "steps": f"{a}-{b}",
            "target": self.target,
            "global_step": self.global_step,
            "ema": self.ema,
            "config": self.config_source,
        }


@dataclass(frozen=True)
class Expert:
    """A diffusion model, the timestep window ``[t_min, t_max)`` it serves (its ``window()``), and a name."""

    model: Any
    window: Window
    name: str

    @classmethod
    def from_model(cls, model: Any, name: str | None = None) -> Expert:
        """Wrap a LatentDiffusion (or subclass); its window is ``model.window()``, validated."""
        window = validate_window(*model.window(), int(model.num_timesteps))
        return cls(model, window, name or type(model).__name__)

    def describe(self, num_timesteps: int) -> str:
        """``"[250, 500) = steps 500-750 (name)"``."""
        return describe_window(self.window, num_timesteps, self.name)


def check_compatible(experts: Sequence[Expert]) -> None:
    """Raise ``ValueError``, naming the experts and what differs, unless all share the noise schedule, the latent
    scale and the first-stage weights."""
    ref = experts[0]
    ref_acp = ref.model.alphas_cumprod.detach().to("cpu", torch.float64)
    ref_scale = float(ref.model.scale_factor)
    ref_fs = {k: v.detach().cpu() for k, v in ref.model.first_stage_model.state_dict().items()}
    for other in experts[1:]:
        acp = other.model.alphas_cumprod.detach().to("cpu", torch.float64)
        if acp.shape != ref_acp.shape or not torch.allclose(acp, ref_acp, rtol=1e-6, atol=1e-9):
            detail = (
                f"T={acp.shape[0]} vs T={ref_acp.shape[0]}"
                if acp.shape != ref_acp.shape
                else f"max |difference| {float((acp - ref_acp).abs().max()):.3g} at t={int((acp - ref_acp).abs().argmax())}"
            )
            raise ValueError(
                f"experts {other.name!r} and {ref.name!r} use different noise schedules (alphas_cumprod: {detail}); "
                "chained experts must be trained with the same timesteps, beta_schedule, linear_start and linear_end"
            )
        scale = float(other.model.scale_factor)
        if scale != ref_scale:
            raise ValueError(
                f"experts {other.name!r} and {ref.name!r} scale latents differently (scale_factor {scale:.6g} vs "
                f"{ref_scale:.6g}); their latent spaces do not match"
            )
        if other.model.first_stage_model is ref.model.first_stage_model:
            continue
        fs = {k: v.detach().cpu() for k, v in other.model.first_stage_model.state_dict().items()}
        # keys in only one of the two, then those whose tensors differ in shape or value
        bad = sorted(set(fs) ^ set(ref_fs))
        bad += [k for k in fs if k in ref_fs and (fs[k].shape != ref_fs[k].shape or not torch.equal(fs[k], ref_fs[k]))]
        if bad:
            raise ValueError(
                f"experts {other.name!r} and {ref.name!r} have different first stages: {len(bad)} of "
                f"{len(ref_fs)} tensors differ (first: {', '.join(bad[:5])}). Chained experts must share one "
                "autoencoder: train them from the same first-stage checkpoint (first_stage_config.params.ckpt_path)"
            )


class ExpertRouter:
    """Sends each step to the expert whose window holds its timestep (``experts``: :class:`Expert` objects or models).

    Samplers ask :meth:`assign` once per refinement and call each step's expert directly; the router is also a
    denoiser itself (:meth:`__call__`), for latent-diffusion's ``DDIMSampler``.
    """

    def __init__(self, experts: Sequence[Expert | Any], allow_outside_window: bool = False):
        wrapped = [e if isinstance(e, Expert) else Expert.from_model(e, name=f"expert {i}") for i, e in enumerate(experts)]
        if not wrapped:
            raise ValueError("ExpertRouter needs at least one expert")
        check_compatible(wrapped)
        self.experts: tuple[Expert, ...] = tuple(wrapped)
        self.allow_outside_window = bool(allow_outside_window)
        self.num_timesteps = int(wrapped[0].model.num_timesteps)
        self.denoisers = tuple(ModelDenoiser(e.model) for e in wrapped)
        self._warned: set[int] = set()  # uncovered timesteps already reported (warn once per timestep)

    def describe_windows(self) -> str:
        return "; ".join(e.describe(self.num_timesteps) for e in self.experts)

    def assign(self, timesteps: Sequence[int], what: str | None = None) -> list[int]:
        """Index of the expert serving each timestep of ``timesteps`` (in order); ``what`` names the run in messages.

        Raises ``ValueError`` for timesteps covered by several windows, and for timesteps no window covers unless
        ``allow_outside_window`` (then the nearest expert serves them, with one warning per timestep).
        """
        ts = [int(t) for t in timesteps]
        what = what or f"the DDIM grid ({len(ts)} steps, t={max(ts)} down to {min(ts)})"
        windows = [e.window for e in self.experts]
        names = [e.name for e in self.experts]
        choice, gaps = assign_windows(windows, ts, self.num_timesteps, names, self.allow_outside_window, what)
        new_gaps = sorted({t for t in gaps if t not in self._warned}, reverse=True)
        if new_gaps:
            self._warned.update(new_gaps)
            used = sorted({choice[ts.index(t)] for t in new_gaps})
            logger.warning(
                "allow_outside_window: %s outside every expert window (%s) run by the nearest expert (%s)",
                format_timesteps(new_gaps, self.num_timesteps),
                self.describe_windows(),
                ", ".join(self.experts[i].name for i in used),
            )
        return choice

    def check_timesteps(self, timesteps: Sequence[int]) -> None:
        """Raise before any work if some timestep cannot be served (see :meth:`assign`)."""
        self.assign(timesteps)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """eps for ``x`` ``[B, C, H, W]`` at timesteps ``t`` ``[B]`` (read back to the host to route), each sample by its
        expert; a batch may mix timesteps of several experts (``cond``: None or a tensor indexed along the batch)."""
        values = [int(v) for v in t.tolist()]
        experts = self.assign(values)
        if len(set(experts)) == 1:
            return self.denoisers[experts[0]](x, t, cond)
        if cond is not None and not isinstance(cond, torch.Tensor):
            raise ValueError("a batch mixing timesteps of several experts supports cond=None or a tensor only")
        out = torch.empty_like(x)
        which = torch.tensor(experts, device=x.device)
        for i in sorted(set(experts)):
            sel = which == i
            out[sel] = self.denoisers[i](x[sel], t[sel], None if cond is None else cond[sel]).to(out.dtype)
        return out
