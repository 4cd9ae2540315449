"""Each network's own part of the attributions in a fusion strategy's report (issue #29, explain/attribution.py
split_by_member): aligned with the page, adding up to the mixture's attribution, and finding its modality's
planted signal (multimodal/synth: a bright lesion, the phrase "spiculated mass", a raised CRP)."""
from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import SYNTH_CONFIG, TINY

# Per-modality networks small enough to train in about 12 s on one core, long enough to learn the planted
# signals (measured: every phrase patient's top-3 words and every high-CRP patient's top feature, pointing 1.0).
UNIMODAL = TINY | {"fusion.strategy": "unimodal", "train.epochs": 6, "text.encoder": "lstm"}
N_STEPS = 8
SPLIT_TOLERANCE = 1e-5
"""The members' parts against the mixture's attribution from one pass over shared layers: the same path
integral, only summed in another order, so float32 rounding, relative to the largest attribution."""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    from multimodal.synth import make_cohort

    return make_cohort(tmp_path_factory.mktemp("members_cohort"), n=300, seed=2)


@pytest.fixture(scope="module")
def unimodal(planted, one_thread):
    from multimodal import DiagnosisModel

    return DiagnosisModel.from_config(SYNTH_CONFIG, **UNIMODAL).fit(planted["train"], planted["val"], progress=False)


@pytest.fixture(scope="module")
def explained(unimodal, planted):
    from explain.patients import explain

    return explain(unimodal, unimodal.records(planted["test"]), n_steps=N_STEPS, ablation=False)


def _untrained(cohort, **overrides):
    from multimodal import DiagnosisModel
    from multimodal.data.preprocess import Preprocessing
    from multimodal.model.build import build_network

    m = DiagnosisModel.from_config(SYNTH_CONFIG, **(TINY | {"text.encoder": "bow"} | overrides))
    m.prep = Preprocessing.fit(m.config, m.records(cohort["train"], labels=True))
    m.net = build_network(m.config, m.prep).eval()
    return m


def _batch(model, records, n: int) -> dict:
    from multimodal.data.batches import RecordDataset, make_loader

    ds = RecordDataset(model.records(records).subset(range(n)), model.prep, model.config.modalities, model.config,
                       views="first")
    return next(iter(make_loader(ds, model.config, model.prep, False, torch.device("cpu"), n)))


def _network(e, name: str) -> dict:
    return next(n for n in e.members if n["network"] == name)


SCORES = {"image": "image_maps", "text": "word_scores", "tabular": "feature_scores"}


def test_each_network_reports_its_part_of_what_it_reads(explained):
    """Every network has its own attributions, aligned with the page's images, words and features, only for
    what it reads: the image network has no word or feature scores, and the reverse."""
    assert explained and all(e.error is None for e in explained)
    for e in explained:
        assert [n["network"] for n in e.members] == ["image", "text", "tabular"]
        has = {"image": bool(e.images), "text": bool(e.words), "tabular": bool(e.features)}
        for n in e.members:
            m = n["network"]
            assert set(n["attribution"]) == ({m} if has[m] else set())
            assert {k for k in SCORES.values() if k in n} == ({SCORES[m]} if has[m] else set())
        image = _network(e, "image")
        assert "word_scores" not in image and "feature_scores" not in image
        assert not set(image["attribution"]) & {"text", "tabular"}
        if has["image"]:
            assert len(image["image_maps"]) == len(e.images)
            assert image["attribution"]["image"] == pytest.approx(sum(float(np.sum(a)) for a in image["image_maps"]),
                                                                  rel=1e-5, abs=1e-6)
        if has["text"]:
            assert len(_network(e, "text")["word_scores"]) == len(e.words)
        # one network per modality: the page's attributions of a modality are that network's
        for m in (m for m in SCORES if has[m]):
            mine = _network(e, m)[SCORES[m]]
            page = getattr(e, SCORES[m])
            assert all(np.allclose(a, b, atol=1e-6) for a, b in zip(mine, page)) and len(mine) == len(page)


