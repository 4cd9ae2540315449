"""Hugging Face text encoder: a local pretrained folder (made here, offline) trains, saves and reloads."""
import numpy as np
import pytest

from multimodal import DiagnosisModel

from conftest import REPO, TINY


@pytest.fixture(scope="module")
def local_bert(tmp_path_factory):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("bert")
    words = "[PAD] [UNK] [CLS] [SEP] [MASK] ct shows a spiculated mass in the left lobe mild cough no fever".split()
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(d)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(d)
    return d


def test_hf_pretrained_folder_train_save_load(local_bert, cohort, tmp_path):
    model = DiagnosisModel.from_config(REPO / "configs" / "synthetic.yaml", modalities="text,tabular",
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
    model = DiagnosisModel.from_config(REPO / "configs" / "synthetic.yaml", modalities="text", **TINY,
                                       **{"text.encoder": "hf"})
    model.fit(cohort["train"], cohort["val"], progress=False)
    cfg = model.net.encoders["text"].model.config
    assert cfg.vocab_size == model.prep.text.vocab_size and cfg.hidden_size == 64
