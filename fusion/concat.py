"""Late-fusion baseline: masked mean of each modality's tokens, concatenated with presence flags."""
from __future__ import annotations

import torch
import torch.nn as nn

from encoders.base import Tokens
from multimodal.config import FusionConfig

from .base import FUSION_HEADS, drop_modalities


@FUSION_HEADS.register("concat")
class ConcatFusion(nn.Module):
    def __init__(self, input_dims: dict[str, int], num_outputs: int, dim: int = 64, dropout: float = 0.1,
                 modality_dropout: float = 0.0, **_ignored):
        super().__init__()
        self.modalities = list(input_dims)
        self.proj = nn.ModuleDict({m: nn.Sequential(nn.Linear(d, dim), nn.GELU()) for m, d in input_dims.items()})
        n = len(input_dims)
        self.head = nn.Sequential(nn.LayerNorm(n * dim + n), nn.Dropout(dropout), nn.Linear(n * dim + n, dim),
                                  nn.GELU(), nn.Linear(dim, num_outputs))
        self.modality_dropout = modality_dropout

    @classmethod
    def from_config(cls, fc: FusionConfig, input_dims: dict[str, int], num_outputs: int, layouts=None):
        """From the `fusion` section, over encoders of `input_dims` ({modality: output_dim}). Tokens are
        pooled here, so where each came from (`layouts`) plays no part."""
        return cls(input_dims, num_outputs, dim=fc.dim, dropout=fc.dropout, modality_dropout=fc.modality_dropout)

    def forward(self, tokens: dict[str, Tokens], return_attention: bool = False) -> torch.Tensor:
        if self.training:
            tokens = drop_modalities(tokens, self.modality_dropout)
        parts, flags = [], []
        for m in self.modalities:
            t = tokens[m]
            parts.append(self.proj[m](t.mean()) * t.present[:, None])  # absent → exact zeros
            flags.append(t.present[:, None].to(t.x.dtype))
        return self.head(torch.cat(parts + flags, 1))
