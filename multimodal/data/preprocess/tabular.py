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


def _finite(df: pd.DataFrame, col: str) -> np.ndarray:
    """A numeric column's finite values (what the scaler statistics are computed on)."""
    x = pd.to_numeric(df[col], errors="coerce").to_numpy(np.float64)
    return x[np.isfinite(x)]


def _patient_counts(df: pd.DataFrame, col: str, patients) -> Counter:
    """How many patients have each value of a categorical column (a patient's repeats count once)."""
    return Counter(s for _, s in {(p, s) for p, s in zip(patients, map(_category, df[col]), strict=True)
                                  if s is not None})


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
            x = _finite(df, c)
            self.mean[i] = float(x.mean()) if len(x) else 0.0
            self.std[i] = float(x.std()) if len(x) > 1 and x.std() > 0 else 1.0
        for c in self.categorical:
            counts = _patient_counts(df, c, patients)
            self.vocab[c] = sorted(v for v, n in counts.items() if n >= self.min_count)
        self._reindex()
        return self

    def site_statistics(self, df: pd.DataFrame, patients=None) -> dict:
        """What `fit` needs from one site's records, as counts that can leave the site (federated
        training): per numeric column n, sum and sum of squares of the finite values, and per
        categorical column the patient count of each value that already reaches min_category_count
        patients at this site (a value rarer than that here never leaves it)."""
        patients = range(len(df)) if patients is None else patients
        numeric = {c: [len(x), float(x.sum()), float((x * x).sum())] for c in self.numeric for x in [_finite(df, c)]}
        categories = {c: {v: n for v, n in sorted(_patient_counts(df, c, patients).items()) if n >= self.min_count}
                      for c in self.categorical}
        return {"numeric": numeric, "categorical": categories}

    @classmethod
    def from_site_statistics(cls, cfg: TabularConfig, sites: list[dict]) -> "TabularPreprocessor":
        """The preprocessor `fit` would give on the sites' records pooled, from their site_statistics:
        the same means and (population) spreads; the categories kept are those every site's counts
        together reach min_category_count with, among the values each site let out."""
        prep = cls(cfg)
        for i, c in enumerate(prep.numeric):
            n, s, ss = (sum(site["numeric"][c][k] for site in sites) for k in range(3))
            mean = s / n if n else 0.0
            var = max(ss / n - mean * mean, 0.0) if n else 0.0
            prep.mean[i] = float(mean)
            prep.std[i] = float(math.sqrt(var)) if n > 1 and var > 0 else 1.0
        for c in prep.categorical:
            counts = Counter()
            for site in sites:
                counts.update(site["categorical"][c])
            prep.vocab[c] = sorted(v for v, n in counts.items() if n >= prep.min_count)
        prep._reindex()
        return prep

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
