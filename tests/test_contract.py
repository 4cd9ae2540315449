"""Every registered encoder and fusion head keeps the contract the rest of mmdx relies on: an encoder
reads only the batch fields its modality declares (multimodal.data.batches.MODALITY_KEYS: what Collate
writes, the ONNX graph takes and attributions are of), builds itself from its config section, online
and offline alike, and returns `output_dim`-wide Tokens that say which patients have the modality; a
fusion head takes the tokens of any subset of modalities. A new encoder or head is held to it by being
registered; the rogue ones at the end show each check can fail."""
import inspect
from itertools import combinations

import pytest
import torch
import torch.nn as nn

from conftest import SYNTH_CONFIG
from encoders import ENCODERS, Tokens
from fusion import FUSION_HEADS
from multimodal.config import FusionConfig, load_config
from multimodal.data.batches import MODALITY_KEYS, TABULAR_KEYS, Collate, RecordDataset
from multimodal.data.preprocess import Preprocessing
from multimodal.data.records import load_records
from multimodal.model.build import build_encoder, encoder_name
from multimodal.model.network import DiagnosisNet

TINY = {"image.encoder": "test_resnet", "image.size": 32, "image.token_grid": 1, "image.augment": None,
        "text.vocab_size": 100, "text.max_length": 16, "text.embed_dim": 8, "text.hidden_dim": 8,
        "text.bigram_buckets": 64, "tabular.embed_dim": 8}
TINY_HF = {"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
           "intermediate_size": 32, "max_position_embeddings": 64}
# The settings that select each registered encoder (one or more variants); a newly registered one
# needs its line here.
SELECTS = {"timm": [{}], "tabular": [{}], "lstm": [{"text.encoder": "lstm"}], "bow": [{"text.encoder": "bow"}],
           "hf": [{"text.encoder": "hf", "text.hf_config": TINY_HF},
                  {"text.encoder": "hf", "text.hf_config": TINY_HF, "text.pooling": "mean"}]}
COMMON = ("index", "ok", "error", "y")  # what Collate writes for every batch, whatever the modalities


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from multimodal.synth import make_cohort

    return make_cohort(tmp_path_factory.mktemp("contract"), n=40, seed=0, image_size=32)


def _fitted(cohort, **settings):
    cfg = load_config(SYNTH_CONFIG, {**TINY, **settings})
    rec = load_records(cohort["train"], cfg, labels=True)
    return cfg, rec, Preprocessing.fit(cfg, rec)


def _collated(cfg, rec, prep, n: int = 6) -> dict:
    """A batch as training collates it: `n` records, then one that failed to load."""
    ds = RecordDataset(rec, prep, cfg.modalities, cfg)
    return Collate(prep, cfg.modalities, cfg)([ds[i] for i in range(n)] + [{"index": n, "error": "unreadable"}])


class _Reads(dict):
    """A batch that remembers which fields were read from it."""

    def __init__(self, *a):
        super().__init__(*a)
        self.read: set[str] = set()

    def __getitem__(self, k):
        self.read.add(k)
        return super().__getitem__(k)


def _encode(enc: nn.Module, batch: dict) -> Tokens:
    """`enc`'s tokens for `batch`, handed over as the network hands them (DiagnosisNet.encode)."""
    with torch.no_grad():
        return DiagnosisNet({enc.modality: enc.eval()}, nn.Identity(), 1).encode(batch)[enc.modality]


