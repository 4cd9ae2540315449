"""The assembled model: one encoder per modality → fusion head → logits (temperature-scaled)."""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn as nn

from encoders.base import Tokens


class DiagnosisNet(nn.Module):
    def __init__(self, encoders: dict[str, nn.Module], fusion: nn.Module, num_outputs: int):
        super().__init__()
        self.num_outputs = num_outputs
        self.encoders = nn.ModuleDict(encoders)
        self.fusion = fusion
        # Calibration (temperature scaling) is part of the model, so predict applies it everywhere.
        self.register_buffer("temperature", torch.ones(1))

    @property
    def modalities(self) -> list[str]:
        return list(self.encoders)

    def encode(self, batch: dict) -> dict[str, Tokens]:
        return {m: enc(*[batch[k] for k in enc.input_keys]) for m, enc in self.encoders.items()}

    def forward(self, batch: dict, absent: Optional[Iterable[str]] = None, return_attention: bool = False) -> torch.Tensor:
        """`absent`: modalities to treat as missing for every patient (ablation), via the mask path."""
        tokens = self.encode(batch)
        for m in absent or ():
            t = tokens[m]
            tokens[m] = Tokens(t.x, torch.zeros_like(t.mask))
        return self.fusion(tokens, return_attention=return_attention) / self.temperature
