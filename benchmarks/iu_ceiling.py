"""IU X-ray by 5-fold grouped CV over train + val: the baselines, other learners, and mmdx models
(issue #29's IU line).

    python benchmarks/iu_ceiling.py            # about 2 min on 2 cores
    python benchmarks/iu_ceiling.py --engine "joint=runs/iu_cv/predictions.csv" ...

`--engine NAME=FILE` adds a row for an mmdx model scored the same way: FILE is the predictions.csv that
`mmdx cv --folds 5` writes for `--records` of the same studies (train + val, in this order), so its
folds are these folds (the same seed and splitter, `multimodal.data.splits.fold_of`; checked).

IU X-ray's inputs are a one-line indication, the number of images and whether a comparison study
exists. The issue asks fusion to beat the best baseline (the mean of TF-IDF + LR and HistGB) by 5-fold
grouped CV over train + val with a paired 95% CI above 0. On the same 5 patient-grouped folds of all
3,273 studies this fits the baselines (`multimodal.evaluation.baselines`, refitted on every fold's
training patients) and other learners a researcher would try (character n-grams, LR on frozen MiniLM
sentence embeddings, one LR over words and tabular columns together), then every equal-weight mean
of a text and a tabular learner. For each: pooled out-of-fold AUROC, minus the baselines' mean as a
paired bootstrap over patients, and the mean of the five folds' own AUROCs, which a model whose scores
shift from fold to fold (a different C or class weighting chosen in each) does not lose by pooling.
Results go to benchmarks/results/iu_ceiling.json (no record ids).
"""
import argparse
import itertools
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "iu_xray"
BASE = "mean of baselines"


