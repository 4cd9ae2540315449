"""Metrics of a model's outputs on labelled records: what `fit` reports on validation patients and
`evaluate` on test patients."""
from __future__ import annotations

import numpy as np

from multimodal.data.splits import shared_patients
from multimodal.errors import UserError
from multimodal.evaluation.comparison import id_order
from multimodal.evaluation.metrics import compute_metrics
from multimodal.evaluation.plots import write_plots
from multimodal.inference.forward import scored


def scored_metrics(cfg, prep, allrec, rec, y: np.ndarray, P: np.ndarray, n_boot: int, plots_dir=None) -> dict:
    """compute_metrics on the rows that could be scored, with CIs over patients; `allrec`: every record
    given (the unlabelled ones are counted), `rec`/`y`: the labelled ones; `plots_dir` also gets
    roc.png and reliability.png; task.conformal adds the prediction sets' coverage and size. The rows
    are resampled in id order, not the file's, so the CIs are those `mmdx compare` and `evaluate
    --predictions` give for the same patients, n_boot and seed."""
    ok = scored(P)
    if ok.sum() < 2:
        raise UserError(f"{rec.source}: fewer than 2 records could be scored")
    task, classes = cfg.task.type, prep.labels.names
    rows = np.flatnonzero(ok)[id_order(rec.df[cfg.data.id].to_numpy()[ok])]  # as compare orders them
    groups = shared_patients(rec.df, cfg)
    groups = groups[rows] if groups is not None else None
    m = compute_metrics(y[rows], P[rows], task, classes, n_boot=n_boot, seed=cfg.train.seed,
                        thresholds=prep.labels.thresholds, groups=groups)
    state = prep.labels.conformal
    if state is not None:  # task.conformal: the stored cuts' sets on these records
        from multimodal.evaluation.conformal import prediction_sets, set_metrics

        m["conformal"] = set_metrics(y[rows], prediction_sets(P[rows], state["cuts"]), classes, n_boot=n_boot,
                                     seed=cfg.train.seed, groups=groups, state=state)
    m["n_errors"] = int((~ok).sum())
    m["n_unlabelled"] = len(allrec) - len(rec)
    if plots_dir is not None:
        m["plots"] = [str(p) for p in write_plots(y[ok], P[ok], task, classes, plots_dir,
                                                  operating_point=m.get("operating_point"))]
    return m
