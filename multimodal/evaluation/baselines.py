"""Baselines a researcher would reach for instead of mmdx: the bar the fusion model has to clear
(`mmdx baselines`, and the benchmark harness's baseline rows).

One afternoon's work with scikit-learn, no tuning beyond what cross-validation on the training rows
picks: TF-IDF + logistic regression for the text, logistic regression and gradient boosting for
the tabular columns, logistic regression on precomputed image features, then the two obvious ways
of combining modalities (average the best per modality; stack them with a logistic regression).

Everything that is chosen (C, class weighting, which tabular model, the stack's weights) is chosen
on the training rows only, with folds that keep a patient's records together, so the test AUROCs
are as honest as the engine's. Model choice and stacking use the same out-of-fold predictions, and
each fold's model picks its own hyperparameters on its own rows (nested), so the stack is fitted
on predictions as noisy as the ones it will combine at test time.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, OrdinalEncoder, StandardScaler

from multimodal.data.splits import folds as split
from multimodal.data.splits import shared_patients
from multimodal.evaluation.comparison import auroc
from multimodal.data.preprocess.labels import LabelEncoder
from multimodal.formats import strict_json
from multimodal.output import write_table

N_FOLDS = 5
CS = np.logspace(-3, 2, 11)
MISSING = "<missing>"
Predict = Callable[[object], np.ndarray]


# -- folds ------------------------------------------------------------------------------------------------------
def folds(y: np.ndarray, groups: Optional[np.ndarray] = None, n_splits: int = N_FOLDS,
          seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified (train, validation) index pairs; grouped when `groups` is given. Fewer folds when a
    class or the number of patients is too small for `n_splits`."""
    units = len(set(groups)) if groups is not None else len(y)
    k = int(min(n_splits, np.bincount(y.astype(int), minlength=2).min(), units))
    if k < 2:
        raise ValueError(f"too few positives, negatives or patients ({units}) for cross-validation")
    return split(y, groups, k, seed)


def _take(obj, idx):
    if obj is None:
        return None
    return obj.iloc[idx] if isinstance(obj, (pd.DataFrame, pd.Series)) else obj[idx]


# -- the single-modality models ---------------------------------------------------------------------------------
def _cv_score(m: LogisticRegressionCV) -> float:
    """Best mean CV AUROC over C, whichever attribute layout this scikit-learn version uses."""
    s = m.scores_
    s = np.asarray(next(iter(s.values())) if isinstance(s, dict) else s)
    return float(s.reshape(s.shape[0], -1).mean(0).max())


def _auroc_scorer(estimator, X, y) -> float:
    """scoring="roc_auc" without its input checks, which cost more than the fits on small data."""
    return auroc(np.asarray(y)[:, None], estimator.decision_function(X)[:, None])


def _tuned_lr(X, y, groups, seed: int, solver: str = "liblinear") -> LogisticRegressionCV:
    """L2 logistic regression with C, and whether to balance the classes, chosen by CV AUROC on these
    rows: the regularisation a TF-IDF matrix needs differs by orders of magnitude between datasets.
    liblinear suits sparse TF-IDF; dense image features use lbfgs (liblinear took most of an hour on
    HAM10000's 1,280-d features). The dense lbfgs fits run their folds in parallel: the same models,
    2.3x sooner on 2 cores (54 → 23 s for one search on 4,000 × 1,280 features)."""
    cv = folds(y, groups, seed=seed)
    n_jobs = -1 if solver == "lbfgs" else None  # liblinear's sparse fits take less than starting workers
    best = None
    for weight in (None, "balanced"):
        with warnings.catch_warnings():  # scikit-learn 1.9 announces attribute changes we do not depend on
            warnings.simplefilter("ignore", FutureWarning)
            m = LogisticRegressionCV(Cs=CS, cv=cv, scoring=_auroc_scorer, solver=solver, class_weight=weight,
                                     max_iter=1000, random_state=seed, n_jobs=n_jobs).fit(X, y)
        if best is None or _cv_score(m) > _cv_score(best):
            best = m
    return best


