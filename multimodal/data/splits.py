"""Who is a patient, and how records are split between training, hold-out and folds.

Every split in mmdx (the validation hold-out, ensemble crossfit, `mmdx cv`, the baselines' inner folds,
the benchmark harness) goes through `patients` and `folds` here, so one records file is split the same
way everywhere and no patient is ever on both sides of a split."""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Optional

import numpy as np
import pandas as pd

from multimodal.config import Config, holdout_folds
from multimodal.data.records import Records
from multimodal.errors import UserError

log = logging.getLogger("mmdx")

Folds = list[tuple[np.ndarray, np.ndarray]]


def patients(df: pd.DataFrame, config: Config) -> np.ndarray:
    """The patient of each row: its `data.group` cell, else (no group column, or an empty cell) its id.
    An empty group cell is its record's own patient: making all of them one pseudo-patient would put
    unrelated records on one side of every split. Privacy thresholds count the same patients, so a
    name written in two records of one patient is still a single patient's."""
    ids = "id:" + df[config.data.id].astype(str)
    if not config.data.group:
        return ids.to_numpy(dtype=str)
    g = df[config.data.group]
    empty = g.isna() | (g.astype(str).str.strip() == "")
    return np.where(empty, ids, "group:" + g.astype(str)).astype(str)


def shared_patients(df: pd.DataFrame, config: Config) -> Optional[np.ndarray]:
    """The patient of each row where a patient can have several rows (data.group set, or an id
    repeated), else None: every row is its own patient. Folds and bootstrap resamples take whole
    patients, since splitting one patient's rows lets a model recognise the patient and makes CIs
    too narrow; with None they draw rows, which is the same thing, faster."""
    g = patients(df, config)
    return g if config.data.group or len(set(g)) < len(g) else None


def folds(strata: np.ndarray, groups: Optional[np.ndarray], k: int, seed: int) -> Folds:
    """The one splitter: `k` stratified, shuffled (train, test) index pairs, grouped by patient when
    `groups` is given (scikit-learn's StratifiedGroupKFold; StratifiedKFold when every row is its own
    patient and the caller says so with None)."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    X = np.zeros(len(strata))
    if groups is None:
        return list(StratifiedKFold(k, shuffle=True, random_state=seed).split(X, strata))
    return list(StratifiedGroupKFold(k, shuffle=True, random_state=seed).split(X, strata, groups))


def fold_of(records: Records, cfg: Config, k: int, seed: int) -> np.ndarray:
    """Fold index per record, stratified by the first label column where every class can fill every
    fold (else grouped and shuffled only); no patient in two folds."""
    groups = patients(records.df, cfg)
    if len(set(groups)) < k:
        raise UserError(f"{records.source}: {len(set(groups))} patients cannot fill {k} folds")
    strata = records.df[cfg.label_columns()[0]].astype(str).to_numpy() if cfg.task.type != "multilabel" \
        else np.zeros(len(records))
    if np.unique(strata, return_counts=True)[1].min() < k:  # a class too rare to be in every fold
        strata = np.zeros(len(records))
    out = np.full(len(records), -1)
    for j, (_, test) in enumerate(folds(strata, groups, k, seed)):
        out[test] = j
    return out


def holdout_splits(records: Records, cfg: Config, n: int = 1) -> list[tuple[Records, Records]]:
    """Validation hold-out(s) when the user gives no validation records: the first `n` (train, hold-out)
    pairs of one stratified, seeded, patient-grouped K-fold split, K = round(1 / val_fraction), so
    their hold-outs are disjoint (train.ensemble_holdout: crossfit). Split before preprocessing is
    fitted, so a single hold-out's patients never reach the vocabulary or the scaler statistics."""
    n_groups = len(set(patients(records.df, cfg)))
    if n_groups < 2:
        raise UserError(f"{records.source}: a validation hold-out needs at least 2 patients")
    k = min(holdout_folds(cfg.train.val_fraction), n_groups)
    fold = fold_of(records, cfg, k, seed=cfg.train.seed)
    return [(records.subset(np.flatnonzero(fold != j)), records.subset(np.flatnonzero(fold == j)))
            for j in range(min(n, k))]


def check_disjoint(train: Records, val: Records, cfg: Config) -> None:
    """Validation patients that are also training patients make every validation number a lie."""
    same = train.source == val.source != "records"
    with contextlib.suppress(OSError):
        same = same or os.path.samefile(train.source, val.source)
    if same:
        raise UserError(f"--val {val.source} is the training records file; give other patients or omit --val")
    shared = set(patients(train.df, cfg)) & set(patients(val.df, cfg))
    if shared:
        what = cfg.data.group or cfg.data.id
        raise UserError(f"{val.source}: {len(shared)} validation patients ({what}) are also in the training "
                        f"records, e.g. {sorted(shared)[0]!r}")


def has_label(y: np.ndarray) -> np.ndarray:
    """Rows with a target: class index >= 0, or a multilabel row that is not all NaN."""
    return ~np.isnan(y).all(1) if y.ndim == 2 else y >= 0


def labelled(records: Records, prep) -> tuple[Records, np.ndarray]:
    """Encode labels (`prep`: the fitted Preprocessing) and drop unlabelled rows: training and evaluation
    need a target."""
    y = prep.labels.encode(records.df)
    prep.labels.check(records.df, y, records.source)
    keep = has_label(y)
    if not keep.all():
        log.warning("%s: %d records without a label are skipped", records.source, int((~keep).sum()))
    return records.subset(np.flatnonzero(keep)), y[keep]
