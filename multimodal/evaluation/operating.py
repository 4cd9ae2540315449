"""Operating points: the probability cut a clinician would use, chosen on validation patients.

Calibrated probabilities cut at 0.5 flag few positives when positives are rare; a screening study
fixes a sensitivity (or specificity) and reads the rest there. `task.threshold` says how the cut is
chosen: a number, `youden` (max sensitivity + specificity − 1), `sensitivity:0.9` (the highest cut
that keeps sensitivity ≥ 0.9, i.e. the best specificity at that sensitivity) or `specificity:0.95`.
The cut is chosen once, at fit time, on the validation records, and saved with the model.
"""
from __future__ import annotations

import numpy as np

from multimodal.config import parse_rule


def choose(y: np.ndarray, p: np.ndarray, rule) -> float:
    """The cut for one binary output: y in {0, 1}, p the calibrated probability of 1."""
    kind, x = parse_rule(rule)
    if kind == "fixed":
        return x
    y, p = np.asarray(y).astype(int), np.asarray(p, dtype=np.float64)
    if y.min() == y.max():
        return 0.5  # one class only: no curve to choose on
    cuts = np.unique(p)[::-1]  # every distinct probability, high to low: "p >= cut" is positive
    pos, neg = y == 1, y == 0
    sens = np.array([(p[pos] >= c).mean() for c in cuts])
    spec = np.array([(p[neg] < c).mean() for c in cuts])
    if kind == "youden":
        i = int(np.argmax(sens + spec - 1))
    elif kind == "sensitivity":
        i = int(np.argmax(sens >= x))  # the first (highest) cut that reaches it
    else:
        ok = np.flatnonzero(spec >= x)
        i = int(ok[-1]) if len(ok) else 0  # the lowest cut that still keeps it
    return float(cuts[i])


def thresholds_for(y: np.ndarray, P: np.ndarray, task: str, rule) -> list[float]:
    """The cut of each output (binary: one; multilabel: one per label) by `rule`, on the rows scored
    and labelled for that output."""
    from multimodal.inference.forward import scored

    if task == "binary":
        ok = scored(P)
        return [choose(y[ok], P[ok], rule)]
    ts = []
    for j in range(P.shape[1]):
        ok = ~np.isnan(P[:, j]) & ~np.isnan(y[:, j])
        ts.append(choose(y[ok, j], P[ok, j], rule))
    return ts


def confusion_metrics(y: np.ndarray, p: np.ndarray, t: float) -> dict[str, float]:
    y, pred = np.asarray(y).astype(int), (np.asarray(p) >= t).astype(int)
    tp, fp = int(((pred == 1) & (y == 1)).sum()), int(((pred == 1) & (y == 0)).sum())
    fn, tn = int(((pred == 0) & (y == 1)).sum()), int(((pred == 0) & (y == 0)).sum())

    def ratio(a, b):
        return a / b if b else float("nan")

    return {"sensitivity": ratio(tp, tp + fn), "specificity": ratio(tn, tn + fp), "ppv": ratio(tp, tp + fp),
            "npv": ratio(tn, tn + fn), "f1": ratio(2 * tp, 2 * tp + fp + fn)}


def at_threshold(y: np.ndarray, p: np.ndarray, t, n_boot: int = 1000, seed: int = 0,
                 groups: np.ndarray | None = None) -> dict:
    """Sensitivity, specificity, PPV, NPV and F1 at the cut, with 95% percentile bootstrap CIs over
    patients (`groups`: resample patients, keeping their records together)."""
    from multimodal.evaluation.bootstrap import ci95, point_and_resamples

    t = np.asarray(t, dtype=float)  # or one cut per record (out-of-fold: each fold's own)
    per_row = t.ndim > 0
    point, boots = point_and_resamples(lambda idx: confusion_metrics(y[idx], p[idx], t[idx] if per_row else t),
                                       len(y), n_boot, seed, groups)
    shown = sorted(set(t.tolist())) if per_row else float(t)
    return {"threshold": shown} | {k: {"value": float(v), "ci95": ci95(boots[k])} for k, v in point.items()}
