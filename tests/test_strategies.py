"""fusion.strategy: per-modality networks (unimodal) and joint + per-modality (auto), weighted on the hold-out."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import SYNTH_CONFIG, TINY

STRATEGIES = ("unimodal", "auto")
BOW = TINY | {"text.encoder": "bow"}


@pytest.fixture(scope="module", params=STRATEGIES)
def fitted(request, cohort, tmp_path_factory):
    from multimodal import DiagnosisModel

    model = DiagnosisModel.from_config(SYNTH_CONFIG,
                                       **(BOW | {"fusion.strategy": request.param}))
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
    scores = report["holdout_auroc_out_of_fold"]
    assert report["chosen"] in scores and scores[report["chosen"]] == max(scores.values())
    alone = {"image networks alone", "text networks alone", "tabular networks alone"}
    expected = alone | ({"equal weights", "fitted weights"} if strategy == "unimodal" else {
        "equal weights, per-modality networks", "equal weights, all networks", "joint network alone", "fitted weights"})
    assert set(scores) == expected
    t = model.net.member_temperature.numpy()
    assert (t > 0).all() and not np.allclose(t, 1.0)  # each network calibrated on the hold-out


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
        # each network's own vote, mixed with the stored weights and calibrated once more, is the prediction
        votes = [(n["weight"], n["probability"]) for n in e.members if n["probability"] is not None]
        assert len(e.members) == len(loaded.net.members) and votes
        assert [n["weight"] for n in e.members] == pytest.approx(loaded.net.member_weights.tolist(), abs=1e-4)
        mixed = sum(w * p for w, p in votes) / sum(w for w, _ in votes)
        z = np.log(mixed / (1 - mixed)) / float(loaded.net.temperature) + float(loaded.net.logit_bias[0])
        assert e.probs[e.target] == pytest.approx(1 / (1 + np.exp(-z)), abs=1e-4)
    index = exps.to_html(tmp_path / "reports")
    page = "".join(p.read_text() for p in index.parent.rglob("*.html"))
    assert "network weights" in page and "tabular " in page and "Networks behind this prediction" in page
    import json

    summary = pd.read_parquet(index.parent / "attributions.parquet")
    assert [[n["weight"] for n in json.loads(v)] for v in summary["members"]] == \
        [[n["weight"] for n in e.members] for e in exps]


def test_exports_to_onnx_with_the_same_probabilities(fitted, cohort, tmp_path):
    pytest.importorskip("onnxruntime")
    from multimodal import DiagnosisModel

    _, model, out = fitted
    onnx_file = tmp_path / "model.onnx"
    DiagnosisModel.load(out).export_onnx(onnx_file, cohort["val"])
    eager = _probs(DiagnosisModel.load(out).predict(cohort["test"]))
    fast = _probs(DiagnosisModel.load(out, onnx=onnx_file).predict(cohort["test"]))
    np.testing.assert_allclose(fast, eager, atol=1e-5)


def _planted(n: int = 300, seed: int = 0):
    """Hold-out logits of three networks: the first carries the label, the other two are noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    informative = (2 * y - 1) * 1.5 + rng.normal(0, 1, n)
    return np.stack([informative, rng.normal(0, 1, n), rng.normal(0, 1, n)], 1)[..., None], y


def test_weights_favour_the_planted_informative_network():
    from multimodal.evaluation.stacking import fit_member_weights

    z, y = _planted()
    w = fit_member_weights(z, np.ones((300, 3), bool), y, "binary")
    assert w[0] > 0.7 and w[0] > 5 * max(w[1], w[2]) and abs(w.sum() - 1) < 1e-9


