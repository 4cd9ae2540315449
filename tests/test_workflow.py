"""A researcher's first project, end to end through the CLI, as a newcomer ran it on a skin set: train with class
names and a screening operating point → evaluate at it → baselines → compare by name (the command baselines
prints) → cv → score cv's out-of-fold file → explain → export → predict through ONNX → a crash → resume."""
from __future__ import annotations

import json
import shlex

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import SYNTH_CONFIG, TINY, run_cli

ARGS = [f"{k}={v}" for k, v in TINY.items() if v is not None and k != "train.alone"] + ["image.augment=null"]
NAMES = {0: "benign", 1: "malignant"}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The synthetic config as a user's copy: readable class names and a sensitivity-0.9 operating point."""
    folder = tmp_path_factory.mktemp("project")
    raw = yaml.safe_load(SYNTH_CONFIG.read_text())
    raw["task"] |= {"names": NAMES, "threshold": "sensitivity:0.9"}
    (folder / "skin.yaml").write_text(yaml.safe_dump(raw))
    return folder


def test_train_evaluate_baselines_compare_cv_explain_export_predict_resume(capsys, cohort, project, monkeypatch):
    cfg, m = project / "skin.yaml", project / "model"
    ok = lambda *argv: _ok(capsys, *argv)  # noqa: E731

    ok("train", "--config", cfg, "--records", cohort["train"], "--val", cohort["val"], "--out", m, "--quiet", *ARGS)
    ok("evaluate", "--model", m, "--records", cohort["test"], "--out", project / "eval.json", "--quiet")
    ev = json.loads((project / "eval.json").read_text())
    cut = json.loads((m / "preprocessing.json").read_text())["labels"]["thresholds"][0]
    assert ev["operating_point"]["threshold"] == pytest.approx(cut) and cut != 0.5   # the rule's, from validation
    assert {"sensitivity", "specificity"} <= set(ev["operating_point"])

    preds = project / "predictions.csv"
    ok("predict", "--model", m, "--records", cohort["test"], "--out", preds, "--quiet")
    p = pd.read_csv(preds)
    assert set(p["pred"]) <= set(NAMES.values()) and "prob_malignant" in p

    out = ok("baselines", "--config", cfg, "--records", cohort["train"], "--predict", cohort["test"],
             "--out", project / "baselines", "--image-weights", "none", "modalities=text,tabular")
    example = next(line for line in out.splitlines() if "mmdx compare" in line).split("e.g. ", 1)[1]
    argv = [preds if a == "PREDICTIONS.csv" else a for a in shlex.split(example)[1:]]
    shown = ok(*argv)                                     # the command baselines prints runs as printed
    assert "malignant" in shown

    ok("cv", "--config", cfg, "--records", cohort["train"], "--folds", "2", "--out", project / "cv", "--n-boot", "50",
       "--quiet", *ARGS)
    cv = json.loads((project / "cv" / "metrics.json").read_text())
    assert "sensitivity" in json.dumps(cv["pooled"]["operating_point"])         # the rule's cut, out of fold
    scored = ok("evaluate", "--predictions", project / "cv" / "predictions.csv", "--labels", cohort["train"],
                "--config", cfg, "--n-boot", "50")
    assert "auroc" in scored.lower()

    first = pd.read_csv(cohort["test"], dtype=str)["patient_id"].iloc[0]
    ok("explain", "--model", m, "--records", cohort["test"], "--ids", first, "--out", project / "reports",
       "--n-steps", "4", "--quiet")
    page = next((project / "reports").glob("patient_*.html")).read_text()
    assert "True label" in page and "operating point" in page

    ok("export", "--model", m, "--records", cohort["val"], "--out", project / "m.onnx")
    ok("predict", "--model", m, "--onnx", project / "m.onnx", "--records", cohort["test"], "--out",
       project / "onnx.csv", "--quiet")
    np.testing.assert_allclose(pd.read_csv(project / "onnx.csv")["prob_malignant"], p["prob_malignant"], atol=1e-5)

    _crash_then_resume(capsys, m, cohort, project / "resumed.csv", monkeypatch)


def _crash_then_resume(capsys, m, cohort, out, monkeypatch):
    """The run dies in its second chunk (as at a kill, nothing after the first chunk is written); --resume
    keeps the first chunk and writes every row once, in order."""
    from multimodal import DiagnosisModel

    real, calls = DiagnosisModel.predict, []

    def dies_second(self, *a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    argv = ["predict", "--model", m, "--records", cohort["test"], "--out", out, "--chunk-rows", "10", "--quiet"]
    monkeypatch.setattr(DiagnosisModel, "predict", dies_second)
    code, _, err = run_cli(capsys, *argv)
    assert code == 130 and "interrupted" in err and len(calls) == 2
    monkeypatch.setattr(DiagnosisModel, "predict", real)
    assert not out.exists()
    out_text = _ok(capsys, *argv, "--resume")
    ids = pd.read_csv(cohort["test"], dtype=str)["patient_id"].tolist()
    assert pd.read_csv(out, dtype=str)["id"].tolist() == ids
    assert "1 of 3 chunks kept from the interrupted run" in out_text, out_text


def _ok(capsys, *argv) -> str:
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, f"mmdx {' '.join(map(str, argv))}\n{err}"
    return out