def _fit_text(X: pd.Series, y, groups, seed: int, cfg) -> Predict:
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2)
    m = _tuned_lr(vec.fit_transform(X), y, groups, seed)
    return lambda Z: m.predict_proba(vec.transform(Z))[:, 1]


def _fit_with(prep, y, X, groups, seed, solver: str = "liblinear") -> Predict:
    """A feature transform fitted on these rows only, then a tuned LR on its output."""
    m = _tuned_lr(prep.fit_transform(X), y, groups, seed, solver)
    return lambda Z: m.predict_proba(prep.transform(Z))[:, 1]


def _fit_tabular_lr(X: pd.DataFrame, y, groups, seed: int, cfg) -> Predict:
    t = cfg.tabular
    prep = ColumnTransformer([
        ("num", make_pipeline(SimpleImputer(strategy="median", add_indicator=True), StandardScaler()), t.numeric),
        ("cat", OneHotEncoder(handle_unknown="infrequent_if_exist", min_frequency=t.min_category_count),
         t.categorical)])
    return _fit_with(prep, y, X, groups, seed)


def _fit_tabular_hgb(X: pd.DataFrame, y, groups, seed: int, cfg) -> Predict:
    """Untuned but sensible boosting; NaN and categories are handled natively, early stopping on a
    random 15% of these rows decides the number of trees."""
    t = cfg.tabular
    prep = ColumnTransformer([
        ("num", "passthrough", t.numeric),
        ("cat", OrdinalEncoder(handle_unknown="use_encoded_value", unknown_value=np.nan,
                               min_frequency=t.min_category_count, max_categories=250), t.categorical)])
    m = HistGradientBoostingClassifier(max_iter=200, learning_rate=0.05, early_stopping=True, validation_fraction=0.15,
                                       n_iter_no_change=20, random_state=seed,
                                       categorical_features=[False] * len(t.numeric) + [True] * len(t.categorical))
    m.fit(prep.fit_transform(X), y)
    return lambda Z: m.predict_proba(prep.transform(Z))[:, 1]


def _fit_image_lr(X: np.ndarray, y, groups, seed: int, cfg) -> Predict:
    """A patient without a readable image has NaN features: imputed, and flagged by an indicator."""
    return _fit_with(make_pipeline(SimpleImputer(strategy="mean", add_indicator=True), StandardScaler()),
                     y, X, groups, seed, solver="lbfgs")


CANDIDATES = [  # (modality, name, fit)
    ("text", "TF-IDF + LR (text)", _fit_text),
    ("tabular", "LR (tabular)", _fit_tabular_lr),
    ("tabular", "HistGB (tabular)", _fit_tabular_hgb),
    ("image", "LR (image features)", _fit_image_lr),
]


def _inputs(df: pd.DataFrame, cfg, image_features) -> dict:
    """What each modality's baselines read, in the form they read it."""
    out = {}
    if "text" in cfg.modalities and cfg.text is not None:
        out["text"] = df[cfg.text.column].fillna("").astype(str)
    if "tabular" in cfg.modalities and cfg.tabular is not None:
        t = cfg.tabular
        cat = df[t.categorical].astype(object)
        out["tabular"] = pd.concat([df[t.numeric].apply(pd.to_numeric, errors="coerce"),
                                    cat.where(cat.notna(), MISSING).astype(str)], axis=1)
    if "image" in cfg.modalities and image_features is not None:
        out["image"] = np.asarray(image_features(df), dtype=np.float64)
    return out


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


