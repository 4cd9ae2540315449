"""Label encoding for binary, multiclass and multilabel tasks; class names travel with the model."""
from __future__ import annotations

import numpy as np
import pandas as pd

from multimodal.config import TaskConfig
from multimodal.data.shown import printable
from multimodal.errors import UserError


def _as_str(v) -> str:
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return str(v).strip()


def _sort_key(s: str):
    try:
        return (0, float(s), s)
    except ValueError:
        return (1, 0.0, s.lower())


class LabelEncoder:
    """`classes` are label values (what the records hold); `names` what outputs and reports show.
    `thresholds`: the operating point per binary/multilabel output, chosen on validation at fit time.
    `conformal`: task.conformal's fitted cuts, one probability per class, beside the operating point
    (see multimodal.evaluation.conformal)."""

    def __init__(self, task: TaskConfig, classes: list[str] | None = None, thresholds: list[float] | None = None,
                 conformal: dict | None = None):
        self.task = task
        self.classes = list(classes or task.classes or (["0", "1"] if task.positive else []))
        self.thresholds = [float(t) for t in thresholds] if thresholds else None
        if self.thresholds and (len(self.thresholds) != self.num_outputs or not all(0 <= t <= 1 for t in self.thresholds)):
            raise ValueError(f"thresholds {self.thresholds} do not fit {self.num_outputs} outputs")
        self.conformal = conformal
        cuts = conformal.get("cuts") if isinstance(conformal, dict) else None
        if conformal is not None and not (isinstance(cuts, list) and len(cuts) == len(self.classes) and all(
                isinstance(c, (int, float)) and 0 <= c <= 1 for c in cuts)):
            raise ValueError(f"conformal cuts {cuts!r} do not fit {len(self.classes)} classes")

    @property
    def names(self) -> list[str]:
        given = self.task.names or {}
        if self.task.positive and not given:
            given = {"0": "other", "1": "+".join(self.task.positive)}
        return [given.get(c, c) for c in self.classes]

    @property
    def columns(self) -> list[str]:
        return [self.task.label] if isinstance(self.task.label, str) else list(self.task.label)

    @property
    def num_outputs(self) -> int:
        return 1 if self.task.type == "binary" else len(self.classes)

    def _multilabel_split(self, df: pd.DataFrame):
        if len(self.columns) > 1:  # several 0/1 columns: the column names are the labels
            return None
        return df[self.columns[0]].map(lambda v: [] if pd.isna(v) else [t.strip() for t in str(v).split(";") if t.strip()])

    def fit(self, df: pd.DataFrame, source: str = "records") -> "LabelEncoder":
        if self.task.positive:
            seen = {_as_str(v) for v in df[self.columns[0]].dropna()}
            unknown = sorted(set(self.task.positive) - seen)
            if unknown:
                raise UserError(f"{source}: task.positive value{'s' if len(unknown) > 1 else ''} "
                                f"{', '.join(map(repr, unknown))} never occur in '{self.columns[0]}' "
                                f"(it has: {printable(', '.join(sorted(seen)[:8]))})")
            if seen <= set(self.task.positive):
                raise UserError(f"{source}: every label in '{self.columns[0]}' is in task.positive: no negatives")
            return self
        if self.classes:
            return self
        t = self.task.type
        if t == "multilabel":
            split = self._multilabel_split(df)
            self.classes = list(self.columns) if split is None else sorted({x for xs in split for x in xs}, key=_sort_key)
        else:
            values = sorted({_as_str(v) for v in df[self.columns[0]].dropna()}, key=_sort_key)
            if t == "binary" and len(values) != 2:
                shown = printable(", ".join(values[:6]))
                raise UserError(f"{source}: label column '{self.columns[0]}' has {len(values)} distinct values "
                                f"({shown}); task type binary needs exactly 2 (use multiclass?)")
            if t == "multiclass" and len(values) < 2:
                raise UserError(f"{source}: label column '{self.columns[0]}' has fewer than 2 classes")
            self.classes = values
        if len(self.classes) < (1 if t == "multilabel" else 2):
            raise UserError(f"{source}: no label values found in '{self.columns[0]}'")
        return self

    def values(self, df: pd.DataFrame) -> list[str]:
        """The distinct label values of `df` as `fit` reads them (each label of a ';'-joined multilabel
        cell). A federated site sends these, and the classes are fitted on every site's together: one
        site may lack a class."""
        split = self._multilabel_split(df) if self.task.type == "multilabel" else None
        if split is not None:
            return sorted({x for xs in split for x in xs})
        return sorted({_as_str(v) for v in df[self.columns[0]].dropna()})

    def encode(self, df: pd.DataFrame) -> np.ndarray:
        """Binary/multiclass: class index per row (-1 where unlabeled). Multilabel: multi-hot (NaN row where unlabeled)."""
        if self.task.type == "multilabel":
            out = np.zeros((len(df), len(self.classes)), np.float32)
            split = self._multilabel_split(df)
            if split is None:
                for j, c in enumerate(self.columns):
                    out[:, j] = pd.to_numeric(df[c], errors="coerce").to_numpy(np.float32)
            else:
                index = {c: j for j, c in enumerate(self.classes)}
                for i, xs in enumerate(split):
                    for x in xs:
                        if x in index:
                            out[i, index[x]] = 1.0
                out[df[self.columns[0]].isna().to_numpy()] = np.nan
            return out
        col = df[self.columns[0]]
        if self.task.positive:
            pos = set(self.task.positive)
            return np.array([-1 if pd.isna(v) else int(_as_str(v) in pos) for v in col], np.int64)
        index = {c: j for j, c in enumerate(self.classes)}
        return np.array([-1 if pd.isna(v) else index.get(_as_str(v), -2) for v in col], np.int64)

    def check(self, df: pd.DataFrame, y: np.ndarray, source: str) -> None:
        """Unknown label values are a user mistake in training/evaluation data, not a per-row skip."""
        if self.task.type != "multilabel" and (y == -2).any():
            bad = sorted({_as_str(v) for v in df[self.columns[0]][y == -2]})[:5]
            raise UserError(f"{source}: label column '{self.columns[0]}' has values {bad} "
                            f"not among the model's classes {self.classes}")

    def state(self) -> dict:
        state = {"classes": self.classes, "thresholds": self.thresholds}
        return state | ({"conformal": self.conformal} if self.conformal is not None else {})
