"""Tests for the synthetic cohort: shape of the files, determinism, DICOM variety,
lesion visibility through the standard display pipeline, and the planted rates."""
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import ExplicitVRLittleEndian

from multimodal.synth import PHRASE, RECORD_COLUMNS, TRUTH_COLUMNS, make_cohort

VARIANTS = {"ct", "mono1", "plain", "multiframe", "png"}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("c200"), n=200, seed=3)


@pytest.fixture(scope="module")
def big():
    """n=2000 without images: records + truth merged, for rate checks."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        p = make_cohort(d, n=2000, seed=11, _write_images=False)
        return pd.read_csv(p["all"], keep_default_na=False, na_values=[""]).merge(
            pd.read_csv(p["truth"], keep_default_na=False), on=["patient_id", "label"])


def _read(p):
    return pd.read_csv(p, dtype=str, keep_default_na=False)


def _variant(path: Path, ds=None) -> str:
    if path.suffix == ".png":
        return "png"
    ds = ds or pydicom.dcmread(path)
    if int(ds.get("NumberOfFrames", 1)) > 1:
        return "multiframe"
    if ds.PhotometricInterpretation == "MONOCHROME1":
        return "mono1"
    return "ct" if "RescaleIntercept" in ds else "plain"


def _display(path: Path, frame: int) -> np.ndarray:
    """Standard display pipeline: modality LUT, VOI LUT/window, invert MONOCHROME1."""
    if path.suffix == ".png":
        return np.asarray(Image.open(path), dtype=float)
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
    if arr.ndim == 3:
        arr = arr[max(frame, 0)]
    arr = apply_voi_lut(apply_modality_lut(arr, ds), ds).astype(float)
    return -arr if ds.PhotometricInterpretation == "MONOCHROME1" else arr


def _contrast(img: np.ndarray, box: str) -> float:
    """(mean inside box - mean outside) / dynamic range of the displayed image."""
    x0, y0, x1, y1 = map(int, box.split(","))
    mask = np.zeros(img.shape, bool)
    mask[y0:y1, x0:x1] = True
    return (img[mask].mean() - img[~mask].mean()) / (img.max() - img.min())


def _lesion_images(cohort):
    recs, truth = _read(cohort["all"]), _read(cohort["truth"])
    t = truth[truth.lesion == "1"].merge(recs[["patient_id", "image_path"]], on="patient_id")
    for _, r in t.iterrows():
        path = cohort["dir"] / r.image_path.split(";")[int(r.lesion_image)]
        yield path, r


def _auroc(score, y):
    try:
        from sklearn.metrics import roc_auc_score
        return roc_auc_score(y, score)
    except ImportError:
        ranks = pd.Series(score).rank().to_numpy()
        n1 = int(np.sum(y == 1))
        return (ranks[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * (len(y) - n1))


def test_files_columns_and_splits(cohort):
    recs = _read(cohort["all"])
    assert list(recs.columns) == RECORD_COLUMNS
    assert list(_read(cohort["truth"]).columns) == TRUTH_COLUMNS
    assert set(cohort) == {"dir", "train", "val", "test", "all", "truth", "images"}
    parts = [_read(cohort[k]) for k in ("train", "val", "test")]
    assert sum(len(p) for p in parts) == len(recs) == 200
    ids = [set(p.patient_id) for p in parts]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert set.union(*ids) == set(recs.patient_id)
    assert [len(p) for p in parts] == pytest.approx([120, 40, 40], abs=2)
    overall = (recs.label == "1").mean()
    for p in parts:
        assert set(p.label) == {"0", "1"}
        assert (p.label == "1").mean() == pytest.approx(overall, abs=0.05)
    assert recs.patient_id.str.fullmatch(r"SYN\d{4}").all()
    assert set(recs.sex) <= {"F", "M", ""} and set(recs.smoking) <= {"never", "former", "current", ""}
    assert (recs.image_path == "").any() and (recs.report_text == "").any()


def test_deterministic(tmp_path):
    a = make_cohort(tmp_path / "a", n=60, seed=5)
    b = make_cohort(tmp_path / "b", n=60, seed=5)
    c = make_cohort(tmp_path / "c", n=60, seed=6, _write_images=False)
    for k in ("all", "train", "val", "test", "truth"):
        assert a[k].read_bytes() == b[k].read_bytes()
    assert a["all"].read_bytes() != c["all"].read_bytes()
    files = sorted(p.name for p in a["images"].iterdir())
    assert files == sorted(p.name for p in b["images"].iterdir()) and files
    for name in files:
        assert (a["images"] / name).read_bytes() == (b["images"] / name).read_bytes(), name
    # skipping images must not change the tables
    d = make_cohort(tmp_path / "d", n=60, seed=5, _write_images=False)
    assert d["all"].read_bytes() == a["all"].read_bytes()
    assert d["truth"].read_bytes() == a["truth"].read_bytes()


def test_images_exist_and_variants(cohort):
    recs = _read(cohort["all"])
    seen = {}
    for rel in ";".join(recs.image_path[recs.image_path != ""]).split(";"):
        path = cohort["dir"] / rel
        assert path.is_file(), rel
        if path.suffix == ".dcm":
            ds = pydicom.dcmread(path)
            assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            assert ds.PatientName.family_name == "SYNTH" and ds.PatientID in rel
            assert ds.InstitutionName == "Synthetic General" and ds.SamplesPerPixel == 1
            assert (ds.Rows, ds.Columns) == (64, 64)
            v = _variant(path, ds)
            if v == "multiframe":
                assert ds.NumberOfFrames == 3 and ds.pixel_array.shape == (3, 64, 64)
        else:
            v = "png"
            assert Image.open(path).mode == "L"
        seen[v] = seen.get(v, 0) + 1
    assert set(seen) == VARIANTS, seen
    n = sum(seen.values())
    assert 0.04 < seen["png"] / n < 0.2
    assert recs.image_path.str.count(";").max() >= 1  # some multi-image patients


def test_truth_consistent(cohort):
    recs, truth = _read(cohort["all"]), _read(cohort["truth"])
    m = recs.merge(truth, on=["patient_id", "label"])
    assert ((m.phrase == "1") == m.report_text.str.lower().str.contains(PHRASE)).all()
    assert (m.phrase_words == PHRASE).all()
    les = m[m.lesion == "1"]
    assert len(les) > 20 and (m[m.lesion == "0"].lesion_box == "").all()
    for _, r in les.iterrows():
        assert 0 <= int(r.lesion_image) < len(r.image_path.split(";"))
        x0, y0, x1, y1 = map(int, r.lesion_box.split(","))
        w, h = map(int, r.image_size.split(","))
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h and 0.15 < (x1 - x0) / w < 0.4
        is_mf = _variant(cohort["dir"] / r.image_path.split(";")[int(r.lesion_image)]) == "multiframe"
        assert int(r.lesion_frame) == (1 if is_mf else -1)
    crp = pd.to_numeric(m.crp)
    assert crp[m.lab_high == "1"].min() > crp[m.lab_high == "0"].median()


def test_lesion_bright_in_display_space(cohort):
    per_variant = {}
    for path, r in _lesion_images(cohort):
        c = _contrast(_display(path, int(r.lesion_frame)), r.lesion_box)
        per_variant.setdefault(_variant(path), []).append(c)
    assert set(per_variant) == VARIANTS, per_variant.keys()
    for v, cs in per_variant.items():
        assert min(cs) > 0.1 and np.mean(cs) > 0.2, (v, cs)
    # multi-frame: same anatomy in every frame, the lesion only in the middle one
    for path, r in _lesion_images(cohort):
        if _variant(path) == "multiframe":
            f0, f1, f2 = (_display(path, k) for k in range(3))
            assert _contrast(f1 - f0, r.lesion_box) * np.ptp(f1 - f0) > 0.1 * np.ptp(f1)
            assert abs(_contrast(f2 - f0, r.lesion_box)) * np.ptp(f2 - f0) < 0.03 * np.ptp(f1)


def test_lesion_bright_with_engine_reader(cohort):
    imageio = pytest.importorskip("multimodal.data.imageio")
    if not hasattr(imageio, "read_image"):
        pytest.skip("multimodal.data.imageio.read_image not available yet")
    for path, r in _lesion_images(cohort):
        frames = imageio.read_image(path, window="auto", frames="all")
        img = frames[max(int(r.lesion_frame), 0)]
        assert img.dtype == np.float32 and 0 <= img.min() and img.max() <= 1
        assert _contrast(img.astype(float), r.lesion_box) > 0.1, path.name


def test_planted_rates_and_auroc(big):
    pos, neg = big[big.label == 1], big[big.label == 0]
    assert (big.label == 1).mean() == pytest.approx(0.4, abs=0.04)
    # rates among patients for whom the modality is present (missing inputs show nothing)
    for ind, present in [("lesion", big.image_path.notna()), ("phrase", big.report_text.notna()),
                         ("lab_high", big.crp.notna())]:
        assert big.loc[~present, ind].eq(0).all()
        assert pos.loc[present, ind].mean() == pytest.approx(0.7, abs=0.06), ind
        assert neg.loc[present, ind].mean() == pytest.approx(0.1, abs=0.04), ind
    for col in ("image_path", "report_text", "crp"):
        assert big[col].isna().mean() == pytest.approx(0.08, abs=0.03), col
    # nuisance columns are label-independent
    assert pos.age.mean() == pytest.approx(neg.age.mean(), abs=2.5)
    assert (pos.sex == "F").mean() == pytest.approx((neg.sex == "F").mean(), abs=0.07)
    y = big.label.to_numpy()
    aucs = {k: _auroc(big[k].to_numpy(float), y) for k in ("lesion", "phrase", "lab_high")}
    for k, a in aucs.items():
        assert 0.7 < a < 0.9, (k, a)
    fused = _auroc(big[["lesion", "phrase", "lab_high"]].sum(axis=1).to_numpy(float), y)
    assert fused > max(aucs.values()) + 0.05, (fused, aucs)


def test_an_empty_working_directory_is_filled_not_replaced(tmp_path, monkeypatch):
    """`mkdir data && cd data && mmdx synth --out .`: the folder stays the same one (the shell is in it)."""
    d = tmp_path / "data"
    d.mkdir()
    inode = d.stat().st_ino
    monkeypatch.chdir(d)
    p = make_cohort(".", n=20, seed=5, _write_images=False)
    assert d.stat().st_ino == inode and os.getcwd() == str(d)
    assert (d / "records_train.csv").is_file() and (d / ".mmdx-output.json").is_file()
    assert p["train"].resolve() == d / "records_train.csv"
    assert sorted(q.name for q in tmp_path.iterdir()) == ["data"]  # no staging folder or lock left beside it
    make_cohort(".", n=20, seed=5, _write_images=False)  # its own earlier cohort: replaced
    assert os.getcwd() == str(d)