def test_the_report_and_its_json_show_each_network(explained, unimodal, tmp_path):
    from explain import Explanations, model_info
    from explain.report import safe_name

    exps = Explanations(explained[:3], model_info(unimodal))
    index = exps.to_html(tmp_path / "reports")
    e = explained[0]
    saved = json.loads((index.parent / "attributions" / f"{safe_name(e.id)}.json").read_text())
    on_disk = {n["network"]: n for n in saved["members"]}
    assert set(on_disk) == {"image", "text", "tabular"}
    for n in e.members:
        got = on_disk[n["network"]]
        assert got["attribution"] == pytest.approx(n["attribution"], rel=1e-6)
        for key in SCORES.values():
            assert (key in got) == (key in n)
        if "image_maps" in n:
            assert np.allclose(got["image_maps"], np.asarray(n["image_maps"]), atol=1e-5)
    page = (index.parent / f"patient_{safe_name(e.id)}.html").read_text()
    assert "Its attribution" in page and "Its strongest inputs" in page
    assert page.count('class="member-detail"') == sum(bool(n["attribution"]) for n in e.members)
    summary = pd.read_parquet(index.parent / "attributions.parquet")
    first = json.loads(summary["members"][0])
    assert [set(n["attribution"]) for n in first] == [set(n["attribution"]) for n in e.members]


def test_members_parts_add_up_to_the_mixtures_attribution(cohort):
    """auto: the joint network and each per-modality network read the same inputs, and a frozen image encoder
    is one module shared by two networks. Split by network, the parts add up to the attribution of the
    mixture's logit computed in one pass over the shared layers (by_member=False), for any weights."""
    from explain.attribution import attribute_batch
    from explain.patients import explain
    from multimodal.model.network import members

    m = _untrained(cohort, **{"fusion.strategy": "auto", "image.freeze": "all"})
    nets = members(m.net)
    assert nets[0].encoders["image"] is nets[1].encoders["image"]  # shared: what the split must undo
    m.net.member_weights.copy_(torch.tensor([0.4, 0.3, 0.2, 0.1]))
    m.net.member_temperature.copy_(torch.tensor([0.7, 1.3, 0.9, 1.1]))
    batch = _batch(m, cohort["test"], 8)
    split = attribute_batch(m, batch, n_steps=N_STEPS)
    whole = attribute_batch(m, batch, n_steps=N_STEPS, by_member=False)
    assert whole.members is None and len(split.members) == 4
    readers = {"image": [0, 1], "text": [0, 2], "tabular": [0, 3]}
    for mod, who in readers.items():
        ref = getattr(whole, mod)
        parts = [split.members[i][mod] for i in who]
        assert [i for i, p in enumerate(split.members) if mod in p] == who
        assert all(float(p.abs().max()) > 0 for p in parts)
        tol = SPLIT_TOLERANCE * float(ref.abs().max())
        torch.testing.assert_close(parts[0] + parts[1], ref, rtol=0, atol=tol)
        assert not torch.allclose(parts[0], ref, atol=tol)  # each network holds a real part, not all of it
    torch.testing.assert_close(split.delta, whole.delta)
    assert not any(enc._forward_pre_hooks for enc in (nets[0].encoders["image"], nets[2].encoders["text"]))
    for e in explain(m, m.records(cohort["test"]).subset(range(4)), n_steps=N_STEPS, ablation=False):
        for key in SCORES.values():
            parts = [n[key] for n in e.members if key in n]
            total = np.sum([np.asarray(p, dtype=np.float64) for p in parts], 0)
            assert np.allclose(total, np.asarray(getattr(e, key), dtype=np.float64),
                               atol=SPLIT_TOLERANCE * np.abs(total).max())


