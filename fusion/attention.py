"""Attention fusion: a transformer over [CLS] + all modality tokens, with modality-type embeddings
and key-padding masks, so absent modalities and padded tokens are never attended to.

Attention alone sees a bag: an image token would not say which of a patient's images it comes from
(a clinical or a dermoscopic photograph, a PA or a lateral view) nor where in the image. For an
encoder whose tokens are views x grid cells (its `token_layout`), each token also gets a learned
view embedding (its image's place in the record's listed images) and a cell embedding (its place in
the grid), both starting at zero so a pretrained start is unchanged (fusion.token_positions)."""
from __future__ import annotations

from typing import Optional

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
                 heads: int = 4, dropout: float = 0.1, modality_dropout: float = 0.0,
                 layouts: Optional[dict[str, tuple[int, int]]] = None):
        """`layouts`: {modality: (views, cells per view)} for modalities whose tokens get view and cell
        embeddings."""
        super().__init__()
        self.modalities = list(input_dims)
        self.proj = nn.ModuleDict({m: nn.Sequential(nn.Linear(d, dim), nn.LayerNorm(dim)) for m, d in input_dims.items()})
        self.type_embed = nn.Parameter(torch.randn(len(input_dims), dim) * 0.02)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.layouts = {m: tuple(v) for m, v in (layouts or {}).items()}
        self.view_embed = nn.ParameterDict({m: nn.Parameter(torch.zeros(v, dim)) for m, (v, _) in self.layouts.items()})
        self.cell_embed = nn.ParameterDict({m: nn.Parameter(torch.zeros(c, dim)) for m, (_, c) in self.layouts.items()})
        self.blocks = nn.ModuleList(Block(dim, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_outputs)
        self.modality_dropout = modality_dropout
        self.last_attention: dict[str, torch.Tensor] | None = None

    @classmethod
    def from_config(cls, fc: FusionConfig, input_dims: dict[str, int], num_outputs: int,
                    layouts: Optional[dict[str, tuple[int, int]]] = None):
        """From the `fusion` section, over encoders of `input_dims` ({modality: output_dim}); `layouts`:
        the encoders' token layouts, used where fusion.token_positions is on."""
        return cls(input_dims, num_outputs, dim=fc.dim, layers=fc.layers, heads=fc.heads, dropout=fc.dropout,
                   modality_dropout=fc.modality_dropout, layouts=layouts if fc.token_positions else None)

    def _places(self, m: str, n: int, device) -> torch.Tensor:
        """[n, dim]: the view and cell embeddings of a modality's first n tokens (views in order, each
        its cells in order); views past the layout's last share its embedding."""
        views, cells = self.layouts[m]
        i = torch.arange(n, device=device)
        return self.view_embed[m][torch.div(i, cells, rounding_mode="floor").clamp(max=views - 1)] + \
            self.cell_embed[m][i % cells]

    def forward(self, tokens: dict[str, Tokens], return_attention: bool = False) -> torch.Tensor:
        if self.training:
            tokens = drop_modalities(tokens, self.modality_dropout)
        B = next(iter(tokens.values())).x.shape[0]
        xs, masks, sizes = [self.cls.expand(B, -1, -1)], [], []
        for i, m in enumerate(self.modalities):
            t = tokens[m]
            x = self.proj[m](t.x) + self.type_embed[i]
            xs.append(x + self._places(m, x.shape[1], x.device) if m in self.layouts else x)
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
