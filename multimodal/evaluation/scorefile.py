"""`mmdx evaluate --predictions`: a predictions file already written (by `mmdx predict`, `mmdx cv`'s
out-of-fold predictions.csv or `mmdx baselines`) scored against the labels of a records file, with no
model directory.

It is `evaluate --model` without the forward pass, so that a file kept from any run can be scored
again, and scored like the rest: it is read and joined with the labels on id as `mmdx compare` joins
them (multimodal.evaluation.joining), and the numbers come from compute_metrics, which
`evaluate --model` calls too, on the rows in the same (id) order with the same seed and groups. On the
file `predict` wrote for the same records they are `evaluate --model`'s, and a file's AUROC CI is the
one `compare` prints for it. No model is loaded and no network built.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Union

import pandas as pd

from multimodal.errors import UserError
from multimodal.evaluation.joining import (class_truth, groups_of, id_order, operating_point, positive_class,
                                           read_labels, read_predictions)
from multimodal.evaluation.metrics import compute_metrics

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
    at (joining.operating_point), else 0.5. More classes: macro over classes, decided by the most probable one.
    Every prediction row needs a row in `labels` and every labelled record a prediction, so a file
    made for other records is refused, not scored on the few ids they share. A prediction_set column
    (task.conformal) adds the sets' empirical coverage and mean size ("conformal")."""
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
        cut, source = operating_point(pred, rows, P, positive, len(classes) == 2, threshold)
    groups = groups_of(lab, rows, group_column)
    m = compute_metrics(y, P, task, names, n_boot=n_boot, seed=seed, thresholds=cut, groups=groups)
    if "prediction_set" in pred["frame"].columns:  # written by a model with task.conformal
        from multimodal.evaluation.conformal import parse_sets, set_metrics

        sets = parse_sets(pred["frame"].loc[rows, "prediction_set"].tolist(), classes, pred["source"])
        m["conformal"] = set_metrics(truth.map(classes.index).to_numpy(), sets, classes, n_boot=n_boot, seed=seed,
                                     groups=groups)
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
