"""Fusion heads: dict of modality Tokens → logits. Built by name from FUSION_HEADS."""
from . import additive, attention, concat  # noqa: F401  (registration)
from .base import FUSION_HEADS, drop_modalities

__all__ = ["FUSION_HEADS", "drop_modalities"]
