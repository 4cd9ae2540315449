"""Bad settings fail loudly and one bad record fails alone (findings 6, 8 and 9 of #8)."""
import numpy as np
import pandas as pd
import pytest

from multimodal import DiagnosisModel, UserError
from multimodal.cli import main
from multimodal.config import config_from_dict, load_config

from conftest import SYNTH_CONFIG, TINY

CFG = SYNTH_CONFIG


def one_line(capsys, argv, needle):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("mmdx: error:") and needle in err and len(err.strip().splitlines()) == 1, err


# -- 8: values, not only types ---------------------------------------------------------------------------------
@pytest.mark.parametrize("override, needle", [
    ({"image.window": [40, 0]}, "width > 0"),
    ({"image.window": [40, float("nan")]}, "width > 0"),
    ({"fusion.heads": 3}, "divisible by fusion.heads"),
    ({"image.std": [0.0]}, "std values must be > 0"),
    ({"image.mean": [0.5, 0.5, 0.5]}, "in_chans=1"),
    ({"train.lr": 0}, "greater than 0"),
    ({"task.classes": ["a", "a"]}, "twice"),
    ({"tabular.numeric": ["crp", "crp"]}, "twice"),
    ({"fusion.dropout": 1.5}, "less than 1"),
])
def test_config_values_are_validated(override, needle):
    with pytest.raises(UserError, match=needle):
        load_config(CFG, override)


def test_fusion_heads_on_the_cli_is_one_line(capsys, cohort, tmp_path):
    one_line(capsys, ["train", "--config", CFG, "--records", cohort["train"], "--out", tmp_path / "m",
                      "fusion.heads=3"], "divisible")


def test_training_where_most_records_fail_stops_with_an_error(cohort, tmp_path):
    model = DiagnosisModel.from_config(CFG, **TINY, **{"image.frames": 7})  # no file has 8 frames
    with pytest.raises(UserError, match=r"records cannot be loaded .*most common error.*frame 7 out of range"):
        model.fit(cohort["train"], cohort["val"], progress=False)


def test_counts_say_how_many_records_were_used(cohort, tmp_path):
    df = pd.read_csv(cohort["train"], dtype=str)
    df.loc[:1, "image_path"] = "images/missing.png"
    df.to_csv(cohort["dir"] / "two_missing.csv", index=False)
    model = DiagnosisModel.from_config(CFG, **TINY).fit(cohort["dir"] / "two_missing.csv", cohort["val"],
                                                         progress=False)
    t = model.metrics["training"]
    assert t["skipped_records"] == 2 and t["n_train"] == len(df) - 2


def test_holdout_keeps_each_patient_on_one_side(cohort):
    from multimodal.data.records import load_records
    from multimodal.data.splits import holdout_splits

    cfg = load_config(CFG)
    df = pd.read_csv(cohort["train"], dtype=str)
    two = pd.concat([df, df]).reset_index(drop=True)  # every patient has 2 records
    with pytest.raises(UserError, match="repeat an id"):  # repeated ids need a group column (issue #11)
        load_records(two, cfg, labels=True)
    grouped = config_from_dict(cfg.model_dump() | {"data": {"id": "record", "group": "patient_id"}})
    two["record"] = [f"r{i}" for i in range(len(two))]
    (tr, va), = holdout_splits(load_records(two, grouped, labels=True), grouped)
    assert not set(tr.df["patient_id"]) & set(va.df["patient_id"])
    assert len(va) >= 2 and len(tr) + len(va) == len(two)


def test_val_equal_to_records_or_sharing_patients_is_refused(capsys, cohort, tmp_path):
    one_line(capsys, ["train", "--config", CFG, "--records", cohort["train"], "--val", cohort["train"],
                      "--out", tmp_path / "m"], "is the training records file")
    df = pd.read_csv(cohort["val"], dtype=str)
    df.loc[0, "patient_id"] = pd.read_csv(cohort["train"], dtype=str)["patient_id"][0]
    df.to_csv(tmp_path / "v.csv", index=False)
    one_line(capsys, ["train", "--config", CFG, "--records", cohort["train"], "--val", tmp_path / "v.csv",
                      "--out", tmp_path / "m"], "1 validation patients (patient_id) are also in the training")


# -- 9: one bad text fails alone ---------------------------------------------------------------------------------
def test_undecodable_bytes_in_a_csv_cost_no_other_row(tiny_model, cohort):
    raw = cohort["test"].read_bytes().replace(b"mass", b"ma\xff\xfess", 1)
    (cohort["dir"] / "latin.csv").write_bytes(raw)
    out = tiny_model.predict(cohort["dir"] / "latin.csv")
    assert len(out) == len(pd.read_csv(cohort["test"])) and (out["status"] == "ok").all()


def test_lone_surrogate_costs_no_other_row(tiny_model, cohort, monkeypatch):
    df = pd.read_csv(cohort["test"], dtype=str).astype(object)
    monkeypatch.setattr(tiny_model.config.data, "image_root", str(cohort["dir"]))  # a DataFrame's image paths
    df.loc[2, "report_text"] = "mass seen \ud800 here"
    out = tiny_model.predict(df)
    assert len(out) == len(df) and out.loc[2, "status"] == "ok"
    clean = tiny_model.predict(df.drop(index=2))
    assert out.drop(index=2)["status"].tolist() == clean["status"].tolist()
    np.testing.assert_allclose(out.drop(index=2)["prob_1"].to_numpy(), clean["prob_1"].to_numpy(), atol=1e-6)


def test_a_tokenizer_crash_is_that_records_error(tiny_model, cohort, monkeypatch):
    class PanicException(BaseException):  # what pyo3 raises for a Rust panic
        pass

    tok = tiny_model.prep.text.tokenizer

    class Crashy:
        def __getattr__(self, name):
            return getattr(tok, name)

        def encode(self, text, *a, **k):
            if "CRASH" in text:
                raise PanicException("index out of bounds")
            return tok.encode(text, *a, **k)

    monkeypatch.setattr(tiny_model.prep.text, "tokenizer", Crashy())
    df = pd.read_csv(cohort["test"], dtype=str)
    df.loc[3, "report_text"] = "CRASH"
    df.to_csv(cohort["dir"] / "crash.csv", index=False)
    out = tiny_model.predict(cohort["dir"] / "crash.csv")
    assert len(out) == len(df)
    assert out.loc[3, "status"] == "error" and "tokenizer crashed" in out.loc[3, "error"]
    assert (out.drop(index=3)["status"] == "ok").all()


# -- 6: a huge report cell costs no gigabytes --------------------------------------------------------------------
def test_huge_text_cell_is_read_and_reported_capped(tiny_model, cohort, tmp_path):
    df = pd.read_csv(cohort["test"], dtype=str).iloc[:2].copy()
    df.loc[0, "report_text"] = "mass " * 400_000  # 2 MB
    df.to_csv(cohort["dir"] / "huge.csv", index=False)
    exps = tiny_model.explain(cohort["dir"] / "huge.csv", method="gradcam")
    assert exps[0].error is None
    cap = tiny_model.config.text.max_chars
    assert len(" ".join(exps[0].words)) <= cap
    index = exps.to_html(tmp_path / "rep")
    biggest = max(p.stat().st_size for p in index.parent.glob("*.html"))
    assert biggest < 1_000_000  # before the cap: ~19x the cell's size (a 10 MB cell gave a 192 MB page)