# -- all together -----------------------------------------------------------------------------------------------
def baselines(train: pd.DataFrame, test: pd.DataFrame, cfg, *, image_features=None, seed: int = 0,
              return_info: bool = False):
    """P(positive class) per test row for every baseline whose modality `cfg` uses, keyed by name,
    plus "mean of baselines" and "LR stack (CV)" over the best baseline of each modality.

    `image_features(df) -> [n_rows, d]` array (e.g. a frozen CNN's mean over a patient's images);
    without it there is no image baseline. Training rows without a label are left out. With
    `return_info=True` also returns which baseline each modality chose, the CV AUROCs (mean over
    folds of the training rows) and the stack's weights, for the report."""
    t0 = time.perf_counter()
    if cfg.task.type != "binary":
        raise ValueError(f"baselines are binary only, not {cfg.task.type}")
    y = LabelEncoder(cfg.task).fit(train).encode(train)
    train = train[y >= 0].reset_index(drop=True)
    y = y[y >= 0]
    groups = shared_patients(train, cfg)
    outer = folds(y, groups, seed=seed)
    tr_in, te_in = _inputs(train, cfg, image_features), _inputs(test, cfg, image_features)
    oof, probs, cv_auroc, modality = {}, {}, {}, {}
    for mod, name, fit in CANDIDATES:
        if mod not in tr_in:
            continue
        X = tr_in[mod]
        oof[name] = np.empty(len(y))
        for a, b in outer:
            oof[name][b] = fit(_take(X, a), y[a], _take(groups, a), seed, cfg)(_take(X, b))
        probs[name] = fit(X, y, groups, seed, cfg)(te_in[mod])
        cv_auroc[name] = float(np.mean([auroc(y[b, None], oof[name][b, None]) for _, b in outer]))
        modality[name] = mod
    if not probs:
        raise ValueError(f"no baseline for modalities {cfg.modalities} (image needs image_features)")
    chosen = {}
    for name, mod in modality.items():
        if mod not in chosen or cv_auroc[name] > cv_auroc[chosen[mod]]:
            chosen[mod] = name
    best = list(chosen.values())
    probs["mean of baselines"] = np.mean([probs[n] for n in best], 0)
    mean_oof = np.mean([oof[n] for n in best], 0)
    cv_auroc["mean of baselines"] = float(np.mean([auroc(y[b, None], mean_oof[b, None]) for _, b in outer]))
    stack = LogisticRegression(C=1.0).fit(np.stack([_logit(oof[n]) for n in best], 1), y)
    probs["LR stack (CV)"] = stack.predict_proba(np.stack([_logit(probs[n]) for n in best], 1))[:, 1]
    if not return_info:
        return probs
    info = {"chosen": chosen, "cv_auroc": cv_auroc, "n_folds": len(outer), "grouped": groups is not None,
            "n_train": int(len(y)), "stack_weights": dict(zip(best, map(float, stack.coef_[0]))),
            "stack_intercept": float(stack.intercept_[0]), "seconds": time.perf_counter() - t0}
    return probs, info


# -- `mmdx baselines` -------------------------------------------------------------------------------------------
def slug(name: str) -> str:
    """A baseline's file name: "TF-IDF + LR (text)" → "tfidf_lr_text"."""
    return "_".join("".join(c if c.isalnum() else " " for c in name.lower().replace("-", "")).split())


def write_baselines(tables: dict[str, pd.DataFrame], info: dict, folder: Path) -> dict[str, str]:
    """One predictions CSV per baseline (named by `slug`) and baselines.json into `folder`; {name: file}."""
    files = {name: f"{slug(name)}.csv" for name in tables}
    for name, df in tables.items():
        write_table(df, Path(folder) / files[name])
    (Path(folder) / "baselines.json").write_text(strict_json(info | {"files": files}), encoding="utf-8")
    return files


