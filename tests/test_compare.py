"""`mmdx compare` / multimodal.evaluation.comparison: paired bootstrap differences on planted gaps, the patient join, the CLI."""
import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from conftest import one_line_error, run_cli
from multimodal.evaluation.bootstrap import resampler
from multimodal.evaluation.comparison import auroc, compare, format_report
from multimodal.errors import UserError


def _cohort(n=300, seed=0):
    """Labels, a model that sees them through noise, and a model that is pure noise."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    labels = pd.DataFrame({"patient_id": [f"P{i:03d}" for i in range(n)], "label": y})

    def preds(p):
        return pd.DataFrame({"id": labels["patient_id"], "prob_0": 1 - p, "prob_1": p, "pred": (p > 0.5).astype(int),
                             "status": "ok", "error": None})
    signal = preds(1 / (1 + np.exp(-(1.0 * (2 * y - 1) + rng.normal(0, 1, n)))))
    noise = preds(rng.random(n))
    return labels, signal, noise


def test_auroc_is_sklearns_with_ties_and_per_column():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, (200, 3))
    s = np.round(rng.random((200, 3)) + 0.3 * y, 1)  # many ties
    assert auroc(y, s) == pytest.approx(np.mean([roc_auc_score(y[:, j], s[:, j]) for j in range(3)]), abs=1e-12)


def test_a_planted_gap_is_found_and_identical_files_differ_by_exactly_zero():
    labels, signal, noise = _cohort()
    r = compare({"signal": signal, "noise": noise, "signal again": signal.copy()}, labels, n_boot=500, all_pairs=True)
    gap, same, _ = r["comparisons"]  # reference minus each other file: positive when the reference is better
    assert (gap["a"], gap["b"]) == ("signal", "noise") and r["reference"] == "signal"
    assert gap["ci95"][0] > 0 and gap["p_le_0"] < 0.05 and gap["value"] > 0.3
    assert gap["value"] == pytest.approx(r["auroc"]["signal"]["value"] - r["auroc"]["noise"]["value"])
    assert (same["a"], same["b"]) == ("signal", "signal again")
    assert same["value"] == 0 and same["ci95"] == [0.0, 0.0] and same["p_le_0"] == 1
    worse = compare({"noise": noise, "signal": signal}, labels, n_boot=500)["comparisons"][0]  # a worse reference
    assert (worse["a"], worse["b"]) == ("noise", "signal") and worse["value"] == pytest.approx(-gap["value"])
    assert worse["ci95"][1] < 0 and worse["p_le_0"] > 0.95
    lo, hi = r["auroc"]["signal"]["ci95"]
    assert lo < r["auroc"]["signal"]["value"] < hi and r["n"] == 300 and r["positive"] == "1"
    assert r["auroc"]["signal"]["value"] == pytest.approx(roc_auc_score(labels["label"], signal["prob_1"]))
    assert compare([noise, signal], labels, n_boot=10, positive=1)["positive"] == "1"  # 1 and "1": one class
    # no gap planted: the CI of the difference covers 0 and p is not small
    _, signal2, noise2 = _cohort(seed=1)
    flat = compare([noise, noise2.assign(id=noise["id"])], labels, n_boot=500)["comparisons"][0]
    assert flat["ci95"][0] < 0 < flat["ci95"][1] and flat["p_le_0"] > 0.05


def test_all_pairs_and_reference_only():
    labels, signal, noise = _cohort()
    three = {"a": noise, "b": signal, "c": signal}
    assert [(c["a"], c["b"]) for c in compare(three, labels, n_boot=50)["comparisons"]] == [("a", "b"), ("a", "c")]
    r = compare(three, labels, n_boot=50, all_pairs=True)
    assert [(c["a"], c["b"]) for c in r["comparisons"]] == [("a", "b"), ("a", "c"), ("b", "c")]
    assert "then each later pair as earlier - later file; positive = the first named is better" in format_report(r)


def test_the_join_is_paired_whatever_the_row_order_and_drops_an_error_row_from_every_file():
    labels, signal, noise = _cohort()
    bad = signal.copy()
    bad.loc[5, ["prob_0", "prob_1", "pred", "status", "error"]] = [np.nan, np.nan, None, "error", "unreadable"]
    extra = pd.DataFrame({"id": ["unlabelled"], "prob_0": [0.5], "prob_1": [0.5], "status": ["ok"]})
    shuffled = pd.concat([noise, extra]).sample(frac=1, random_state=0)
    r = compare({"noise": shuffled, "signal": bad}, labels.sample(frac=1, random_state=1), n_boot=300)
    keep = labels.index != 5
    ref = compare({"noise": noise[keep], "signal": signal[keep]}, labels[keep], n_boot=300)
    assert r["n"] == 299 and r["auroc"] == ref["auroc"] and r["comparisons"] == ref["comparisons"]
    assert r["files"]["signal"]["dropped"] == {"status error": 1}
    assert r["files"]["noise"]["dropped"] == {"without label": 1, "not scored by every file": 1}
    assert r["labels"]["dropped"] == {"not scored by every file": 1}
    text = format_report(r)
    assert "signal (predictions 'signal'): 300 rows -> 299 paired; status error: 1" in text


def test_groups_are_resampled_whole():
    groups = np.repeat(np.arange(40), np.arange(40) % 4 + 1)
    draw, rng = resampler(len(groups), groups), np.random.default_rng(0)
    size = np.bincount(groups)
    for _ in range(20):
        idx = draw(rng)
        per_row = np.bincount(idx, minlength=len(groups))
        for g in range(40):  # every record of a drawn patient, as often as the patient was drawn
            assert len(set(per_row[groups == g])) == 1
        assert len(idx) == sum(per_row[groups == g][0] * size[g] for g in range(40))
    labels, signal, noise = _cohort()
    labels["patient"] = labels.index // 3
    r = compare([noise, signal], labels, n_boot=100, group_column="patient")
    assert r["n_groups"] == 100 and r["n"] == 300
    assert r["auroc"] != compare([noise, signal], labels, n_boot=100)["auroc"]


def test_multiclass_is_macro_one_vs_rest_or_one_class_against_the_rest():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 150)
    P = rng.dirichlet(np.ones(3), 150) + 0.5 * np.eye(3)[y]
    P /= P.sum(1, keepdims=True)
    labels = pd.DataFrame({"patient_id": range(150), "label": np.array(["a", "b", "c"])[y]})
    pa = pd.DataFrame({"id": range(150), **{f"prob_{c}": P[:, j] for j, c in enumerate("abc")}})
    pb = pa[["id", "prob_c", "prob_a", "prob_b"]]  # same classes in another order
    r = compare([pa, pb], labels, n_boot=50)
    assert r["metric"] == "macro one-vs-rest auroc" and r["comparisons"][0]["value"] == 0
    assert r["auroc"]["model1"]["value"] == pytest.approx(roc_auc_score(y, P, multi_class="ovr"))
    one = compare([pa, pb], labels, n_boot=50, positive="b")
    assert one["auroc"]["model1"]["value"] == pytest.approx(roc_auc_score(y == 1, P[:, 1]))


@pytest.mark.parametrize("change, needle", [
    (lambda lab, a, b: ([a], lab), "at least 2 prediction files, got 1"),
    (lambda lab, a, b: ([a, b.drop(columns=["prob_0", "prob_1"])], lab), "no prob_<class> columns"),
    (lambda lab, a, b: ([a, b], lab.drop(columns=["label"])), "no column 'label'"),
    (lambda lab, a, b: ([a, b.iloc[:9]], lab), "only 9 patients are labelled and scored"),
    (lambda lab, a, b: ([a, b.rename(columns={"prob_1": "prob_yes"})], lab), "has classes ['0', 'yes']"),
    (lambda lab, a, b: ([a, b], lab.assign(label=7)), "label values ['7'] are not among"),
    (lambda lab, a, b: ([a, b], lab.assign(label=1)), "do not all have both outcomes"),
    (lambda lab, a, b: ([a, pd.concat([b, b.iloc[:1]])], lab), "appears more than once"),
])
def test_api_mistakes_are_user_errors(change, needle):
    labels, signal, noise = _cohort(60)
    preds, lab = change(labels, signal, noise)
    with pytest.raises(UserError) as e:
        compare(preds, lab, n_boot=10)
    assert needle in str(e.value)


def test_importable_from_the_package():
    from multimodal import compare as top

    assert top is compare


# -- the command line ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prediction_files(tiny_model, cohort, tmp_path_factory):
    d = tmp_path_factory.mktemp("compare")
    p = tiny_model.predict(cohort["test"])
    p.to_csv(d / "tiny.csv", index=False)
    rng = np.random.default_rng(0)
    noisy = p.copy()
    pos = f"prob_{tiny_model.classes[-1]}"
    noisy[pos] = 0.3 * p[pos] + 0.7 * rng.random(len(p))
    noisy[f"prob_{tiny_model.classes[0]}"] = 1 - noisy[pos]
    noisy.to_parquet(d / "noisy.parquet", index=False)
    return d


def test_cli_happy_path_writes_strict_json(capsys, cohort, prediction_files, tmp_path):
    d = prediction_files
    code, out, err = run_cli(capsys, "compare", "--labels", cohort["test"], d / "tiny.csv", d / "noisy.parquet",
                             "--names", "tiny,noisy", "--n-boot", 200, "--out", tmp_path / "cmp.json")
    assert code == 0, err
    assert "tiny (reference)" in out and "tiny - noisy" in out and f"comparison written to {tmp_path}" in out
    assert "how much the reference (tiny, the first file) beats each other file" in out
    assert "positive = the reference is better" in out and "p(<=0)" not in out
    r = json.loads((tmp_path / "cmp.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    c = r["comparisons"][0]
    assert f"share of resamples where tiny is not better: {c['p_le_0']:.4f}" in out
    assert "tiny - noisy" in out.splitlines()[-2] and f"{c['value']:+.3f}" in out.splitlines()[-2]
    assert c["value"] == pytest.approx(r["auroc"]["tiny"]["value"] - r["auroc"]["noisy"]["value"])
    assert r["difference"].startswith("a - b: how much a beats b")
    n_test = len(pd.read_csv(cohort["test"]))
    assert r["n"] == n_test and r["files"]["tiny"]["rows"] == n_test and (c["a"], c["b"]) == ("tiny", "noisy")
    api = compare({"tiny": d / "tiny.csv", "noisy": d / "noisy.parquet"}, cohort["test"], n_boot=200)
    assert r["auroc"] == api["auroc"] and r["comparisons"] == api["comparisons"]  # JSON floats round-trip


def _cli_case(d, cohort, tmp, case):
    lab, a, b = str(cohort["test"]), str(d / "tiny.csv"), str(d / "noisy.parquet")
    df = pd.read_csv(a)
    if case == "no prob":
        df.drop(columns=[c for c in df.columns if c.startswith("prob_")]).to_csv(tmp / "x.csv", index=False)
        return ["--labels", lab, a, tmp / "x.csv"]
    if case == "no label":
        pd.read_csv(lab).drop(columns=["label"]).to_csv(tmp / "l.csv", index=False)
        return ["--labels", tmp / "l.csv", a, b]
    if case == "few":
        df.iloc[:5].to_csv(tmp / "x.csv", index=False)
        return ["--labels", lab, a, tmp / "x.csv"]
    if case == "classes":
        df.rename(columns={df.columns[1]: "prob_other"}).to_csv(tmp / "x.csv", index=False)
        return ["--labels", lab, a, tmp / "x.csv"]
    return {"missing": ["--labels", lab, a, tmp / "nope.csv"], "one": ["--labels", lab, a],
            "out is input": ["--labels", lab, a, b, "--out", a]}[case]


@pytest.mark.parametrize("case, needle", [
    ("missing", "file not found"), ("no prob", "no prob_<class> columns"), ("no label", "no column 'label'"),
    ("few", "only 5 patients"), ("classes", "has classes"), ("one", "at least 2 prediction files"),
    ("out is input", "is also an input"),
])
def test_cli_mistakes_are_one_line(capsys, cohort, prediction_files, tmp_path, case, needle):
    code, _, err = run_cli(capsys, "compare", *_cli_case(prediction_files, cohort, tmp_path, case))
    one_line_error(code, err, needle)


@pytest.mark.parametrize("content, needle", [
    (bytes(range(256)) * 8, "cannot read records"),       # not a CSV at all
    (b"", "file is empty"),
    (b"id,prob_0,prob_1\n", "no records (header only)"),
    (b"patient,score\nP1,0.5\n", "no prob_<class> columns"),  # another tool's file
    (b"prob_0,prob_1\n0.1,0.9\n", "no column 'patient_id'"),   # no id column
    (b"id,prob_0,prob_1\nX1,0.1,0.9\nX2,0.2,0.8\n", "only 0 patients"),  # none of the labelled ids
    (b"PAR1 not a parquet file", "cannot read records"),
])
@pytest.mark.parametrize("role", ["predictions", "labels"])
def test_bad_files_are_one_line_errors(capsys, cohort, prediction_files, tmp_path, content, needle, role):
    bad = tmp_path / ("bad.parquet" if content.startswith(b"PAR1") else "bad.csv")
    bad.write_bytes(content)
    good = str(prediction_files / "tiny.csv")
    if role == "labels":
        needle = {"no prob_<class> columns": "no column 'patient_id'", "only 0 patients": "no column 'patient_id'"}.get(
            needle, needle)
        argv = ["--labels", bad, good, prediction_files / "noisy.parquet"]
    else:
        argv = ["--labels", cohort["test"], good, bad]
    code, _, err = run_cli(capsys, "compare", *argv, "--n-boot", 20)
    one_line_error(code, err, needle)


def test_class_names_from_the_config_map_raw_label_values(capsys, tmp_path):
    """A model trained with task.names writes prob_benign / prob_melanoma; the labels file holds 0 / 1."""
    labels, signal, noise = _cohort()
    for name, df in (("a", signal), ("b", noise)):
        df.rename(columns={"prob_0": "prob_benign", "prob_1": "prob_melanoma"}).to_csv(tmp_path / f"{name}.csv",
                                                                                       index=False)
    labels.rename(columns={"label": "dx", "patient_id": "lesion"}).to_csv(tmp_path / "labels.csv", index=False)
    (tmp_path / "cfg.yaml").write_text("task: {label: dx, names: {0: benign, 1: melanoma}}\ndata: {id: lesion}\n"
                                       "modalities: [tabular]\ntabular: {numeric: [x]}\n")
    files = [tmp_path / "a.csv", tmp_path / "b.csv", "--labels", tmp_path / "labels.csv", "--n-boot", 50]
    code, out, err = run_cli(capsys, "compare", *files, "--label-column", "dx", "--id-column", "lesion")
    one_line_error(code, err, "pass the config (--config)")
    code, out, err = run_cli(capsys, "compare", *files, "--config", tmp_path / "cfg.yaml", "--out",
                             tmp_path / "r.json")
    assert code == 0, err
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["positive"] == "melanoma"
    want = roc_auc_score(labels["label"], signal["prob_1"])
    assert r["auroc"]["a"]["value"] == pytest.approx(want)
