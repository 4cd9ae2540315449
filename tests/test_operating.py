"""Operating points, label mapping and class names: what a clinician reads off the outputs."""
import json

import numpy as np
import pandas as pd
import pytest

from conftest import SYNTH_CONFIG, TINY, one_line_error, run_cli
from multimodal.evaluation.operating import choose, confusion_metrics, parse_rule


def test_rules_pick_the_cut_they_promise():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    p = np.clip(0.5 * y + rng.normal(0.25, 0.2, 2000), 0, 1)
    t = choose(y, p, "sensitivity:0.9")
    assert confusion_metrics(y, p, t)["sensitivity"] >= 0.9
    higher = np.unique(p)[np.unique(p) > t].min()  # the next cut up misses the target
    assert confusion_metrics(y, p, higher)["sensitivity"] < 0.9
    t = choose(y, p, "specificity:0.95")
    assert confusion_metrics(y, p, t)["specificity"] >= 0.95
    lower = np.unique(p)[np.unique(p) < t].max()
    assert confusion_metrics(y, p, lower)["specificity"] < 0.95
    tj = choose(y, p, "youden")
    youden = [sum(confusion_metrics(y, p, c)[k] for k in ("sensitivity", "specificity")) for c in (tj, 0.3, 0.6)]
    assert youden[0] >= max(youden[1:])
    assert choose(y, p, 0.3) == 0.3
    for bad in ("sensitivity:1.5", "recall:0.9", 1.0, "youden:2x"):
        with pytest.raises(ValueError):
            parse_rule(bad)


@pytest.fixture(scope="module")
def thresholded(cohort, tmp_path_factory):
    from multimodal import DiagnosisModel

    d = tmp_path_factory.mktemp("op") / "m"
    model = DiagnosisModel.from_config(SYNTH_CONFIG, **TINY,
                                       **{"task.threshold": "sensitivity:0.95", "task.names": {0: "healthy", 1: "sick"}})
    model.fit(cohort["train"], cohort["val"], progress=False).save(d)
    return model, d


def test_threshold_is_chosen_saved_and_used_by_pred(thresholded, cohort):
    from multimodal import DiagnosisModel

    model, d = thresholded
    t = model.metrics["training"]["thresholds"][0]
    assert json.loads((d / "preprocessing.json").read_text())["labels"]["thresholds"] == [t]
    val = pd.read_csv(cohort["val"])
    pv = model.predict(cohort["val"])
    sick = pv["prob_sick"].to_numpy()
    assert t == choose(val["label"].to_numpy(), sick, "sensitivity:0.95")  # on the validation records
    again = DiagnosisModel.load(d).predict(cohort["test"])
    assert list(again.columns[:3]) == ["id", "prob_healthy", "prob_sick"]
    ok = again["status"] == "ok"
    assert (again.loc[ok, "pred"] == np.where(again.loc[ok, "prob_sick"] >= t, "sick", "healthy")).all()
    assert model.metrics["validation"]["operating_point"]["sensitivity"]["value"] >= 0.95


def test_evaluate_reports_the_operating_point_with_cis(capsys, thresholded, cohort, tmp_path):
    _, d = thresholded
    code, out, err = run_cli(capsys, "evaluate", "--model", d, "--records", cohort["test"], "--out",
                             tmp_path / "m.json", "--n-boot", 100, "--plots", tmp_path / "plots", "--quiet")
    assert code == 0, err
    assert "at threshold" in out and "sensitivity" in out and "NPV" in out
    op = json.loads((tmp_path / "m.json").read_text())["operating_point"]
    assert set(op) == {"threshold", "sensitivity", "specificity", "ppv", "npv", "f1"}
    lo, hi = op["sensitivity"]["ci95"]
    assert lo <= op["sensitivity"]["value"] <= hi and hi - lo > 0
    assert (tmp_path / "plots" / "roc.png").stat().st_size > 0


