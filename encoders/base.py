"""What every encoder yields, and the registry encoders and fusion heads are built from by name.

A registered encoder names its `modality`, reads only batch fields that modality declares
(multimodal.data.batches.MODALITY_KEYS) as its `input_keys`, and builds itself from its config
section with `from_config`; tests/test_contract.py holds every registered one to that."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Tokens:
    """x: [B, N, output_dim]; mask: [B, N], True where a token is real. A patient without this
    modality has an all-False row, which is how fusion learns and predicts with it absent."""

    x: torch.Tensor
    mask: torch.Tensor

    @property
    def present(self) -> torch.Tensor:
        return self.mask.any(dim=1)

    def mean(self) -> torch.Tensor:
        """Masked mean over real tokens → [B, output_dim]; zeros for a patient without this modality."""
        w = self.mask.to(self.x.dtype)[..., None]
        return (self.x * w).sum(1) / w.sum(1).clamp(min=1)


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Callable] = {}

    def register(self, name: str):
        def deco(cls):
            self._items[name] = cls
            cls.registry_name = name
            return cls
        return deco

    def names(self) -> list[str]:
        return sorted(self._items)

    def get(self, name: str):
        """The class registered as `name`; its `from_config` builds it from a config section."""
        if name not in self._items:
            raise ValueError(f"unknown {self.kind} '{name}' (known: {', '.join(self.names())})")
        return self._items[name]

    def create(self, name: str, **kwargs):
        return self.get(name)(**kwargs)


ENCODERS = Registry("encoder")
