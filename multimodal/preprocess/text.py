"""Text → token ids with a `tokenizers` tokenizer: a WordPiece vocabulary trained on the training
reports, or the tokenizer of a pretrained Hugging Face model. Either way the model directory keeps
one `tokenizer.json`, so loading needs neither network nor transformers' tokenizer classes.
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import torch

from ..config import TextConfig

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def clean(text) -> str:
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return ""
    return str(text).strip()


class TextPreprocessor:
    def __init__(self, tokenizer, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length
        pad = next((t for t in ("[PAD]", "<pad>") if tokenizer.token_to_id(t) is not None), None)
        self.pad_id = tokenizer.token_to_id(pad) if pad else 0
        self.tokenizer.enable_truncation(max_length)
        self.tokenizer.enable_padding(pad_id=self.pad_id, pad_token=pad or "[PAD]")

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @classmethod
    def train(cls, texts: Iterable[str], cfg: TextConfig) -> "TextPreprocessor":
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=cfg.lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(vocab_size=cfg.vocab_size, special_tokens=SPECIALS, min_frequency=2,
                                           show_progress=False)
        tok.train_from_iterator([t for t in map(clean, texts) if t] or ["empty"], trainer=trainer)
        # The trainer numbers tokens in hash order, differently on every run: renumber so the same
        # reports and seed give the same model.
        ordered = SPECIALS + sorted(t for t in tok.get_vocab() if t not in SPECIALS)
        tok.model = models.WordPiece({t: i for i, t in enumerate(ordered)}, unk_token="[UNK]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", SPECIALS.index("[CLS]")),
                                                    ("[SEP]", SPECIALS.index("[SEP]"))])
        tok.decoder = decoders.WordPiece()
        return cls(tok, cfg.max_length)

    @classmethod
    def from_pretrained(cls, name_or_path: str, cfg: TextConfig) -> "TextPreprocessor":
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(name_or_path).backend_tokenizer, cfg.max_length)

    @classmethod
    def from_json(cls, text: str, max_length: int) -> "TextPreprocessor":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(text), max_length)

    def to_json(self) -> str:
        return self.tokenizer.to_str()

    def __call__(self, texts: list[str]):
        """Batch of texts → ids [B, L], mask [B, L] (all False for an empty text: the modality is absent),
        and each token's word index (None for special tokens), for merging attributions back to words."""
        texts = [clean(t) for t in texts]
        enc = self.tokenizer.encode_batch(texts)
        ids = torch.tensor(np.array([e.ids for e in enc], np.int64))
        mask = torch.tensor(np.array([e.attention_mask for e in enc], bool))
        mask[torch.tensor([not t for t in texts])] = False
        return ids, mask, enc
