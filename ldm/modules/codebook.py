"""Dead-code restarts for a VQ codebook (Jukebox's "random restarts"): a code no encoder output chose for a whole
window gets no gradient and never comes back, so it restarts at a (slightly noised) encoder output of the batch."""

from __future__ import annotations

import torch

RESTART_NOISE = 0.01  # of the candidates' per-dimension standard deviation


def restart_dead_codes(
    codebook: torch.Tensor,
    usage: torch.Tensor,
    candidates: torch.Tensor,
    generator: torch.Generator | None = None,
    noise: float = RESTART_NOISE,
) -> torch.Tensor:
    """Overwrite, in place, every code of ``codebook`` ``[K, D]`` whose ``usage`` ``[K]`` count is 0 with a random row of
    ``candidates`` ``[N, D]`` (pre-quantization latents) plus Gaussian ``noise`` in units of the candidates'
    per-dimension standard deviation; ``generator`` draws the picks and the noise (None: torch's global generator).
    Returns the restarted indices ``[M]`` (long; empty without dead codes or candidates).
    """
    dead = (usage == 0).nonzero().flatten()
    if dead.numel() == 0 or candidates.shape[0] == 0:
        return dead[:0]
    candidates = candidates.detach().to(device=codebook.device, dtype=torch.float32)
    draw_device = generator.device if generator is not None else torch.device("cpu")
    pick = torch.randint(candidates.shape[0], (dead.numel(),), generator=generator, device=draw_device)
    picked = candidates[pick.to(candidates.device)]
    if noise > 0 and candidates.shape[0] > 1:
        jitter = torch.randn(picked.shape, generator=generator, device=draw_device).to(picked.device)
        picked = picked + noise * candidates.std(dim=0) * jitter
    with torch.no_grad():
        codebook[dead] = picked.to(codebook.dtype)
    return dead