def test_a_network_that_alone_speaks_gets_its_own_attribution(unimodal, planted):
    """Where one network speaks for a patient (no image, no report, the others left out), the mixture is that
    network, and its part is the Integrated Gradients of its own logit, through the two calibrations."""
    from explain.attribution import attribute_batch
    from explain.patients import with_net

    net = copy.deepcopy(unimodal.net)
    net.member_answers_absent.zero_()  # the image and text networks stay out where their input is missing
    model = with_net(unimodal, net)
    df = pd.read_csv(planted["test"]).head(6)
    df["image_path"], df["report_text"] = np.nan, ""
    batch = _batch(model, df, 6)
    mixed = attribute_batch(model, batch, n_steps=N_STEPS)
    tab = net.members[2]
    own = attribute_batch(model, batch, n_steps=N_STEPS, net=tab)  # the tabular network's own logit
    scale = float(net.member_temperature[2]) * float(net.temperature)
    assert [set(p) for p in mixed.members] == [set(), set(), {"tabular"}]
    torch.testing.assert_close(mixed.members[2]["tabular"] * scale, own.tabular, rtol=1e-4, atol=1e-5)


def test_each_network_finds_its_modalitys_planted_signal(explained, unimodal, planted):
    """The text network ranks the planted phrase among its top 3 words, the tabular network CRP first, and the
    image network's map peaks in the lesion (a re-initialised copy's does not: the map is learnt, not the
    brightest pixels). Chance: ~0.25 for the phrase (2 of ~25 words), 0.25 for CRP (1 of 4 features)."""
    from explain.faithfulness import inside, lesion_in_input, peak
    from explain.patients import explain, with_net
    from explain.perturbation import randomized_copy
    from multimodal.synth import LAB, PHRASE

    truth = pd.read_csv(planted["truth"], dtype=str, keep_default_na=False).set_index("patient_id")
    rec = unimodal.records(planted["test"])
    phrase, text, lab = set(PHRASE.split()), [], []
    for e in explained:
        t = truth.loc[e.id]
        if t["phrase"] == "1" and e.words:
            scores = _network(e, "text")["word_scores"]
            top = {e.words[i].strip(".,").lower() for i in np.argsort(scores)[::-1][:3]}
            text.append(bool(phrase & top))
        if t["lab_high"] == "1" and e.features:
            lab.append(e.features[int(np.argmax(_network(e, "tabular")["feature_scores"]))] == LAB)
    assert len(text) >= 10 and np.mean(text) >= 0.8, text
    assert len(lab) >= 10 and np.mean(lab) >= 0.8, lab

    shuffled = explain(with_net(unimodal, randomized_copy(unimodal.net, seed=1)), rec, n_steps=N_STEPS, ablation=False)
    pointing = {"trained": [], "re-initialised": []}
    for i, (e, r) in enumerate(zip(explained, shuffled)):
        hit = lesion_in_input(rec.df.iloc[i], truth.loc[e.id], unimodal.config, rec.root)
        if truth.loc[e.id, "lesion"] != "1" or hit is None:
            continue
        view, box = hit
        for name, x in (("trained", e), ("re-initialised", r)):
            pointing[name].append(inside(peak(np.asarray(_network(x, "image")["image_maps"][view])), box))
    assert len(pointing["trained"]) >= 10
    assert np.mean(pointing["trained"]) >= 0.8 and np.mean(pointing["re-initialised"]) <= 0.4, pointing


def test_joint_networks_and_seed_ensembles_are_not_split(cohort, tmp_path):
    """Reports of a joint network, or of seeds averaged (train.ensemble), stay as they were: no networks."""
    from explain import Explanations, model_info
    from explain.attribution import attribute_batch, split_by_member
    from explain.patients import explain

    for over in ({}, {"train.ensemble": 2}):
        m = _untrained(cohort, **over)
        assert split_by_member(m.net) is m.net
        assert attribute_batch(m, _batch(m, cohort["test"], 2), n_steps=2).members is None
        exps = explain(m, m.records(cohort["test"]).subset(range(2)), n_steps=2, ablation=False)
        assert all(e.members == [] for e in exps)
        index = Explanations(exps, model_info(m)).to_html(tmp_path / f"r{len(over)}")
        assert "Networks behind" not in "".join(p.read_text() for p in index.parent.glob("patient_*.html"))