def check_encoder(enc: nn.Module, batch: dict) -> Tokens:
    """AssertionError where `enc` breaks the encoder contract, run on `batch` (a Collate batch); else
    its tokens."""
    keys = MODALITY_KEYS.get(getattr(enc, "modality", None))
    assert keys is not None, f"{type(enc).__name__}: modality {getattr(enc, 'modality', None)!r} is not declared"
    undeclared = sorted(set(enc.input_keys) - set(keys.inputs))
    assert not undeclared, f"{type(enc).__name__} reads {undeclared}, which the {keys.modality} batch does not declare"
    params = inspect.signature(enc.forward).parameters
    assert all(p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in params.values()), \
        f"{type(enc).__name__}.forward takes *args or **kwargs: what it reads is not declared"
    unlisted = sorted(set(params) - set(enc.input_keys))
    assert not unlisted, f"{type(enc).__name__}.forward takes {unlisted}, not in its input_keys"
    required = sorted(n for n, p in params.items() if p.default is p.empty and n not in keys.tensors)
    assert not required, f"{type(enc).__name__}.forward needs {required}, which not every batch carries"

    everything = _Reads(batch)  # every modality's fields, the labels, the errors
    _encode(enc, everything)
    assert everything.read <= set(keys.inputs), \
        f"{type(enc).__name__} was handed {sorted(everything.read - set(keys.inputs))} from the batch"
    t = _encode(enc, {k: batch[k] for k in keys.tensors})  # what every batch of the modality carries is enough
    B = len(batch["ok"])
    assert isinstance(t, Tokens), f"{type(enc).__name__} returns {type(t).__name__}, not Tokens"
    assert t.x.ndim == 3 and t.x.shape[0] == B and t.x.shape[2] == enc.output_dim, \
        f"{type(enc).__name__}: tokens {tuple(t.x.shape)}, declared [B={B}, N, output_dim={enc.output_dim}]"
    assert t.mask.dtype == torch.bool and t.mask.shape == t.x.shape[:2], f"mask {tuple(t.mask.shape)}"
    assert torch.isfinite(t.x).all(), f"{type(enc).__name__}: non-finite tokens"
    ok = batch["ok"]
    assert not t.present[~ok].any(), f"{type(enc).__name__}: a record that failed to load has {keys.modality}"
    assert t.present[ok].any(), f"{type(enc).__name__}: no record has {keys.modality}"
    return t


def check_fusion(cls, dims: dict[str, int], num_outputs: int = 2, B: int = 3) -> None:
    """AssertionError where a fusion head class fails on some subset of modalities: built over it from
    a fusion section, in training (modality dropout) and eval mode, with some or all of it absent."""
    fc = FusionConfig(dim=8, layers=1, heads=2, modality_dropout=0.5)
    for r in range(1, len(dims) + 1):
        for subset in combinations(dims, r):
            torch.manual_seed(0)
            toks = {m: Tokens(torch.randn(B, 2 + i, dims[m]), torch.ones(B, 2 + i, dtype=torch.bool))
                    for i, m in enumerate(subset)}
            first = subset[0]  # row 1: without the first modality; row 2: without any
            toks[first].mask[1] = False
            for t in toks.values():
                t.mask[2] = False
            try:
                head = cls.from_config(fc, {m: dims[m] for m in subset}, num_outputs)
                outs = [head.train(mode)(toks) for mode in (True, False)]
            except Exception as e:  # noqa: BLE001  (any failure is the head's, reported as which subset)
                raise AssertionError(f"{cls.__name__} over {list(subset)}: {type(e).__name__}: {e}") from e
            for z in outs:
                assert z.shape == (B, num_outputs), f"{cls.__name__} over {list(subset)}: logits {tuple(z.shape)}"
                assert torch.isfinite(z).all(), f"{cls.__name__} over {list(subset)}: non-finite logits"


@pytest.mark.parametrize("name, settings", [(n, s) for n in ENCODERS.names() for s in SELECTS.get(n, [None])])
def test_every_registered_encoder_keeps_the_contract(cohort, name, settings):
    assert settings is not None, f"encoder {name!r} is registered but has no settings here: add them to SELECTS"
    cls = ENCODERS.get(name)
    cfg, rec, prep = _fitted(cohort, **settings)
    m = cls.modality
    assert encoder_name(cfg, m) == name  # the settings select it, so build uses this very class
    torch.manual_seed(0)
    enc = build_encoder(cfg, m, prep)
    assert type(enc) is cls
    batch = _collated(cfg, rec, prep)
    tokens = check_encoder(enc, batch)
    # rebuilt as a saved model is loaded (its stored config, no hub or file), then given its weights:
    # the same parameters, and the same tokens
    stored = enc.config_dict() if hasattr(enc, "config_dict") else None
    again = build_encoder(cfg, m, prep, text_config=stored, offline=True)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in enc.state_dict().items()}
    again.load_state_dict(enc.state_dict())
    reloaded = _encode(again, {k: batch[k] for k in MODALITY_KEYS[m].tensors})
    assert torch.equal(reloaded.mask, tokens.mask) and torch.allclose(reloaded.x, tokens.x, atol=1e-6)


@pytest.mark.parametrize("name", FUSION_HEADS.names())
def test_every_registered_fusion_head_takes_any_subset_of_modalities(name):
    check_fusion(FUSION_HEADS.get(name), {"image": 10, "text": 6, "tabular": 4})


