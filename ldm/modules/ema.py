"""Exponential moving average of model parameters with latent-diffusion's ``LitEma`` buffers: ``decay``, ``num_updates``
(-1 disables the warm-up) and one per trainable parameter, named as the parameter with every ``.`` removed."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


class LitEma(nn.Module):
    """EMA shadow of ``model``'s trainable parameters: ``shadow -= (1 - decay) * (shadow - param)``; with
    ``use_num_upates`` (CompVis spelling) the decay warms up as ``min(decay, (1 + n) / (10 + n))``."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, use_num_upates: bool = True):
        super().__init__()
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:  # NaN too
            raise ValueError(f"EMA decay={decay!r} must be a number in [0, 1]")
        self.m_name2s_name: dict[str, str] = {}
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0 if use_num_upates else -1, dtype=torch.int))
        for name, p in model.named_parameters():
            if p.requires_grad:
                s_name = name.replace(".", "")
                self.m_name2s_name[name] = s_name
                self.register_buffer(s_name, p.detach().clone())
        self.collected_params: list[torch.Tensor] = []
        # host copies of (decay, num_updates), so that an update reads nothing back from the device; valid while both
        # buffers are the same tensors at the same version (load_state_dict, copy_, fill_, .to() all change that)
        self._host_state: tuple[float, int] | None = None
        self._host_key: tuple[int, int, int, int] | None = None

    def _buffers_key(self) -> tuple[int, int, int, int]:
        return (id(self.decay), self.decay._version, id(self.num_updates), self.num_updates._version)

    @torch.no_grad()
    def forward(self, model: nn.Module) -> None:
        """One EMA update from ``model``'s parameters, as one multi-tensor ``lerp`` (no device-to-host reads)."""
        if self._host_state is None or self._host_key != self._buffers_key():
            self._host_state = (float(self.decay), int(self.num_updates))
        decay, n = self._host_state
        if n >= 0:
            n += 1
            self.num_updates.fill_(n)
            self._host_state = (decay, n)
            decay = min(decay, (1 + n) / (10 + n))
        self._host_key = self._buffers_key()
        pairs = self._shadows_and_params(model)
        for buf, param in pairs:
            if buf.dtype != param.dtype:
                buf.data = buf.data.to(param.dtype)
        if pairs:
            torch._foreach_lerp_([buf for buf, _ in pairs], [param.detach() for _, param in pairs], 1.0 - decay)

    def _shadows_and_params(self, model: nn.Module) -> list[tuple[torch.Tensor, nn.Parameter]]:
        shadow = dict(self.named_buffers())
        return [(shadow[self.m_name2s_name[k]], p) for k, p in model.named_parameters() if p.requires_grad]

    @torch.no_grad()
    def reset_to(self, model: nn.Module) -> None:
        """Set every shadow to ``model``'s current parameter (``decay`` and ``num_updates`` are kept)."""
        for buf, param in self._shadows_and_params(model):
            buf.copy_(param.detach())

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the EMA weights into ``model``'s parameters."""
        for buf, param in self._shadows_and_params(model):
            param.data.copy_(buf.data)

    def store(self, parameters: Iterable[torch.Tensor]) -> None:
        """Save copies of ``parameters`` so that :meth:`restore` can put them back."""
        self.collected_params = [p.detach().clone() for p in parameters]

    def restore(self, parameters: Iterable[torch.Tensor]) -> None:
        """Restore the parameters saved by :meth:`store` (exactly, bit for bit)."""
        for c_param, param in zip(self.collected_params, parameters, strict=True):
            param.data.copy_(c_param.data)
        self.collected_params = []
