"""What a model directory may hold of its training patients: nothing that only one patient's records
carry (counted by patient, not by record), and with text.scrub no names."""
from __future__ import annotations

import pandas as pd
import pytest

from conftest import SYNTH_CONFIG, TINY

SECRETS = ("quixotely", "zanzibarson", "48213377", "ward-7")


def _with_patient(path, group="patient") -> pd.DataFrame:
    df = pd.read_csv(path, dtype=str)
    return df.assign(**{group: df["patient_id"]})


@pytest.mark.parametrize("scrub", [False, True])
def test_one_patients_identifiers_in_two_records_stay_out_of_the_model_directory(cohort, tmp_path, scrub):
    from multimodal import DiagnosisModel

    train, val = _with_patient(cohort["train"]), _with_patient(cohort["val"])
    second = train.iloc[[0]].assign(patient_id="SYN-SECOND-VISIT")  # the same patient, a second record
    train = pd.concat([train, second], ignore_index=True)
    for i in (0, len(train) - 1):
        train.loc[i, "report_text"] = f"{train.loc[i, 'report_text']} Patient Quixotely Zanzibarson, MRN 48213377."
        train.loc[i, "smoking"] = "Quixotely-Ward-7"
    train.to_csv(tmp_path / "train.csv", index=False)
    val.to_csv(tmp_path / "val.csv", index=False)
    model = DiagnosisModel.from_config(SYNTH_CONFIG, **{**TINY,
        "data.group": "patient", "data.image_root": str(cohort["dir"]), "text.vocab_size": 2000, "text.scrub": scrub})
    model.fit(tmp_path / "train.csv", tmp_path / "val.csv", progress=False)
    out = model.save(tmp_path / "m")
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "tokenizer.json" for p in files) and any(p.name == "preprocessing.json" for p in files)
    for p in files:
        data = p.read_bytes().lower()
        for secret in SECRETS:
            assert secret.encode() not in data, (secret, p.name)
    assert "heart" in model.prep.text.tokenizer.get_vocab()  # what many patients write is still learnt


def _vocab(df: pd.DataFrame, **overrides) -> dict:
    from multimodal.config import load_config
    from multimodal.data.preprocess import Preprocessing
    from multimodal.data.records import load_records

    cfg = load_config(SYNTH_CONFIG, {"text.vocab_size": 2000, "data.group": "patient",
                                                           **overrides})
    return Preprocessing.fit(cfg, load_records(df, cfg, labels=True)).text.tokenizer.get_vocab()


def test_scrub_keeps_names_out_of_the_vocabulary_however_many_patients_carry_them(cohort):
    df = _with_patient(cohort["train"])
    notes = ["Reviewed by Dr. Quenneville.", "Discussed with Hargreave today.", "reviewed by dr quenneville",
             "The Mass is stable.", "MS lesions noted."]
    for i in range(12):
        df.loc[i, "report_text"] = f"{df.loc[i, 'report_text']} {notes[i % len(notes)]}"
    plain, scrubbed = _vocab(df), _vocab(df, **{"text.scrub": True})
    for name in ("quenneville", "hargreave"):
        assert name in plain  # several patients' reports carry it: frequency alone keeps it
        assert name not in scrubbed
    for word in ("mass", "lesions", "reviewed", "discussed"):  # "mass" is also written in lower case
        assert word in scrubbed


@pytest.mark.parametrize("empty", ["", None])
def test_records_without_a_group_are_each_their_own_patient(cohort, empty):
    from multimodal.config import load_config
    from multimodal.data.splits import patients

    cfg = load_config(SYNTH_CONFIG, {"data.group": "patient"})
    df = pd.DataFrame({"patient_id": ["a", "b", "c", "d"], "patient": ["p1", "p1", empty, empty]})
    who = patients(df, cfg)
    assert who[0] == who[1] and len(set(who)) == 3
    assert len(set(patients(df, load_config(SYNTH_CONFIG)))) == 4
