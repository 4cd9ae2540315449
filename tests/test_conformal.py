"""task.conformal: split-conformal prediction sets, fitted on the calibration records, written by predict,
scored by evaluate (from a model and from a predictions file)."""
import json

import numpy as np
import pandas as pd
import pytest

from conftest import SYNTH_CONFIG, TINY, run_cli
from multimodal.evaluation.conformal import (cut_of, fit_cuts, min_records, parse_sets, prediction_sets,
                                             set_metrics, set_text, use_by_class)


# -- a synthetic task where the answer is known -----------------------------------------------------------
def _draw(rng, n: int, logit_offsets, spread: float):
    """Probabilities from random logits, and labels drawn from those very probabilities: a perfectly
    calibrated model, whose true-class probability is what conformal prediction is built on."""
    z = rng.normal(0, spread, (n, len(logit_offsets))) + np.asarray(logit_offsets)
    P = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = (rng.random(n)[:, None] > P.cumsum(1)).sum(1)
    return y, P


def _coverage_over_draws(by_class, offsets, spread=2.0, coverage=0.9, draws=200, n_cal=1000, n_test=2000):
    """Mean coverage over many calibration/test draws: overall and within each true class; mean set size."""
    rng = np.random.default_rng(0)
    overall, per_class, sizes = [], [], []
    for _ in range(draws):
        y, P = _draw(rng, n_cal, offsets, spread)
        cuts = fit_cuts(y, P, coverage, by_class)["cuts"]
        yt, Pt = _draw(rng, n_test, offsets, spread)
        covered = prediction_sets(Pt, cuts)[np.arange(n_test), yt]
        overall.append(covered.mean())
        per_class.append([covered[yt == k].mean() for k in range(len(offsets))])
        sizes.append(prediction_sets(Pt, cuts).sum(1).mean())
    return np.mean(overall), np.nanmean(per_class, 0), np.mean(sizes)


def test_marginal_coverage_is_the_target_over_many_draws():
    """E[coverage] = ceil((n+1)·0.9)/(n+1) = 0.9001 for n = 1000 calibration records; the mean of 200
    draws has a standard error near 0.0007."""
    cov, _, _ = _coverage_over_draws(False, [0.0, 0.0, 0.0])
    assert 0.897 <= cov <= 0.904


def test_the_finite_sample_correction_with_few_calibration_records():
    """With 20 records the cut is the r = ceil(21 · 0.9) = 19th smallest score, and E[coverage] is exactly
    19/21 = 0.905 (ceil(20 · 0.9) = 18, without the +1, would give 18/21 = 0.857); 4,000 draws."""
    cov, _, _ = _coverage_over_draws(False, [0.0, 0.0, 0.0], draws=4000, n_cal=20, n_test=200)
    assert 0.900 <= cov <= 0.910


def test_binary_coverage_is_the_target_over_many_draws():
    rng = np.random.default_rng(1)
    covs = []
    for _ in range(200):
        p = rng.beta(0.7, 0.7, 1000)  # P(positive); binary probabilities come as one column
        y = (rng.random(1000) < p).astype(int)
        cuts = fit_cuts(y, p, 0.9)["cuts"]
        pt = rng.beta(0.7, 0.7, 2000)
        yt = (rng.random(2000) < pt).astype(int)
        covs.append(prediction_sets(pt, cuts)[np.arange(2000), yt].mean())
    assert 0.897 <= np.mean(covs) <= 0.904


def test_class_conditional_cuts_cover_each_class_and_one_cut_does_not():
    """A rare class (about 11% of records) and an informative model: one pooled cut covers the rare
    class near 0.69; per-class cuts cover every class at 0.9 (the rare class's ~106 calibration records
    make its expected coverage ceil(107·0.9)/107 ≈ 0.90–0.91; 1,000 draws, standard error near 0.001)."""
    offsets = [1.5, 0.5, -1.5]
    cov, per_class, _ = _coverage_over_draws(True, offsets, draws=1000)
    assert 0.897 <= cov <= 0.915
    assert all(0.896 <= c <= 0.915 for c in per_class), per_class
    _, pooled, _ = _coverage_over_draws(False, offsets, draws=50)
    assert pooled[2] < 0.85, pooled


