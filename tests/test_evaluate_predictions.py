"""`mmdx evaluate --predictions`: a written predictions file scored against a records file's labels, with
the metrics, bootstrap and resamples of `evaluate --model` and the join and CIs of `mmdx compare`."""
import json

import numpy as np
import pandas as pd
import pytest

from conftest import SYNTH_CONFIG, one_line_error, run_cli
from multimodal.evaluation.comparison import compare
from multimodal.evaluation.scorefile import evaluate_predictions


def _read(path):
    return json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))


def _without(m, *keys):
    return {k: v for k, v in m.items() if k not in keys}


@pytest.fixture(scope="module")
def predicted(tiny_model, cohort, tmp_path_factory):
    """The tiny model's directory, test records out of id order (rows are resampled in id order, not the
    file's), and the file `mmdx predict` wrote for them."""
    d = tmp_path_factory.mktemp("evalpred")
    tiny_model.save(d / "m")
    shuffled = cohort["dir"] / "test_out_of_order.csv"  # beside the images its paths name
    pd.read_csv(cohort["test"], dtype=str, keep_default_na=False).sample(frac=1, random_state=3).to_csv(
        shuffled, index=False)
    from multimodal.cli import main

    assert main(["predict", "--model", str(d / "m"), "--records", str(shuffled), "--out", str(d / "p.csv"),
                 "--quiet"]) == 0
    return d, shuffled


def test_the_file_predict_wrote_scores_as_the_model_does(capsys, predicted, tmp_path):
    d, records = predicted
    code, out_model, err = run_cli(capsys, "evaluate", "--model", d / "m", "--records", records, "--out",
                                   tmp_path / "model.json", "--n-boot", 200, "--quiet")
    assert code == 0, err
    code, out_file, err = run_cli(capsys, "evaluate", "--predictions", d / "p.csv", "--labels", records,
                                  "--config", SYNTH_CONFIG, "--out", tmp_path / "file.json", "--n-boot", 200)
    assert code == 0, err
    by_model, by_file = _read(tmp_path / "model.json"), _read(tmp_path / "file.json")
    assert by_file["threshold_from"] == "the file's pred column" and by_file["predictions"] == str(d / "p.csv")
    assert _without(by_file, "threshold_from", "predictions") == by_model  # every value and CI, the cut included
    assert out_file.split("operating point from")[0] == out_model.split("metrics written")[0]


def test_a_planted_perfect_predictor_and_a_threshold(capsys, tmp_path):
    """Positives at 0.51..0.90, negatives at 0.01..0.40: AUROC 1; cut at 0.705 half the positives are
    called, cut at 0.205 half the negatives are; without a cut (no pred column) 0.5 separates them all."""
    k = np.arange(1, 41)
    p = np.concatenate([0.5 + 0.01 * k, 0.01 * k])
    ids = [f"R{i:03d}" for i in range(80)]
    labels = pd.DataFrame({"patient_id": ids, "label": [1] * 40 + [0] * 40})
    labels.sample(frac=1, random_state=0).to_csv(tmp_path / "labels.csv", index=False)
    pd.DataFrame({"id": ids, "prob_0": 1 - p, "prob_1": p}).to_csv(tmp_path / "p.csv", index=False)
    base = ["evaluate", "--predictions", tmp_path / "p.csv", "--labels", tmp_path / "labels.csv", "--n-boot", 50]
    for cut, sens, spec, out in ((None, 1.0, 1.0, "a.json"), (0.705, 0.5, 1.0, "b.json"), (0.205, 1.0, 0.5, "c.json")):
        code, stdout, err = run_cli(capsys, *base, *(["--threshold", cut] if cut else []), "--out", tmp_path / out)
        assert code == 0, err
        m = _read(tmp_path / out)
        assert m["overall"]["auroc"]["value"] == 1.0 and m["n"] == 80
        assert m["overall"]["auroc"]["ci95"] == pytest.approx([1.0, 1.0], abs=1e-12)
        op = m["operating_point"]
        assert (op["threshold"], op["sensitivity"]["value"], op["specificity"]["value"]) == (cut or 0.5, sens, spec)
        assert m["threshold_from"] == ("--threshold" if cut else "0.5 (the file has no threshold or pred column)")
        assert f"at threshold {cut or 0.5:.3g}: sensitivity {sens:.3f}" in stdout


