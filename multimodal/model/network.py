"""The assembled model: one encoder per modality → fusion head → logits (calibrated: z / T + b)."""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn as nn

from encoders.base import Tokens


class DiagnosisNet(nn.Module):
    def __init__(self, encoders: dict[str, nn.Module], fusion: nn.Module, num_outputs: int,
                 aux_heads: bool = False):
        super().__init__()
        self.num_outputs = num_outputs
        self.encoders = nn.ModuleDict(encoders)
        self.fusion = fusion
        # Training-only: each modality predicts the label from its own pooled tokens (see fusion.aux_weight).
        self.aux_heads = nn.ModuleDict({m: nn.Linear(e.output_dim, num_outputs) for m, e in encoders.items()}) \
            if aux_heads else None
        # Calibration (temperature scaling) is part of the model, so predict applies it everywhere.
        self.register_buffer("temperature", torch.ones(1))
        self.register_buffer("logit_bias", torch.zeros(num_outputs))

    @property
    def modalities(self) -> list[str]:
        return list(self.encoders)

    def encode(self, batch: dict) -> dict[str, Tokens]:
        return {m: enc(**{k: batch[k] for k in enc.input_keys if k in batch}) for m, enc in self.encoders.items()}

    def forward(self, batch: dict, absent: Optional[Iterable[str]] = None, return_attention: bool = False,
                return_aux: bool = False):
        """`absent`: modalities to treat as missing for every patient (ablation), via the mask path.
        `return_aux`: also return {modality: (logits from that modality alone, present mask)}."""
        tokens = self.encode(batch)
        for m in absent or ():
            t = tokens[m]
            tokens[m] = Tokens(t.x, torch.zeros_like(t.mask))
        logits = self.fusion(tokens, return_attention=return_attention) / self.temperature + self.logit_bias
        if not return_aux:
            return logits
        aux = {m: (head(tokens[m].mean()), tokens[m].present) for m, head in (self.aux_heads or {}).items()}
        return logits, aux
