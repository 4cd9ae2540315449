"""Hugging Face text encoder: a local pretrained folder (made here, offline) trains, saves and reloads."""
import numpy as np
import pytest

from multimodal import DiagnosisModel

from conftest import SYNTH_CONFIG, TINY


def _bert_folder(d, layers: int):
    """A tiny pretrained-style BERT folder (weights + tokenizer), as a user's local checkpoint."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    words = "[PAD] [UNK] [CLS] [SEP] [MASK] ct shows a spiculated mass in the left lobe mild cough no fever".split()
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(d)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def local_bert(tmp_path_factory):
    return _bert_folder(tmp_path_factory.mktemp("bert"), layers=1)


@pytest.fixture(scope="module")
def bert3(tmp_path_factory):
    return _bert_folder(tmp_path_factory.mktemp("bert3"), layers=3)


def test_hf_pretrained_folder_train_save_load(local_bert, cohort, tmp_path):
    model = DiagnosisModel.from_config(SYNTH_CONFIG, modalities="text,tabular",
                                       **TINY, **{"text.encoder": "hf", "text.pretrained": str(local_bert)})
    assert model.config.text.pretrained
    model.fit(cohort["train"], cohort["val"], progress=False)
    enc = model.net.encoders["text"]
    assert type(enc).__name__ == "HFTextEncoder" and enc.output_dim == 16
    ids, mask, _ = model.prep.text(["CT shows a spiculated mass"])
    assert ids[0, :7].tolist() == [2, 5, 6, 7, 8, 9, 3]  # the folder's own vocabulary, not a new one
    before = model.predict(cohort["test"])
    model.save(tmp_path / "m")
    local_bert.rename(local_bert.with_name("moved_away"))  # loading must not need the original folder
    after = DiagnosisModel.load(tmp_path / "m").predict(cohort["test"])
    np.testing.assert_array_equal(before.prob_1.to_numpy(), after.prob_1.to_numpy())


def test_hf_random_init_uses_trained_vocab(cohort):
    model = DiagnosisModel.from_config(SYNTH_CONFIG, modalities="text", **TINY,
                                       **{"text.encoder": "hf"})
    model.fit(cohort["train"], cohort["val"], progress=False)
    cfg = model.net.encoders["text"].model.config
    assert cfg.vocab_size == model.prep.text.vocab_size and cfg.hidden_size == 64


def _top_cached(bert, **kw):
    return DiagnosisModel.from_config(SYNTH_CONFIG, modalities="text,tabular", **(TINY | {
        "text.encoder": "hf", "text.pretrained": str(bert), "text.freeze": 1, "text.cache_features": True,
        "train.lr": 0.01} | kw))


def test_freeze_n_caches_the_lower_layers_once_and_trains_the_last(bert3, cohort, tmp_path, monkeypatch):
    import torch
    from transformers import BertModel

    from encoders.text import HFTextEncoder
    from multimodal.data import features
    from multimodal.data.batches import Collate, RecordDataset
    from multimodal.data.features import text_features
    from multimodal.data.preprocess.text import clean
    from multimodal.data.records import load_records

    monkeypatch.setattr(features, "_FROZEN_TEXT", {})  # what earlier tests in this process computed
    rows = []
    frozen_hidden = HFTextEncoder.frozen_hidden
    monkeypatch.setattr(HFTextEncoder, "frozen_hidden", lambda self, ids, mask, check=False: rows.append(len(ids))
                        or frozen_hidden(self, ids, mask, check))
    model = _top_cached(bert3, **{"train.ensemble": 2})
    model.fit(cohort["train"], cohort["val"], progress=False)
    texts = set()
    for split in ("train", "val"):
        rec = load_records(cohort[split], model.config)
        texts |= {clean(rec.cell(i, "report_text"), 20_000) for i in range(len(rec))}
    # each report once through the frozen layers, for both members
    assert sum(rows) == len(texts)
    start = BertModel.from_pretrained(bert3).encoder.layer
    for net in model.net.members:
        layers = net.encoders["text"].model.encoder.layer
        assert all(torch.equal(a, b) for a, b in zip(layers[0].state_dict().values(), start[0].state_dict().values()))
        assert not all(torch.equal(a, b) for a, b in zip(layers[2].state_dict().values(), start[2].state_dict().values()))
    # the cached path (lower layers' fp16 output + the last layer) is what prediction computes live
    enc = model.net.members[0].encoders["text"].eval()
    rec = load_records(cohort["val"], model.config)
    ds = RecordDataset(rec, model.prep, model.config.modalities, model.config,
                       text_features=text_features(rec, model.config, model.prep, enc))
    b = Collate(model.prep, model.config.modalities, model.config)([ds[i] for i in range(16)])
    with torch.no_grad():
        live, fast = enc(b["text_ids"], b["text_mask"]), enc(b["text_ids"], b["text_mask"], b["text_x"])
    m = b["text_mask"].unsqueeze(-1)
    assert torch.allclose(live.x * m, fast.x * m, atol=1e-2) and not torch.allclose(live.x * m, b["text_x"].float() * m)
    before = model.predict(cohort["test"])
    again = DiagnosisModel.load(model.save(tmp_path / "m")).predict(cohort["test"])
    np.testing.assert_array_equal(before.prob_1.to_numpy(), again.prob_1.to_numpy())
    # a later run in the process (another seed, a CV fold) reuses them; another cut point does not
    n = len(rows)
    _top_cached(bert3, **{"train.seed": 7}).fit(cohort["train"], cohort["val"], progress=False)
    assert len(rows) == n
    _top_cached(bert3, **{"text.freeze": 2}).fit(cohort["train"], cohort["val"], progress=False)
    assert sum(rows[n:]) == len(texts)


def test_last_layers_that_cannot_run_alone_are_refused_in_one_line(bert3, cohort, monkeypatch):
    from encoders.text import HFTextEncoder
    from multimodal import UserError
    from multimodal.data import features

    monkeypatch.setattr(features, "_FROZEN_TEXT", {})
    monkeypatch.setattr(HFTextEncoder, "top", lambda self, x, mask: x)  # as if the layers ignored their input
    with pytest.raises(UserError, match=r"^text.cache_features with text.freeze: 1 cannot run the last layers"):
        _top_cached(bert3).fit(cohort["train"], cohort["val"], progress=False)


def _edit_folder(src, dst, drop=None, config=None):
    """A copy of a pretrained folder with tensors dropped from its weights or keys set in its config."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    if drop:
        sd = load_file(str(dst / "model.safetensors"))
        save_file({k: v for k, v in sd.items() if drop not in k}, str(dst / "model.safetensors"))
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps(cfg | config))
    return dst


@pytest.mark.parametrize("edit, needle", [
    ({"drop": "encoder.layer.0.attention"}, "are not in its files or do not fit"),
    ({"config": {"hidden_size": 32}}, "text.pretrained"),
    ({"config": {"model_type": "timm_wrapper", "architecture": "resnet18"}}, "is not one mmdx builds"),
])
def test_pretrained_folder_must_fill_every_weight_of_an_allowed_architecture(cohort, tmp_path, edit, needle):
    from multimodal import UserError

    (tmp_path / "good").mkdir()
    bad = _edit_folder(_bert_folder(tmp_path / "good", layers=1), tmp_path / "bad", **edit)
    model = DiagnosisModel.from_config(SYNTH_CONFIG, modalities="text,tabular",
                                       **TINY, **{"text.encoder": "hf", "text.pretrained": str(bad)})
    with pytest.raises(UserError, match=needle):
        model.fit(cohort["train"], cohort["val"], progress=False)
