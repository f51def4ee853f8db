"""latent-diffusion's transformer encoder (its trimmed copy of lucidrains' x-transformers), the body of ``BERTEmbedder``:
only what its text encoders use, with its class names, arguments and module tree, so txt2img-f8's
``cond_stage_model.transformer.*`` weights load unchanged.  The attention width is ``heads * dim_head`` whatever ``dim``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_DIM_HEAD = 64


class AbsolutePositionalEmbedding(nn.Module):
    """Learned position embedding: ``x`` ``[B, N, ...]`` -> ``[1, N, dim]`` for positions ``0..N-1``."""

    def __init__(self, dim: int, max_seq_len: int):
        super().__init__()
        self.emb = nn.Embedding(max_seq_len, dim)
        nn.init.normal_(self.emb.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.emb(torch.arange(x.shape[1], device=x.device))[None]


class Residual(nn.Module):
    """``x + residual``: latent-diffusion's block layout ``[norm, block, Residual]``."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return x + residual


class FeedForward(nn.Module):
    """``Linear(dim, mult*dim) -> GELU -> Dropout -> Linear(mult*dim, dim_out)`` on ``[B, N, dim]``."""

    def __init__(self, dim: int, dim_out: int | None = None, mult: float = 4, glu: bool = False, dropout: float = 0.0):
        super().__init__()
        if glu:
            raise ValueError("ff_glu=True is not supported (latent-diffusion's text encoders do not use it)")
        inner_dim = int(dim * mult)
        self.net = nn.Sequential(
            nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU()),
            nn.Dropout(dropout),
            nn.Linear(inner_dim, dim_out if dim_out is not None else dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Attention(nn.Module):
    """Multi-head self-attention ``[B, N, dim] -> [B, N, dim]`` (bias-free q/k/v, biased output projection)."""

    def __init__(self, dim: int, dim_head: int = DEFAULT_DIM_HEAD, heads: int = 8, causal: bool = False, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.causal = causal
        self.dropout = dropout
        inner_dim = dim_head * heads
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_k = nn.Linear(dim, inner_dim, bias=False)
        self.to_v = nn.Linear(dim, inner_dim, bias=False)
        self.to_out = nn.Linear(inner_dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``[B, N, dim]``; ``mask`` ``[B, N]`` bool, True = a real token (padding keys are not attended to)."""
        b, n, _ = x.shape
        q, k, v = (proj(x).view(b, n, self.heads, -1).transpose(1, 2) for proj in (self.to_q, self.to_k, self.to_v))
        # x-transformers masks query rows too, but a fully masked row would be NaN under SDPA; the rows of padding
        # queries are discarded by callers that pass a mask, so masking keys alone gives the same real-token output
        attn_mask = None if mask is None else mask[:, None, None, :].to(torch.bool)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            is_causal=self.causal and mask is None,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class AttentionLayers(nn.Module):
    """``depth`` blocks of (norm, self-attention, residual) then (norm, feed-forward, residual): ``[B, N, dim]``.
    ``attn_*`` and ``ff_*`` are x-transformers' prefixed options, spelled out."""

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int = 8,
        causal: bool = False,
        pre_norm: bool = True,
        attn_dim_head: int = DEFAULT_DIM_HEAD,
        attn_dropout: float = 0.0,
        ff_mult: float = 4,
        ff_glu: bool = False,
        ff_dropout: float = 0.0,
    ):
        super().__init__()
        if dim < 1 or depth < 1 or heads < 1 or attn_dim_head < 1:
            raise ValueError(f"dim, depth, heads and attn_dim_head must be >= 1; got {dim}, {depth}, {heads}, {attn_dim_head}")
        self.dim = dim
        self.depth = depth
        self.pre_norm = pre_norm
        self.layer_types = ("a", "f") * depth
        self.layers = nn.ModuleList()
        for layer_type in self.layer_types:
            if layer_type == "a":
                block: nn.Module = Attention(dim, dim_head=attn_dim_head, heads=heads, causal=causal, dropout=attn_dropout)
            else:
                block = FeedForward(dim, mult=ff_mult, glu=ff_glu, dropout=ff_dropout)
            self.layers.append(nn.ModuleList([nn.LayerNorm(dim), block, Residual()]))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``[B, N, dim]`` -> ``[B, N, dim]``; ``mask`` ``[B, N]`` bool (True = real token) or None."""
        last = len(self.layers) - 1
        for i, (layer_type, (norm, block, residual_fn)) in enumerate(zip(self.layer_types, self.layers)):
            residual = x
            if self.pre_norm:
                x = norm(x)
            out = block(x, mask=mask) if layer_type == "a" else block(x)
            x = residual_fn(out, residual)
            if not self.pre_norm and i != last:
                x = norm(x)
        return x


class Encoder(AttentionLayers):
    """Bidirectional ``AttentionLayers`` (latent-diffusion's text encoder body)."""

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int = 8,
        pre_norm: bool = True,
        attn_dim_head: int = DEFAULT_DIM_HEAD,
        attn_dropout: float = 0.0,
        ff_mult: float = 4,
        ff_glu: bool = False,
        ff_dropout: float = 0.0,
    ):
        super().__init__(dim, depth, heads, False, pre_norm, attn_dim_head, attn_dropout, ff_mult, ff_glu, ff_dropout)


class TransformerWrapper(nn.Module):
    """Token ids ``[B, N]`` (long) -> logits ``[B, N, num_tokens]``, or embeddings ``[B, N, dim]``.  ``emb_dim``: the
    token embedding width, projected to ``dim`` when different."""

    def __init__(
        self,
        *,
        num_tokens: int,
        max_seq_len: int,
        attn_layers: AttentionLayers,
        emb_dim: int | None = None,
        emb_dropout: float = 0.0,
        use_pos_emb: bool = True,
    ):
        super().__init__()
        dim = attn_layers.dim
        emb_dim = dim if emb_dim is None else emb_dim
        self.max_seq_len = max_seq_len
        self.num_tokens = num_tokens
        self.token_emb = nn.Embedding(num_tokens, emb_dim)
        nn.init.normal_(self.token_emb.weight, std=0.02)
        self.pos_emb = AbsolutePositionalEmbedding(emb_dim, max_seq_len) if use_pos_emb else None
        self.emb_dropout = nn.Dropout(emb_dropout)
        self.project_emb = nn.Linear(emb_dim, dim) if emb_dim != dim else nn.Identity()
        self.attn_layers = attn_layers
        self.norm = nn.LayerNorm(dim)
        # kept although embeddings never use it: latent-diffusion's checkpoints hold to_logits.* and load strict
        self.to_logits = nn.Linear(dim, num_tokens)

    def forward(self, x: torch.Tensor, return_embeddings: bool = False, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``[B, N]`` token ids in ``[0, num_tokens)`` (checked by the embedders); ``mask`` ``[B, N]`` bool (True =
        real token) or None."""
        if x.shape[1] > self.max_seq_len:
            raise ValueError(f"{x.shape[1]} tokens exceed max_seq_len={self.max_seq_len}")
        h = self.token_emb(x)
        if self.pos_emb is not None:
            h = h + self.pos_emb(h)
        h = self.project_emb(self.emb_dropout(h))
        h = self.norm(self.attn_layers(h, mask=mask))
        return h if return_embeddings else self.to_logits(h)
