"""Encoders turn one modality's preprocessed batch into tokens (Tokens: x [B, N, output_dim], mask [B, N]).

Each declares its `modality`, `output_dim` and `input_keys` (the batch fields it reads, among those its
modality declares in multimodal.data.batches.MODALITY_KEYS), so any encoder plugs into any fusion head,
the ONNX graph and attributions. Importing this package registers the built-in encoders.
"""
from . import image, tabular, text  # noqa: F401  (registration)
from .base import ENCODERS, Registry, Tokens

__all__ = ["ENCODERS", "Registry", "Tokens"]
