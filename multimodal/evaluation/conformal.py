"""Split-conformal prediction sets: the classes a patient's calibrated probabilities cannot rule out.

"Melanoma or naevus, with the true class in the set for 90% of patients" is more use at the bedside
than a bare probability, and the guarantee holds whatever the network, as long as new patients are
exchangeable with the calibration records (Vovk et al. 2005; the LAC score of Sadinle, Lei &
Wasserman 2019). On n calibration records the nonconformity score is 1 − p(true class); with r =
ceil((n + 1) · coverage), the cut is the r-th smallest score, and a record's set holds every class k
whose score 1 − p_k does not exceed it. Then P(true class ∈ set) ≥ coverage for a new record.

Class-conditional (Mondrian) cuts are fitted on each class's calibration records alone, so coverage
holds within each class: one pooled cut over-covers the frequent class and under-covers a rare one
(the malignant lesions a screening model is for). `by_class="auto"` takes them when the task is
imbalanced and every class has the records a finite cut needs (see use_by_class).

A cut is kept as a probability: class k is in the set when p_k ≥ cut_k, where cut_k is the
(n + 1 − r)-th smallest true-class probability, the r-th smallest score without the 1 − (1 − p)
rounding. Where r > n (too few records) the cut is 0: the class is always in the set, which keeps the
guarantee. The method is a few lines of numpy, so no conformal library is a dependency.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import numpy as np

from multimodal.errors import UserError
from multimodal.evaluation.bootstrap import ci95, point_and_resamples
from multimodal.evaluation.metrics import prob_matrix

JOIN = "|"  # between the class names of one prediction set; the empty set is ""
SET_COLUMNS = ("prediction_set", "set_size")


def _rank(n: int, coverage: float) -> int:
    """r = ceil((n + 1) · coverage), the rank of the cut among n scores (the 1e-9 absorbs 10 × 0.9 ≠ 9)."""
    return math.ceil((n + 1) * coverage - 1e-9)


def min_records(coverage: float) -> int:
    """The fewest calibration records that give a finite cut (r ≤ n): 9 at 0.9, 19 at 0.95."""
    n = 1
    while _rank(n, coverage) > n:
        n += 1
    return n


def cut_of(p_true: np.ndarray, coverage: float) -> float:
    """The probability cut from one group's true-class probabilities (0.0, every class in, when the
    group is too small for a finite one)."""
    p = np.sort(np.asarray(p_true, dtype=np.float64))
    r = _rank(len(p), coverage)
    return float(p[len(p) - r]) if r <= len(p) else 0.0


def use_by_class(setting: Union[bool, str], counts: np.ndarray, coverage: float) -> bool:
    """auto: per class when the rarest class holds under half its even share (1 / (2K)) of the
    calibration records, i.e. the task is imbalanced, and every class has min_records of them, so no
    class is left with the trivial cut 0."""
    if isinstance(setting, bool):
        return setting
    counts = np.asarray(counts)
    imbalanced = counts.min() / counts.sum() < 1 / (2 * len(counts))
    return bool(imbalanced and counts.min() >= min_records(coverage))


def fit_cuts(y: np.ndarray, P: np.ndarray, coverage: float, by_class: Union[bool, str] = "auto") -> dict:
    """The cuts from the calibration records' labels `y` (class index) and calibrated probabilities `P`
    ([N] positive-class for binary, or [N, K]); rows with NaN probabilities (not scored) are left out.
    → {"coverage", "by_class", "cuts": [K], "n_calibration": [K] records per class}, JSON-able."""
    P = prob_matrix(P, "binary" if np.ndim(P) == 1 else "multiclass")
    y = np.asarray(y).astype(int)
    ok = np.isfinite(P).all(1) & (y >= 0)
    P, y = P[ok], y[ok]
    k = P.shape[1]
    counts = np.bincount(y, minlength=k)
    if not len(y):
        raise UserError("task.conformal: no calibration record could be scored")
    per_class = use_by_class(by_class, counts, coverage)
    p_true = P[np.arange(len(y)), y]
    cuts = [cut_of(p_true[y == j], coverage) for j in range(k)] if per_class else [cut_of(p_true, coverage)] * k
    return {"coverage": float(coverage), "by_class": per_class, "cuts": cuts, "n_calibration": counts.tolist()}


def prediction_sets(P: np.ndarray, cuts: Sequence[float]) -> np.ndarray:
    """[N, K] bool: class k is in a record's set when its probability reaches cuts[k]. A row that was
    not scored (NaN) has an empty row here; its output row is an error, not an empty set."""
    P = prob_matrix(P, "binary" if np.ndim(P) == 1 else "multiclass")
    with np.errstate(invalid="ignore"):
        return P >= np.asarray(cuts, dtype=np.float64)[None, :]


def check_names(names: Sequence[str]) -> None:
    if any(JOIN in n for n in names):
        bad = next(n for n in names if JOIN in n)
        raise UserError(f"task.conformal: class name {bad!r} contains {JOIN!r}, which joins a prediction set's "
                        f"classes; rename it in task.names")


def set_text(sets: np.ndarray, names: Sequence[str]) -> list[str]:
    """Each row's set as its class names joined by `|`, in class order; "" for the empty set."""
    return [JOIN.join(n for n, inside in zip(names, row) if inside) for row in sets]


