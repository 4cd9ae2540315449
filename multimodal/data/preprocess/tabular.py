"""Tabular features: numeric columns standardised with missing indicators, categories mapped to indices.

Index 0 of every categorical column is the missing/unknown bucket, so unseen values at predict
time are handled, not errors. A non-numeric value in a numeric column is a per-record error.
"""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pandas as pd

from multimodal.config import TabularConfig
from multimodal.errors import RecordError


def _number(col: str, v) -> float:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return math.nan
    if isinstance(v, (int, float, np.integer, np.floating)):
        return float(v)
    s = str(v).strip()
    if not s or s.lower() in ("nan", "na", "n/a", "none", "null"):
        return math.nan
    try:
        x = float(s)
    except ValueError:
        raise RecordError(f"column '{col}': {s[:40]!r} is not a number") from None
    if not math.isfinite(x):
        raise RecordError(f"column '{col}': {s[:40]!r} is not a finite number")
    return x


def _category(v) -> str | None:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    s = str(v).strip()
    return s or None


class TabularPreprocessor:
    def __init__(self, cfg: TabularConfig, mean=None, std=None, vocab=None):
        self.numeric, self.categorical = list(cfg.numeric), list(cfg.categorical)
        self.min_count = cfg.min_category_count
        self.mean = list(mean or [0.0] * len(self.numeric))
        self.std = list(std or [1.0] * len(self.numeric))
        self.vocab: dict[str, list[str]] = dict(vocab or {c: [] for c in self.categorical})
        self._reindex()

    def _reindex(self) -> None:
        self._lookup = {c: {v: i + 1 for i, v in enumerate(self.vocab[c])} for c in self.categorical}

    @property
    def features(self) -> list[str]:
        return self.numeric + self.categorical

    @property
    def cardinalities(self) -> list[int]:
        """Embedding rows per categorical column: the seen values plus the missing/unknown bucket."""
        return [len(self.vocab[c]) + 1 for c in self.categorical]

    def fit(self, df: pd.DataFrame, patients=None) -> "TabularPreprocessor":
        """Means, spreads and the categories kept: those of at least min_category_count patients
        (`patients`: whose record each row is; default: each row its own patient)."""
        patients = range(len(df)) if patients is None else patients
        for i, c in enumerate(self.numeric):
            x = pd.to_numeric(df[c], errors="coerce").to_numpy(np.float64)
            x = x[np.isfinite(x)]
            self.mean[i] = float(x.mean()) if len(x) else 0.0
            self.std[i] = float(x.std()) if len(x) > 1 and x.std() > 0 else 1.0
        for c in self.categorical:
            pairs = {(p, s) for p, s in zip(patients, map(_category, df[c]), strict=True) if s is not None}
            counts = Counter(s for _, s in pairs)
            self.vocab[c] = sorted(v for v, n in counts.items() if n >= self.min_count)
        self._reindex()
        return self

    def transform(self, row) -> dict[str, np.ndarray]:
        """One record → standardised numbers (0 where missing), missing flags, category indices."""
        num = np.array([_number(c, row[c]) for c in self.numeric], np.float32)
        missing = np.isnan(num).astype(np.float32)
        num = np.where(missing > 0, 0.0, (num - np.array(self.mean)) / np.array(self.std)).astype(np.float32)
        cat = np.array([self._lookup[c].get(_category(row[c]), 0) for c in self.categorical], np.int64)
        return {"num": num, "num_missing": missing, "cat": cat}

    def state(self) -> dict:
        return {"numeric": self.numeric, "categorical": self.categorical, "mean": self.mean, "std": self.std,
                "vocab": self.vocab}
