"""train.ensemble: several seeds in one model directory, averaged in logit space, calibrated once."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import SYNTH_CONFIG, TINY

ENS = {**TINY, "train.ensemble": 2}


@pytest.fixture(scope="module")
def ensemble(cohort):
    from multimodal import DiagnosisModel

    return DiagnosisModel.from_config(SYNTH_CONFIG, **ENS).fit(
        cohort["train"], cohort["val"], progress=False)


def _probs(df):
    return df.filter(like="prob_").to_numpy()


def test_members_are_different_seeds_and_the_output_is_their_mean_logit(ensemble, cohort):
    from explain.patients import with_net
    from multimodal.model.network import Ensemble, members

    net = ensemble.net
    assert isinstance(net, Ensemble) and len(members(net)) == 2
    a, b = (dict(n.named_parameters()) for n in members(net))
    assert any(not torch.equal(a[k], b[k]) for k in a), "both members have the same weights"
    assert [r["seed"] for r in ensemble.metrics["training"]["members"]] == [0, 1]
    rec = ensemble.records(cohort["val"])
    with ensemble.uncalibrated():
        z = ensemble._infer(rec, 64, 0, False, logits=True)["logits"]
    parts = [with_net(ensemble, n)._infer(rec, 64, 0, False, logits=True)["logits"] for n in members(net)]
    assert not np.allclose(parts[0], parts[1])
    np.testing.assert_allclose(z, np.mean(parts, 0), atol=1e-5)
    # calibration is the ensemble's: the members' own stay at identity
    assert all(float(n.temperature) == 1.0 and not n.logit_bias.any() for n in members(net))
    assert float(net.temperature) != 1.0


def test_one_directory_reloads_to_identical_probabilities(ensemble, cohort, tmp_path):
    from multimodal import DiagnosisModel

    ensemble.save(tmp_path / "m")
    again = DiagnosisModel.load(tmp_path / "m")
    assert type(again.net).__name__ == "Ensemble"
    np.testing.assert_array_equal(_probs(ensemble.predict(cohort["val"])), _probs(again.predict(cohort["val"])))


def test_a_frozen_encoder_is_shared_and_stored_once(cohort, tmp_path):
    from safetensors import safe_open

    from multimodal import DiagnosisModel
    from multimodal.model.network import members

    over = {**ENS, "image.freeze": "all", "train.epochs": 1}
    m = DiagnosisModel.from_config(SYNTH_CONFIG, **over).fit(
        cohort["train"], cohort["val"], progress=False)
    first, second = members(m.net)
    assert first.encoders["image"] is second.encoders["image"]
    assert first.encoders["text"] is not second.encoders["text"]
    m.save(tmp_path / "m")
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("members.0.encoders.image.") for k in keys)
    assert not any(k.startswith("members.1.encoders.image.") for k in keys)
    assert any(k.startswith("members.1.encoders.text.") for k in keys)
    again = DiagnosisModel.load(tmp_path / "m")
    a, b = members(again.net)
    assert a.encoders["image"] is b.encoders["image"]
    np.testing.assert_array_equal(_probs(m.predict(cohort["val"])), _probs(again.predict(cohort["val"])))


def test_attributions_explain_the_mean_logit(ensemble, cohort):
    """IG over every member's layers at once: completeness against the ensemble's own logit holds,
    and Grad-CAM sums the members' maps."""
    from explain.patients import iter_batches

    rows = []
    for res, exps in iter_batches(ensemble, cohort["val"], n_steps=64, batch_size=8, ablation=False):
        assert all(e.error is None for e in exps)
        rows.append(res)
    delta = torch.cat([r.delta for r in rows]).abs()
    assert float(delta.median()) < 0.02, delta
    assert all(r.text is not None and r.tabular is not None and r.image is not None for r in rows)
    cams = [e for _, es in iter_batches(ensemble, cohort["val"], method="gradcam", batch_size=8, ablation=False)
            for e in es]
    assert len(cams) == len(ensemble.records(cohort["val"])) and all(e.error is None for e in cams)


def test_onnx_export_of_an_ensemble_matches_pytorch(cohort, tmp_path):
    from multimodal import DiagnosisModel

    m = DiagnosisModel.from_config(SYNTH_CONFIG, **{**ENS, "text.encoder": "bow",
                                                                           "train.epochs": 1}).fit(
        cohort["train"], cohort["val"], progress=False)
    m.save(tmp_path / "m")
    m = DiagnosisModel.load(tmp_path / "m")
    info = m.export_onnx(tmp_path / "m.onnx", cohort["val"])
    onnx = DiagnosisModel.load(tmp_path / "m", onnx=tmp_path / "m.onnx")
    np.testing.assert_allclose(_probs(onnx.predict(cohort["val"])), _probs(m.predict(cohort["val"])), atol=1e-5)
    assert info["max_abs_diff"] < 1e-4


def test_crossfit_members_early_stop_on_disjoint_folds_and_calibrate_out_of_fold(cohort):
    """ensemble_holdout: crossfit. Each member holds out its own fold; calibration is fitted on each
    hold-out record's logits from the one member that never trained on it."""
    from multimodal import DiagnosisModel
    from multimodal.evaluation.calibration import fit_temperature
    from multimodal.data.splits import holdout_splits, labelled
    from multimodal.model.network import members

    over = {**ENS, "train.ensemble_holdout": "crossfit", "train.val_fraction": 0.34}
    m = DiagnosisModel.from_config(SYNTH_CONFIG, **over)
    rec = m.records(cohort["train"], labels=True)
    splits = holdout_splits(rec, m.config, 2)
    ids = [set(v.df["patient_id"]) for _, v in splits]
    assert ids[0] and ids[1] and not ids[0] & ids[1]
    assert all(not set(t.df["patient_id"]) & i for (t, _), i in zip(splits, ids))
    m.fit(cohort["train"], progress=False)
    assert m.metrics["validation"]["n"] == len(splits[0][1]) + len(splits[1][1])
    trained = m.metrics["training"]
    assert trained["n_records"] == len(rec) and trained["n_train"] == len(splits[0][0]) < len(rec)
    zs, ys = [], []
    for (_, val), net in zip(splits, members(m.net)):
        r, y = labelled(val, m.prep)
        zs.append(m._infer(r, 64, 0, False, logits=True, net=net)["logits"])
        ys.append(y)
    t, b = fit_temperature(np.concatenate(zs), np.concatenate(ys), "binary", bias=True)
    assert float(m.net.temperature) == pytest.approx(t) and float(m.net.logit_bias[0]) == pytest.approx(b[0])


def test_crossfit_needs_a_fold_per_member():
    from multimodal.config import load_config
    from multimodal.errors import UserError

    with pytest.raises(UserError, match="round\\(1 / val_fraction\\) = 2 folds"):
        load_config(SYNTH_CONFIG, {"train.ensemble": 3, "train.val_fraction": 0.5,
                                                           "train.ensemble_holdout": "crossfit"})
