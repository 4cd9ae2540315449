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
from multimodal.data.shown import printable
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


# A word after one of these is a name, whatever its case ("Dr. Smith", "seen by dr smith"). Case matters:
# "MS lesions", "did not miss" and "MR angiography" are no titles.
TITLES = {"Mr", "Mrs", "Ms", "Mx", "Miss", "Dr", "Prof", "mr", "mrs", "dr"}
_SENTENCE_END = {".", "!", "?", ":", ";"}


def _words(tok, text: str) -> list[str]:
    """A text's words as the vocabulary sees them (normalised: lower-cased unless text.lowercase is off)."""
    return [w for w, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text))]


def name_like(tok, texts: list[str]) -> set[str]:
    """Normalised words that read as names in these reports: a word after a title (Dr, Mrs, ...), and a
    Capitalised word inside a sentence that is never written in lower case anywhere in the reports
    ("seen by Smith", but not "Mass" when "mass" also occurs). A name only ever written in lower case or
    in capitals is not found, and an eponym (Crohn, Parkinson) is taken for one."""
    from tokenizers import pre_tokenizers

    split = pre_tokenizers.BertPreTokenizer()
    lower, capitalised, titled = set(), set(), set()
    for text in texts:
        at_start, after_title, prev_end = True, False, 0  # at_start: no word yet in this sentence or line
        for w, (start, end) in split.pre_tokenize_str(text):
            at_start = at_start or "\n" in text[prev_end:start]
            prev_end = end
            if w.isalpha():
                if w.islower():
                    lower.add(w)
                elif len(w) > 1 and w[0].isupper() and w[1:].islower() and not at_start:
                    capitalised.add(w.lower())
                if after_title and len(w) > 1:
                    titled.add(w.lower())
                at_start, after_title = False, w in TITLES
            elif w == "." and after_title:  # "Dr." ends no sentence
                continue
            else:
                at_start, after_title = at_start or w in _SENTENCE_END, False
    names = (capitalised - lower) | titled
    return {n for w in names for n in _words(tok, w)} | {n for w in names for n in _words(tok, w.title())}


def _private_words(tok, texts: list[str], patients: list, min_patients: int, scrub: bool) -> set[str]:
    """Normalised words of fewer than `min_patients` patients, and with `scrub` every word that looks like
    an identifier or a name: never vocabulary. Counted by patient, not by report, so a name repeated in
    one patient's several reports is still one patient's."""
    seen: dict = {}
    for t, p in zip(texts, patients):
        seen.setdefault(p, set()).update(_words(tok, t))
    df = Counter(w for words in seen.values() for w in words)
    private = {w for w, n in df.items() if n < min_patients or (scrub and looks_like_identifier(w))}
    return private | (name_like(tok, texts) if scrub else set())


def _without(tok, text: str, private: set[str]) -> str:
    return " ".join(w for w in _words(tok, text) if w not in private)


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
        raise error(f"{what} ({type(e).__name__}: {printable(' '.join(str(e).split())[:100])})") from None
    except BaseException as e:
        if type(e).__name__ != "PanicException":
            raise
        raise error(f"{what} (the tokenizer crashed)") from None


def _reports(texts: Iterable[str], cfg: TextConfig, patients: Optional[Iterable]) -> tuple:
    """The non-empty reports, cleaned, with the tokenizer that splits them into words and the words kept
    out of any vocabulary (_private_words). `patients`: whose report each is (default: its own)."""
    from tokenizers import Tokenizer, models

    tok = _bert_style(Tokenizer(models.WordPiece(unk_token="[UNK]")), cfg.lowercase)
    texts = [clean(t, cfg.max_chars) for t in texts]
    patients = range(len(texts)) if patients is None else list(patients)
    kept = [(t, p) for t, p in zip(texts, patients, strict=True) if t]
    texts = [t for t, _ in kept]
    return tok, texts, _private_words(tok, texts, [p for _, p in kept], cfg.min_doc_freq, cfg.scrub)


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
    def train(cls, texts: Iterable[str], cfg: TextConfig, patients: Optional[Iterable] = None) -> "TextPreprocessor":
        """A WordPiece vocabulary of these reports; `patients`: whose report each is (default: each report
        its own patient), what text.min_doc_freq counts."""
        tok, texts, private = _reports(texts, cfg, patients)
        vocab = _learn_wordpieces(tok, [_without(tok, t, private) for t in texts] or ["empty"], cfg.vocab_size)
        return cls._of_pieces(vocab, private, cfg)

    @classmethod
    def _of_pieces(cls, vocab: list[str], private: set[str], cfg: TextConfig) -> "TextPreprocessor":
        """The tokenizer of the learnt pieces, less `private` ones, renumbered in sorted order: the same
        reports give the same ids, and so the same model."""
        from tokenizers import Tokenizer, models

        ordered = SPECIALS + sorted(t for t in vocab if t not in SPECIALS and t not in private)
        final = _bert_style(Tokenizer(models.WordPiece({t: i for i, t in enumerate(ordered)}, unk_token="[UNK]")),
                            cfg.lowercase)
        final.add_special_tokens(SPECIALS)
        return cls(final, cfg.max_length, cfg.max_chars)

    @staticmethod
    def site_word_counts(texts: Iterable[str], cfg: TextConfig, patients: Optional[Iterable] = None) -> dict[str, int]:
        """What `train` learns from, as counts that can leave a site (federated training): how often
        each word occurs in these reports, normalised as the vocabulary sees it, without the words
        `train` keeps out (fewer than text.min_doc_freq of this site's patients; with text.scrub,
        identifiers and names). No report leaves the site, only these counts."""
        tok, texts, private = _reports(texts, cfg, patients)
        counts = Counter(w for t in texts for w in _words(tok, t) if w not in private)
        return dict(sorted(counts.items()))

    @classmethod
    def from_word_counts(cls, counts: dict[str, int], cfg: TextConfig) -> "TextPreprocessor":
        """The WordPiece vocabulary of word counts (several sites' site_word_counts, summed): the
        trainer counts words, not reports, so these counts give it what the reports behind them would."""
        from tokenizers import Tokenizer, models

        def texts():  # each word repeated as often as it was counted, in strings of bounded length
            for w, n in sorted(counts.items()):
                for start in range(0, n, 1000):
                    yield " ".join([w] * min(1000, n - start))

        tok = _bert_style(Tokenizer(models.WordPiece(unk_token="[UNK]")), cfg.lowercase)
        return cls._of_pieces(_learn_wordpieces(tok, list(texts()) or ["empty"], cfg.vocab_size), set(), cfg)

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
