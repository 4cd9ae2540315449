"""Attention fusion: a transformer over [CLS] + all modality tokens, with modality-type embeddings
and key-padding masks, so absent modalities and padded tokens are never attended to."""
from __future__ import annotations

import torch
import torch.nn as nn

from encoders.base import Tokens
from multimodal.config import FusionConfig

from .base import FUSION_HEADS, drop_modalities


class Block(nn.Module):
    """Pre-norm transformer block that can return its attention map (nn.TransformerEncoderLayer can't)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, pad_mask, need_weights=False):
        h = self.norm1(x)
        a, w = self.attn(h, h, h, key_padding_mask=pad_mask, need_weights=need_weights)
        x = x + self.drop(a)
        return x + self.drop(self.mlp(self.norm2(x))), w


@FUSION_HEADS.register("attention")
class AttentionFusion(nn.Module):
    def __init__(self, input_dims: dict[str, int], num_outputs: int, dim: int = 64, layers: int = 2,
                 heads: int = 4, dropout: float = 0.1, modality_dropout: float = 0.0):
        super().__init__()
        self.modalities = list(input_dims)
        self.proj = nn.ModuleDict({m: nn.Sequential(nn.Linear(d, dim), nn.LayerNorm(dim)) for m, d in input_dims.items()})
        self.type_embed = nn.Parameter(torch.randn(len(input_dims), dim) * 0.02)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_outputs)
        self.modality_dropout = modality_dropout
        self.last_attention: dict[str, torch.Tensor] | None = None

    @classmethod
    def from_config(cls, fc: FusionConfig, input_dims: dict[str, int], num_outputs: int):
        """From the `fusion` section, over encoders of `input_dims` ({modality: output_dim})."""
        return cls(input_dims, num_outputs, dim=fc.dim, layers=fc.layers, heads=fc.heads, dropout=fc.dropout,
                   modality_dropout=fc.modality_dropout)

    def forward(self, tokens: dict[str, Tokens], return_attention: bool = False) -> torch.Tensor:
        if self.training:
            tokens = drop_modalities(tokens, self.modality_dropout)
        B = next(iter(tokens.values())).x.shape[0]
        xs, masks, sizes = [self.cls.expand(B, -1, -1)], [], []
        for i, m in enumerate(self.modalities):
            t = tokens[m]
            xs.append(self.proj[m](t.x) + self.type_embed[i])
            masks.append(t.mask)
            sizes.append(t.x.shape[1])
        x = torch.cat(xs, 1)
        pad = ~torch.cat([torch.ones(B, 1, dtype=torch.bool, device=x.device)] + masks, 1)
        w = None
        for k, blk in enumerate(self.blocks):
            x, w = blk(x, pad, need_weights=return_attention and k == len(self.blocks) - 1)
        if return_attention:  # CLS → token attention of the last block, split per modality
            self.last_attention = dict(zip(self.modalities, w[:, 0, 1:].split(sizes, dim=1)))
        return self.head(self.norm(x[:, 0]))
