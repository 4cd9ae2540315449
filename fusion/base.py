"""Shared by fusion heads: the registry and modality dropout.

A registered head builds itself from the `fusion` section with `from_config(fc, input_dims,
num_outputs, layouts)` and maps {modality: Tokens} to logits for whichever modalities it was built
over. `layouts`: {modality: (views, cells per view)} of encoders whose tokens are image grid cells."""
from __future__ import annotations

import torch

from encoders.base import Registry, Tokens

FUSION_HEADS = Registry("fusion head")


def drop_modalities(tokens: dict[str, Tokens], p: float) -> dict[str, Tokens]:
    """Hide each modality of each patient with probability p (training only), through the same mask
    path a truly missing modality takes; a patient always keeps at least one modality it had."""
    if p <= 0 or len(tokens) < 2:
        return tokens
    names = list(tokens)
    present = torch.stack([tokens[m].present for m in names], 1)  # [B, M]
    keep = (torch.rand(present.shape, device=present.device) >= p) & present
    lost = ~keep.any(1) & present.any(1)
    if lost.any():  # restore one random modality the patient had
        score = torch.rand(present.shape, device=present.device) * present
        keep[lost] = torch.nn.functional.one_hot(score[lost].argmax(1), len(names)).bool()
    return {m: Tokens(t.x, t.mask & keep[:, i, None]) for i, (m, t) in enumerate(tokens.items())}
