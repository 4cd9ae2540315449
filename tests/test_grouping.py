"""Patients with several records: no patient crosses the hold-out or a CV fold, duplicate ids need a
group column, and `mmdx cv` writes one out-of-fold row per record."""
import json

import numpy as np
import pandas as pd
import pytest

from conftest import SYNTH_CONFIG, TINY, one_line_error, run_cli


@pytest.fixture(scope="module")
def two_per_patient(cohort):
    """Every patient twice: two studies (record ids) of one patient (patient column), same label."""
    df = pd.read_csv(cohort["all"], dtype=str, keep_default_na=False)
    a, b = df.copy(), df.copy()
    a["patient"] = b["patient"] = df["patient_id"]
    a["patient_id"] = df["patient_id"] + "-a"
    b["patient_id"] = df["patient_id"] + "-b"
    both = pd.concat([a, b], ignore_index=True).sample(frac=1, random_state=0).reset_index(drop=True)
    path = cohort["dir"] / "two_per_patient.csv"
    both.to_csv(path, index=False)
    return path


def _cfg(**extra):
    from multimodal import load_config

    return load_config(SYNTH_CONFIG, {**TINY, "data.group": "patient", **extra})


def test_holdout_and_folds_keep_patients_together(two_per_patient):
    from multimodal.data.splits import fold_of
    from multimodal.data.records import load_records
    from multimodal.data.splits import holdout_splits

    cfg = _cfg()
    rec = load_records(two_per_patient, cfg, labels=True)
    (tr, va), = holdout_splits(rec, cfg)
    assert not set(tr.df["patient"]) & set(va.df["patient"]) and len(va) > 0
    folds = fold_of(rec, cfg, 5, seed=0)
    per_patient = pd.Series(folds).groupby(rec.df["patient"].to_numpy()).nunique()
    assert (per_patient == 1).all() and sorted(set(folds)) == [0, 1, 2, 3, 4]
    rates = pd.Series(rec.df["label"].astype(int).to_numpy()).groupby(folds).mean()
    assert rates.max() - rates.min() < 0.15  # stratified


def test_duplicate_ids_are_an_error_without_a_group_column(capsys, two_per_patient, tmp_path):
    df = pd.read_csv(two_per_patient, dtype=str, keep_default_na=False)
    df["patient_id"] = df["patient"]
    dup = tmp_path / "dup.csv"
    df.to_csv(dup, index=False)
    code, _, err = run_cli(capsys, "train", "--config", SYNTH_CONFIG, "--records", dup,
                           "--out", tmp_path / "m", "--quiet")
    one_line_error(code, err, "repeat an id")


def test_cv_writes_one_out_of_fold_row_per_record(capsys, two_per_patient, tmp_path):
    out = tmp_path / "cv"
    code, stdout, err = run_cli(capsys, "cv", "--config", SYNTH_CONFIG, "--records",
                                two_per_patient, "--folds", 3, "--out", out, "--n-boot", 50, "--quiet",
                                *[f"{k}={v}" for k, v in TINY.items() if v is not None], "image.augment=null",
                                "data.group=patient", "train.epochs=1", "task.threshold=sensitivity:0.9")
    assert code == 0, err
    src = pd.read_csv(two_per_patient, dtype=str)
    oof = pd.read_csv(out / "predictions.csv", dtype={"id": str})
    assert list(oof["id"]) == list(src["patient_id"])  # every record once, in input order
    assert oof.groupby(src["patient"].to_numpy())["fold"].nunique().max() == 1
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["per_fold"]) == 3 and m["n_patients"] == len(src) // 2
    assert sorted(oof["fold"].unique()) == [1, 2, 3] == [f["fold"] for f in m["per_fold"]]  # as printed
    y, pred = oof["label"].astype(int), oof["pred"].astype(int)  # each at its own fold's cut
    op = m["pooled"]["operating_point"]
    assert len(op["threshold"]) == 3  # three folds, three cuts
    assert op["threshold"] == sorted({f["thresholds"][0] for f in m["per_fold"]})
    assert op["sensitivity"]["value"] == pytest.approx(((pred == 1) & (y == 1)).sum() / (y == 1).sum())
    assert op["specificity"]["value"] == pytest.approx(((pred == 0) & (y == 0)).sum() / (y == 0).sum())
    assert m["pooled"]["overall"]["accuracy"]["value"] == pytest.approx((pred == y).mean())
    assert "at each fold's threshold (" in stdout
    assert "fold 2: AUROC" in stdout and "pooled out-of-fold" in stdout
    code, cmp_out, err = run_cli(capsys, "compare", out / "predictions.csv", out / "predictions.csv", "--labels",
                                 two_per_patient, "--group-column", "patient", "--n-boot", 50, "--names", "a", "b")
    assert code == 0, err
    # the out-of-fold file scored again: cv's pooled numbers, each record at its own fold's cut (read off
    # its pred column), and compare's AUROC CI
    code, _, err = run_cli(capsys, "evaluate", "--predictions", out / "predictions.csv", "--labels", two_per_patient,
                           "--group-column", "patient", "--n-boot", 50, "--out", tmp_path / "again.json")
    assert code == 0, err
    again = json.loads((tmp_path / "again.json").read_text())
    for k, s in m["pooled"]["overall"].items():
        assert [again["overall"][k]["value"], *again["overall"][k]["ci95"]] == pytest.approx(
            [s["value"], *s["ci95"]], abs=1e-12), k
    assert {k: v for k, v in again["operating_point"].items() if k != "threshold"} == \
        {k: v for k, v in op.items() if k != "threshold"}
    from multimodal.evaluation.comparison import compare

    paired = compare({"a": out / "predictions.csv", "b": out / "predictions.csv"}, two_per_patient,
                     group_column="patient", n_boot=50)
    assert again["overall"]["auroc"]["ci95"] == pytest.approx(paired["auroc"]["a"]["ci95"], abs=1e-12)


def test_empty_group_cells_are_each_their_own_patient_everywhere(two_per_patient):
    """The hold-out, CV folds and the baselines' folds use one definition of a patient: a record with an
    empty group cell is its own patient (they all became one patient "nan" in hold-outs and folds)."""
    from multimodal.data.records import load_records
    from multimodal.data.splits import fold_of, holdout_splits, patients, shared_patients
    from multimodal.evaluation.baselines import folds

    df = pd.read_csv(two_per_patient, dtype=str, keep_default_na=False)
    df.loc[df.index[:60], "patient"] = ""  # 60 records without a patient: 60 patients, not one
    path = two_per_patient.parent / "some_empty_groups.csv"
    df.to_csv(path, index=False)
    cfg = _cfg()
    rec = load_records(path, cfg, labels=True)
    who = patients(rec.df, cfg)
    assert len(set(who[:60])) == 60 and len(set(who)) == 60 + df["patient"].iloc[60:].nunique()
    assert (patients(rec.df, cfg) == who).all() and (shared_patients(rec.df, cfg) == who).all()
    train, held = holdout_splits(rec, cfg)[0]
    assert not set(patients(train.df, cfg)) & set(patients(held.df, cfg))
    assert 0 < held.df.index.isin(range(60)).sum() < 60  # the empty-cell records spread, not held out together
    y = rec.df["label"].astype(int).to_numpy()
    for part in (fold_of(rec, cfg, 5, 0), None):
        if part is None:
            part = np.zeros(len(y), int)
            for k, (_, test) in enumerate(folds(y, shared_patients(rec.df, cfg))):
                part[test] = k
        for g in set(who):
            assert len(set(part[who == g])) == 1  # a patient's records share a fold
        assert len(set(part[:60])) > 1