def test_an_uninformative_model_gets_larger_sets():
    _, _, sharp = _coverage_over_draws(False, [0.0, 0.0, 0.0], spread=4.0, draws=40)
    cov, _, flat = _coverage_over_draws(False, [0.0, 0.0, 0.0], spread=0.2, draws=40)
    assert sharp < 1.4 and flat > 2.5 and 0.89 <= cov <= 0.91  # still covering, by saying little


def test_the_finite_sample_quantile_and_its_edges():
    p = np.arange(1, 20) / 20  # 19 true-class probabilities 0.05 .. 0.95
    assert cut_of(p, 0.9) == 0.1  # r = ceil(20 · 0.9) = 18: the (19 + 1 − 18) = 2nd smallest probability
    assert cut_of(p, 0.5) == 0.5  # r = 10: the 10th smallest probability
    assert cut_of(p[:8], 0.9) == 0.0 and min_records(0.9) == 9  # too few for a finite cut: every class in
    assert cut_of(p[:9], 0.9) == 0.05


def test_auto_chooses_per_class_cuts_for_imbalanced_tasks_with_enough_records():
    assert use_by_class("auto", np.array([800, 200]), 0.9) is True  # 20% < 25%
    assert use_by_class("auto", np.array([700, 300]), 0.9) is False
    assert use_by_class("auto", np.array([995, 5]), 0.9) is False  # too few for a finite cut
    assert use_by_class("auto", np.array([500, 450, 50]), 0.9) is True  # 5% < 1/6
    assert use_by_class(False, np.array([800, 200]), 0.9) is False


def test_sets_are_written_and_read_back_by_name():
    sets = np.array([[True, False, True], [False, False, False], [True, True, True]])
    text = set_text(sets, ["melanoma", "nevus", "bkl"])
    assert text == ["melanoma|bkl", "", "melanoma|nevus|bkl"]
    assert (parse_sets(text[:1] + [float("nan")] + text[2:], ["melanoma", "nevus", "bkl"], "f") == sets).all()
    m = set_metrics(np.array([2, 0, 1]), sets, ["melanoma", "nevus", "bkl"], n_boot=50)
    assert m["coverage"]["value"] == pytest.approx(2 / 3) and m["mean_set_size"]["value"] == pytest.approx(5 / 3)
    assert m["set_sizes"] == {"0": 1, "1": 0, "2": 1, "3": 1} and m["per_class"]["melanoma"]["coverage"]["value"] == 0


def test_config_refuses_a_coverage_out_of_range_and_multilabel():
    from multimodal.config import config_from_dict
    from multimodal.errors import UserError

    with pytest.raises(UserError, match="task.conformal"):
        config_from_dict({"task": {"label": "y", "conformal": 1.2}})
    with pytest.raises(UserError, match="binary and multiclass"):
        config_from_dict({"task": {"label": ["a", "b"], "type": "multilabel", "conformal": 0.9}})


# -- through the engine -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def conformal_model(cohort, tmp_path_factory):
    """A tiny model with per-class cuts at 0.8 (the cohort's ~20 validation patients give each class
    about 10, at least the 4 a finite cut at 0.8 needs), saved to its directory."""
    from multimodal import DiagnosisModel

    model = DiagnosisModel.from_config(SYNTH_CONFIG, **(TINY | {"task.conformal": 0.8,
                                                                 "task.conformal_by_class": True}))
    model.fit(cohort["train"], cohort["val"], progress=False)
    out = model.save(tmp_path_factory.mktemp("conformal") / "model")
    return model, out


def _labels(model, records):
    df = pd.read_csv(records)
    return model.prep.labels.encode(df)