def test_positive_values_make_a_binary_task_from_a_multiclass_column(cohort, tmp_path):
    from multimodal import DiagnosisModel

    rng = np.random.default_rng(0)
    paths = {}
    for split in ("train", "val"):
        df = pd.read_csv(cohort[split], dtype=str, keep_default_na=False)
        df["dx"] = np.where(df["label"] == "1", rng.choice(["mel", "bcc"], len(df)), rng.choice(["nv", "bkl"], len(df)))
        paths[split] = cohort["dir"] / f"dx_{split}.csv"
        df.to_csv(paths[split], index=False)
    cfg = {"task.label": "dx", "task.positive": ["mel", "bcc"], "train.epochs": 1}
    m = DiagnosisModel.from_config(SYNTH_CONFIG, **{**TINY, **cfg})
    m.fit(paths["train"], paths["val"], progress=False)
    assert m.classes == ["other", "mel+bcc"]
    y = m.prep.labels.encode(pd.read_csv(paths["val"], dtype=str))
    assert (y == pd.read_csv(cohort["val"])["label"].to_numpy()).all()
    with pytest.raises(Exception, match="never occur"):
        DiagnosisModel.from_config(SYNTH_CONFIG,
                                   **{**TINY, **cfg, "task.positive": ["melanoma"]}).fit(paths["train"], paths["val"], progress=False)


def test_bad_operating_settings_are_one_line(capsys, cohort, tmp_path):
    base = ["train", "--config", SYNTH_CONFIG, "--records", cohort["train"], "--out",
            tmp_path / "m", "--quiet"]
    one_line_error(*run_cli(capsys, *base, "task.threshold=sensitivity:1.2")[::2], "strictly between 0 and 1")
    one_line_error(*run_cli(capsys, *base, "task.type=multiclass", "task.threshold=youden")[::2], "multiclass")
    one_line_error(*run_cli(capsys, *base, "task.positive=[a]", "task.classes=[a,b]")[::2], "task.positive")
    assert not (tmp_path / "m").exists()


def test_operating_point_can_be_chosen_again_and_saved(thresholded, cohort, tmp_path):
    from multimodal import DiagnosisModel

    _, d = thresholded
    model = DiagnosisModel.load(d)
    t = model.set_operating_point(cohort["val"], "specificity:0.9")[0]
    model.save(tmp_path / "m2")
    again = DiagnosisModel.load(tmp_path / "m2")
    assert again.prep.labels.thresholds == [t] and again.config.task.threshold == "specificity:0.9"
    spec = again.evaluate(cohort["val"], n_boot=20)["operating_point"]["specificity"]["value"]
    assert spec >= 0.9


def test_predictions_file_is_scored_at_the_models_cut(capsys, thresholded, cohort, tmp_path):
    """evaluate --predictions on what predict wrote: task.names read from the config, and the decisions
    of its pred column (the sensitivity:0.95 cut, which the file does not name) are the ones scored."""
    import yaml

    model, d = thresholded
    cfg = yaml.safe_load(SYNTH_CONFIG.read_text())
    cfg["task"]["names"] = {0: "healthy", 1: "sick"}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert run_cli(capsys, "predict", "--model", d, "--records", cohort["test"], "--out", tmp_path / "p.csv")[0] == 0
    common = ["--n-boot", 100, "--quiet"]
    run_cli(capsys, "evaluate", "--model", d, "--records", cohort["test"], "--out", tmp_path / "m.json", *common)
    code, out, err = run_cli(capsys, "evaluate", "--predictions", tmp_path / "p.csv", "--labels", cohort["test"],
                             "--config", tmp_path / "cfg.yaml", "--out", tmp_path / "f.json", *common)
    assert code == 0, err
    by_model, by_file = (json.loads((tmp_path / f).read_text()) for f in ("m.json", "f.json"))
    t = model.prep.labels.thresholds[0]
    assert t != 0.5 and by_file["operating_point"].pop("threshold") >= t == by_model["operating_point"].pop("threshold")
    for key in ("overall", "per_class", "operating_point", "n", "n_errors", "n_unlabelled"):
        assert by_file[key] == by_model[key], key
    assert list(by_file["per_class"]) == ["healthy", "sick"] and "from the file's pred column" in out