def parse_sets(cells, classes: Sequence[str], source: str) -> np.ndarray:
    """A predictions file's prediction_set column → [N, K] bool over `classes` (the prob_ columns'
    names); an empty cell is the empty set."""
    from multimodal.evaluation.comparison import as_text

    index = {c: j for j, c in enumerate(classes)}
    out = np.zeros((len(cells), len(classes)), bool)
    for i, cell in enumerate(cells):
        text = "" if cell is None or (isinstance(cell, float) and math.isnan(cell)) else as_text(cell)
        for name in filter(None, text.split(JOIN)):
            if name not in index:
                raise UserError(f"{source}: prediction_set names {name!r}, not one of the classes {list(classes)}")
            out[i, index[name]] = True
    return out


def _point(y: np.ndarray, sets: np.ndarray) -> dict[str, float]:
    covered, size = sets[np.arange(len(y)), y], sets.sum(1)
    out = {"coverage": covered.mean(), "mean_set_size": size.mean(), "empty": (size == 0).mean()}
    for j in range(sets.shape[1]):
        here = y == j
        out[f"coverage/{j}"] = covered[here].mean() if here.any() else np.nan
        out[f"mean_set_size/{j}"] = size[here].mean() if here.any() else np.nan
    return out


def set_metrics(y: np.ndarray, sets: np.ndarray, classes: Sequence[str], n_boot: int = 1000, seed: int = 0,
                groups=None, state: Optional[dict] = None) -> dict:
    """Empirical coverage (share of records whose true class is in their set), mean set size and the
    share of empty sets, overall and within each true class, with 95% percentile CIs from the one
    bootstrap (patients resampled whole with `groups`). `state`: the fitted cuts (target, by_class)."""
    y = np.asarray(y).astype(int)
    point, boots = point_and_resamples(lambda idx: _point(y[idx], sets[idx]), len(y), n_boot, seed, groups)

    def stat(k):
        return {"value": float(point[k]), "ci95": ci95(boots[k])}

    sizes = np.bincount(sets.sum(1), minlength=sets.shape[1] + 1)
    out = {"n": int(len(y)), "coverage": stat("coverage"), "mean_set_size": stat("mean_set_size"),
           "empty": stat("empty"), "set_sizes": {str(s): int(c) for s, c in enumerate(sizes)},
           "per_class": {c: {"n": int((y == j).sum()), "coverage": stat(f"coverage/{j}"),
                             "mean_set_size": stat(f"mean_set_size/{j}")} for j, c in enumerate(classes)}}
    if state:
        out = {"target": state["coverage"], "by_class": state["by_class"], **out}
    return out


def format_sets(m: dict) -> str:
    """Lines for `evaluate`'s printed table."""
    def f(s):
        lo, hi = s["ci95"]
        return f"{s['value']:.3f} [{lo:.3f}, {hi:.3f}]" if np.isfinite(lo) else f"{s['value']:.3f} [n/a]"

    target = f" (target {m['target']:g}, {'per-class' if m['by_class'] else 'one'} cut)" if "target" in m else ""
    lines = [f"conformal prediction sets{target}: coverage {f(m['coverage'])}, mean set size "
             f"{f(m['mean_set_size'])}, empty {f(m['empty'])}; sizes "
             + ", ".join(f"{s}: {c}" for s, c in m["set_sizes"].items())]
    for c, s in m["per_class"].items():
        lines.append(f"  true class {c} (n={s['n']}): coverage {f(s['coverage'])}, mean set size "
                     f"{f(s['mean_set_size'])}")
    return "\n".join(lines)
