"""Tests for explain.attribution (joint multimodal IG, Grad-CAM) and explain.faithfulness.

One small model is trained per module on a synthetic cohort with planted signals; two untrained
variants (concat fusion + HF text encoder, multiclass) cover the other code paths cheaply.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from explain.patients import explain, merge_words
from explain.faithfulness import faithfulness, inside, lesion_in_input, peak
from explain.perturbation import randomized_copy
from multimodal import DiagnosisModel
from multimodal.model.build import build_network
from multimodal.data.preprocess import Preprocessing
from multimodal.synth import config_path, make_cohort

CONFIG = config_path()
# Small and quick on 2 CPU cores, but trained long enough for the text and lab signals to be learnt.
# The CNN is pinned (a small ResNet, so Grad-CAM has a last feature stage and timing stays predictable).
# The records here are DataFrames listing absolute image paths (_abs_images), which resolve against no
# image root: they need the opt-out from confinement.
FAST = {"image.encoder": "test_resnet", "image.size": 48, "image.augment": None, "text.vocab_size": 300,
        "train.epochs": 6, "train.batch_size": 16, "train.patience": 100, "fusion.layers": 1, "train.seed": 0,
        "data.confine_images": False, "fusion.strategy": "joint"}
N_STEPS = 16


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("attr_cohort"), n=300, seed=2)


pytestmark = pytest.mark.usefixtures("one_thread")


def fixed_vocabulary(texts, cfg):
    """Every training word as a fixed WordPiece vocabulary. The trained one differs between runs
    (huggingface/tokenizers#1794), which made this small model, and the thresholds below, vary."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    from multimodal.data.preprocess.text import SPECIALS, TextPreprocessor

    norm, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = sorted({w for t in texts if isinstance(t, str) for w, _ in pre.pre_tokenize_str(norm.normalize_str(t))})
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(SPECIALS + words)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = norm, pre
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return TextPreprocessor(tok, cfg.text.max_length)


@pytest.fixture(scope="module")
def model(data, one_thread):
    from multimodal.data.preprocess import Preprocessing

    m = DiagnosisModel.from_config(CONFIG, **FAST)
    train = m.records(data["train"], labels=True)
    m.prep = Preprocessing.fit(m.config, train)
    m.prep.text = fixed_vocabulary(train.df[m.config.text.column], m.config)
    return m.fit(train, data["val"], progress=False, reuse_preprocessing=True)


@pytest.fixture(scope="module")
def test_df(data):
    return pd.read_csv(data["test"], dtype=str, keep_default_na=False, na_values=[""])


@pytest.fixture(scope="module")
def few(model, data, test_df):
    """Six test patients, explained once (IG)."""
    df = test_df.iloc[:6].reset_index(drop=True)
    return df, explain(model, _abs_images(df, data["dir"]), n_steps=N_STEPS)


def _abs_images(df: pd.DataFrame, root: Path) -> pd.DataFrame:
    """DataFrame records resolve image paths against the cwd: make them absolute."""
    df = df.copy()
    df["image_path"] = [";".join(str(Path(root) / p) for p in str(v).split(";")) if isinstance(v, str) and v
                        else v for v in df["image_path"]]
    return df


def _untrained(data, **overrides) -> DiagnosisModel:
    m = DiagnosisModel.from_config(CONFIG, **{**FAST, **overrides})
    rec = m.records(data["train"], labels=True)
    m.prep = Preprocessing.fit(m.config, rec)
    m.net = build_network(m.config, m.prep).eval()
    return m


def _logit_at_baseline(model, df: pd.DataFrame, root) -> tuple[np.ndarray, np.ndarray]:
    """Independent of the module under test: logits at the input and at the documented baseline."""
    from multimodal.data.batches import Collate, RecordDataset

    rec = model.records(_abs_images(df, root))
    ds = RecordDataset(rec, model.prep, model.config.modalities, model.config)
    b = Collate(model.prep, model.config.modalities, model.config)([ds[i] for i in range(len(ds))])
    net = model.net.eval()
    base = dict(b)
    p = model.prep.image
    base["image"] = ((0 - p.mean) / p.std).expand_as(b["image"]).contiguous()
    special = torch.tensor(np.array([e.special_tokens_mask for e in b["text_encodings"]], bool))
    base["text_ids"] = torch.where(special, b["text_ids"], torch.full_like(b["text_ids"], model.prep.text.pad_id))
    present_tab = (b["num_missing"] < 0.5).any(1) | (b["cat"] > 0).any(1)
    for k in ("num", "num_missing", "cat"):
        base[k] = torch.where(present_tab[:, None], torch.zeros_like(b[k]), b[k])
    with torch.no_grad():
        return net(b)[:, 0].numpy(), net(base)[:, 0].numpy()


# -- shapes and contract ---------------------------------------------------------------------------
def test_shapes_and_fields(model, few):
    df, ex = few
    size = model.config.image.size
    assert [e.id for e in ex] == df["patient_id"].tolist()
    for e, (_, row) in zip(ex, df.iterrows()):
        assert e.error is None and e.method == "ig" and e.target == model.classes[1]
        assert set(e.probs) == set(model.classes) and abs(sum(e.probs.values()) - 1) < 1e-5
        assert e.pred == max(e.probs, key=e.probs.get)
        assert len(e.images) == len(e.image_maps)
        for img, amap in zip(e.images, e.image_maps):
            assert img.shape == (size, size) and amap.shape == (size, size)
            assert 0 <= img.min() and img.max() <= 1 and np.isfinite(amap).all()
        text = row["report_text"] if isinstance(row["report_text"], str) else ""
        assert e.words == text.split()                       # original words, one score each
        assert len(e.word_scores) == len(e.words)
        assert e.features == ["age", "crp", "sex", "smoking"]
        assert len(e.feature_scores) == len(e.feature_values) == 4
        for f, v in zip(e.features, e.feature_values):
            raw = row[f]
            assert v == ("missing" if pd.isna(raw) else str(raw).strip())
        assert set(e.modality_share) <= {"image", "text", "tabular"}
        assert abs(sum(e.modality_share.values()) - 1) < 1e-6
        assert e.convergence_delta is not None
    d = ex[0].to_dict()
    assert d["id"] == ex[0].id and isinstance(d["image_maps"], list)


def test_images_are_display_space_model_inputs(model, data, few):
    """`images` are the model inputs mapped back to [0, 1]: re-normalising gives the batch tensor."""
    from multimodal.data.batches import RecordDataset

    df, ex = few
    ds = RecordDataset(model.records(_abs_images(df, data["dir"])), model.prep, model.config.modalities,
                       model.config)
    checked = 0
    for i, e in enumerate(ex):
        x = ds[i].get("image")
        assert len(e.images) == (0 if x is None else len(x))
        for v, img in enumerate(e.images):
            assert torch.allclose(model.prep.image.normalize(torch.as_tensor(img)[None]), x[v], atol=1e-5)
            checked += 1
    assert checked


def _total(e) -> float:
    return sum(float(m.sum()) for m in e.image_maps) + sum(e.word_scores) + sum(e.feature_scores)


def test_completeness_sum_matches_logit_difference(model, data, few):
    """Every unit of attribution reaches the output (maps, words, features), and the sum equals the
    logit difference up to the reported convergence delta; where the path is smooth the delta is small."""
    df, ex = few
    z, z0 = _logit_at_baseline(model, df, data["dir"])
    for e, zi, z0i in zip(ex, z, z0):
        gap = float(zi - z0i)
        assert _total(e) - gap == pytest.approx(e.convergence_delta, abs=2e-3 + 1e-3 * abs(gap))
    # text + tabular only (no images): a smooth path, so IG has converged at 32 steps
    no_img = df.copy()
    no_img["image_path"] = np.nan
    ex2 = explain(model, no_img, n_steps=32, ablation=False)
    z, z0 = _logit_at_baseline(model, no_img, data["dir"])
    for e, zi, z0i in zip(ex2, z, z0):
        gap = float(zi - z0i)
        assert abs(e.convergence_delta) <= 0.05 * abs(gap) + 0.02
        assert abs(_total(e) - gap) <= 0.05 * abs(gap) + 0.02


def test_merge_words_against_offsets(model):
    text = "Spiculated mass, 12 mm in the left upper-lobe."
    ids, mask, enc = model.prep.text([text])
    scores = np.arange(ids.shape[1], dtype=float)
    words, ws = merge_words(text, enc[0], scores)
    assert words == text.split()
    expected = np.zeros(len(words))
    starts = [m.start() for m in re.finditer(r"\S+", text)]
    for j, (wid, (s, e)) in enumerate(zip(enc[0].word_ids, enc[0].offsets)):
        if wid is not None and e > s:
            expected[max(k for k, st in enumerate(starts) if st <= s)] += scores[j]
    assert np.allclose(ws, expected)
    assert sum(ws) == pytest.approx(sum(scores[1:int(mask[0].sum()) - 1]))  # CLS/SEP left out


# -- robustness: bad records, absent modalities, targets ------------------------------------------------
def test_bad_record_in_mixed_batch(model, data, test_df):
    df = _abs_images(test_df.iloc[:4], data["dir"]).reset_index(drop=True)
    df.loc[1, "image_path"] = str(Path(data["dir"]) / "images" / "does_not_exist.dcm")
    df.loc[3, "crp"] = "not-a-number"
    ex = explain(model, df, n_steps=4, batch_size=8)
    assert [e.id for e in ex] == df["patient_id"].tolist()
    for k in (1, 3):
        e = ex[k]
        assert e.error and "\n" not in e.error
        assert not (e.images or e.image_maps or e.words or e.features or e.probs or e.modality_share)
        assert e.convergence_delta is None and e.pred is None
    assert "does_not_exist" in ex[1].error and "crp" in ex[3].error
    for k in (0, 2):
        assert ex[k].error is None and ex[k].probs and ex[k].modality_share


def test_absent_modalities_get_no_attribution(model, data, test_df):
    df = _abs_images(test_df.iloc[:3], data["dir"]).reset_index(drop=True)
    df.loc[0, "image_path"] = np.nan
    df.loc[1, "report_text"] = np.nan
    df.loc[2, ["age", "crp", "sex", "smoking"]] = np.nan
    ex = explain(model, df, n_steps=8)
    gone = ["image", "text", "tabular"]
    for e, m in zip(ex, gone):
        assert e.error is None
        assert m not in e.modality_share and m not in e.modality_ablation and m not in e.attention
        assert set(e.modality_share) == set(gone) - {m}
    assert ex[0].images == [] and ex[0].image_maps == []
    assert ex[1].words == [] and ex[1].word_scores == []
    assert ex[2].features == [] and ex[2].feature_scores == []
    z, z0 = _logit_at_baseline(model, df, data["dir"])
    for e, zi, z0i in zip(ex, z, z0):  # the attribution of the missing modality is not lost elsewhere
        assert _total(e) - float(zi - z0i) == pytest.approx(e.convergence_delta, abs=2e-3 + 1e-3 * abs(float(zi - z0i)))


def test_negative_target_negates_and_internal_batching_matches(model, few, two):
    _, ex = few
    neg = explain(model, two, target=model.classes[0], n_steps=N_STEPS, ablation=False)
    small = explain(model, two, target=1, n_steps=N_STEPS, internal_batch_size=5, ablation=False)
    for p, n, s in zip(ex[:2], neg, small):
        assert n.target == model.classes[0] and s.target == model.classes[1]
        assert np.allclose(n.feature_scores, -np.asarray(p.feature_scores), atol=1e-4)
        assert np.allclose(n.word_scores, -np.asarray(p.word_scores), atol=1e-4)
        assert n.convergence_delta == pytest.approx(-p.convergence_delta, abs=1e-4)
        assert np.allclose(s.feature_scores, p.feature_scores, atol=1e-4)
        assert np.allclose(s.word_scores, p.word_scores, atol=1e-4)
        for a, b in zip(s.image_maps, p.image_maps):
            assert np.allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError):
        explain(model, two, target="no-such-class")


