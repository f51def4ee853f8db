"""Noise for samplers from explicit ``torch.Generator`` objects (never the global RNG), drawn on the generator's device
(CPU generators: bit-reproducible, device-RNG independent) and moved to the latent's."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Generators = torch.Generator | Sequence[torch.Generator] | None


def to_like(noise: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``noise`` on ``like``'s device and dtype; CPU to CUDA through pinned memory, non-blocking (from pageable memory
    the copy would wait for the device's queued work: a per-step host sync)."""
    if noise.device.type == "cpu" and like.device.type == "cuda":
        return noise.pin_memory().to(like.device, like.dtype, non_blocking=True)
    return noise.to(like.device, like.dtype)


def draw(fn: Callable[..., torch.Tensor], shape: tuple[int, ...], like: torch.Tensor, generator: Generators) -> torch.Tensor:
    """``fn(shape)`` (``torch.randn`` or ``torch.rand``) in float32 from ``generator``, moved to ``like``.

    ``generator`` may be a sequence of per-sample generators: row ``i`` of the batch (``shape[0]``) is drawn from
    ``generator[i]`` alone (so a sample's result does not depend on its batch); a batch of 1 draws from the first.
    None draws from ``like``'s device RNG.
    """
    if generator is None or isinstance(generator, torch.Generator):
        device = generator.device if generator is not None else like.device
        return to_like(fn(shape, generator=generator, device=device, dtype=torch.float32), like)
    gens = list(generator)
    if shape[0] != 1 and len(gens) != shape[0]:
        raise ValueError(f"{len(gens)} per-sample generators for a batch of {shape[0]}; pass one generator per sample")
    devices = {g.device for g in gens[: shape[0]]}
    rows = [fn((1, *shape[1:]), generator=g, device=g.device, dtype=torch.float32) for g in gens[: shape[0]]]
    if len(devices) == 1:
        return to_like(torch.cat(rows), like)
    return torch.cat([to_like(r, like) for r in rows])


def randn(shape: tuple[int, ...], like: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Standard normal noise ``shape`` like ``like`` from ``generator`` (see :func:`draw`)."""
    return draw(torch.randn, shape, like, generator)
