"""The CLI: user mistakes are one line on stderr with exit 2; the happy path writes what it says."""
import json

import pandas as pd
import pytest


from conftest import SYNTH_CONFIG, TINY, one_line_error, run_cli

CFG = str(SYNTH_CONFIG)


run = run_cli


def test_unknown_column(capsys, cohort, tmp_path):
    df = pd.read_csv(cohort["train"]).drop(columns=["crp"])
    df.to_csv(tmp_path / "r.csv", index=False)
    code, _, err = run(capsys, "train", "--config", CFG, "--records", tmp_path / "r.csv", "--out", tmp_path / "m")
    one_line_error(code, err, "unknown column 'crp'")


def test_wrong_label_type(capsys, cohort, tmp_path):
    df = pd.read_csv(cohort["train"])
    df["label"] = [("a", "b", "c")[i % 3] for i in range(len(df))]
    df.to_csv(tmp_path / "r.csv", index=False)
    code, _, err = run(capsys, "train", "--config", CFG, "--records", tmp_path / "r.csv", "--out", tmp_path / "m")
    one_line_error(code, err, "has 3 distinct values (a, b, c); task type binary needs exactly 2")


@pytest.mark.parametrize("content, needle", [("", "file is empty"), ("patient_id,label\n", "no records")])
def test_empty_records(capsys, tmp_path, content, needle):
    (tmp_path / "r.csv").write_text(content)
    code, _, err = run(capsys, "train", "--config", CFG, "--records", tmp_path / "r.csv", "--out", tmp_path / "m")
    one_line_error(code, err, needle)


def test_bad_config_and_missing_files(capsys, cohort, tmp_path):
    (tmp_path / "c.yaml").write_text("task: {type: binary, label: label}\nfusion: {type: [oops\n")
    code, _, err = run(capsys, "train", "--config", tmp_path / "c.yaml", "--records", cohort["train"], "--out", tmp_path / "m")
    one_line_error(code, err, "not valid YAML")
    code, _, err = run(capsys, "train", "--config", CFG, "--records", tmp_path / "nope.csv", "--out", tmp_path / "m")
    one_line_error(code, err, "records file not found")
    code, _, err = run(capsys, "predict", "--model", tmp_path / "nomodel", "--records", cohort["test"], "--out", tmp_path / "p.csv")
    one_line_error(code, err, "not a model directory")
    code, _, err = run(capsys, "train", "--config", CFG, "--records", cohort["train"], "--out", tmp_path / "m", "fusion.type=magic")
    one_line_error(code, err, "unknown fusion head 'magic'")


def test_train_predict_evaluate_tabular_subset(capsys, cohort, tmp_path):
    overrides = [f"{k}={v}" for k, v in TINY.items() if not k.startswith(("image", "text"))]
    code, out, err = run(capsys, "train", "--config", CFG, "--records", cohort["train"], "--val", cohort["val"],
                         "--out", tmp_path / "m", "--quiet", "modalities=tabular", *overrides)
    assert code == 0, err
    assert "model saved to" in out and "AUROC" in out
    saved = json.loads((tmp_path / "m" / "config.json").read_text())["config"]
    assert saved["modalities"] == ["tabular"]
    code, out, err = run(capsys, "predict", "--model", tmp_path / "m", "--records", cohort["test"],
                         "--out", tmp_path / "p.parquet", "--quiet")
    assert code == 0, err
    pred = pd.read_parquet(tmp_path / "p.parquet")
    test = pd.read_csv(cohort["test"], dtype=str)
    assert list(pred.id) == list(test.patient_id)
    assert list(pred.columns) == ["id", "prob_0", "prob_1", "pred", "status", "error"]
    assert not list(tmp_path.glob(".p.parquet*")), "temporary file left behind"
    code, out, err = run(capsys, "evaluate", "--model", tmp_path / "m", "--records", cohort["test"],
                         "--out", tmp_path / "e.json", "--n-boot", 50, "--quiet")
    assert code == 0, err
    m = json.loads((tmp_path / "e.json").read_text())
    lo, hi = m["overall"]["auroc"]["ci95"]
    assert lo <= m["overall"]["auroc"]["value"] <= hi and "AUROC" in out


def test_no_dicom_header_values_in_output(capsys, tiny_model, cohort, tmp_path):
    """Synthetic DICOMs carry PHI-shaped headers (SYNTH^PATIENT…); none may reach stdout/stderr/files."""
    import pydicom

    src = next((cohort["dir"] / "images").glob("*.dcm"))
    ds = pydicom.dcmread(src)
    ds.PixelData = ds.PixelData[:10]  # truncated pixel data: decoding fails
    ds.save_as(cohort["dir"] / "images" / "broken_phi.dcm")
    df = pd.read_csv(cohort["test"], dtype=str).iloc[:3]
    df.loc[1, "image_path"] = "images/broken_phi.dcm"
    df.to_csv(cohort["dir"] / "phi.csv", index=False)
    tiny_model.save(tmp_path / "m")
    code, out, err = run(capsys, "predict", "--model", tmp_path / "m", "--records", cohort["dir"] / "phi.csv",
                         "--out", tmp_path / "p.csv")
    assert code == 0
    written = (tmp_path / "p.csv").read_text()
    assert "broken_phi.dcm" in written  # the error names the file...
    for text in (out, err, written):  # ...but no header value
        assert "SYNTH^PATIENT" not in text and "Synthetic General" not in text and str(ds.PatientBirthDate) not in text


def test_a_relative_image_root_on_the_command_line_is_the_shells(capsys, tiny_model, cohort, tmp_path, monkeypatch):
    """`--image-root ../data/images` from a project folder resolved against the records file's folder
    instead, and every image was 'not found'. A config's data.image_root still means the records' folder."""
    tiny_model.save(tmp_path / "m")
    (tmp_path / "elsewhere").mkdir()
    pd.read_csv(cohort["test"], dtype=str).iloc[:6].to_csv(tmp_path / "elsewhere" / "r.csv", index=False)
    monkeypatch.chdir(cohort["dir"].parent)
    code, out, err = run(capsys, "predict", "--model", tmp_path / "m", "--records", tmp_path / "elsewhere" / "r.csv",
                         "--image-root", cohort["dir"].name, "--out", tmp_path / "p.csv")
    assert code == 0, err
    assert (pd.read_csv(tmp_path / "p.csv")["status"] == "ok").all()
