"""Evaluation figures: ROC curves and a reliability diagram, drawn by scikit-learn's displays."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from multimodal.evaluation.calibration import calibration_points
from multimodal.evaluation.metrics import onehot, prob_matrix


def write_plots(y: np.ndarray, probs: np.ndarray, task: str, classes: list[str], out_dir,
                operating_point: dict | None = None) -> list[Path]:
    """`operating_point`: evaluate's, drawn on the ROC curve where the model's threshold cuts it."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed
    from sklearn.calibration import CalibrationDisplay
    from sklearn.metrics import RocCurveDisplay

    from multimodal.output import atomic_file

    out = Path(out_dir)
    P = prob_matrix(probs, task)
    Y = onehot(np.nan_to_num(y), task, P.shape[1])
    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    for j in ([1] if task == "binary" else range(P.shape[1])):
        if 0 < Y[:, j].sum() < len(Y):
            RocCurveDisplay.from_predictions(Y[:, j], P[:, j], name=str(classes[j]), ax=ax)
    points = {} if not operating_point else (
        {str(classes[1]): operating_point} if "threshold" in operating_point else operating_point)
    for name, op in points.items():
        ax.plot(1 - op["specificity"]["value"], op["sensitivity"]["value"], "o", ms=8, mfc="none", mew=2,
                label=f"{name}: threshold {op['threshold']:.3g}")
    if points:
        ax.legend(loc="lower right")
    ax.plot([0, 1], [0, 1], ls=":", c="grey")
    # scikit-learn's labels name the positive label as the encoded 1, not the class (task.names)
    ax.set_xlabel("false positive rate (1 − specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title("ROC" if task != "binary" else f"ROC, {classes[1]} against {classes[0]}")
    atomic_file(out / "roc.png", lambda t: fig.savefig(t, dpi=110, bbox_inches="tight", format="png"))

    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    correct, conf = calibration_points(y, P, task)
    label = {"binary": f"P({classes[1]})", "multiclass": "top class", "multilabel": "all labels"}[task]
    CalibrationDisplay.from_predictions(correct, conf, n_bins=15, name=label, ax=ax)
    ax.set_title("Reliability diagram")
    atomic_file(out / "reliability.png", lambda t: fig.savefig(t, dpi=110, bbox_inches="tight", format="png"))
    return [out / "roc.png", out / "reliability.png"]
