"""Encoders declare token dims and masks; fusion ignores what the mask says is absent."""
import pytest
import torch

from encoders import ENCODERS, Tokens
from fusion import FUSION_HEADS, drop_modalities


def test_timm_encoder_tokens_per_view_and_view_mask():
    enc = ENCODERS.create("timm", model_name="test_resnet", in_chans=1, image_size=64, token_grid=2).eval()
    images = torch.randn(3, 2, 1, 64, 64)
    mask = torch.tensor([[True, True], [True, False], [False, False]])
    t = enc(images, mask)
    T = enc.tokens_per_image
    assert T == 4 and t.x.shape == (3, 2 * T, enc.output_dim)
    assert t.mask.tolist() == [[True] * 2 * T, [True] * T + [False] * T, [False] * 2 * T]
    assert torch.all(t.x[2] == 0) and torch.all(t.x[1, T:] == 0)
    # a view's tokens depend only on that view
    images2 = images.clone()
    images2[0, 1] += 1
    assert torch.allclose(enc(images2, mask).x[0, :T], t.x[0, :T])


def test_timm_encoder_loads_local_checkpoint(tmp_path):
    import timm
    from safetensors.torch import save_file

    from encoders.weights import resolve

    src = timm.create_model("test_resnet", in_chans=1, num_classes=0, global_pool="")
    save_file(src.state_dict(), tmp_path / "w.safetensors")
    enc = ENCODERS.create("timm", model_name="test_resnet", in_chans=1, image_size=32,
                          weights=resolve(str(tmp_path / "w.safetensors"), "test_resnet"))
    for k, v in src.state_dict().items():
        assert torch.equal(enc.backbone.state_dict()[k], v)


