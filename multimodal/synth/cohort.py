"""The synthetic cohort's generator: patients with a known, planted signal in every modality.

Why: the engine needs data that (a) exercises every input path (four DICOM flavours,
PNG, multi-image and multi-frame patients, missing image/text/lab values) and (b) carries
a per-patient truth, so that fusion must beat each single modality and explanations can
be checked (lesion box, planted phrase, planted lab).

Each modality carries one binary indicator -- a bright lesion, the phrase
"spiculated mass", a high CRP -- drawn independently given the label with
P(indicator | positive) = 0.7 and P(indicator | negative) = 0.1. Alone each gives an
AUROC of about 0.8; together about 0.95. Everything else is label-independent noise.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

P_POSITIVE = 0.4
P_INDICATOR = (0.1, 0.7)  # P(indicator | label=0), P(indicator | label=1)
PHRASE = "spiculated mass"  # the planted finding in the report
LAB = "crp"                 # the planted lab: raised where the indicator is drawn
VARIANTS = ("ct", "mono1", "plain", "multiframe", "png")
P_VARIANT = (0.225, 0.225, 0.225, 0.225, 0.10)
P_N_IMAGES = (0.08, 0.70, 0.17, 0.05)  # 0, 1, 2 or 3 images per patient
RECORD_COLUMNS = ["patient_id", "image_path", "report_text", "age", "sex", LAB,
                  "smoking", "label"]
TRUTH_COLUMNS = ["patient_id", "label", "lesion", "lesion_image", "lesion_frame",
                 "lesion_box", "image_size", "phrase", "phrase_words", "lab_high"]

_REASONS = ["persistent cough", "chest pain", "weight loss", "fatigue",
            "shortness of breath", "an abnormal chest radiograph"]
_HISTORY = ["Patient referred for evaluation of {reason}.", "History of {reason}.",
            "Follow-up imaging requested for {reason}.", "Indication: {reason}."]
_FINDING = ["CT shows a spiculated mass in the {side} {lobe} lobe.",
            "Known spiculated mass, follow-up requested.",
            "There is a {size} mm spiculated mass in the {side} {lobe} lobe.",
            "Appearance suggests a spiculated mass near the {side} hilum.",
            "Spiculated mass noted, measuring {size} mm."]
# Distractors appear at the same rate in both classes, some look clinically relevant.
_DISTRACTORS = ["Mild cough for two weeks.", "No fever.", "Simple cyst in the {side} kidney.",
                "Patient is a smoker.", "Heart size is normal.", "No pleural effusion.",
                "Mild degenerative changes of the spine.", "Small calcified granuloma.",
                "Occasional night sweats.", "Lungs otherwise clear."]


def make_cohort(out_dir, n: int = 600, seed: int = 0, image_size: int = 64,
                splits=(0.6, 0.2, 0.2), *, _write_images: bool = True) -> dict[str, Path]:
    """Write images, records*.csv and truth.csv into `out_dir`; return their paths.

    `out_dir` must be new, empty or an earlier synthetic cohort that holds only what mmdx wrote there
    (output.staged_dir): a user's records or images of the same names are never overwritten, and a
    crash leaves no half cohort. Deterministic for a given seed. `_write_images=False` skips rendering
    (same CSVs), for fast statistical tests on large n.
    """
    from multimodal.output import staged_dir

    splits = np.asarray(splits, dtype=float)
    if splits.shape != (3,) or (splits < 0).any() or abs(splits.sum() - 1) > 1e-6:
        raise ValueError("splits must be three non-negative fractions summing to 1")
    if n < 1 or image_size < 16:
        raise ValueError("need n >= 1 and image_size >= 16")
    out = Path(out_dir)
    with staged_dir(out, "synth") as tmp:
        _write_cohort(tmp, n, seed, image_size, splits, _write_images)
    return {"dir": out, "images": out / "images", "all": out / "records.csv", "truth": out / "truth.csv"} | {
        name: out / f"records_{name}.csv" for name in ("train", "val", "test")}


def _write_cohort(out: Path, n: int, seed: int, image_size: int, splits: np.ndarray, write_images: bool) -> None:
    (out / "images").mkdir()
    rng = np.random.default_rng(seed)

    label = (rng.random(n) < P_POSITIVE).astype(int)
    p_ind = np.where(label == 1, P_INDICATOR[1], P_INDICATOR[0])
    lesion, phrase, lab_high = (rng.random((3, n)) < p_ind).astype(int)
    n_images = rng.choice(4, size=n, p=P_N_IMAGES)
    empty_report = rng.random(n) < 0.08
    lesion &= n_images > 0                      # truth = what the inputs actually show
    phrase &= ~empty_report
    crp = np.where(lab_high == 1, rng.normal(65, 12, n), np.clip(rng.normal(15, 8, n), 0, None))
    crp = np.where(rng.random(n) < 0.08, np.nan, crp.round(1))
    lab_high &= ~np.isnan(crp)
    age = np.where(rng.random(n) < 0.05, np.nan, np.clip(rng.normal(62, 12, n), 18, 95).round())
    sex = np.where(rng.random(n) < 0.05, "", rng.choice(["F", "M"], n))
    smoking = np.where(rng.random(n) < 0.07, "",
                       rng.choice(["never", "former", "current"], n, p=[0.5, 0.3, 0.2]))

    records, truths = [], []
    for i in range(n):
        pid = f"SYN{i + 1:04d}"
        report = "" if empty_report[i] else _report(rng, bool(phrase[i]))
        prng = np.random.default_rng([seed, i])  # per patient: images never shift the CSVs
        plan = _plan_images(prng, pid, int(n_images[i]), bool(lesion[i]), image_size)
        if write_images:
            header = {"pid": pid, "k": i + 1, "age": age[i], "sex": sex[i], "seed": seed}
            for j, img in enumerate(plan["images"]):
                _write_image(out / img["path"], img, image_size, header, j,
                             np.random.default_rng([seed, i, j, 1]))
        records.append([pid, ";".join(im["path"] for im in plan["images"]), report,
                        age[i], sex[i], crp[i], smoking[i], label[i]])
        truths.append([pid, label[i], lesion[i], plan["lesion_image"], plan["lesion_frame"],
                       plan["box"], f"{image_size},{image_size}" if plan["images"] else "",
                       phrase[i], PHRASE, lab_high[i]])

    df = pd.DataFrame(records, columns=RECORD_COLUMNS)
    part = _stratified_split(label, splits, rng)
    df.to_csv(out / "records.csv", index=False)
    for s, name in enumerate(("train", "val", "test")):
        df[part == s].to_csv(out / f"records_{name}.csv", index=False)
    pd.DataFrame(truths, columns=TRUTH_COLUMNS).to_csv(out / "truth.csv", index=False)


def _report(rng, with_phrase: bool) -> str:
    """History sentence, then 1-2 distractors and (maybe) the finding in random order."""
    fill = dict(reason=rng.choice(_REASONS), side=rng.choice(["left", "right"]),
                lobe=rng.choice(["upper", "lower"]), size=int(rng.integers(8, 40)))
    body = list(rng.choice(_DISTRACTORS, size=int(rng.integers(1, 3)), replace=False))
    if with_phrase:
        body.insert(int(rng.integers(len(body) + 1)), rng.choice(_FINDING))
    return " ".join(s.format(**fill) for s in [rng.choice(_HISTORY), *body])


def _plan_images(rng, pid: str, n_images: int, lesion: bool, s: int) -> dict:
    """Choose file variant per image and, if any, which image/frame/box shows the lesion."""
    images = []
    for j in range(n_images):
        variant = VARIANTS[rng.choice(len(VARIANTS), p=P_VARIANT)]
        ext = "png" if variant == "png" else "dcm"
        images.append({"path": f"images/{pid}_{j}.{ext}", "variant": variant,
                       "uint8": bool(rng.random() < 0.5), "lesion": None})
    plan = {"images": images, "lesion_image": -1, "lesion_frame": -1, "box": ""}
    if lesion:
        j = int(rng.integers(n_images))
        r = int(round(s * rng.uniform(0.10, 0.15)))
        cx, cy = (int(c) for c in rng.integers(r + 1, s - r - 1, size=2))
        images[j]["lesion"] = (cx, cy, r, float(rng.uniform(0.25, 0.38)))
        plan.update(lesion_image=j, box=f"{cx - r},{cy - r},{cx + r + 1},{cy + r + 1}",
                    lesion_frame=1 if images[j]["variant"] == "multiframe" else -1)
    return plan


def _render(rng, s: int, n_frames: int, lesion) -> np.ndarray:
    """(frames, s, s) floats in [0, 1]: smooth 'anatomy' + noise, lesion in middle frame.

    Box (x1, y1 exclusive) is [cx-r, cx+r+1) x [cy-r, cy+r+1); the soft-edged blob is
    at half height at 0.85 r so nearly all of it lies inside the box.
    """
    yy, xx = np.mgrid[0:s, 0:s].astype(float)
    u, v = xx / s, yy / s
    gx, gy = rng.uniform(-0.15, 0.15, 2)
    base = 0.40 + gx * (u - 0.5) + gy * (v - 0.5)
    for _ in range(int(rng.integers(3, 7))):
        (bx, by), sd = rng.uniform(0, 1, 2), rng.uniform(0.2, 0.4)  # larger than lesions
        base += rng.uniform(-0.12, 0.12) * np.exp(-((u - bx) ** 2 + (v - by) ** 2) / (2 * sd**2))
    frames = base + rng.normal(0, 0.04, (n_frames, s, s))
    if lesion is not None:
        cx, cy, r, amp = lesion
        d = np.hypot(xx - cx, yy - cy)
        frames[n_frames // 2] += amp / (1 + np.exp((d - 0.85 * r) / (0.12 * r)))
    return np.clip(frames, 0, 1)


def _write_image(path: Path, img: dict, s: int, header: dict, j: int, rng) -> None:
    """Encode one rendered image as PNG or as one of the four DICOM flavours."""
    variant = img["variant"]
    f = _render(rng, s, 3 if variant == "multiframe" else 1, img["lesion"])
    if variant == "png":
        from PIL import Image
        Image.fromarray((f[0] * 255).round().astype(np.uint8), mode="L").save(path)
        return
    from pydicom import uid as U
    tags: dict = {}
    if variant == "ct":  # HU in [-200, 200]; window [-250, 250] keeps everything visible
        arr, pi, bits, sop, modality = ((f[0] * 400 - 200 + 1024).round().astype(np.uint16),
                                        "MONOCHROME2", 12, U.CTImageStorage, "CT")
        tags = dict(RescaleSlope=1, RescaleIntercept=-1024, RescaleType="HU",
                    WindowCenter=0, WindowWidth=500)
    elif variant == "mono1":  # stored inverted: high value = dark, lesion stays bright
        arr, pi, bits, sop, modality = (((1 - f[0]) * 4095).round().astype(np.uint16),
                                        "MONOCHROME1", 12, U.ComputedRadiographyImageStorage, "CR")
        tags = dict(WindowCenter=2048, WindowWidth=4096)
    elif variant == "plain":  # no rescale, no window: a viewer would use min-max
        arr = (f[0] * 255).round().astype(np.uint8) if img["uint8"] else \
            (f[0] * 4000 + 60).round().astype(np.uint16)
        pi, bits, sop, modality = ("MONOCHROME2", 8 if img["uint8"] else 12,
                                   U.SecondaryCaptureImageStorage, "OT")
    else:  # multiframe (3, s, s)
        arr, pi, bits, sop, modality = ((f * 4095).round().astype(np.uint16), "MONOCHROME2",
                                        12, U.MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
                                        "OT")
    _write_dicom(path, arr, pi, bits, sop, modality, tags, header, j)


def _write_dicom(path, arr, pi, bits, sop, modality, tags, header, j) -> None:
    """Real Part-10 file, Explicit VR Little Endian, fake PHI-shaped identifiers."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    def uid(*kind):  # deterministic: same seed/patient/image -> same UID
        return generate_uid(entropy_srcs=["mmdx-synth", str(header["seed"]), header["pid"], *kind])

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop, uid("sop", str(j))
    ds.file_meta.MediaStorageSOPClassUID = sop
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uid("study"), uid("series", str(j))
    ds.Modality, ds.InstitutionName = modality, "Synthetic General"
    ds.PatientName, ds.PatientID = f"SYNTH^PATIENT{header['k']}", header["pid"]
    age = 60 if np.isnan(header["age"]) else int(header["age"])
    ds.StudyDate = f"2024{1 + header['k'] % 12:02d}{1 + header['k'] % 28:02d}"
    ds.PatientBirthDate = f"{2024 - age}0101"
    if header["sex"]:
        ds.PatientSex = header["sex"]
    ds.SeriesNumber, ds.InstanceNumber = j + 1, 1
    ds.set_pixel_data(arr, pi, bits, generate_instance_uid=False)
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.save_as(path, enforce_file_format=True)


def _stratified_split(label: np.ndarray, splits: np.ndarray, rng) -> np.ndarray:
    """0/1/2 = train/val/test per patient, proportions `splits` within each class."""
    part = np.empty(len(label), dtype=int)
    cuts = np.cumsum(splits)
    for c in (0, 1):
        idx = rng.permutation(np.flatnonzero(label == c))
        bounds = np.concatenate([[0], np.round(cuts * len(idx)).astype(int)])
        bounds[-1] = len(idx)
        for s in range(3):
            part[idx[bounds[s]:bounds[s + 1]]] = s
    return part
