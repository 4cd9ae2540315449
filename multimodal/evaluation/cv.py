"""Grouped, stratified k-fold cross-validation on a user's own records (`mmdx cv`).

With a few hundred patients one validation split is too noisy to choose a recipe by; k folds use
every patient once for testing. Folds keep a patient's records together (data.group, else the id)
and keep the label balance. Each fold's model is trained exactly as `mmdx train` would train it on
the other folds (its own inner hold-out for early stopping, calibration and the operating point),
so the out-of-fold predictions are as honest as a fresh validation set, and two configs run with
the same seed and folds can be compared with `mmdx compare` on their predictions.csv files.
"""
from __future__ import annotations

import logging
import time
from typing import Optional

import numpy as np
import pandas as pd

from multimodal.errors import UserError
from multimodal.formats import strict_json
from multimodal.output import staged_dir
from multimodal.data.records import Records
from multimodal.data.splits import fold_of, has_label, labelled, patients

log = logging.getLogger("mmdx")


def cross_validate(estimator, records, folds: int = 5, out: Optional[str] = None, progress: bool = False,
                   n_boot: int = 1000) -> dict:
    """Train `folds` models, each a fresh `estimator.clone()` (an unfitted DiagnosisModel, as
    scikit-learn's model selection clones its estimator); return per-fold and pooled out-of-fold
    metrics (95% CIs over patients) and the out-of-fold predictions (one row per record, in input
    order). `out`: a folder for predictions.csv and metrics.json."""
    from multimodal.evaluation.comparison import id_order
    from multimodal.evaluation.metrics import compute_metrics, cuts
    from multimodal.output import check_dir_target
    from multimodal.data.records import load_records

    if folds < 2:
        raise UserError("--folds must be at least 2")
    if out is not None:
        check_dir_target(out, "cv", inputs=[records])
    cfg = estimator.config
    rec = load_records(records, cfg, labels=True)
    fold = fold_of(rec, cfg, folds, cfg.train.seed)
    rows, per_fold, t0 = [None] * folds, [], time.perf_counter()
    for k in range(folds):
        model = estimator.clone()
        model.fit(rec.subset(np.flatnonzero(fold != k)), None, progress=progress)
        test = rec.subset(np.flatnonzero(fold == k))
        pred = model.predict(test)
        pred.insert(1, "fold", k + 1)
        rows[k] = pred.set_index(np.flatnonzero(fold == k))
        _, y = labelled(test, model.prep)
        P = _probs(pred, model.classes, cfg.task.type)[_labelled_rows(test, model.prep)]
        ok = ~np.isnan(P).any(1) if P.ndim == 2 else ~np.isnan(P)
        m = compute_metrics(y[ok], P[ok], cfg.task.type, model.classes, n_boot=200, seed=cfg.train.seed,
                            thresholds=model.prep.labels.thresholds)
        per_fold.append({"fold": k + 1, "n_test": int(ok.sum()), "auroc": m["overall"]["auroc"]["value"],
                         "best_epoch": model.metrics["training"]["best_epoch"],
                         "thresholds": model.prep.labels.thresholds})
        log.info("fold %d/%d: AUROC %.3f on %d records (%.0f s so far)", k + 1, folds, per_fold[-1]["auroc"],
                    per_fold[-1]["n_test"], time.perf_counter() - t0)
    oof = pd.concat(rows).sort_index()
    for c in cfg.label_columns():
        oof[c] = rec.df[c].to_numpy()
    keep = _labelled_rows(rec, model.prep)
    _, y = labelled(rec, model.prep)
    P = _probs(oof, model.classes, cfg.task.type)[keep]
    ok = ~np.isnan(P).any(1) if P.ndim == 2 else ~np.isnan(P)
    order = id_order(rec.df[cfg.data.id].to_numpy()[keep][ok])  # resampled as evaluate and compare do
    groups = patients(rec.df, cfg)[keep][ok][order]
    row_cuts = None
    if cfg.task.type != "multiclass":  # each record decided at its own fold's cut, as its pred column was
        by_fold = [cuts(f["thresholds"], cfg.task.type, len(model.classes)) for f in per_fold]
        row_cuts = np.stack([by_fold[k] for k in fold])[keep][ok][order]
    pooled = compute_metrics(y[ok][order], P[ok][order], cfg.task.type, model.classes, n_boot=n_boot,
                             seed=cfg.train.seed, thresholds=row_cuts, groups=groups)
    result = {"folds": folds, "seed": cfg.train.seed, "per_fold": per_fold, "pooled": pooled,
              "n_records": len(rec), "n_patients": int(len(set(patients(rec.df, cfg)))),
              "seconds": time.perf_counter() - t0}
    if out is not None:
        from multimodal.formats import defuse_frame

        with staged_dir(out, "cv", inputs=[records]) as tmp:
            defuse_frame(oof).to_csv(tmp / "predictions.csv", index=False)
            (tmp / "metrics.json").write_text(strict_json(result) + "\n")
    result["predictions"] = oof
    return result


def _labelled_rows(rec: Records, prep) -> np.ndarray:
    return has_label(prep.labels.encode(rec.df))


def _probs(pred: pd.DataFrame, classes: list[str], task: str) -> np.ndarray:
    P = pred[[f"prob_{c}" for c in classes]].to_numpy(dtype=float)
    return P[:, 1] if task == "binary" else P


def format_cv(result: dict) -> str:
    from multimodal.evaluation.metrics import format_table

    lines = [f"{result['folds']}-fold grouped CV over {result['n_records']} records of {result['n_patients']} "
             f"patients ({result['seconds']:.0f} s)"]
    lines += [f"  fold {f['fold']}: AUROC {f['auroc']:.3f} (n={f['n_test']}, best epoch {f['best_epoch']})"
              for f in result["per_fold"]]
    aurocs = [f["auroc"] for f in result["per_fold"]]
    lines.append(f"  fold mean {np.mean(aurocs):.3f} (SD {np.std(aurocs, ddof=1):.3f})")
    lines.append("pooled out-of-fold predictions:\n" + format_table(result["pooled"]))
    return "\n".join(lines)
