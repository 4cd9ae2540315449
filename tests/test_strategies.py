"""fusion.strategy: per-modality networks (unimodal) and joint + per-modality (auto), weighted on the hold-out."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import REPO, TINY

STRATEGIES = ("unimodal", "auto")
EXPORTABLE = TINY | {"text.encoder": "bow"}  # the BiLSTM has no ONNX form


@pytest.fixture(scope="module", params=STRATEGIES)
def fitted(request, cohort, tmp_path_factory):
    from multimodal import DiagnosisModel

    model = DiagnosisModel.from_config(REPO / "configs" / "synthetic.yaml", **EXPORTABLE,
                                       **{"fusion.strategy": request.param})
    model.fit(cohort["train"], cohort["val"], progress=False)
    out = model.save(tmp_path_factory.mktemp(request.param) / "model")
    return request.param, model, out


def _probs(frame: pd.DataFrame) -> np.ndarray:
    return frame[[c for c in frame if c.startswith("prob_")]].to_numpy()


def test_members_weights_and_candidates_are_recorded(fitted):
    strategy, model, out = fitted
    import json

    report = json.loads((out / "metrics.json").read_text())["training"]["fusion"]
    mods = [tuple(m["modalities"]) for m in report["members"]]
    alone = [("image",), ("text",), ("tabular",)]
    assert mods == (alone if strategy == "unimodal" else [("image", "text", "tabular")] + alone)
    w = np.array([m["weight"] for m in report["members"]])
    assert (w >= 0).all() and abs(w.sum() - 1) < 1e-3
    assert np.allclose(model.net.member_weights.numpy(), w, atol=1e-4)
    expected = {"equal weights", "fitted weights"} | ({"joint", "unimodal"} if strategy == "auto" else set())
    assert set(report["holdout_auroc"]) == expected


def test_reload_gives_identical_probabilities(fitted, cohort):
    from multimodal import DiagnosisModel

    _, model, out = fitted
    before = _probs(model.predict(cohort["test"]))
    assert np.array_equal(before, _probs(DiagnosisModel.load(out).predict(cohort["test"])))


def test_a_missing_modality_drops_its_network_out(fitted, cohort):
    """Patients without a report are scored by the other networks, not by the text network's guess."""
    _, model, _ = fitted
    df = pd.read_csv(cohort["test"])
    df["report_text"] = ""
    no_text = cohort["test"].parent / f"records_test_no_text_{fitted[0]}.csv"  # image paths are relative
    df.to_csv(no_text, index=False)
    p_empty = _probs(model.predict(no_text))
    p_hidden = _probs(model.predict(cohort["test"], absent=["text"]))
    assert np.isfinite(p_empty).all()
    np.testing.assert_allclose(p_empty, p_hidden, atol=1e-5)  # a missing report = the text network left out
    assert not np.allclose(p_hidden, _probs(model.predict(cohort["test"])))


def test_explains_every_modality_and_reports_the_weights(fitted, cohort, tmp_path):
    _, model, out = fitted
    from multimodal import DiagnosisModel

    loaded = DiagnosisModel.load(out)
    exps = loaded.explain(loaded.records(cohort["test"]).subset(range(2)), n_steps=8)
    for e in exps:
        assert not e.error and set(e.modality_share) == {"image", "text", "tabular"}
        assert abs(sum(e.modality_share.values()) - 1) < 1e-6
    index = exps.to_html(tmp_path / "reports")
    page = "".join(p.read_text() for p in index.parent.rglob("*.html"))
    assert "network weights" in page and "tabular " in page


def test_exports_to_onnx_with_the_same_probabilities(fitted, cohort, tmp_path):
    pytest.importorskip("onnxruntime")
    from multimodal import DiagnosisModel

    _, model, out = fitted
    onnx_file = tmp_path / "model.onnx"
    DiagnosisModel.load(out).export_onnx(onnx_file, cohort["val"])
    eager = _probs(DiagnosisModel.load(out).predict(cohort["test"]))
    fast = _probs(DiagnosisModel.load(out, onnx=onnx_file).predict(cohort["test"]))
    np.testing.assert_allclose(fast, eager, atol=1e-5)


def test_weights_favour_the_planted_informative_network():
    """Three networks' hold-out logits: one carries the label, two are noise → it takes most weight."""
    from multimodal.engine.stacking import fit_member_weights

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    informative = (2 * y - 1) * 1.5 + rng.normal(0, 1, 300)
    z = np.stack([rng.normal(0, 1, 300), informative, rng.normal(0, 1, 300)], 1)[..., None]
    w = fit_member_weights(z, np.ones((300, 3), bool), y, "binary")
    assert w[1] > 0.7 and w[1] > 5 * max(w[0], w[2]) and abs(w.sum() - 1) < 1e-9


def test_combine_leaves_out_networks_that_saw_nothing():
    from multimodal.model.network import combine

    z = torch.tensor([[[1.0], [1.0]], [[3.0], [3.0]], [[10.0], [10.0]]])  # 3 networks, 2 patients
    seen = torch.tensor([[True, True], [True, True], [True, False]])
    out = combine(z, seen, torch.tensor([0.25, 0.25, 0.5]))
    assert out[0, 0].item() == pytest.approx(0.25 * 1 + 0.25 * 3 + 0.5 * 10)
    assert out[1, 0].item() == pytest.approx((1 + 3) / 2)  # the third network did not see patient 2
    nobody = combine(z, torch.zeros(3, 2, dtype=torch.bool), torch.tensor([0.25, 0.25, 0.5]))
    assert nobody[1, 0].item() == pytest.approx(0.25 * 1 + 0.25 * 3 + 0.5 * 10)
