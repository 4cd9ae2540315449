"""Tabular encoder: one token per feature, so fusion and attributions work feature by feature."""
from __future__ import annotations

import torch
import torch.nn as nn

from multimodal.config import TabularConfig
from multimodal.data.batches import TABULAR_KEYS

from .base import ENCODERS, Tokens


@ENCODERS.register("tabular")
class TabularEncoder(nn.Module):
    """Numeric token = value * w_f + b_f (+ a learned 'missing' vector when absent);
    categorical token = embedding row (row 0 = missing/unknown); both plus a feature-identity vector.
    The modality counts as absent for a patient only when every feature is missing."""

    modality = "tabular"
    input_keys = TABULAR_KEYS.inputs

    def __init__(self, n_numeric: int, cardinalities: list[int], dim: int = 32):
        super().__init__()
        self.num_weight = nn.Parameter(torch.randn(n_numeric, dim) * 0.1)
        self.num_bias = nn.Parameter(torch.zeros(n_numeric, dim))
        self.num_missing = nn.Parameter(torch.randn(n_numeric, dim) * 0.1)
        self.cat_embeddings = nn.ModuleList(nn.Embedding(c, dim) for c in cardinalities)
        self.feature_embed = nn.Parameter(torch.randn(n_numeric + len(cardinalities), dim) * 0.1)
        self.output_dim = dim
        # Hook point (no parameters): its output is the [B, F, dim] feature-token tensor, for Layer IG.
        self.tokens = nn.Identity()

    @classmethod
    def from_config(cls, tc: TabularConfig, prep, stored=None, offline: bool = False):
        """From the `tabular` section and the fitted TabularPreprocessor (which features, how many categories)."""
        return cls(n_numeric=len(prep.numeric), cardinalities=prep.cardinalities, dim=tc.embed_dim)

    def forward(self, num: torch.Tensor, num_missing: torch.Tensor, cat: torch.Tensor) -> Tokens:
        parts = [num[..., None] * self.num_weight + self.num_bias + num_missing[..., None] * self.num_missing]
        if len(self.cat_embeddings):
            parts.append(torch.stack([emb(cat[:, j]) for j, emb in enumerate(self.cat_embeddings)], 1))
        x = self.tokens(torch.cat(parts, 1) + self.feature_embed)
        present = (num_missing < 0.5).any(1) | (cat > 0).any(1)
        return Tokens(x, present[:, None].expand(-1, x.shape[1]))
