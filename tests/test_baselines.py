"""benchmarks/baselines.py: planted signals are found, patients never straddle folds, and the IU numbers."""
import sys

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from conftest import REPO, shared
from multimodal.config import config_from_dict, load_config

sys.path.insert(0, str(REPO / "benchmarks"))
from baselines import baselines, folds, train_groups  # noqa: E402

FILLER = [f"word{i}" for i in range(300)]


def _cfg(modalities=("text", "tabular"), **data):
    return config_from_dict({"task": {"type": "binary", "label": "label"}, "data": {"id": "patient_id", **data},
                             "modalities": list(modalities), "text": {"column": "report_text"},
                             "image": {}, "tabular": {"numeric": ["marker", "noise"], "categorical": ["sex"]}})


def _cohort(n, seed, ids_per_patient=1):
    """The label shows as the phrase "spiculated mass" (90% of positives, 5% of negatives) and as a
    shift of `marker`; everything else is noise."""
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.4
    phrase = np.where(y, rng.random(n) < 0.9, rng.random(n) < 0.05)
    text = [" ".join(rng.choice(FILLER, 8)) + (" spiculated mass" if p else "") for p in phrase]
    marker = np.where(rng.random(n) < 0.1, np.nan, rng.normal(2.5 * y, 1.0))
    return pd.DataFrame({"patient_id": [f"P{seed}-{i // ids_per_patient}" for i in range(n)], "report_text": text,
                         "marker": marker, "noise": rng.normal(0, 1, n), "sex": rng.choice(["F", "M", None], n),
                         "label": np.where(y, "yes", "no")})


def _auroc(df, p):
    return roc_auc_score(df["label"] == "yes", p)


def test_planted_text_and_numeric_signals_are_found_and_the_stack_is_no_worse():
    train, test = _cohort(1500, 0), _cohort(800, 1)
    probs, info = baselines(train, test, _cfg(), return_info=True)
    auc = {k: _auroc(test, p) for k, p in probs.items()}
    assert set(auc) == {"TF-IDF + LR (text)", "LR (tabular)", "HistGB (tabular)", "mean of baselines",
                        "LR stack (CV)"}
    assert auc["TF-IDF + LR (text)"] > 0.9 and auc["HistGB (tabular)"] > 0.9, auc
    single = max(v for k, v in auc.items() if "(" in k and "CV" not in k)
    assert auc["LR stack (CV)"] >= single - 0.02 and auc["mean of baselines"] > single, auc
    assert info["chosen"]["text"] == "TF-IDF + LR (text)" and info["chosen"]["tabular"] in auc
    assert set(info["stack_weights"]) == set(info["chosen"].values()) and not info["grouped"]
    assert all(0.85 < info["cv_auroc"][k] <= 1 for k in ("TF-IDF + LR (text)", "HistGB (tabular)"))


def test_deterministic_given_the_seed_and_one_modality_only():
    train, test = _cohort(300, 2), _cohort(100, 3)
    cfg = _cfg(["tabular"])
    a, b = baselines(train, test, cfg, seed=4), baselines(train, test, cfg, seed=4)
    assert set(a) == {"LR (tabular)", "HistGB (tabular)", "mean of baselines", "LR stack (CV)"}
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_image_features_only_when_given_and_enabled():
    train, test = _cohort(300, 4), _cohort(100, 5)

    def features(df):  # what a frozen CNN would give: the label through noise, plus junk dimensions
        rng = np.random.default_rng(len(df))
        signal = (df["label"] == "yes").to_numpy() * 2.0 + rng.normal(0, 1, len(df))
        return np.c_[signal, rng.normal(0, 1, (len(df), 5))]
    probs = baselines(train, test, _cfg(["image", "tabular"]), image_features=features)
    assert _auroc(test, probs["LR (image features)"]) > 0.85
    assert "LR (image features)" not in baselines(train, test, _cfg(["image", "tabular"]))
    assert "LR (image features)" not in baselines(train, test, _cfg(["tabular"]), image_features=features)


@pytest.mark.parametrize("how", ["repeated ids", "group column"])
def test_a_patient_never_straddles_folds(how):
    df = _cohort(400, 6, ids_per_patient=4 if how == "repeated ids" else 1)
    cfg = _cfg()
    if how == "group column":
        df["patient"] = [f"G{i // 3}" for i in range(len(df))]
        cfg = _cfg(group="patient")
    groups = train_groups(df, cfg)
    assert groups is not None and len(set(groups)) == (100 if how == "repeated ids" else 134)
    y = (df["label"] == "yes").to_numpy().astype(int)
    seen = np.zeros(len(df), int)
    for tr, va in folds(y, groups, seed=0):
        assert not set(groups[tr]) & set(groups[va])
        seen[va] += 1
    assert (seen == 1).all()  # every row validated exactly once: the out-of-fold predictions are complete
    cfg = _cfg(["tabular"], **({"group": "patient"} if how == "group column" else {}))
    _, info = baselines(df, _cohort(50, 7), cfg, return_info=True)
    assert info["grouped"]
    assert train_groups(_cohort(50, 8), _cfg()) is None  # one row per patient: plain stratified folds


def test_iu_xray_validation_aurocs(capsys):
    path = shared("iu_xray", "records_train.csv")
    from multimodal.data.records import load_records

    cfg = load_config(REPO / "configs" / "iu_xray.yaml")
    train = load_records(path, cfg, labels=True).df
    val = load_records(path.with_name("records_val.csv"), cfg, labels=True).df
    probs, info = baselines(train, val, cfg, return_info=True)
    y = val[cfg.task.label].astype(int)
    auc = {k: roc_auc_score(y, p) for k, p in probs.items()}
    with capsys.disabled():
        print("\nIU X-ray validation AUROC: " + ", ".join(f"{k} {v:.3f}" for k, v in auc.items())
              + f"; chosen {info['chosen']}; {info['seconds']:.1f}s")
    assert auc["TF-IDF + LR (text)"] > 0.62 and auc["mean of baselines"] > auc["TF-IDF + LR (text)"], auc
