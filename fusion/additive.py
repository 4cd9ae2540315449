"""Additive fusion: each modality's own logit from its pooled tokens, summed over the modalities a
patient has. No interaction between modalities, so it cannot overfit one: on a few thousand patients
with weak signals in each source, the mean of per-modality models is hard to beat, and this is the
jointly trained form of it."""
from __future__ import annotations

import torch
import torch.nn as nn

from encoders.base import Tokens
from multimodal.config import FusionConfig

from .base import FUSION_HEADS, drop_modalities


@FUSION_HEADS.register("additive")
class AdditiveFusion(nn.Module):
    def __init__(self, input_dims: dict[str, int], num_outputs: int, dim: int = 64, dropout: float = 0.1,
                 modality_dropout: float = 0.0, **_ignored):
        super().__init__()
        self.modalities = list(input_dims)
        self.heads = nn.ModuleDict({m: nn.Sequential(nn.Linear(d, dim), nn.LayerNorm(dim), nn.GELU(),
                                                     nn.Dropout(dropout), nn.Linear(dim, num_outputs))
                                    for m, d in input_dims.items()})
        self.bias = nn.Parameter(torch.zeros(num_outputs))
        self.modality_dropout = modality_dropout

    @classmethod
    def from_config(cls, fc: FusionConfig, input_dims: dict[str, int], num_outputs: int, layouts=None):
        """From the `fusion` section, over encoders of `input_dims` ({modality: output_dim}). Tokens are
        pooled here, so where each came from (`layouts`) plays no part."""
        return cls(input_dims, num_outputs, dim=fc.dim, dropout=fc.dropout, modality_dropout=fc.modality_dropout)

    def forward(self, tokens: dict[str, Tokens], return_attention: bool = False) -> torch.Tensor:
        if self.training:
            tokens = drop_modalities(tokens, self.modality_dropout)
        z = self.bias
        for m in self.modalities:
            t = tokens[m]
            z = z + self.heads[m](t.mean()) * t.present[:, None]  # absent → adds nothing
        return z
