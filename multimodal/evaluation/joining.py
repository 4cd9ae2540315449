"""Reading a predictions file and a labels file and joining them on id, one way for `mmdx compare`
(multimodal.evaluation.comparison) and `mmdx evaluate --predictions` (multimodal.evaluation.scorefile):
ids spelled alike (as_text), rows in one order (id_order), patients grouped alike (groups_of), and
the operating point a file's decisions were made at read alike (operating_point), so that one file
gives one number in both.

Only numpy and pandas: `from multimodal import compare` must not need a model or torch here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Union

import numpy as np
import pandas as pd

from multimodal.errors import UserError
from multimodal.data.records import read_table

PathOrFrame = Union[str, Path, pd.DataFrame]


def as_text(v) -> str:
    """Ids and labels as the engine spells them: 7, 7.0 and "7" are the same patient or class."""
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        v = int(v)
    return str(v).strip()


def _table(obj: PathOrFrame, what: str) -> tuple[pd.DataFrame, str]:
    if isinstance(obj, pd.DataFrame):
        return obj.reset_index(drop=True), what
    path = Path(obj)
    if not path.is_file():
        raise UserError(f"{what} file not found: {path}")
    return read_table(path), str(path)


def need_columns(df: pd.DataFrame, source: str, *cols: str) -> None:
    for c in cols:
        if c not in df.columns:
            raise UserError(f"{source}: no column {c!r} (file has: {', '.join(map(str, df.columns[:12]))})")


def _ids(df: pd.DataFrame, col: str, source: str) -> pd.Index:
    ids = pd.Index([as_text(v) for v in df[col]])
    dup = ids[ids.duplicated()]
    if len(dup):
        raise UserError(f"{source}: id {dup[0]!r} appears more than once; ids must name one record each")
    return ids


def read_predictions(obj: PathOrFrame, name: str, id_column: str) -> dict:
    """Probabilities indexed by id, the ids it scored (status ok and finite probabilities), and the
    whole table indexed the same way (its pred, threshold and fold columns, where it has them)."""
    df, source = _table(obj, f"predictions {name!r}")
    cols = [c for c in df.columns if str(c).startswith("prob_")]
    if not cols:
        raise UserError(f"{source}: no prob_<class> columns (expected a file written by `mmdx predict`)")
    id_col = "id" if "id" in df.columns else id_column
    need_columns(df, source, id_col)
    probs = df[cols].apply(pd.to_numeric, errors="coerce")
    probs.index = df.index = _ids(df, id_col, source)
    probs.columns = [str(c)[5:] for c in cols]
    status = df["status"].astype(str).str.strip().to_numpy() if "status" in df.columns else np.full(len(df), "ok")
    ok = (status == "ok") & np.isfinite(probs.to_numpy()).all(1)
    return {"source": source, "probs": probs, "ok": probs.index[ok], "n_rows": len(df), "frame": df}


def read_labels(labels: PathOrFrame, id_column: str, label_column: str, group_column: Optional[str] = None) -> dict:
    """The labels file indexed by id (as text), and the ids whose label is not empty."""
    lab, source = _table(labels, "labels")
    need_columns(lab, source, id_column, label_column, *([group_column] if group_column else []))
    lab.index = _ids(lab, id_column, source)
    return {"frame": lab, "source": source, "column": label_column,
            "labelled": lab.index[lab[label_column].notna().to_numpy()]}


def class_truth(lab: dict, ids: pd.Index, classes: list[str], class_names: Optional[Mapping] = None) -> pd.Series:
    """The class each id's label names, spelled as the prob_<class> columns spell it: `class_names`
    (the config's task.names) maps raw label values (0/1) to names. A value no column names is the
    user's mistake (another label column, or a config forgotten), refused in one line."""
    named = {as_text(k): v for k, v in (class_names or {}).items()}
    truth = pd.Series([named.get(as_text(v), as_text(v)) for v in lab["frame"].loc[ids, lab["column"]]], index=ids)
    unknown = sorted(set(truth) - set(classes))
    if len(classes) > 1 and unknown:
        hint = "" if class_names else "; with task.names, pass the config (--config) to map label values to names"
        raise UserError(f"{lab['source']}: label values {unknown[:5]} are not among the predicted classes "
                        f"{classes}{hint}")
    return truth


def positive_class(positive, classes: list[str]) -> Optional[str]:
    """The class scored against the rest: `positive`, else the last class when there are at most two
    (prob_<positive> is the second column `mmdx predict` writes), else None (macro over classes)."""
    if positive is None and len(classes) <= 2:
        positive = classes[-1]
    positive = None if positive is None else as_text(positive)
    if positive is not None and positive not in classes:
        raise UserError(f"positive class {positive!r} is not among the predicted classes {classes}")
    return positive


def groups_of(lab: dict, ids: pd.Index, group_column: Optional[str]) -> Optional[list[str]]:
    """The group (patient) of each id, resampled whole; an empty cell is its record's own group, as in
    multimodal.data.splits.patients, so a config's data.group groups alike here and in evaluate."""
    if not group_column:
        return None
    cells = [as_text(v) if pd.notna(v) else "" for v in lab["frame"].loc[ids, group_column]]
    return [f"group:{g}" if g else f"id:{i}" for i, g in zip(ids, cells)]


def id_order(ids) -> np.ndarray:
    """The order rows are resampled in: by id, as text. With one seed, `compare` and `evaluate` (from
    a model or a predictions file) then draw the same patients from the same file, and no file's row
    order changes a CI."""
    return np.argsort(np.array([as_text(v) for v in ids], dtype=object), kind="stable")


DEFAULT_CUT = 0.5  # task.threshold's default: what `predict` decides at unless the config chose another


def operating_point(pred: dict, rows: pd.Index, p: np.ndarray, positive: str, two_classes: bool,
                    threshold: Optional[float] = None) -> tuple:
    """The cut a predictions file's decisions were made at (one, or one per row), and where it came
    from, in words for the report: `threshold`, else the file's threshold column, else the cut its pred
    column was decided at, else DEFAULT_CUT. `evaluate --predictions` scores its file there, and
    `compare` decides each file there for McNemar's test and the subgroups' sensitivity."""
    frame, source = pred["frame"], pred["source"]
    if threshold is not None:
        if not 0 <= threshold <= 1:
            raise UserError(f"--threshold {threshold}: a probability cut is between 0 and 1")
        return [float(threshold)], "--threshold"
    if "threshold" in frame.columns:
        t = pd.to_numeric(frame.loc[rows, "threshold"], errors="coerce").to_numpy(float)
        if not np.isfinite(t).all():
            raise UserError(f"{source}: the threshold column has empty or non-numeric cells; give --threshold")
        return (t[:, None] if len(set(t)) > 1 else [float(t[0])]), "the file's threshold column"
    if two_classes and "pred" in frame.columns:
        return _pred_cut(frame, rows, p, positive, source), "the file's pred column"
    return [DEFAULT_CUT], f"{DEFAULT_CUT} (the file has no threshold or pred column)"


def _pred_cut(frame: pd.DataFrame, rows: pd.Index, p: np.ndarray, positive: str, source: str):
    """The cut the file's pred column was decided at, so that its decisions are the ones scored: the
    model's own threshold, which the file does not name. 0.5 where the decisions agree with it (the
    default), else the lowest probability called positive (the same decisions); one per fold in an
    out-of-fold file (its fold column), each fold's model having chosen its own."""
    called = np.array([as_text(v) == positive for v in frame.loc[rows, "pred"]])
    folds = frame.loc[rows, "fold"].astype(str).to_numpy() if "fold" in frame.columns else np.zeros(len(rows))
    cuts = np.empty(len(rows))
    for f in np.unique(folds):
        here = folds == f
        pos, neg = p[here & called], p[here & ~called]
        if len(pos) and len(neg) and pos.min() <= neg.max():
            raise UserError(f"{source}: its pred column is not a cut of prob_{positive} (a record called "
                            f"{positive} has no higher probability than one that is not); give --threshold")
        low, high = (neg.max() if len(neg) else -np.inf), (pos.min() if len(pos) else np.inf)
        cuts[here] = DEFAULT_CUT if low < DEFAULT_CUT <= high else high if len(pos) else np.nextafter(low, np.inf)
    return cuts[:, None] if len(set(cuts)) > 1 else [float(cuts[0])]