def _grouped(n=240, seed=0):
    """Labels with 3 records per patient, and a noisy score."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    labels = pd.DataFrame({"patient_id": [f"P{i:03d}" for i in range(n)], "label": y, "patient": np.arange(n) // 3})
    p = 1 / (1 + np.exp(-(0.8 * (2 * y - 1) + rng.normal(0, 1, n))))
    return labels, pd.DataFrame({"id": labels["patient_id"], "prob_0": 1 - p, "prob_1": p, "status": "ok"})


@pytest.mark.parametrize("group", [None, "patient"])
def test_the_auroc_ci_is_compares_for_one_file(capsys, tmp_path, group):
    """Same n_boot, seed and groups: one resampling, in id order, whatever order either file lists rows in."""
    labels, pred = _grouped()
    labels.sample(frac=1, random_state=1).to_csv(tmp_path / "labels.csv", index=False)
    pred.sample(frac=1, random_state=2).to_csv(tmp_path / "p.csv", index=False)
    grouping = ["--group-column", group] if group else []
    code, _, err = run_cli(capsys, "evaluate", "--predictions", tmp_path / "p.csv", "--labels", tmp_path / "labels.csv",
                           "--n-boot", 300, "--out", tmp_path / "e.json", *grouping)
    assert code == 0, err
    by_evaluate = _read(tmp_path / "e.json")["overall"]["auroc"]
    by_compare = compare({"p": pred, "again": pred}, labels, n_boot=300, group_column=group)["auroc"]["p"]
    assert by_evaluate["value"] == pytest.approx(by_compare["value"], abs=1e-12)
    assert by_evaluate["ci95"] == pytest.approx(by_compare["ci95"], abs=1e-12)
    other_seed = compare({"p": pred, "again": pred}, labels, n_boot=300, group_column=group, seed=1)["auroc"]["p"]
    assert other_seed["ci95"] != pytest.approx(by_evaluate["ci95"], abs=1e-6)  # the test can tell CIs apart


def test_cross_validation_files_are_scored_at_each_folds_cut():
    """An out-of-fold file's pred column was decided at each fold's own cut: those decisions are scored."""
    labels, pred = _grouped(200, seed=3)
    pred["fold"] = np.arange(200) % 2 + 1
    cut = np.where(pred["fold"] == 1, 0.3, 0.7)
    pred["pred"] = np.where(pred["prob_1"] >= cut, "1", "0")
    m = evaluate_predictions(pred, labels, n_boot=20)
    y, called = labels["label"].to_numpy() == 1, pred["pred"].to_numpy() == "1"
    op = m["operating_point"]
    assert op["sensitivity"]["value"] == called[y].mean() and op["specificity"]["value"] == (~called[~y]).mean()
    assert len(op["threshold"]) == 2 and op["threshold"][0] >= 0.3 and op["threshold"][1] >= 0.7
    assert m["overall"]["accuracy"]["value"] == pytest.approx((called == y).mean())


def test_multiclass_is_macro_and_counts_errors_and_unlabelled_rows():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 150)
    P = rng.dirichlet(np.ones(3), 150) + 0.5 * np.eye(3)[y]
    P /= P.sum(1, keepdims=True)
    labels = pd.DataFrame({"patient_id": range(150), "label": np.array(["a", "b", "c"])[y].astype(object)})
    labels.loc[0, "label"] = None
    pred = pd.DataFrame({"id": range(150), **{f"prob_{c}": P[:, j] for j, c in enumerate("abc")}, "status": "ok"})
    pred.loc[1, "status"] = "error"
    m = evaluate_predictions(pred, labels, n_boot=20)
    from sklearn.metrics import roc_auc_score

    assert m["task"] == "multiclass" and m["n"] == 148 and (m["n_errors"], m["n_unlabelled"]) == (1, 1)
    assert m["overall"]["auroc"]["value"] == pytest.approx(roc_auc_score(y[2:], P[2:], multi_class="ovr"))
    one = evaluate_predictions(pred, labels, n_boot=20, positive="b")
    assert one["task"] == "binary" and list(one["per_class"]) == ["rest", "b"]
    assert one["overall"]["auroc"]["value"] == pytest.approx(roc_auc_score(y[2:] == 1, P[2:, 1]))


def _case(tmp, case):
    labels, pred = _grouped(60)
    if case == "id not in labels":
        pred.loc[3, "id"] = "X999"
    elif case == "labelled id not predicted":
        pred = pred.drop(index=5)
    elif case == "unknown label":
        labels.loc[2, "label"] = 7
    elif case == "no prob column":
        pred = pred.drop(columns=["prob_0", "prob_1"]).assign(score=0.5)
    elif case == "pred is no cut":
        pred["pred"] = np.where(np.arange(60) % 2, "1", "0")
    labels.to_csv(tmp / "labels.csv", index=False)
    pred.to_csv(tmp / "p.csv", index=False)
    return ["--predictions", tmp / "p.csv", "--labels", tmp / "labels.csv", "--n-boot", 10]


@pytest.mark.parametrize("case, needle", [
    ("id not in labels", "has no row for 1 of the ids in"),
    ("labelled id not predicted", "has no row for 1 of the ids in"),
    ("unknown label", "label values ['7'] are not among the predicted classes"),
    ("no prob column", "no prob_<class> columns"),
    ("pred is no cut", "its pred column is not a cut of prob_1"),
])
def test_mistakes_are_one_line(capsys, tmp_path, case, needle):
    one_line_error(*run_cli(capsys, "evaluate", *_case(tmp_path, case))[::2], needle)


def test_model_or_predictions_exactly_one(capsys, predicted, cohort, tmp_path):
    d, _ = predicted
    for argv, needle in ((["--model", d / "m", "--predictions", d / "p.csv"], "not allowed with argument"),
                         ([], "one of the arguments --predictions --model is required")):
        with pytest.raises(SystemExit) as e:  # argparse's usage line and its error, exit 2
            run_cli(capsys, "evaluate", *argv, "--records", cohort["test"])
        assert e.value.code == 2 and needle in capsys.readouterr().err
    one_line_error(*run_cli(capsys, "evaluate", "--model", d / "m", "--records", cohort["test"],
                            "--threshold", 0.3)[::2], "--threshold only goes with evaluate --predictions")
    one_line_error(*run_cli(capsys, "evaluate", "--predictions", d / "p.csv", "--labels", cohort["test"],
                            "--out", d / "p.csv")[::2], "is also an input")
    labels, pred = _grouped(60)
    pred.to_csv(tmp_path / "p.csv", index=False)
    labels.assign(label=np.array(["a", "b", "c"])[np.arange(60) % 3]).to_csv(tmp_path / "l.csv", index=False)
    pd.DataFrame({"id": labels["patient_id"], "prob_a": 0.2, "prob_b": 0.3, "prob_c": 0.5}).to_csv(
        tmp_path / "m.csv", index=False)
    one_line_error(*run_cli(capsys, "evaluate", "--predictions", tmp_path / "m.csv", "--labels", tmp_path / "l.csv",
                            "--threshold", 0.3)[::2], "--threshold sets a binary operating point")
