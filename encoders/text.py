"""Text encoders: a BiLSTM over a trained WordPiece vocabulary, or a Hugging Face transformer.

Both expose `embedding` (the token embedding layer) for Layer Integrated Gradients.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .base import ENCODERS, Tokens


def _nonempty(mask: torch.Tensor) -> torch.Tensor:
    """Encoders get at least one attended position per row; fusion still sees the true mask."""
    m = mask.clone()
    m[~m.any(1), 0] = True
    return m


@ENCODERS.register("lstm")
class LSTMTextEncoder(nn.Module):
    input_keys = ("text_ids", "text_mask")

    def __init__(self, vocab_size: int, embed_dim: int = 64, hidden_dim: int = 64, layers: int = 1,
                 pad_id: int = 0, dropout: float = 0.1):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        self.lstm = nn.LSTM(embed_dim, hidden_dim, layers, batch_first=True, bidirectional=True,
                            dropout=dropout if layers > 1 else 0.0)
        self.dropout = nn.Dropout(dropout)
        self.output_dim = 2 * hidden_dim

    def forward(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> Tokens:
        lengths = _nonempty(text_mask).sum(1).cpu()
        packed = pack_padded_sequence(self.dropout(self.embedding(text_ids)), lengths, batch_first=True,
                                      enforce_sorted=False)
        out, _ = pad_packed_sequence(self.lstm(packed)[0], batch_first=True, total_length=text_ids.shape[1])
        return Tokens(out, text_mask)


# Config keys that point transformers at code or files outside the model directory.
_FOREIGN_KEYS = ("auto_map", "_name_or_path", "custom_pipelines", "_commit_hash")


@ENCODERS.register("hf")
class HFTextEncoder(nn.Module):
    """`pretrained`: a local folder (or hub name when online) for AutoModel.from_pretrained.
    Otherwise random init from `config` (a transformers config dict with model_type): only built-in
    transformers architectures, and never remote code (a folder's `auto_map` is refused, not prompted for)."""

    input_keys = ("text_ids", "text_mask")

    def __init__(self, config: dict | None = None, pretrained: str | None = None):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        if pretrained:
            self.model = AutoModel.from_pretrained(pretrained, trust_remote_code=False)
        else:
            cfg = {k: v for k, v in dict(config).items() if k not in _FOREIGN_KEYS}
            self.model = AutoModel.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg),
                                               trust_remote_code=False)
        self.output_dim = self.model.config.hidden_size

    @property
    def embedding(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def config_dict(self) -> dict:
        """Enough to rebuild the architecture offline; the weights live in model.safetensors."""
        d = self.model.config.to_diff_dict() | {"model_type": self.model.config.model_type}
        return {k: v for k, v in d.items() if k not in _FOREIGN_KEYS}

    def forward(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> Tokens:
        out = self.model(input_ids=text_ids, attention_mask=_nonempty(text_mask).long())
        return Tokens(out.last_hidden_state, text_mask)
