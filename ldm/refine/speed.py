"""Speed and memory options of refinement: memory-efficient attention, channels_last, ``torch.compile``, auto tiling.

:class:`~ldm.refine.Refiner` applies these to its experts; ``benchmarks/`` measures them.

Attention memory.  ``torch.nn.functional.scaled_dot_product_attention`` picks its memory-efficient (flash) kernel only
when the last dimension of ``q``, ``k`` and ``v`` is contiguous; otherwise it falls back to the math path, which keeps the
whole ``N x N`` score matrix (and its softmax).  The first stage's ``AttnBlock`` and the UNet's ``AttentionBlock`` build
``q, k, v`` by transposing ``[B, C, N]`` maps, so their last dimension has stride ``N``: a 1024x1024 image through the
VQ-f4 mid block (N = 65536 tokens) would need two 16 GiB matrices.  :func:`use_efficient_attention` makes those inputs
contiguous, inside the attention modules only, so the flash kernel serves them (measured in ``benchmarks/bench_memory.py``).
It becomes a no-op, and can be dropped, once those blocks pass contiguous ``q, k, v`` themselves.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from ldm.models.autoencoder import VQModelInterface
from ldm.models.tiling import TilingConfig
from ldm.modules.diffusionmodules.model import AttnBlock
from ldm.modules.diffusionmodules.openaimodel import AttentionBlock

logger = logging.getLogger(__name__)

ATTENTION_BLOCKS: tuple[type[nn.Module], ...] = (AttnBlock, AttentionBlock)

# Images with a side above 1024 px are encoded/decoded tile by tile (512 px tiles, 128 px overlap), which bounds the
# first stage's full-resolution activations (a 1024x1024 untiled VQ-f4 decode already holds 1 GiB maps of 256 channels).
AUTO_TILING = TilingConfig(min_side=1024, tile=512, overlap=128, stat_passes=2)


class _ContiguousAttentionInputs(TorchFunctionMode):
    """Makes ``q, k, v`` of ``scaled_dot_product_attention`` last-dim contiguous (so the flash kernel can serve them)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is F.scaled_dot_product_attention:
            qkv = tuple(a.contiguous() if isinstance(a, torch.Tensor) and a.stride(-1) != 1 else a for a in args[:3])
            args = qkv + tuple(args[3:])
        return func(*args, **(kwargs or {}))


def use_efficient_attention(module: nn.Module) -> list[RemovableHandle]:
    """Route the attention blocks (:data:`ATTENTION_BLOCKS`) of ``module`` to the memory-efficient SDPA kernel.

    Each block runs its forward with contiguous ``q, k, v`` (a function mode entered by a forward pre-hook and left by a
    forward hook that also runs on exceptions); nothing outside the blocks is touched, outputs are unchanged up to
    float rounding.  Blocks already routed are skipped (experts share one first stage).  Returns the hook handles.
    """
    handles: list[RemovableHandle] = []
    for block in module.modules():
        if not isinstance(block, ATTENTION_BLOCKS) or getattr(block, "_efficient_attention", False):
            continue
        mode = _ContiguousAttentionInputs()

        def enter(_module: nn.Module, _args: Any, mode: TorchFunctionMode = mode) -> None:
            mode.__enter__()

        def leave(_module: nn.Module, _args: Any, _out: Any, mode: TorchFunctionMode = mode) -> None:
            mode.__exit__(None, None, None)

        handles.append(block.register_forward_pre_hook(enter))
        handles.append(block.register_forward_hook(leave, always_call=True))
        block._efficient_attention = True
    return handles


def to_channels_last(modules: Iterable[nn.Module]) -> None:
    """Store the 4-D weights of ``modules`` in channels_last (NHWC) order; convolutions then run NHWC.

    Inputs need no conversion: a convolution with channels_last weights returns channels_last activations.  Results
    equal the default layout up to float rounding (other kernels).
    """
    for module in modules:
        module.to(memory_format=torch.channels_last)


def compile_unets(models: Iterable[Any], mode: str | None = None) -> None:
    """``torch.compile`` each model's UNet (``model.model.diffusion_model``) in place (state-dict keys unchanged).

    Compilation happens on the first call for each input shape (minutes for a large UNet); later calls of that shape
    run the compiled kernels.  ``mode`` is passed to ``torch.compile`` (None, ``"reduce-overhead"``, ``"max-autotune"``).
    """
    for model in models:
        model.model.diffusion_model.compile(mode=mode)


def resolve_tiling(tiling: TilingConfig | str | None, model: Any) -> TilingConfig | None:
    """The tiling a refiner uses: ``"auto"`` -> :data:`AUTO_TILING` for VQ first stages (others are never tiled),
    None -> no tiling, a :class:`TilingConfig` as given (the first stage must be a VQ and the geometry must fit its
    downsampling factor; ``ValueError`` otherwise)."""
    if tiling is None:
        return None
    if isinstance(tiling, str):
        if tiling != "auto":
            raise ValueError(f"tiling={tiling!r} must be 'auto', None or a TilingConfig")
        if not isinstance(model.first_stage_model, VQModelInterface):
            logger.debug("first stage %s is not a VQ: no tiling", type(model.first_stage_model).__name__)
            return None
        tiling = AUTO_TILING
    if not isinstance(tiling, TilingConfig):
        raise ValueError(f"tiling={tiling!r} must be 'auto', None or a TilingConfig")
    if not isinstance(model.first_stage_model, VQModelInterface):
        raise ValueError(
            f"tiled encode/decode needs a VQ first stage (VQModelInterface); this model has "
            f"{type(model.first_stage_model).__name__}: pass tiling=None"
        )
    tiling.check_factor(model.downsampling_factor)
    return tiling


def describe_tiling(tiling: TilingConfig | None) -> str:
    """``"off"`` or ``"512 px tiles, 128 px overlap, above 1024 px, 2 statistics passes"``."""
    if tiling is None or tiling.min_side is None:
        return "off"
    return (
        f"{tiling.tile} px tiles, {tiling.overlap} px overlap, above {tiling.min_side} px, "
        f"{tiling.stat_passes} statistics passes"
    )
