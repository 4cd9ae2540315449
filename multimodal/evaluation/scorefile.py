"""`mmdx evaluate --predictions`: a predictions file already written (by `mmdx predict`, `mmdx cv`'s
out-of-fold predictions.csv or `mmdx baselines`) scored against the labels of a records file, with no
model directory.

It is `evaluate --model` without the forward pass, so that a file kept from any run can be scored
again, and scored like the rest: it is read and joined with the labels on id as `mmdx compare` joins
them (multimodal.evaluation.comparison), and the numbers come from compute_metrics, which
`evaluate --model` calls too, on the rows in the same (id) order with the same seed and groups. On the
file `predict` wrote for the same records they are `evaluate --model`'s, and a file's AUROC CI is the
one `compare` prints for it. No model is loaded and no network built.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Union

import numpy as np
import pandas as pd

from multimodal.errors import UserError
from multimodal.evaluation.comparison import (as_text, class_truth, groups_of, id_order, positive_class,
                                              read_labels, read_predictions)
from multimodal.evaluation.metrics import compute_metrics

DEFAULT_CUT = 0.5  # task.threshold's default: what `predict` decides at unless the config chose another
REST = "rest"  # the negative class when one class of several is scored against the others


def evaluate_predictions(predictions: Union[str, Path, pd.DataFrame], labels: Union[str, Path, pd.DataFrame], *,
                         label_column: str = "label", id_column: str = "patient_id",
                         group_column: Optional[str] = None, positive=None,
                         class_names: Optional[Mapping] = None, threshold: Optional[float] = None,
                         n_boot: int = 1000, seed: int = 0, plots_dir=None) -> dict:
    """The metrics dict `evaluate --model` returns, of the predictions file against `labels`, with
    "threshold_from" (binary: where the operating point came from) and "predictions" (the file).

    Binary (two prob_ columns, or `positive` against the rest): AUROC/AUPRC of prob_<positive>
    (default: the last class, as `predict` writes it), F1, accuracy and sensitivity/specificity at
    `threshold`; without it, the file's `threshold` column, else the cut its `pred` column was decided
    at (see _pred_cut), else 0.5. More classes: macro over classes, decided by the most probable one.
    Every prediction row needs a row in `labels` and every labelled record a prediction, so a file
    made for other records is refused, not scored on the few ids they share."""
    if n_boot < 1:
        raise UserError(f"--n-boot must be at least 1, got {n_boot}")
    pred = read_predictions(predictions, "predictions", id_column)
    lab = read_labels(labels, id_column, label_column, group_column)
    _same_records(pred, lab)
    rows = pred["ok"].intersection(lab["labelled"])
    rows = rows[id_order(rows)]  # compare's order: the same resamples for the same seed
    if len(rows) < 2:
        raise UserError(f"{pred['source']}: fewer than 2 labelled records were scored (status ok)")
    classes = list(pred["probs"].columns)
    truth = class_truth(lab, rows, classes, class_names)
    positive = positive_class(positive, classes)
    if positive is None:
        if threshold is not None:
            raise UserError(f"--threshold sets a binary operating point; {pred['source']} has {len(classes)} "
                            f"classes, decided by the most probable one (give --positive to score one class)")
        task, names, cut, source = "multiclass", classes, None, None
        y, P = truth.map(classes.index).to_numpy(), pred["probs"].loc[rows, classes].to_numpy()
    else:
        task = "binary"
        names = [next(c for c in classes if c != positive), positive] if len(classes) == 2 else [REST, positive]
        y, P = (truth == positive).to_numpy().astype(int), pred["probs"].loc[rows, positive].to_numpy()
        cut, source = _operating_point(pred, rows, P, positive, len(classes) == 2, threshold)
    m = compute_metrics(y, P, task, names, n_boot=n_boot, seed=seed, thresholds=cut,
                        groups=groups_of(lab, rows, group_column))
    labelled = pred["probs"].index.isin(lab["labelled"])
    m["n_errors"] = int(labelled.sum()) - len(rows)
    m["n_unlabelled"] = int((~labelled).sum())
    m["predictions"] = pred["source"]
    if source:
        m["threshold_from"] = source
    if plots_dir is not None:
        from multimodal.evaluation.plots import write_plots

        m["plots"] = [str(p) for p in write_plots(y, P, task, names, plots_dir,
                                                  operating_point=m.get("operating_point"))]
    return m


def _same_records(pred: dict, lab: dict) -> None:
    """Each prediction row needs its label row, and each labelled record its prediction: a file made
    for other records (or joined on the wrong id column) would otherwise be scored on whatever few ids
    the two share, and look like a result."""
    ids = pred["probs"].index
    for missing, have, lack in ((ids.difference(lab["frame"].index), pred["source"], lab["source"]),
                                (lab["labelled"].difference(ids), lab["source"], pred["source"])):
        if len(missing):
            raise UserError(f"{lack} has no row for {len(missing)} of the ids in {have} (e.g. {missing[0]!r}); "
                            f"score a predictions file against the records it was made for")


def _operating_point(pred: dict, rows: pd.Index, p: np.ndarray, positive: str, two_classes: bool,
                     threshold: Optional[float]) -> tuple:
    """The cut (one, or one per row) and where it came from, in words for the report."""
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