@pytest.mark.parametrize("name, kw", [
    ("lstm", {"vocab_size": 50, "embed_dim": 8, "hidden_dim": 6}),
    ("hf", {"config": {"model_type": "bert", "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "intermediate_size": 32}}),
])
def test_text_encoders_shape_and_mask(name, kw):
    enc = ENCODERS.create(name, **kw).eval()
    ids = torch.randint(1, 50, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2] = False  # empty report
    t = enc(ids, mask)
    assert t.x.shape == (3, 7, enc.output_dim) and torch.equal(t.mask, mask)
    assert torch.isfinite(t.x).all() and t.present.tolist() == [True, True, False]


def test_hf_encoder_from_local_pretrained_folder(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path / "bert")
    enc = ENCODERS.create("hf", pretrained=str(tmp_path / "bert")).eval()
    ref = BertModel.from_pretrained(tmp_path / "bert").eval()
    ids = torch.randint(1, 40, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.bool)
    assert torch.allclose(enc(ids, mask).x, ref(input_ids=ids).last_hidden_state, atol=1e-6)


def test_tabular_one_token_per_feature_and_absent_when_all_missing():
    enc = ENCODERS.create("tabular", n_numeric=2, cardinalities=[3, 4], dim=8)
    num = torch.tensor([[0.5, -1.0], [0.0, 0.0]])
    missing = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    cat = torch.tensor([[1, 0], [0, 0]])
    t = enc(num, missing, cat)
    assert t.x.shape == (2, 4, 8) and t.present.tolist() == [True, False]


def _tokens(B=4):
    torch.manual_seed(0)
    return {"image": Tokens(torch.randn(B, 6, 10), torch.ones(B, 6, dtype=torch.bool)),
            "text": Tokens(torch.randn(B, 5, 12), torch.ones(B, 5, dtype=torch.bool)),
            "tabular": Tokens(torch.randn(B, 3, 8), torch.ones(B, 3, dtype=torch.bool))}


@pytest.mark.parametrize("head", ["attention", "concat", "additive"])
@pytest.mark.parametrize("missing", ["image", "text", "tabular"])
def test_fusion_ignores_absent_modality(head, missing):
    toks = _tokens()
    f = FUSION_HEADS.create(head, input_dims={m: t.x.shape[-1] for m, t in toks.items()}, num_outputs=2,
                            dim=16, layers=1, heads=2).eval()
    toks[missing] = Tokens(toks[missing].x, torch.zeros_like(toks[missing].mask))
    out = f(toks)
    garbage = dict(toks)
    garbage[missing] = Tokens(torch.randn_like(toks[missing].x) * 100, toks[missing].mask)
    assert torch.isfinite(out).all() and out.shape == (4, 2)
    assert torch.allclose(f(garbage), out, atol=1e-5)
    # while a present modality does change the output
    other = next(m for m in toks if m != missing)
    changed = dict(toks)
    changed[other] = Tokens(toks[other].x + 1, toks[other].mask)
    assert not torch.allclose(f(changed), out)


def test_attention_fusion_all_modalities_absent_still_finite_and_attention_split():
    toks = {m: Tokens(t.x, torch.zeros_like(t.mask)) for m, t in _tokens().items()}
    f = FUSION_HEADS.create("attention", input_dims={m: t.x.shape[-1] for m, t in toks.items()},
                            num_outputs=1, dim=16, layers=2, heads=2).eval()
    assert torch.isfinite(f(toks)).all()
    f(_tokens(), return_attention=True)
    att = f.last_attention
    assert {m: a.shape[1] for m, a in att.items()} == {"image": 6, "text": 5, "tabular": 3}
    total = sum(a.sum(1) for a in att.values())
    assert torch.all(total < 1.0 + 1e-5)  # the rest goes to CLS itself


def test_modality_dropout_keeps_one_present_modality():
    toks = _tokens(B=500)
    toks["text"] = Tokens(toks["text"].x, torch.zeros_like(toks["text"].mask))  # nobody has text
    out = drop_modalities(toks, p=0.9)
    present = torch.stack([t.present for t in out.values()], 1)
    assert present.any(1).all() and not present[:, 1].any()
    assert 0.05 < present.float().mean() < 0.6


def test_timm_encoder_runs_channels_last_with_the_numbers_of_plain_nchw():
    import timm

    torch.manual_seed(0)
    enc = ENCODERS.create("timm", model_name="resnet10t", in_chans=3, image_size=64, token_grid=1).eval()
    conv = next(p for p in enc.backbone.parameters() if p.ndim == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    plain = timm.create_model("resnet10t", pretrained=False, num_classes=0, in_chans=3).eval()
    plain.load_state_dict({k: v.contiguous() for k, v in enc.backbone.state_dict().items()})
    x = torch.rand(3, 1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(enc(x, torch.ones(3, 1, dtype=torch.bool)).x[:, 0], plain(x[:, 0]),
                                   atol=1e-5, rtol=1e-4)


def test_additive_fusion_is_the_sum_of_per_modality_logits():
    """No interaction: changing one modality moves the logit by the same amount whatever the others hold."""
    toks = _tokens()
    f = FUSION_HEADS.create("additive", input_dims={m: t.x.shape[-1] for m, t in toks.items()}, num_outputs=1,
                            dim=16).eval()
    moved = dict(toks, text=Tokens(toks["text"].x * 2 + 1, toks["text"].mask))
    other = dict(toks, image=Tokens(-toks["image"].x, toks["image"].mask))
    other_moved = dict(other, text=moved["text"])
    torch.testing.assert_close(f(moved) - f(toks), f(other_moved) - f(other), atol=1e-5, rtol=0)
    assert not torch.allclose(f(moved), f(toks))


def _two_views(n: int = 64, seed: int = 0):
    """Image tokens of 2 views x 3 cells; the label is which view a marked token sits in."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, 8, generator=g) * 0.1
    y = torch.randint(0, 2, (n,), generator=g)
    cell = torch.randint(0, 3, (n,), generator=g)
    x[torch.arange(n), y * 3 + cell, 0] += 3.0  # the same mark, in view 0 or view 1
    return {"image": Tokens(x, torch.ones(n, 6, dtype=torch.bool))}, y


@pytest.mark.parametrize("positions", [True, False])
def test_attention_fusion_tells_views_and_cells_apart_only_with_token_positions(positions):
    """fusion.token_positions: with view and cell embeddings, moving tokens to another view or cell
    changes the output, and a head trained on a label that is *which view* shows a mark learns it;
    without them the head sees a bag, is blind to the move and cannot learn the label."""
    torch.manual_seed(0)
    f = FUSION_HEADS.create("attention", input_dims={"image": 8}, num_outputs=1, dim=16, layers=1, heads=2,
                            dropout=0.0, layouts={"image": (2, 3)} if positions else None)
    toks, y = _two_views()
    opt = torch.optim.Adam(f.parameters(), lr=0.01)
    for _ in range(150):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(f(toks)[:, 0], y.float())
        loss.backward()
        opt.step()
    f.eval()
    test, yt = _two_views(200, seed=1)
    from sklearn.metrics import roc_auc_score

    auc = roc_auc_score(yt.numpy(), f(test)[:, 0].detach().numpy())
    swapped = {"image": Tokens(test["image"].x[:, [3, 4, 5, 0, 1, 2]], test["image"].mask)}
    moved = not torch.allclose(f(swapped), f(test), atol=1e-5)
    if positions:
        assert auc > 0.95 and moved, auc
    else:
        assert auc < 0.65 and not moved, auc


def test_token_positions_follow_the_image_encoders_layout(cohort):
    from conftest import SYNTH_CONFIG, TINY
    from multimodal import DiagnosisModel
    from multimodal.data.preprocess import Preprocessing
    from multimodal.model.build import build_network

    for on in (True, False):
        m = DiagnosisModel.from_config(SYNTH_CONFIG, **(TINY | {"fusion.token_positions": on, "image.max_images": 3,
                                                                "image.token_grid": 2, "image.size": 64}))
        prep = Preprocessing.fit(m.config, m.records(cohort["train"], labels=True))
        head = build_network(m.config, prep).fusion
        names = {n for n, _ in head.named_parameters()}
        if on:
            assert head.view_embed["image"].shape == (3, m.config.fusion.dim)
            assert head.cell_embed["image"].shape == (4, m.config.fusion.dim)  # a 2 x 2 grid
            assert not any("text" in n or "tabular" in n for n in names if "_embed." in n)
        else:
            assert not any("view_embed" in n or "cell_embed" in n for n in names)


def test_a_model_directory_from_before_token_positions_loads_as_it_was_built(cohort, tmp_path):
    """Format 1 directories have no view or cell embeddings and no fusion.token_positions: they are
    read as built (without them), not refused for tensors they never had."""
    import json

    import numpy as np
    from safetensors.torch import load_file, save_file

    from conftest import SYNTH_CONFIG, TINY
    from multimodal import DiagnosisModel
    from test_model_dir_trust import rehash

    m = DiagnosisModel.from_config(SYNTH_CONFIG, **(TINY | {"fusion.token_positions": False}))
    m.fit(cohort["train"], cohort["val"], progress=False)
    d = m.save(tmp_path / "old")
    head = json.loads((d / "config.json").read_text())
    head["format_version"] = 1
    del head["config"]["fusion"]["token_positions"]
    (d / "config.json").write_text(json.dumps(head))
    tensors = load_file(d / "model.safetensors")
    assert not any("view_embed" in k for k in tensors)
    save_file(tensors, d / "model.safetensors")
    rehash(d)
    before = m.predict(cohort["test"])
    after = DiagnosisModel.load(d).predict(cohort["test"])
    cols = [c for c in before if c.startswith("prob_")]
    assert np.array_equal(before[cols].to_numpy(), after[cols].to_numpy())
