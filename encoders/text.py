"""Text encoders: a bag of word pieces and bigrams, a BiLSTM over a trained WordPiece vocabulary, or a
Hugging Face transformer.

All expose `embedding` (the token embedding layer) for Layer Integrated Gradients.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from multimodal.config import TextConfig
from multimodal.data.batches import TEXT_KEYS
from multimodal.errors import UserError

from .base import ENCODERS, Tokens
from .weights import TEXT_ARCHITECTURES, text_source


def _nonempty(mask: torch.Tensor) -> torch.Tensor:
    """Encoders get at least one attended position per row; fusion still sees the true mask."""
    m = mask.clone()
    m[~m.any(1), 0] = True
    return m


@ENCODERS.register("lstm")
class LSTMTextEncoder(nn.Module):
    modality = "text"
    input_keys = TEXT_KEYS.tensors

    def __init__(self, vocab_size: int, embed_dim: int = 64, hidden_dim: int = 64, layers: int = 1,
                 pad_id: int = 0, dropout: float = 0.1):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        self.lstm = nn.LSTM(embed_dim, hidden_dim, layers, batch_first=True, bidirectional=True,
                            dropout=dropout if layers > 1 else 0.0)
        self.dropout = nn.Dropout(dropout)
        self.output_dim = 2 * hidden_dim

    @classmethod
    def from_config(cls, tc: TextConfig, prep, stored=None, offline: bool = False):
        """From the `text` section and the trained tokenizer (vocabulary size, padding id)."""
        return cls(vocab_size=prep.vocab_size, embed_dim=tc.embed_dim, hidden_dim=tc.hidden_dim, layers=tc.layers,
                   pad_id=prep.pad_id)

    def forward(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> Tokens:
        x, lengths = self.dropout(self.embedding(text_ids)), _nonempty(text_mask).sum(1)
        if torch.onnx.is_in_onnx_export():
            return Tokens(self._unpacked(x, lengths), text_mask)
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = pad_packed_sequence(self.lstm(packed)[0], batch_first=True, total_length=text_ids.shape[1])
        return Tokens(out, text_mask)

    def _unpacked(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """What the packed BiLSTM computes, without packed sequences (ONNX has no form for them): each
        direction of each layer as a one-way LSTM over the padded rows, the backward one over every row
        reversed within its own length; outputs past a row's length are zero, as pad_packed_sequence
        leaves them. Evaluation only (no dropout between layers)."""
        t = torch.arange(x.shape[1], device=x.device)[None, :]
        inside = t < lengths[:, None]
        flip = torch.where(inside, lengths[:, None] - 1 - t, t)[..., None]  # its own inverse

        def reverse(v: torch.Tensor) -> torch.Tensor:
            return v.gather(1, flip.expand(-1, -1, v.shape[-1]))

        for k in range(self.lstm.num_layers):
            ways = []
            for suffix in ("", "_reverse"):
                size = self.lstm.input_size if k == 0 else 2 * self.lstm.hidden_size
                one = nn.LSTM(size, self.lstm.hidden_size, batch_first=True).to(x.device)
                for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    setattr(one, f"{name}_l0", getattr(self.lstm, f"{name}_l{k}{suffix}"))
                state = (x.new_zeros(1, x.shape[0], self.lstm.hidden_size),) * 2  # any batch size
                ways.append(one(x, state)[0] if not suffix else reverse(one(reverse(x), state)[0]))
            x = torch.cat(ways, -1) * inside[..., None]
        return x


@ENCODERS.register("bow")
class BagOfNgramsEncoder(nn.Module):
    """fastText-style: the mean of word-piece and hashed-bigram embeddings, as one token. On a few
    hundred to a few thousand short reports this is what TF-IDF + logistic regression exploits, and it
    is what sequence models overfit; here it trains jointly with the other modalities' tokens."""

    modality = "text"
    input_keys = TEXT_KEYS.tensors

    def __init__(self, vocab_size: int, embed_dim: int = 64, buckets: int = 2 ** 16, pad_id: int = 0,
                 dropout: float = 0.1):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        self.bigrams = nn.Embedding(buckets, embed_dim) if buckets else None
        self.buckets = buckets
        self.dropout = nn.Dropout(dropout)
        self.output_dim = embed_dim

    @classmethod
    def from_config(cls, tc: TextConfig, prep, stored=None, offline: bool = False):
        """From the `text` section and the trained tokenizer (vocabulary size, padding id)."""
        return cls(vocab_size=prep.vocab_size, embed_dim=tc.embed_dim, buckets=tc.bigram_buckets, pad_id=prep.pad_id)

    def forward(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> Tokens:
        w = text_mask.to(torch.float32).unsqueeze(-1)
        total = (self.embedding(text_ids) * w).sum(1)
        count = w.sum(1)
        if self.bigrams is not None and text_ids.shape[1] > 1:
            pair = text_mask[:, 1:] & text_mask[:, :-1]
            h = (text_ids[:, :-1] * 1_000_003 + text_ids[:, 1:]) % self.buckets
            wp = pair.to(torch.float32).unsqueeze(-1)
            total = total + (self.bigrams(h) * wp).sum(1)
            count = count + wp.sum(1)
        pooled = self.dropout(total / count.clamp(min=1)).unsqueeze(1)
        return Tokens(pooled, text_mask.any(1, keepdim=True))


# Config keys that point transformers at code or files outside the model directory: dropped.
_FOREIGN_KEYS = ("auto_map", "_name_or_path", "custom_pipelines", "_commit_hash")
_DICT_KEYS = ("id2label", "label2id")  # the only nested values a text encoder's config may hold


def safe_config(config: dict):
    """A transformers config of an allowed architecture, or ValueError (one line). Besides the model type,
    keys that make transformers load something (quantization_config, attn_implementation: a hub kernel,
    private `_` settings, nested sub-model configs) are refused, not passed on."""
    from transformers import AutoConfig

    cfg = {k: v for k, v in dict(config).items() if k not in _FOREIGN_KEYS}
    kind = cfg.pop("model_type", None)
    if kind not in TEXT_ARCHITECTURES:
        raise ValueError(f"text encoder model_type {kind!r} is not one mmdx builds offline "
                         f"(allowed: {', '.join(TEXT_ARCHITECTURES)})")
    odd = [k for k, v in cfg.items() if k.startswith("_") or k.endswith("_implementation")
           or k == "quantization_config" or (isinstance(v, dict) and k not in _DICT_KEYS)]
    if odd:
        raise ValueError(f"text encoder config key {odd[0]!r} is not allowed: it can make transformers load "
                         "code or weights")
    return AutoConfig.for_model(kind, **cfg)


def _from_pretrained(source: str):
    """The folder's (or, online, the hub's) weights into an allowed architecture, every key matched:
    transformers would leave weights the file lacks at random init with only a warning."""
    from transformers import AutoConfig, AutoModel

    stored = AutoConfig.from_pretrained(source, trust_remote_code=False)
    cfg = safe_config(stored.to_diff_dict() | {"model_type": stored.model_type})
    # mismatched shapes are reported (and refused below) rather than raised as transformers' own error
    model, info = AutoModel.from_pretrained(source, config=cfg, trust_remote_code=False, output_loading_info=True,
                                            ignore_mismatched_sizes=True)
    unset = sorted(info.get("missing_keys") or ()) + sorted(str(k) for k in info.get("mismatched_keys") or ())
    if unset:
        raise ValueError(f"text.pretrained {source}: {len(unset)} weights of the {cfg.model_type} network are not in "
                         f"its files or do not fit (e.g. {unset[0]}); they would train from random init")
    return model


@ENCODERS.register("hf")
class HFTextEncoder(nn.Module):
    """`pretrained`: a local folder (or hub name when online) for AutoModel.from_pretrained.
    Otherwise random init from `config` (a transformers config dict with model_type). Either way only
    TEXT_ARCHITECTURES, and never remote code (a folder's `auto_map` is dropped, not prompted for)."""

    modality = "text"
    input_keys = TEXT_KEYS.tensors + TEXT_KEYS.cached

    def __init__(self, config: dict | None = None, pretrained: str | None = None, freeze="none",
                 pooling: str = "tokens"):
        """`freeze`: "none", "all", or N = only the last N transformer layers train (embeddings and the
        earlier layers keep their pretrained weights). `pooling`: "tokens" or one "mean" vector."""
        super().__init__()
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a weight-loading bar per model fills batch logs
        if pretrained:
            self.model = _from_pretrained(pretrained)
        else:
            self.model = AutoModel.from_config(safe_config(config), trust_remote_code=False)
        self.output_dim = self.model.config.hidden_size
        self.pooling = pooling
        self._top: list[nn.Module] = []  # the transformer layers that train under freeze: N
        self._frozen = self._freeze(freeze)

    @classmethod
    def from_config(cls, tc: TextConfig, prep, stored: dict | None = None, offline: bool = False):
        """From the `text` section. `stored`: the architecture a saved model recorded (preprocessing.json's
        text_encoder_config, see `config_dict`), built with random weights that the model's own replace.
        `offline`: only that record is used: no hub id, folder or remote code is looked at. Otherwise
        text.pretrained's weights, or random init from text.hf_config sized to the trained tokenizer."""
        if offline and not (isinstance(stored, dict) and "model_type" in stored):
            raise UserError("preprocessing.json has no text_encoder_config: the transformer cannot be rebuilt offline")
        if stored is not None:
            return cls(config=stored, freeze=tc.freeze, pooling=tc.pooling)
        if tc.pretrained:
            return cls(pretrained=text_source(tc.pretrained), freeze=tc.freeze, pooling=tc.pooling)
        return cls(config={**tc.hf_config, "vocab_size": prep.vocab_size, "pad_token_id": prep.pad_id},
                   freeze=tc.freeze, pooling=tc.pooling)

    def _freeze(self, freeze) -> list[nn.Module]:
        if freeze == "none":
            return []
        if freeze == "all":
            self.model.requires_grad_(False)
            return [self.model]
        layers = next((m for name, m in self.model.named_modules()
                       if isinstance(m, nn.ModuleList) and name.split(".")[-1] in ("layer", "layers")), None)
        if layers is None or not 1 <= int(freeze) <= len(layers):
            raise ValueError(f"text.freeze={freeze}: the transformer has {len(layers) if layers else 0} layers")
        keep = {id(p) for layer in list(layers)[-int(freeze):] for p in layer.parameters()}
        keep |= {id(p) for name, p in self.model.named_parameters() if name.startswith("pooler.")}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in keep)
        self._top = list(layers)[-int(freeze):]
        return [self.model.get_input_embeddings()] + list(layers)[: -int(freeze)]

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self._frozen:  # frozen layers keep dropout off: they are feature extractors
            m.eval()
        return self

    @property
    def embedding(self) -> nn.Module:
        return self.model.get_input_embeddings()

    @property
    def n_top(self) -> int:
        """How many last layers train over a frozen part (freeze: N); 0 under freeze: all or none."""
        return len(self._top)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def config_dict(self) -> dict:
        """Enough to rebuild the architecture offline; the weights live in model.safetensors."""
        d = self.model.config.to_diff_dict() | {"model_type": self.model.config.model_type}
        return {k: v for k, v in d.items() if k not in _FOREIGN_KEYS}

    def hidden(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=text_ids, attention_mask=_nonempty(text_mask).long()).last_hidden_state

    def frozen_hidden(self, text_ids: torch.Tensor, text_mask: torch.Tensor, check: bool = False) -> torch.Tensor:
        """What a feature cache keeps: the output of the frozen part, i.e. the whole transformer under
        freeze: all, or the input of the first trainable layer under freeze: N. `check`: also run `top`
        over it and refuse (ValueError, one line) an architecture whose last layers cannot run on their
        own as `top` runs them, rather than train on activations that prediction would never see (in eval
        mode, as a cache runs it: dropout would make the two differ)."""
        if not self._top:  # freeze: all (under freeze: none there is no frozen part to cache)
            return self.hidden(text_ids, text_mask)
        out = self.model(input_ids=text_ids, attention_mask=_nonempty(text_mask).long(), output_hidden_states=True)
        frozen = out.hidden_states[-1 - len(self._top)]
        if check:
            self._check_top(frozen, out.last_hidden_state, text_mask)
        return frozen

    def top(self, x: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """The trainable last layers over the frozen part's output (freeze: N): a cached epoch runs these
        alone. Built-in BERT-style layers take the additive [B, 1, 1, L] mask; `frozen_hidden(check=True)`
        proves it for the model at hand."""
        keep = _nonempty(text_mask)[:, None, None, :]
        mask = torch.zeros(keep.shape, dtype=x.dtype, device=x.device).masked_fill(~keep, torch.finfo(x.dtype).min)
        for layer in self._top:
            x = layer(x, mask)
            x = x[0] if isinstance(x, tuple) else x
        return x

    def _check_top(self, frozen: torch.Tensor, live: torch.Tensor, text_mask: torch.Tensor, atol: float = 1e-4):
        was = self.training
        self.eval()  # dropout off: the comparison is of the computation, not of its noise
        try:
            with torch.no_grad():
                fast = self.top(frozen, text_mask)
            ok = live.shape == fast.shape and bool(((live - fast).abs() * text_mask.unsqueeze(-1)).max() <= atol)
        except (TypeError, ValueError, RuntimeError):
            ok = False
        finally:
            self.train(was)
        if not ok:
            raise ValueError(f"text.cache_features with text.freeze: {len(self._top)} cannot run the last layers of "
                             f"this {self.model.config.model_type} model on their own; use text.freeze: all or "
                             "text.cache_features: false")

    def forward(self, text_ids: torch.Tensor, text_mask: torch.Tensor, text_x: torch.Tensor | None = None) -> Tokens:
        """`text_x`: the frozen part's cached output for these ids (see `frozen_hidden`), else computed."""
        if text_x is None:
            out = self.hidden(text_ids, text_mask)
        else:
            out = text_x[:, : text_ids.shape[1]].to(self.dtype)
            out = self.top(out, text_mask) if self._top else out
        if self.pooling == "mean":
            w = text_mask.to(out.dtype).unsqueeze(-1)
            pooled = (out * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp(min=1)
            return Tokens(pooled, text_mask.any(1, keepdim=True))
        return Tokens(out, text_mask)