def minilm_embeddings(texts: list[str]) -> np.ndarray:
    """Mean-pooled all-MiniLM-L6-v2 sentence embeddings (the packaged weights the IU config uses)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from multimodal.pretrained import text_source

    src = text_source("minilm")
    tok, model = AutoTokenizer.from_pretrained(src), AutoModel.from_pretrained(src).eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), 128):
            b = tok(texts[i:i + 128], padding=True, truncation=True, max_length=48, return_tensors="pt")
            mask = b["attention_mask"][..., None].float()
            out.append(((model(**b).last_hidden_state * mask).sum(1) / mask.sum(1)).numpy())
    return np.concatenate(out)


def other_learners(tr: pd.DataFrame, te: pd.DataFrame, emb_tr, emb_te, y, seed: int) -> dict[str, np.ndarray]:
    """P(abnormal) on `te` from learners the baselines do not include, each tuned by CV on `tr` only."""
    import scipy.sparse as sp
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.preprocessing import OneHotEncoder

    def lr(Xa, Xb, solver="liblinear"):
        m = LogisticRegressionCV(Cs=np.logspace(-3, 2, 11), cv=5, scoring="roc_auc", solver=solver,
                                 max_iter=2000, random_state=seed).fit(Xa, y)
        return m.predict_proba(Xb)[:, 1]

    text = [d["report_text"].fillna("").astype(str) for d in (tr, te)]
    chars = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2)
    words = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2)
    tab = OneHotEncoder(handle_unknown="ignore")
    cols = ["n_images", "has_comparison"]
    W = [words.fit_transform(text[0]), words.transform(text[1])]
    T = [tab.fit_transform(tr[cols].astype(str)), tab.transform(te[cols].astype(str))]
    return {"char n-gram TF-IDF + LR (text)": lr(chars.fit_transform(text[0]), chars.transform(text[1])),
            "LR on MiniLM embeddings (text)": lr(emb_tr, emb_te, solver="lbfgs"),
            "one LR over words and tabular": lr(sp.hstack([W[0], T[0]]).tocsr(), sp.hstack([W[1], T[1]]).tocsr())}


def fit_all(tr: pd.DataFrame, te: pd.DataFrame, emb_tr, emb_te, cfg, seed: int) -> dict[str, np.ndarray]:
    """Every learner fitted on `tr`, P(abnormal) on `te`, plus each mean of a text and a tabular one."""
    from multimodal.evaluation.baselines import baselines

    y = tr["label_abnormal"].to_numpy().astype(int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probs = baselines(tr, te, cfg, seed=seed) | other_learners(tr, te, emb_tr, emb_te, y, seed)
    singles = [n for n in probs if n not in (BASE, "LR stack (CV)")]
    for t, s in itertools.product([n for n in singles if n.endswith("(text)")],
                                  [n for n in singles if n.endswith("(tabular)")]):
        probs.setdefault(f"mean: {t} + {s}", (probs[t] + probs[s]) / 2)
    return probs


def table(y: np.ndarray, probs: dict, n_boot: int, seed: int, fold=None) -> list[dict]:
    """Per model: AUROC [95% CI], minus the baselines' mean (paired bootstrap), and the fold mean."""
    from multimodal.evaluation.bootstrap import bootstrap_stats, ci95, difference
    from multimodal.evaluation.comparison import auroc

    boots = bootstrap_stats(y, lambda i: {n: auroc(y[i, None], p[i, None]) for n, p in probs.items()},
                            n_boot=n_boot, seed=seed)
    base, rows = auroc(y[:, None], probs[BASE][:, None]), []
    for n, p in probs.items():
        v = auroc(y[:, None], p[:, None])
        row = {"model": n, "auroc": v, "ci95": ci95(boots[n]),
               "minus_baselines_mean": difference(v - base, boots[n], boots[BASE])}
        if fold is not None:
            row["fold_mean"] = float(np.mean([auroc(y[fold == k, None], p[fold == k, None]) for k in range(5)]))
        rows.append(row)
    rows.sort(key=lambda r: -r["auroc"])
    for r in rows:
        d = r["minus_baselines_mean"]
        mean = f"  {r['fold_mean']:.4f}" if "fold_mean" in r else ""
        print(f"  {r['model']:<62} {r['auroc']:.4f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]{mean}  "
              f"{d['value']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--engine", action="append", default=[], metavar="NAME=FILE",
                    help="out-of-fold predictions of an mmdx model from mmdx cv on the same studies")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "iu_ceiling.json")
    args = ap.parse_args()
    from multimodal.config import load_config
    from multimodal.data.records import Records
    from multimodal.data.splits import fold_of

    t0 = time.perf_counter()
    cfg = load_config(ROOT / "configs" / "iu_xray.yaml")
    train, val = (pd.read_csv(DATA / f"records_{s}.csv") for s in ("train", "val"))
    df = pd.concat([train, val], ignore_index=True)
    y = df["label_abnormal"].to_numpy().astype(int)
    fold = fold_of(Records(df, DATA, "IU train + val"), cfg, 5, args.seed)
    emb = minilm_embeddings(df["report_text"].fillna("").astype(str).tolist())
    n = len(train)
    print(f"validation ({len(val)} studies; trained on the {n} training studies): AUROC [95% CI], minus the "
          "baselines' mean")
    val_rows = table(y[n:], fit_all(train, val, emb[:n], emb[n:], cfg, args.seed), args.n_boot, args.seed)
    oof: dict[str, np.ndarray] = {}
    for k in range(5):
        a, b = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
        for name, p in fit_all(df.iloc[a], df.iloc[b], emb[a], emb[b], cfg, args.seed).items():
            oof.setdefault(name, np.zeros(len(y)))[b] = p
    for spec in args.engine:
        name, path = spec.split("=", 1)
        pred = pd.read_csv(path).set_index("id").loc[df["patient_id"]]  # mmdx writes the id as `id`
        if not (pred["fold"].to_numpy() == fold + 1).all():
            raise SystemExit(f"{path}: its folds are not these folds (mmdx cv --folds 5 on train + val, same seed)")
        oof[f"mmdx: {name}"] = pred["prob_1"].to_numpy()
    print(f"5-fold grouped CV over train + val ({len(y)} studies), pooled out of fold: AUROC [95% CI], fold "
          "mean, minus the baselines' mean")
    cv_rows = table(y, oof, args.n_boot, args.seed, fold)
    out = {"n_val": len(val), "n_cv": int(len(y)), "folds": 5, "seed": args.seed, "n_boot": args.n_boot,
           "validation": val_rows, "cv": cv_rows, "seconds": round(time.perf_counter() - t0, 1)}
    args.out.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(f"{out['seconds']:.0f} s → {args.out}")


if __name__ == "__main__":
    main()