@pytest.fixture(scope="module")
def two(data, test_df):
    """The first two test patients (the same as few[:2]) as a DataFrame with absolute image paths."""
    return _abs_images(test_df.iloc[:2], data["dir"]).reset_index(drop=True)


# -- attention, ablation, gradcam ------------------------------------------------------------------------
def test_attention_and_ablation(model, few):
    _, ex = few
    for e in ex:
        present = set(e.modality_share)
        assert set(e.attention) == present and set(e.modality_ablation) == present
        assert all(0 <= v <= 1 + 1e-6 for v in e.attention.values())
        assert sum(e.attention.values()) <= 1 + 1e-5
        p = e.probs[e.target]
        assert all(-1 <= v <= 1 and p - v >= -1e-6 and p - v <= 1 + 1e-6 for v in e.modality_ablation.values())


def test_ablation_matches_predict_with_absent(model, two):
    recs = two
    ex = explain(model, recs, n_steps=2)
    full = model.predict(recs)[f"prob_{model.classes[1]}"].to_numpy()
    no_text = model.predict(recs, absent=["text"])[f"prob_{model.classes[1]}"].to_numpy()
    for e, f, t in zip(ex, full, no_text):
        assert e.probs[model.classes[1]] == pytest.approx(f, abs=1e-5)
        assert e.modality_ablation["text"] == pytest.approx(f - t, abs=1e-5)