def test_auto_picks_the_planted_better_candidate():
    """auto over a joint network that carries the signal and two per-modality networks that do not."""
    from multimodal.evaluation.stacking import choose_weights

    z, y = _planted()
    plan = [(("image", "text"), 0), (("image",), 0), (("text",), 0)]
    chosen, w, scores = choose_weights("auto", plan, z, np.ones((300, 3), bool), y, "binary")
    assert chosen in ("joint network alone", "fitted weights") and w[0] > 0.7, (chosen, w, scores)
    assert scores[chosen] > scores["equal weights, per-modality networks"] + 0.2


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_clearly_better_single_modality_is_not_diluted(strategy):
    """Never knowingly worse than its own best single modality: where only the image network carries
    the signal and every other network is noise, the chosen mixture gives it nearly all the weight,
    and scores out of fold at least what the image network alone scores, less a hair."""
    from multimodal.evaluation.stacking import choose_weights

    z, y = _planted(seed=3)
    z = np.concatenate([z[:, [1]], z[:, [0]], z[:, [2]]], 1)  # the informative network is now the image one
    plan = [(("image", "text"), 0), (("image",), 0), (("text",), 0)]
    if strategy == "unimodal":
        z, plan = z[:, 1:], plan[1:]
    chosen, w, scores = choose_weights(strategy, plan, z, np.ones(z.shape[:2], bool), y, "binary")
    image = [i for i, (mods, _) in enumerate(plan) if mods == ("image",)][0]
    assert w[image] > 0.8, (chosen, w, scores)
    assert scores[chosen] >= scores["image networks alone"] - 0.01, (chosen, scores)
    assert scores["image networks alone"] > scores["equal weights, per-modality networks" if strategy == "auto"
                                                   else "equal weights"] + 0.02  # equal weights dilute it


def test_each_modality_alone_is_a_candidate_over_all_its_seeds():
    from multimodal.evaluation.stacking import candidates, mixture_logits

    plan = [(("image", "text"), 0), (("image", "text"), 1), (("image",), 0), (("image",), 1), (("text",), 0),
            (("text",), 1)]
    masks = candidates("auto", plan)
    assert masks["image networks alone"].tolist() == [0, 0, 1, 1, 0, 0]
    assert masks["text networks alone"].tolist() == [0, 0, 0, 0, 1, 1]
    assert list(masks)[-2:] == ["image networks alone", "text networks alone"]  # tried last: a guard
    z = np.random.default_rng(0).normal(size=(20, 6, 1))
    image = mixture_logits(z, np.ones((20, 6), bool), masks["image networks alone"] / 2, "binary")
    p = 1 / (1 + np.exp(-z[:, 2:4, 0]))
    np.testing.assert_allclose(1 / (1 + np.exp(-image[:, 0])), p.mean(1), atol=1e-6)


def test_mix_leaves_out_networks_that_saw_nothing():
    from multimodal.model.network import mix

    z = torch.tensor([[[0.0], [0.0]], [[2.0], [2.0]], [[-3.0], [-3.0]]])  # 3 networks, 2 patients
    seen = torch.tensor([[True, True], [True, True], [True, False]])
    p = torch.sigmoid(z[:, 0, 0])
    out = torch.sigmoid(mix(z, seen, torch.tensor([0.25, 0.25, 0.5]), "binary"))
    assert out[0, 0].item() == pytest.approx(float(0.25 * p[0] + 0.25 * p[1] + 0.5 * p[2]), abs=1e-6)
    assert out[1, 0].item() == pytest.approx(float((p[0] + p[1]) / 2), abs=1e-6)  # the third did not see patient 2
    nobody = torch.sigmoid(mix(z, torch.zeros(3, 2, dtype=torch.bool), torch.tensor([0.25, 0.25, 0.5]), "binary"))
    assert nobody[1, 0].item() == pytest.approx(float(0.25 * p[0] + 0.25 * p[1] + 0.5 * p[2]), abs=1e-6)
    three = torch.softmax(mix(torch.randn(2, 4, 3), torch.ones(2, 4, dtype=torch.bool), torch.tensor([0.5, 0.5]),
                              "multiclass"), -1)
    assert torch.allclose(three.sum(-1), torch.ones(4))


def test_uni_modal_teachers_pull_each_modality_towards_its_own_network(cohort):
    """fusion.teacher_weight: the joint network's per-modality heads end up nearer the per-modality networks'
    logits (trained first, as teachers) than the same heads trained on the label alone. The text head,
    whose encoder learns fastest here, at least halves its distance."""
    import torch.nn.functional as F

    from multimodal import DiagnosisModel
    from multimodal.data.batches import RecordDataset, make_loader

    gaps = {}
    for weight in (0.0, 20.0):
        model = DiagnosisModel.from_config(SYNTH_CONFIG, **(TINY | {
            "fusion.strategy": "auto", "fusion.teacher_weight": weight, "train.epochs": 8, "train.lr": 0.01,
            "train.encoder_lr": None}))
        model.fit(cohort["train"], cohort["val"], progress=False)
        joint, *alone = model.net.members  # member_plan: the joint network, then image, text, tabular alone
        rec = model.records(cohort["val"])
        ds = RecordDataset(rec, model.prep, model.config.modalities, model.config)
        batch = next(iter(make_loader(ds, model.config, model.prep, False, torch.device("cpu"), len(ds))))
        with torch.no_grad():
            _, aux = joint.eval()(batch, return_aux=True)
            gaps[weight] = {m: F.mse_loss(aux[m][0][aux[m][1]], t.eval()(batch)[aux[m][1]]).item()
                            for m, t in zip(("image", "text", "tabular"), alone)}
    assert gaps[20.0]["text"] < 0.5 * gaps[0.0]["text"], gaps
    assert sum(gaps[20.0].values()) < sum(gaps[0.0].values()), gaps