def test_collate_writes_what_each_modality_declares(cohort):
    cfg, rec, prep = _fitted(cohort)
    batch = _collated(cfg, rec, prep)
    declared = {k for m in cfg.modalities for keys in [MODALITY_KEYS[m]] for k in keys.tensors + keys.aside}
    written = set(batch) - set(COMMON)
    assert {k for m in cfg.modalities for k in MODALITY_KEYS[m].tensors} <= written <= declared
    # a feature cache's batch adds the cached fields, and only those
    items = [{"index": i, "error": None, "image": torch.zeros(1, 4, 2, 2), "text": prep.text.encode("a b"),
              "text_x": torch.zeros(3, 5), **prep.tabular.transform(rec.row(i))} for i in range(2)]
    cached = Collate(prep, cfg.modalities, cfg, image_stage=2)(items)
    assert set(cached) - set(batch) == {k for m in cfg.modalities for k in MODALITY_KEYS[m].cached}
    assert cached["image_stage"] == 2 and "image_stage" not in batch


def test_graph_inputs_and_attributed_fields_come_from_the_declaration():
    from explain.attribution import MODALITY_EXTRA, MODALITY_INPUTS
    from multimodal.model.export import INPUTS

    # exported graphs name their inputs in exports.json: this order is part of the file format
    assert INPUTS == ("image", "image_slot", "image_mask", "text_ids", "text_mask", "num", "num_missing", "cat")
    assert MODALITY_INPUTS == {"image": ("image",), "text": ("text_ids",), "tabular": ("num", "num_missing", "cat")}
    assert MODALITY_EXTRA == {"image": ("image_mask",), "text": ("text_mask",), "tabular": ()}


# -- the checks fail where they should ----------------------------------------------------------
class _Tabular(nn.Module):
    modality, input_keys = "tabular", TABULAR_KEYS.inputs

    def __init__(self, dim: int = 4):
        super().__init__()
        self.output_dim, self.proj = dim, nn.Linear(1, dim)

    def forward(self, num, num_missing, cat):
        x = self.proj(num[..., None])
        return Tokens(x, (num_missing < 0.5)[..., :x.shape[1]])


class _ReadsTheLabel(_Tabular):
    input_keys = TABULAR_KEYS.inputs + ("y",)

    def forward(self, num, num_missing, cat, y=None):
        return super().forward(num, num_missing, cat)


class _TakesAnyField(_Tabular):
    def forward(self, num, num_missing, cat, **more):
        return super().forward(num, num_missing, cat)


class _WrongWidth(_Tabular):
    def forward(self, num, num_missing, cat):
        t = super().forward(num, num_missing, cat)
        return Tokens(t.x[..., :2], t.mask)


class _PresentWhenFailed(_Tabular):
    def forward(self, num, num_missing, cat):
        t = super().forward(num, num_missing, cat)
        return Tokens(t.x, torch.ones_like(t.mask))


@pytest.mark.parametrize("rogue, says", [(_ReadsTheLabel, "reads ['y']"), (_TakesAnyField, "**kwargs"),
                                         (_WrongWidth, "output_dim=4"), (_PresentWhenFailed, "failed to load")])
def test_the_encoder_check_catches_a_broken_encoder(cohort, rogue, says):
    cfg, rec, prep = _fitted(cohort, modalities="tabular")
    batch = _collated(cfg, rec, prep)
    check_encoder(_Tabular(), batch)  # the same encoder, unbroken, passes
    with pytest.raises(AssertionError) as e:
        check_encoder(rogue(), batch)
    assert says in str(e.value)


class _NeedsEveryModality(nn.Module):
    def __init__(self, input_dims, num_outputs):
        super().__init__()
        self.out = nn.Linear(sum(input_dims.values()), num_outputs)

    @classmethod
    def from_config(cls, fc, input_dims, num_outputs):
        return cls(input_dims, num_outputs)

    def forward(self, tokens):
        return self.out(torch.cat([tokens[m].mean() for m in ("image", "text", "tabular")], 1))


def test_the_fusion_check_catches_a_head_that_needs_every_modality():
    with pytest.raises(AssertionError, match=r"over \['image'\]: KeyError"):
        check_fusion(_NeedsEveryModality, {"image": 10, "text": 6, "tabular": 4})