def test_pages_call_the_class_predict_calls_at_the_operating_point(model, data, few):
    """The explanation's `pred` is predict's decision at the stored cut-off, not the most probable class,
    with the cut-off, the true label and the model's own training date beside it."""
    df, ex = few
    from explain import model_info

    pos = model.classes[1]
    p = np.array([e.probs[pos] for e in ex])
    cut = float(np.sort(p)[len(p) // 2])        # half the patients on each side, none at argmax's 0.5 split
    labels = model.prep.labels
    saved, labels.thresholds = labels.thresholds, [cut]
    try:
        recs = _abs_images(df, data["dir"])
        again = explain(model, recs, n_steps=2, ablation=False)
        preds = model.predict(recs)["pred"].tolist()
    finally:
        labels.thresholds = saved
    assert [e.pred for e in again] == preds
    assert [e.pred == pos for e in again] == [bool(v >= cut) for v in p]
    assert all(e.threshold == pytest.approx(cut) for e in again)
    truth = [model.classes[labels.encode(df.iloc[[i]])[0]] for i in range(len(df))]
    assert [e.label for e in again] == truth
    trained = model_info(model)["created"]
    assert trained == model.metrics["trained"] and re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", trained)


def test_ig_rows_per_pass_fit_half_the_available_memory(model, two, monkeypatch, caplog):
    """Captum's default (every step of every patient in one pass) was OOM-killed without a word."""
    import logging

    import explain.budget as budget
    from multimodal.data.batches import Collate, RecordDataset

    rec = model.records(two)
    ds = RecordDataset(rec, model.prep, model.config.modalities, model.config)
    collate = Collate(model.prep, model.config.modalities, model.config)
    one, three = collate([ds[0]]), collate([ds[0]] * 3)
    per_row, once = budget.row_bytes(model.net, one)
    assert per_row > model.prep.image.mean.numel() * 48 * 48 * 4            # at least the pixels it keeps
    assert budget.saved_bytes(model.net, three) == pytest.approx(once + 3 * per_row, rel=0.05)
    both = collate([ds[0], ds[1]])
    assert budget.largest_row(both).tolist() == (
        [True, False] if (both["image_mask"][0].sum(), both["text_mask"][0].sum()) >=
        (both["image_mask"][1].sum(), both["text_mask"][1].sum()) else [False, True])
    views = int(one["image_mask"].sum())
    free = (7.5 * per_row * 2 / views + once) * budget.OVERHEAD / budget.MEMORY_SHARE
    monkeypatch.setattr(budget, "available_memory", lambda device: int(free))
    with caplog.at_level(logging.INFO, logger="mmdx"):
        assert budget.rows_per_pass(model.net, one, 64, torch.device("cpu"), max_views=2) == 7   # sized for 2 images
        bounded = explain(model, two, n_steps=8, ablation=False)
    assert "explain: 7 Integrated Gradients rows per pass" in caplog.text
    assert budget.rows_per_pass(model.net, one, 5, torch.device("cpu")) == 5     # never more than a batch holds
    monkeypatch.setattr(budget, "available_memory", lambda device: 0)
    assert budget.rows_per_pass(model.net, one, 64, torch.device("cpu")) == 1     # one row at least, and said so
    whole = explain(model, two, n_steps=8, ablation=False, internal_batch_size=16)
    for a, b in zip(bounded, whole):
        np.testing.assert_allclose(a.feature_scores, b.feature_scores, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(a.image_maps[0], b.image_maps[0], rtol=1e-3, atol=1e-6)


def test_gradcam_maps(model, two):
    recs = two
    ex = explain(model, recs, method="gradcam", n_steps=4)
    size = model.config.image.size
    for e in ex:
        assert e.method == "gradcam" and e.error is None
        assert all(m.shape == (size, size) and np.isfinite(m).all() for m in e.image_maps)
        assert len(e.image_maps) == len(e.images)
        assert "image" not in e.modality_share  # Grad-CAM is not on the IG scale
        assert len(e.word_scores) == len(e.words)
    assert any(np.ptp(m) > 0 for e in ex for m in e.image_maps)


# -- other model shapes: concat fusion + HF text encoder, multiclass ---------------------------------------
def test_concat_fusion_and_hf_text_encoder(data, two):
    m = _untrained(data, **{"fusion.type": "concat", "text.encoder": "hf",
                            "text.hf_config": {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1,
                                               "num_attention_heads": 2, "intermediate_size": 64,
                                               "max_position_embeddings": 128}})
    recs = two
    ex = explain(m, recs, n_steps=N_STEPS)
    z, z0 = _logit_at_baseline(m, recs, data["dir"])
    for e, zi, z0i in zip(ex, z, z0):
        assert e.error is None and e.attention == {}
        assert len(e.word_scores) == len(e.words) > 0 and any(s != 0 for s in e.word_scores)
        assert _total(e) - float(zi - z0i) == pytest.approx(e.convergence_delta, abs=2e-3 + 1e-3 * abs(float(zi - z0i)))


def test_multiclass_default_target_is_prediction(data, two):
    m = _untrained(data, **{"task.type": "multiclass"})
    ex = explain(m, two, n_steps=4)
    for e in ex:
        assert e.target == e.pred and set(e.probs) == set(m.classes)


# -- faithfulness on the planted signals ------------------------------------------------------------------------
def test_lesion_box_maps_to_bright_model_input_region(model, data):
    """The truth box, mapped into the model's image list and pixels, covers the bright lesion."""
    truth = pd.read_csv(data["truth"], dtype=str, keep_default_na=False).set_index("patient_id")
    recs = model.records(data["test"])
    rows = [i for i, pid in enumerate(recs.df["patient_id"]) if truth.loc[pid, "lesion"] == "1"][:6]
    ex = explain(model, recs.subset(rows), n_steps=2, ablation=False)
    checked = 0
    for i, e in zip(rows, ex):
        hit = lesion_in_input(recs.df.iloc[i], truth.loc[recs.df.iloc[i]["patient_id"]], model.config, recs.root)
        if hit is None or e.error:
            continue
        v, (x0, y0, x1, y1) = hit
        img = e.images[v]
        yy, xx = np.mgrid[0:img.shape[0], 0:img.shape[1]] + 0.5
        box = (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)
        assert img[box].mean() > img[~box].mean() + 0.05, e.id
        assert inside(peak(img), (x0, y0, x1, y1))
        checked += 1
    assert checked >= 3


def test_randomized_copy_changes_every_parameter(model):
    r = randomized_copy(model.net, seed=1)
    same = [n for (n, a), (_, b) in zip(model.net.named_parameters(), r.named_parameters())
            if a.numel() > 1 and torch.equal(a, b)]
    assert same == []


def test_faithfulness_planted_signals(model, data):
    res = faithfulness(model, data["test"], data["truth"], n_steps=8, max_patients=30, sanity_patients=10)
    json.dumps(res)  # flat and JSON-able
    n = res["n"]
    assert n["errors"] == 0 and n["text"] >= 4 and n["tabular"] >= 4 and n["pointing"] >= 4
    # The issue asks for 0.90 on the full-size model (see the PR for those numbers); this 6-epoch,
    # 48-px model explains 7-9 patients per signal, so the bar is lower, but well above chance
    # (top-3 of ~25 words holding one of 2 phrase words: ~0.25; top-1 of 4 features: 0.25).
    assert res["text_top3"] >= 0.7
    assert res["tabular_top1"] >= 0.5
    for m in ("text", "tabular"):
        assert res["deletion"][m]["top"] > res["deletion"][m]["random"]
    assert res["deletion_top_gt_random"] and res["passed"]["deletion"]
    assert res["sanity_rank_corr"]["image"] < 0.2 and res["sanity_rank_corr"]["text"] < 0.6
    # The trained model agrees with itself (32 vs 16 IG steps) far more than with a re-initialised
    # copy. On this tiny model the image self-agreement varies run to run (0.79-0.9, the vocabulary
    # is not deterministic), so the contrast is what is asserted, not a fixed bar inside that noise.
    ref, rand = res["sanity_reference_rank_corr"], res["sanity_rank_corr"]
    # (Tabular has 4 features: a re-initialised model's rank correlation is high by chance there.)
    assert all(ref[m] > 0.6 for m in ref) and all(ref[m] - rand[m] > 0.3 for m in ("image", "text")), (ref, rand)
    for k in ("pointing_game", "pointing_game_abs", "pointing_game_gradcam", "pointing_game_randomized_model"):
        assert 0 <= res[k] <= 1
    assert res["convergence"]["median_rel_delta_without_images"] < 0.05