def predict_baselines(config, train, records, *, image_weights: Optional[str] = "efficientnet_lite0",
                      seed: int = 0, image_root=None) -> tuple[dict[str, pd.DataFrame], dict]:
    """Fit every baseline on `train` (labelled) and score `records`: per baseline a table in `mmdx
    predict`'s layout (one row per record, in order: id, prob_<class>..., pred at 0.5, status), so that
    `mmdx compare` reads them beside the engine's predictions on the same patients; and what was chosen
    by CV on `train`. `config`: a Config or its file; `train`, `records`: files, DataFrames or Records.
    The image baseline needs `image_weights` (packaged or local, as `image.pretrained`); None leaves it out."""
    from multimodal.config import Config, load_config
    from multimodal.data.records import Records, load_records
    from multimodal.errors import UserError

    cfg = config if isinstance(config, Config) else load_config(config)
    if cfg.task.type != "binary":
        raise UserError(f"the baselines are for binary tasks; this config's task is {cfg.task.type}")
    train, records = (r if isinstance(r, Records) else load_records(r, cfg, labels=lab, image_root=image_root)
                      for r, lab in ((train, True), (records, False)))
    labels = LabelEncoder(cfg.task).fit(train.df, train.source)
    n = len(train)
    tr, te = train.df.assign(_row=np.arange(n)), records.df.assign(_row=n + np.arange(len(records)))
    features = None
    if "image" in cfg.modalities and cfg.image is not None and image_weights is not None:
        try:
            X = np.concatenate([pooled_features(r, cfg, weights=image_weights) for r in (train, records)])
        except (ValueError, OSError, RuntimeError) as e:  # a missing extra, file or foreign layout
            raise UserError(f"image baseline weights {image_weights!r}: {' '.join(str(e).split())[:250]}") from None
        for what, rows in ((train, X[:n]), (records, X[n:])):  # else a constant, or noise, passes as a baseline
            if len(rows) and np.isnan(rows).all():
                raise UserError(f"{what.source}: no record has an image that could be read, for the image baseline "
                                f"(image paths resolve against {what.root}; see --image-root)")
        features = lambda df: X[df["_row"].to_numpy()]  # noqa: E731 — by position: ids may repeat
    try:
        probs, info = baselines(tr, te, cfg, image_features=features, seed=seed, return_info=True)
    except ValueError as e:  # too few patients or classes for CV, no modality a baseline reads
        raise UserError(f"{train.source}: {e}") from None
    if features is not None:
        info["records_without_image_features"] = {"train": int(np.isnan(X[:n]).all(1).sum()),
                                                  "scored": int(np.isnan(X[n:]).all(1).sum())}
    from joblib.externals.loky import get_reusable_executor

    # the image LR's parallel folds leave loky workers that idle for 5 minutes, and a process that
    # ends waits for them: `mmdx baselines` took 5.4 min for 34 s of work
    get_reusable_executor().shutdown(wait=True)
    names = labels.names
    out = {}
    for name, p in probs.items():
        df = pd.DataFrame({"id": records.df[cfg.data.id].to_numpy(), f"prob_{names[0]}": 1 - p,
                           f"prob_{names[1]}": p})
        df["pred"] = np.where(p >= 0.5, names[1], names[0])
        df["status"] = "ok"
        out[name] = df
    return out, info


# -- image features ---------------------------------------------------------------------------------------------
def pooled_features(records, cfg, cache: Optional[Path] = None, arch: str = "tf_efficientnet_lite0",
                    weights: str = "efficientnet_lite0", batch: int = 64) -> np.ndarray:
    """[n_records, D] mean of globally pooled frozen ImageNet features over each record's images (NaN:
    none readable), for the LR on image features. Decoding and resizing are the engine's own, so the
    baseline sees exactly the pixels the fused model sees; only what follows the frozen network differs."""
    import torch

    from encoders import ENCODERS
    from encoders.weights import pretrained_stats, resolve
    from multimodal.data.preprocess.image import ImagePreprocessor

    if cache is not None and cache.is_file():
        return np.load(cache)["x"]
    ic = cfg.image
    mean, std = pretrained_stats(arch, ic.in_chans)
    prep = ImagePreprocessor(ic, mean, std, confine=cfg.data.confine_images)
    enc = ENCODERS.create("timm", model_name=arch, in_chans=ic.in_chans, image_size=ic.size,
                          weights=resolve(weights, arch), freeze="all").eval()
    out = np.full((len(records), enc.output_dim), np.nan, np.float32)
    pending: list[tuple[int, torch.Tensor]] = []

    def flush():
        if not pending:
            return
        x = torch.cat([v for _, v in pending])
        with torch.no_grad():
            f = enc.frozen_features(prep.normalize(x)).mean((-1, -2)).numpy()
        k = 0
        for i, v in pending:
            out[i] = f[k:k + len(v)].mean(0)
            k += len(v)
        pending.clear()

    for i in range(len(records)):
        row = records.row(i)
        try:
            x = prep.load([row[c] for c in ic.columns], records.root)
        except Exception:  # noqa: BLE001 — the baseline, like the engine, skips unreadable records
            continue
        if len(x):
            pending.append((i, x))
        if sum(len(v) for _, v in pending) >= batch:
            flush()
    flush()
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, x=out)
    return out
