"""Classification metrics (scikit-learn) with percentile bootstrap 95% CIs over patients."""
from __future__ import annotations

import warnings

import numpy as np

from multimodal.evaluation.bootstrap import ci95, point_and_resamples, shifted_ci95
from multimodal.evaluation.calibration import expected_calibration_error


def prob_matrix(probs: np.ndarray, task: str) -> np.ndarray:
    """Binary positive-class probabilities → [N, 2]; others unchanged."""
    probs = np.asarray(probs, dtype=np.float64)
    return np.stack([1 - probs, probs], 1) if task == "binary" and probs.ndim == 1 else probs


def onehot(y: np.ndarray, task: str, k: int) -> np.ndarray:
    return y.astype(int) if task == "multilabel" else np.eye(k, dtype=int)[y.astype(int)]


def cuts(thresholds, task: str, k: int) -> np.ndarray:
    """The thresholds as an array: one per decided column ([1] binary, [K] multilabel; 0.5 where none
    are stored), or one row of them per record ([N, 1] / [N, K]: out-of-fold predictions, each made at
    its own fold's cut)."""
    if thresholds is None or not len(thresholds):
        return np.full(1 if task == "binary" else k, 0.5)
    return np.asarray(thresholds, dtype=float)


def predicted(P: np.ndarray, task: str, thresholds=None) -> np.ndarray:
    """[N, K] 0/1 decisions: binary and multilabel cut at the stored thresholds (0.5 if none; see
    cuts), multiclass takes the most probable class."""
    if task == "multiclass":
        return np.eye(P.shape[1], dtype=int)[P.argmax(1)]
    t = cuts(thresholds, task, P.shape[1])
    if task == "binary":
        pos = (P[:, 1] >= t[..., 0]).astype(int)
        return np.stack([1 - pos, pos], 1)
    return (P >= t).astype(int)


def point_metrics(Y: np.ndarray, P: np.ndarray, task: str, thresholds=None) -> dict[str, float]:
    """Y: [N, K] 0/1 truth, P: [N, K] probabilities → flat metric dict (NaN where undefined)."""
    from sklearn.metrics import accuracy_score, average_precision_score, f1_score, roc_auc_score  # 1 s to import

    out: dict[str, float] = {}
    pred = predicted(P, task, thresholds)
    for j in range(P.shape[1]):
        both = 0 < Y[:, j].sum() < len(Y)
        out[f"auroc/{j}"] = roc_auc_score(Y[:, j], P[:, j]) if both else np.nan
        out[f"auprc/{j}"] = average_precision_score(Y[:, j], P[:, j]) if both else np.nan
        out[f"f1/{j}"] = f1_score(Y[:, j], pred[:, j], zero_division=0)
    out["accuracy"] = accuracy_score(Y, pred) if task == "multilabel" else accuracy_score(Y.argmax(1), pred.argmax(1))
    labels = Y[:, 1] if task == "binary" else Y.argmax(1) if task == "multiclass" else Y
    out["ece"] = expected_calibration_error(labels, P, task)
    k = P.shape[1]
    pos = [k - 1] if task == "binary" else range(k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for m in ("auroc", "auprc", "f1"):
            out[m] = float(np.nanmean([out[f"{m}/{j}"] for j in pos]))
    return out


def compute_metrics(y: np.ndarray, probs: np.ndarray, task: str, classes: list[str],
                    n_boot: int = 1000, seed: int = 0, thresholds=None, groups=None) -> dict:
    """Binary: AUROC/AUPRC/F1 of the positive (second) class. Multiclass/multilabel: macro over classes.
    F1 and accuracy are at the model's `thresholds` (binary, multilabel; or a row of them per record,
    see cuts). CIs resample patients (`groups`, else rows) with replacement; a resample where a
    metric is undefined is skipped for it.
    Binary and multilabel also get `operating_point`: sensitivity, specificity, PPV, NPV, F1 at the cut."""
    P = prob_matrix(probs, task)
    Y = onehot(np.asarray(y), task, P.shape[1])
    T = None if task == "multiclass" else cuts(thresholds, task, P.shape[1])
    per_row = T is not None and T.ndim == 2
    point, boots = point_and_resamples(lambda idx: point_metrics(Y[idx], P[idx], task, T[idx] if per_row else T),
                                       len(Y), n_boot, seed, groups)

    def stat(k):
        interval = shifted_ci95(point[k], boots[k]) if k == "ece" else ci95(boots[k])
        return {"value": float(point[k]), "ci95": interval}

    overall = {m: stat(m) for m in ("auroc", "auprc", "accuracy", "f1", "ece")}
    per_class = {c: {m: stat(f"{m}/{j}") for m in ("auroc", "auprc", "f1")} | {"support": int(Y[:, j].sum())}
                 for j, c in enumerate(classes)}
    out = {"n": int(len(Y)), "task": task, "overall": overall, "per_class": per_class, "n_bootstrap": n_boot}
    if task != "multiclass":
        from multimodal.evaluation.operating import at_threshold

        cols = [1] if task == "binary" else range(P.shape[1])
        ops = {classes[j]: at_threshold(Y[:, j], P[:, j], T[..., i], n_boot, seed, groups) for i, j in enumerate(cols)}
        out["operating_point"] = ops[classes[1]] if task == "binary" else ops
    return out


def _fmt(s: dict) -> str:
    lo, hi = s["ci95"]
    return f"{s['value']:.3f} [{lo:.3f}, {hi:.3f}]" if np.isfinite(lo) else f"{s['value']:.3f} [n/a]"


def format_table(metrics: dict) -> str:
    """A readable table: overall metrics, then per class (value [95% CI])."""
    lines = [f"n = {metrics['n']} ({metrics['task']}); 95% bootstrap CIs over {metrics['n_bootstrap']} resamples",
             f"{'':24s}{'AUROC':>24s}{'AUPRC':>24s}{'F1':>24s}{'accuracy':>24s}"]
    o = metrics["overall"]
    lines.append(f"{'overall':24s}{_fmt(o['auroc']):>24s}{_fmt(o['auprc']):>24s}{_fmt(o['f1']):>24s}{_fmt(o['accuracy']):>24s}")
    binary = metrics["task"] == "binary"  # one AUROC, the overall one: each class's would repeat it
    for c, s in metrics["per_class"].items():
        name = f"{c} (n={s['support']})"[:23]
        auroc = "" if binary else _fmt(s["auroc"])
        lines.append(f"{name:24s}{auroc:>24s}{_fmt(s['auprc']):>24s}{_fmt(s['f1']):>24s}")
    if "ece" in o:
        lines.append(f"expected calibration error (15 bins): {_fmt(o['ece'])}")
    op = metrics.get("operating_point")
    if op:
        for name, d in ({"": op} if "threshold" in op else op).items():
            t = d["threshold"]
            at = f"at threshold {t:.3g}" if not isinstance(t, list) else \
                f"at each fold's threshold ({', '.join(f'{v:.3g}' for v in t)})"
            lines.append(f"{at}{' (' + name + ')' if name else ''}: " + ", ".join(
                f"{k if k in ('sensitivity', 'specificity') else k.upper()} {_fmt(d[k])}"
                for k in ("sensitivity", "specificity", "ppv", "npv", "f1")))
    return "\n".join(lines)
