"""Train → save → load → predict, and the batch row contract with broken inputs mixed in."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from multimodal import DiagnosisModel, UserError


def test_save_load_identical_probabilities_and_no_pickles(tiny_model, cohort, tmp_path):
    before = tiny_model.predict(cohort["test"])
    out = tiny_model.save(tmp_path / "model")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessing.json", "tokenizer.json", "metrics.json",
            "versions.json", "checksums.json"} <= names
    assert not any(n.endswith((".pt", ".pth", ".pkl", ".bin")) for n in names)
    shutil.move(out, tmp_path / "moved")  # a model directory is self-contained
    after = DiagnosisModel.load(tmp_path / "moved", device="cpu").predict(cohort["test"])
    prob_cols = [c for c in before if c.startswith("prob_")]
    assert prob_cols == ["prob_0", "prob_1"]
    np.testing.assert_array_equal(before[prob_cols].to_numpy(), after[prob_cols].to_numpy())
    assert (before.pred == after.pred).all()
    metrics = json.loads((tmp_path / "moved" / "metrics.json").read_text())
    assert 0 <= metrics["validation"]["overall"]["auroc"]["value"] <= 1
    assert len(metrics["training"]["history"]) >= 1


def test_tampered_model_directory_is_refused(tiny_model, tmp_path):
    d = tiny_model.save(tmp_path / "m")
    cfg = json.loads((d / "preprocessing.json").read_text())
    cfg["tabular"]["mean"][0] += 1.0
    (d / "preprocessing.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="preprocessing.json does not match its recorded checksum"):
        DiagnosisModel.load(d)
    with pytest.raises(UserError, match="not a model directory"):
        DiagnosisModel.load(tmp_path)


def broken_records(cohort, tmp_path) -> pd.DataFrame:
    """Good test records with bad ones interleaved; returns the frame written next to the images."""
    test = pd.read_csv(cohort["test"], dtype=str, keep_default_na=False, na_values=[""])
    good = test.iloc[:6].copy()
    (cohort["dir"] / "images" / "garbage.dcm").write_bytes(b"DICM" * 10)
    (cohort["dir"] / "images" / "notes.png").write_text("not an image")
    bad = pd.DataFrame([
        dict(good.iloc[0], patient_id="BAD_MISSING_FILE", image_path="images/does_not_exist.dcm"),
        dict(good.iloc[0], patient_id="BAD_DICOM", image_path="images/garbage.dcm"),
        dict(good.iloc[0], patient_id="BAD_PNG", image_path="images/notes.png"),
        dict(good.iloc[0], patient_id="BAD_NUMBER", crp="twelve"),
        dict(good.iloc[0], patient_id="NOTHING_AT_ALL", image_path=None, report_text=None, age=None, sex=None,
             crp=None, smoking=None),
    ])
    rows = [good.iloc[0], bad.iloc[0], good.iloc[1], bad.iloc[1], bad.iloc[2], good.iloc[2], bad.iloc[3],
            good.iloc[3], bad.iloc[4], good.iloc[4], good.iloc[5]]
    return pd.DataFrame(rows).reset_index(drop=True)


def test_predict_one_row_per_record_in_order_with_clear_errors(tiny_model, cohort, tmp_path):
    df = broken_records(cohort, tmp_path)
    path = cohort["dir"] / "mixed.csv"
    df.to_csv(path, index=False)
    out = tiny_model.predict(path, batch_size=4)
    assert len(out) == len(df) and list(out.id) == list(df.patient_id)
    status = dict(zip(out.id, out.status))
    errors = dict(zip(out.id, out.error))
    assert status["BAD_MISSING_FILE"] == "error"
    assert errors["BAD_MISSING_FILE"].startswith("image not found: ") and errors["BAD_MISSING_FILE"].endswith(
        "images/does_not_exist.dcm")
    assert status["BAD_DICOM"] == "error" and "garbage.dcm" in errors["BAD_DICOM"]
    assert status["BAD_PNG"] == "error" and "notes.png" in errors["BAD_PNG"]
    assert status["BAD_NUMBER"] == "error" and "column 'crp'" in errors["BAD_NUMBER"]
    # no modality at all is not an error: the model still predicts (from nothing but its prior)
    assert status["NOTHING_AT_ALL"] == "ok"
    good = out[~out.id.str.startswith("BAD")]
    assert (good.status == "ok").all() and good[["prob_0", "prob_1"]].notna().all(axis=None)
    assert np.allclose(good.prob_0 + good.prob_1, 1)
    assert out[out.status == "error"][["prob_0", "prob_1"]].isna().all(axis=None)
    assert all("\n" not in e for e in out.error.dropna())
    # the good rows get the same probabilities as when predicted alone
    clean = cohort["dir"] / "clean.csv"
    df[~df.patient_id.str.startswith("BAD")].to_csv(clean, index=False)
    ref = tiny_model.predict(clean, batch_size=5).set_index("id")
    np.testing.assert_allclose(good.set_index("id").prob_1, ref.prob_1, rtol=1e-5, atol=1e-6)


def test_missing_modalities_still_predict(tiny_model, cohort):
    out = tiny_model.predict(cohort["test"], absent=["image", "text"])
    assert (out.status == "ok").all()
    full = tiny_model.predict(cohort["test"])
    assert not np.allclose(out.prob_1, full.prob_1)


def test_same_seed_same_model(tiny_model, cohort):
    """Given the same fitted preprocessing, a seed fixes weight init, shuffling, augmentation and
    modality dropout: retraining gives the identical model."""
    again = DiagnosisModel(tiny_model.config, prep=tiny_model.prep).fit(
        cohort["train"], cohort["val"], progress=False, reuse_preprocessing=True)
    np.testing.assert_array_equal(tiny_model.predict(cohort["test"]).prob_1.to_numpy(),
                                  again.predict(cohort["test"]).prob_1.to_numpy())


def test_auxiliary_modality_heads_train_and_round_trip(cohort, tmp_path):
    from conftest import SYNTH_CONFIG, TINY

    model = DiagnosisModel.from_config(SYNTH_CONFIG, **TINY, **{"fusion.aux_weight": 0.5})
    model.fit(cohort["train"], cohort["val"], progress=False)
    assert set(model.net.aux_heads) == {"image", "text", "tabular"}
    from multimodal.data.batches import Collate, RecordDataset

    ds = RecordDataset(model.records(cohort["test"]), model.prep, model.config.modalities, model.config)
    batch = Collate(model.prep, model.config.modalities, model.config)([ds[i] for i in range(8)])
    logits, aux = model.net.eval()(batch, return_aux=True)
    assert logits.shape == (8, 1) and all(z.shape == (8, 1) for z, _ in aux.values())
    assert aux["image"][1].tolist() == batch["image_mask"].any(1).tolist()
    before = model.predict(cohort["test"]).prob_1.to_numpy()
    model.save(tmp_path / "m")
    np.testing.assert_array_equal(before, DiagnosisModel.load(tmp_path / "m").predict(cohort["test"]).prob_1.to_numpy())
    off = DiagnosisModel.from_config(SYNTH_CONFIG, **TINY, **{"fusion.aux_weight": 0.0})
    off.fit(cohort["train"], cohort["val"], progress=False)
    assert off.net.aux_heads is None and not any(k.startswith("aux_heads") for k in off.net.state_dict())


@pytest.mark.parametrize("epochs, min_epochs", [(3, 3), (2, 5)])
def test_min_epochs_bounds_checkpoint_choice(cohort, epochs, min_epochs):
    from conftest import SYNTH_CONFIG

    model = DiagnosisModel.from_config(SYNTH_CONFIG, modalities="tabular",  # the train section's own epochs
                                       **{"train.epochs": epochs, "train.min_epochs": min_epochs, "train.alone": {}})
    t = model.fit(cohort["train"], cohort["val"], progress=False).metrics["training"]
    assert t["best_epoch"] == epochs and len(t["history"]) == epochs


def test_integer_category_in_an_all_numeric_dataframe_is_seen_as_fitted(tmp_path):
    """An all-numeric DataFrame through the API: df.iloc[i] turns its int columns into floats, so the
    category 1 read as '1.0' against the '1' the vocabulary was fitted on, and every value fell into the
    unknown bucket. Cells now come from their own column: the planted category signal is learnt."""
    from multimodal.data.batches import RecordDataset

    rng = np.random.default_rng(0)
    n = 400
    stage = rng.integers(1, 4, n)
    df = pd.DataFrame({"patient_id": np.arange(n), "age": rng.normal(60, 10, n).round(1), "stage": stage,
                       "label": (stage == 3).astype(int)})
    cfg = {"task": {"label": "label"}, "modalities": ["tabular"],
           "tabular": {"numeric": ["age"], "categorical": ["stage"]}, "train": {"epochs": 3}}
    m = DiagnosisModel.from_config(cfg).fit(df.iloc[:300], df.iloc[300:], progress=False)
    assert m.prep.tabular.vocab["stage"] == ["1", "2", "3"]
    ds = RecordDataset(m.records(df.iloc[300:]), m.prep, m.config.modalities, m.config)
    assert [int(ds[i]["cat"][0]) for i in range(5)] == stage[300:305].tolist()  # index k = category k
    assert m.metrics["training"]["best_val_auroc"] > 0.99


def test_nullable_frames_predict_as_the_file_does(tiny_model, cohort, monkeypatch):
    """A frame of pandas' nullable string columns (what Dask and Spark hand over) marks missing cells
    pd.NA; they must read as missing, as in the records file, not as the text "<NA>"."""
    monkeypatch.setattr(tiny_model.config.data, "image_root", str(cohort["val"].parent))
    plain = pd.read_csv(cohort["val"], dtype=str)
    plain.loc[:4, "age"] = None
    nullable = plain.astype("string")
    assert nullable["age"].isna().sum() >= 5 and nullable["age"].dtype == "string"
    want, got = tiny_model.predict(plain), tiny_model.predict(nullable)
    assert (got["status"] == "ok").all(), got["error"].dropna().head()
    pd.testing.assert_frame_equal(got, want)