def test_predict_writes_each_records_set_from_the_stored_cuts(conformal_model, cohort):
    model, out = conformal_model
    state = json.loads((out / "preprocessing.json").read_text())["labels"]["conformal"]
    assert state["by_class"] is True and len(state["cuts"]) == 2 and state["coverage"] == 0.8
    assert json.loads((out / "metrics.json").read_text())["training"]["conformal"] == state
    frame = model.predict(cohort["test"])
    assert list(frame.columns) == ["id", "prob_0", "prob_1", "pred", "prediction_set", "set_size", "status", "error"]
    P = frame[["prob_0", "prob_1"]].to_numpy()
    expected = set_text(P >= np.asarray(state["cuts"]), ["0", "1"])
    assert frame["prediction_set"].tolist() == expected
    assert frame["set_size"].tolist() == [len(s.split("|")) if s else 0 for s in expected]
    # the calibration records are covered at the target by construction (a finite-sample guarantee)
    val = model.predict(cohort["val"])
    y = _labels(model, cohort["val"])
    covered = [str(c) in s.split("|") for c, s in zip(y, val["prediction_set"])]
    assert np.mean(covered) >= 0.8


def test_the_sets_survive_reload_the_file_and_onnx(conformal_model, cohort, tmp_path):
    from multimodal import DiagnosisModel

    model, out = conformal_model
    eager = model.predict(cohort["test"])
    loaded = DiagnosisModel.load(out)
    assert loaded.predict(cohort["test"])["prediction_set"].tolist() == eager["prediction_set"].tolist()
    loaded.predict_file(cohort["test"], tmp_path / "p.csv")
    written = pd.read_csv(tmp_path / "p.csv", keep_default_na=False, dtype=str)
    assert written["prediction_set"].tolist() == eager["prediction_set"].tolist()
    assert written["set_size"].astype(int).tolist() == eager["set_size"].tolist()
    loaded.export_onnx(tmp_path / "m.onnx", cohort["val"])
    onnx = DiagnosisModel.load(out, onnx=tmp_path / "m.onnx").predict(cohort["test"])
    assert onnx["prediction_set"].tolist() == eager["prediction_set"].tolist()


def test_evaluate_reports_coverage_and_set_size_with_cis_from_the_model_and_the_file(
        conformal_model, cohort, capsys, tmp_path):
    model, out = conformal_model
    code, printed, err = run_cli(capsys, "evaluate", "--model", out, "--records", cohort["test"], "--out",
                                 tmp_path / "m.json", "--n-boot", 200, "--quiet")
    assert code == 0, err
    m = json.loads((tmp_path / "m.json").read_text())["conformal"]
    frame = model.predict(cohort["test"])
    y = _labels(model, cohort["test"])
    covered = [str(c) in s.split("|") for c, s in zip(y, frame["prediction_set"])]
    assert m["target"] == 0.8 and m["n"] == len(y)
    assert m["coverage"]["value"] == pytest.approx(np.mean(covered))
    assert m["mean_set_size"]["value"] == pytest.approx(frame["set_size"].mean())
    lo, hi = m["coverage"]["ci95"]
    assert lo <= m["coverage"]["value"] <= hi and lo < hi
    assert "conformal prediction sets (target 0.8, per-class cut): coverage" in printed
    model.predict_file(cohort["test"], tmp_path / "p.csv")
    code, printed, err = run_cli(capsys, "evaluate", "--predictions", tmp_path / "p.csv", "--labels",
                                 cohort["test"], "--config", SYNTH_CONFIG, "--out", tmp_path / "f.json",
                                 "--n-boot", 200)
    assert code == 0, err
    f = json.loads((tmp_path / "f.json").read_text())["conformal"]
    assert {k: f[k] for k in ("coverage", "mean_set_size", "set_sizes", "per_class")} == \
        {k: m[k] for k in ("coverage", "mean_set_size", "set_sizes", "per_class")}  # the same resamples
