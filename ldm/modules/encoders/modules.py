"""Conditioning encoders (the ``cond_stage_config`` targets of LatentDiffusion)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn


class ClassEmbedder(nn.Module):
    """Class labels ``batch[key]`` ``[B]`` (long) -> embeddings ``[B, 1, embed_dim]`` (cross-attention context).

    Use with ``cond_stage_key: class_label`` (the whole batch is passed) and ``conditioning_key: crossattn``.
    """

    def __init__(self, embed_dim: int, n_classes: int = 1000, key: str = "class"):
        super().__init__()
        self.key = key
        self.n_classes = n_classes
        self.embedding = nn.Embedding(n_classes, embed_dim)

    def forward(self, batch: Mapping[str, Any], key: str | None = None) -> torch.Tensor:
        labels = torch.as_tensor(batch[key or self.key], device=self.embedding.weight.device).long()
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.n_classes):
            raise ValueError(f"class labels must be in [0, {self.n_classes}); got {labels.min()}..{labels.max()}")
        return self.embedding(labels)[:, None]


class ClassLabels(nn.Module):
    """Class labels ``batch[key]`` ``[B]`` as a long tensor, for ``conditioning_key: adm`` (UNet ``num_classes``)."""

    def __init__(self, n_classes: int, key: str = "class"):
        super().__init__()
        self.key = key
        self.n_classes = n_classes
        # follows .to(device), so that the labels land where the UNet's label embedding is (no state-dict key)
        self.register_buffer("device_anchor", torch.empty(0), persistent=False)

    def forward(self, batch: Mapping[str, Any]) -> torch.Tensor:
        labels = torch.as_tensor(batch[self.key], device=self.device_anchor.device).long()
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.n_classes):
            raise ValueError(f"class labels must be in [0, {self.n_classes}); got {labels.min()}..{labels.max()}")
        return labels
