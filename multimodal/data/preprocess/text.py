"""Text → token ids with a `tokenizers` tokenizer: a WordPiece vocabulary trained on the training
reports, or the tokenizer of a pretrained Hugging Face model. Either way the model directory keeps
one `tokenizer.json`, so loading needs neither network nor transformers' tokenizer classes.
"""
from __future__ import annotations

import contextlib
import math
from collections import Counter
from typing import Iterable, Optional

import numpy as np
import torch

from multimodal.config import TextConfig
from multimodal.errors import RecordError, UserError

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
MAX_CHARS = 20_000


def clean(text, max_chars: int = MAX_CHARS) -> str:
    """The text a model reads: at most `max_chars` characters, valid UTF-8 (a lone surrogate from a
    broken export becomes U+FFFD instead of failing the tokenizer)."""
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return ""
    s = str(text)[: max_chars + 64].strip()[:max_chars]
    return s.encode("utf-8", "replace").decode("utf-8") if not s.isascii() else s


def looks_like_identifier(word: str) -> bool:
    """Record numbers, dates, phone numbers: four digits or more in one word."""
    return sum(ch.isdigit() for ch in word) >= 4


def _private_words(tok, texts: list[str], min_doc_freq: int, scrub: bool) -> set[str]:
    """Normalised words in fewer than `min_doc_freq` reports (or identifier-like): never vocabulary."""
    df: Counter = Counter()
    for t in texts:
        df.update({w for w, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(t))})
    return {w for w, n in df.items() if n < min_doc_freq or (scrub and looks_like_identifier(w))}


def _without(tok, text: str, private: set[str]) -> str:
    words = tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text))
    return " ".join(w for w, _ in words if w not in private)


def _bert_style(tok, lowercase: bool):
    """BERT's normaliser, word splitter, [CLS] ... [SEP] template and ## decoder on a WordPiece tokenizer."""
    from tokenizers import decoders, normalizers, pre_tokenizers, processors

    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", SPECIALS.index("[CLS]")), ("[SEP]", SPECIALS.index("[SEP]"))])
    tok.decoder = decoders.WordPiece()
    return tok


def _learn_wordpieces(tok, texts: list[str], vocab_size: int) -> list[str]:
    """The word pieces `tokenizers`' trainer learns from `texts`, the same on every run.

    The trainer breaks ties between equally frequent merges by token id, and it numbers each
    continuing piece (`##x`) when it first meets it while walking a hash map of words: an order that
    changes from run to run, and with it which merges win a tie. Handing it every continuing piece up
    front, sorted, fixes those ids, so the same reports always give the same vocabulary."""
    from tokenizers import trainers

    continuing = sorted({"##" + ch for t in texts for w, _ in tok.pre_tokenizer.pre_tokenize_str(
        tok.normalizer.normalize_str(t)) for ch in w[1:]})
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIALS + continuing,
                                       min_frequency=2, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return list(tok.get_vocab())


@contextlib.contextmanager
def _tokenizer_failures(error: type, what: str):
    """Any tokenizer failure as one `error` line. tokenizers reports Rust panics as pyo3's
    PanicException, a BaseException: that is a bad input too, not a reason to exit."""
    try:
        yield
    except Exception as e:  # noqa: BLE001
        raise error(f"{what} ({type(e).__name__}: {' '.join(str(e).split())[:100]})") from None
    except BaseException as e:
        if type(e).__name__ != "PanicException":
            raise
        raise error(f"{what} (the tokenizer crashed)") from None


class TextPreprocessor:
    def __init__(self, tokenizer, max_length: int, max_chars: int = MAX_CHARS):
        self.tokenizer = tokenizer
        self.max_length, self.max_chars = max_length, max_chars
        pad = next((t for t in ("[PAD]", "<pad>") if tokenizer.token_to_id(t) is not None), None)
        self.pad_id = tokenizer.token_to_id(pad) if pad else 0
        self.tokenizer.enable_truncation(max_length)
        self.tokenizer.enable_padding(pad_id=self.pad_id, pad_token=pad or "[PAD]")

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @classmethod
    def train(cls, texts: Iterable[str], cfg: TextConfig) -> "TextPreprocessor":
        from tokenizers import Tokenizer, models

        tok = _bert_style(Tokenizer(models.WordPiece(unk_token="[UNK]")), cfg.lowercase)
        texts = [t for t in (clean(t, cfg.max_chars) for t in texts) if t]
        private = _private_words(tok, texts, cfg.min_doc_freq, cfg.scrub)
        kept = [_without(tok, t, private) for t in texts] or ["empty"]
        vocab = _learn_wordpieces(tok, kept, cfg.vocab_size)
        # Renumbered in sorted order: the same reports give the same ids, and so the same model.
        ordered = SPECIALS + sorted(t for t in vocab if t not in SPECIALS and t not in private)
        final = _bert_style(Tokenizer(models.WordPiece({t: i for i, t in enumerate(ordered)}, unk_token="[UNK]")),
                            cfg.lowercase)
        final.add_special_tokens(SPECIALS)
        return cls(final, cfg.max_length, cfg.max_chars)

    @classmethod
    def from_pretrained(cls, name_or_path: str, cfg: TextConfig) -> "TextPreprocessor":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)
        return cls(tok.backend_tokenizer, cfg.max_length, cfg.max_chars)

    @classmethod
    def from_json(cls, text: Optional[str], cfg: TextConfig) -> "TextPreprocessor":
        """A model directory's tokenizer.json; checked once here so a broken one is the model's error,
        not one per record."""
        from tokenizers import Tokenizer

        with _tokenizer_failures(UserError, "tokenizer.json is not a usable tokenizer"):
            prep = cls(Tokenizer.from_str(text), cfg.max_length, cfg.max_chars)
            prep.tokenizer.encode("smoke test 12")
        return prep

    def to_json(self) -> str:
        return self.tokenizer.to_str()

    def encode(self, text) -> "Encoding":  # noqa: F821
        """One record's text → its Encoding (unpadded). Per record, so one text the tokenizer cannot
        handle is that record's error, not the batch's."""
        with _tokenizer_failures(RecordError, "text cannot be tokenised"):
            return self.tokenizer.encode(clean(text, self.max_chars))

    def empty(self):
        return self.tokenizer.encode("")

    def pad(self, encodings: list) -> tuple[torch.Tensor, torch.Tensor, list]:
        """Per-record encodings → ids [B, L], mask [B, L] (all False for an empty text: the modality is
        absent), and the encodings padded alike (word ids and offsets merge attributions back to words)."""
        L = max([1] + [len(e.ids) for e in encodings])
        ids = np.full((len(encodings), L), self.pad_id, np.int64)
        mask = np.zeros((len(encodings), L), bool)
        for b, e in enumerate(encodings):
            n = len(e.ids)
            ids[b, :n] = e.ids
            has_words = any(w is not None for w in e.word_ids)
            mask[b, :n] = np.asarray(e.attention_mask, bool) & has_words
            if n < L:
                e.pad(L, pad_id=self.pad_id, pad_token=self.tokenizer.id_to_token(self.pad_id) or "[PAD]")
        return torch.from_numpy(ids), torch.from_numpy(mask), encodings

    def __call__(self, texts: list[str]):
        """Batch of texts → (ids, mask, encodings) as `pad` gives them; a failing text raises."""
        return self.pad([self.encode(t) for t in texts])
