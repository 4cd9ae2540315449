"""Every config in configs/ trains, saves and exports to ONNX with the probabilities of the eager network.

A newcomer's copy of the HAM10000 recipe could not be exported (its 5x5 feature map does not divide into
token_grid 4), nor could the LSTM text encoder. Each shipped architecture is built here as its config says
(image size, token grid, encoders, fusion strategy, views and flips), on 24 made-up records with that
config's columns, trained for one epoch with one ensemble member, and exported.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import REPO

pytest.importorskip("onnxruntime")

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
WORDS = "mass nodule effusion normal clear opacity lesion margin spiculated benign stable".split()
SMALL = {"train.epochs": 1, "train.min_epochs": 1, "train.ensemble": 1, "train.batch_size": 8,
         "train.patience": 100}


def made_up_records(cfg, folder: Path, n: int = 24) -> Path:
    """n records with the config's columns: photos of odd shapes, short reports, numbers and categories,
    labels from the task (binary 0/1, else three classes), each class several times."""
    rng = np.random.default_rng(0)
    df = pd.DataFrame({cfg.data.id: [f"p{i:03d}" for i in range(n)]})
    label = cfg.label_columns()[0]
    df[label] = [str(i % 2) if cfg.task.type == "binary" else "xyz"[i % 3] for i in range(n)]
    if "image" in cfg.modalities:
        for c in cfg.image.columns:
            paths = []
            for i in range(n):
                shape = (40 + 8 * (i % 3), 56) + ((3,) if cfg.image.in_chans == 3 else ())
                Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(folder / f"{c}_{i}.png")
                paths.append(f"{c}_{i}.png")
            df[c] = paths
    if "text" in cfg.modalities:
        df[cfg.text.column] = [" ".join(rng.choice(WORDS, 3 + i % 9)) for i in range(n)]
    if "tabular" in cfg.modalities:
        for c in cfg.tabular.numeric:
            df[c] = rng.normal(50, 10, n).round(1)
        for c in cfg.tabular.categorical:
            df[c] = rng.choice(["a", "b"], n)
    path = folder / "records.csv"
    df.to_csv(path, index=False)
    return path


CASES = [(p, {}) for p in CONFIGS] + [(REPO / "configs" / "medpix2.yaml", {"modalities": "image,text,tabular"})]


@pytest.mark.parametrize("config,extra", CASES, ids=[f"{p.stem}{'+image' if e else ''}" for p, e in CASES])
def test_each_shipped_config_exports_with_eager_probabilities(config, extra, tmp_path):
    from multimodal import DiagnosisModel

    model = DiagnosisModel.from_config(config, **SMALL, **extra)
    records = made_up_records(model.config, tmp_path)
    model.fit(records, progress=False).save(tmp_path / "m")
    eager = DiagnosisModel.load(tmp_path / "m")
    info = eager.export_onnx(tmp_path / "m.onnx", records)
    onnx = DiagnosisModel.load(tmp_path / "m", onnx=tmp_path / "m.onnx")
    got, want = (m.predict(records, batch_size=5) for m in (onnx, eager))
    probs = [c for c in want if c.startswith("prob_")]
    assert (want["status"] == "ok").all() and len(got) == len(want) == 24
    np.testing.assert_allclose(got[probs].to_numpy(float), want[probs].to_numpy(float), atol=1e-5)
    assert info["max_abs_diff"] < 1e-4