def test_teachers_need_the_auto_strategy():
    from multimodal import DiagnosisModel, UserError

    with pytest.raises((UserError, ValueError), match="teacher_weight needs fusion.strategy: auto"):
        DiagnosisModel.from_config(SYNTH_CONFIG,
                                   **(TINY | {"fusion.strategy": "unimodal", "fusion.teacher_weight": 1.0}))


def test_crossfit_folds_are_scored_by_their_own_networks_and_weighted_per_kind(cohort, tmp_path):
    """auto with train.ensemble_holdout crossfit: fold j's hold-out is scored only by the networks of
    seed offset j (the ones that held it out), the mixture's weights are fitted per kind (joint, each
    modality alone) on the pooled folds and shared by a kind's seeds, and the model's calibration is
    fitted on those out-of-fold logits."""
    from multimodal import DiagnosisModel
    from multimodal.data.splits import holdout_splits, labelled
    from multimodal.evaluation.calibration import fit_temperature
    from multimodal.model.build import fold_members

    m = DiagnosisModel.from_config(SYNTH_CONFIG, **(TINY | {
        "fusion.strategy": "auto", "train.ensemble": 2, "train.ensemble_holdout": "crossfit",
        "train.val_fraction": 0.34}))
    m.fit(cohort["train"], progress=False)
    folds = fold_members(m.config, 2)
    assert folds == [[0, 2, 4, 6], [1, 3, 5, 7]]  # joint, image, text, tabular: seed offsets 0 and 1
    report = m.metrics["training"]["fusion"]
    assert report["networks_per_kind"] == 2 and len(report["members"]) == 4
    w, t = m.net.member_weights.numpy(), m.net.member_temperature.numpy()
    assert np.allclose(w[folds[0]], w[folds[1]]) and abs(w.sum() - 1) < 1e-6
    assert np.allclose(t[folds[0]], t[folds[1]]) and not np.allclose(t, 1.0)
    assert np.allclose(w[folds[0]] * 2, [k["weight"] for k in report["members"]], atol=1e-4)
    splits = holdout_splits(m.records(cohort["train"], labels=True), m.config, 2)
    zs, ys = [], []
    for (_, val), idx in zip(splits, folds):
        r, y = labelled(val, m.prep)
        zs.append(m._infer(r, 64, 0, False, logits=True, net=m.net.subset(idx))["logits"])
        ys.append(y)
    assert m.metrics["validation"]["n"] == sum(len(y) for y in ys)
    tc, b = fit_temperature(np.concatenate(zs), np.concatenate(ys), "binary", bias=True)
    assert float(m.net.temperature) == pytest.approx(tc) and float(m.net.logit_bias[0]) == pytest.approx(b[0])
    out = m.save(tmp_path / "model")
    assert np.array_equal(_probs(m.predict(cohort["test"])), _probs(DiagnosisModel.load(out).predict(cohort["test"])))


def test_a_network_of_one_modality_trains_with_that_modalitys_alone_settings(cohort):
    """train.alone: the tabular network of a strategy, and a tabular-only run, take their own epochs;
    the networks that read images keep the recipe's."""
    from multimodal import DiagnosisModel

    alone = {"train.alone": {"tabular": {"epochs": 4, "min_epochs": 4}}, "train.epochs": 2}
    m = DiagnosisModel.from_config(SYNTH_CONFIG, **(BOW | alone | {"fusion.strategy": "unimodal"}))
    m.fit(cohort["train"], cohort["val"], progress=False)
    ran = {tuple(r["modalities"]): r["epochs"] for r in m.metrics["training"]["members"]}
    assert ran == {("image",): 2, ("text",): 2, ("tabular",): 4}
    one = DiagnosisModel.from_config(SYNTH_CONFIG, **(BOW | alone | {"modalities": ["tabular"]}))
    one.fit(cohort["train"], cohort["val"], progress=False)
    assert len(one.metrics["training"]["history"]) == 4 and one.config.train.epochs == 2  # the config as written
