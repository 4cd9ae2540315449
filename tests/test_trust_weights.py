"""Pretrained weights and encoder names from a config: strict, bounded, and checked before any file is
touched. A wrong file is a one-line refusal, never a network silently trained from random init."""
import json
import os
import signal

import pytest
import torch

from encoders.weights import WeightsError, resolve
from multimodal import DiagnosisModel, UserError

from conftest import SYNTH_CONFIG, TINY, one_line_error, run_cli

CFG = SYNTH_CONFIG


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MMDX_CACHE", str(tmp_path / "cache"))


def _timm_file(path, arch="test_resnet", drop=(), add=None):
    """A timm-layout safetensors of `arch`, less the tensors named in `drop`, plus `add`."""
    import timm
    from safetensors.torch import save_file

    sd = {k: v for k, v in timm.create_model(arch, pretrained=False).state_dict().items() if k not in drop}
    save_file(sd | (add or {}), str(path))
    return path


def _train(capsys, cohort, tmp_path, *overrides):
    return run_cli(capsys, "train", "--config", CFG, "--records", cohort["train"], "--out", tmp_path / "m",
                   *[f"{k}={json.dumps(v)}" for k, v in TINY.items()], *overrides)


# -- weights that do not fit the architecture ----------------------------------------------------------------------
@pytest.mark.parametrize("edit", [{"drop": ("layer1.0.conv1.weight",)},
                                  {"add": {"extra.weight": torch.zeros(3)}},
                                  {"arch": "resnet10t"}])
def test_image_weights_must_match_every_key_and_shape(capsys, cohort, tmp_path, edit):
    f = _timm_file(tmp_path / "w.safetensors", **edit)
    with pytest.raises(UserError, match="weights do not fit test_resnet"):
        DiagnosisModel.from_config(CFG, **(TINY | {"image.encoder": "test_resnet", "image.pretrained": str(f)})) \
            .fit(cohort["train"], cohort["val"], progress=False)
    code, _, err = _train(capsys, cohort, tmp_path, "image.encoder=test_resnet", f"image.pretrained={f}")
    one_line_error(code, err, "weights do not fit test_resnet")
    assert not (tmp_path / "m").exists()


def test_image_weights_that_fit_load_every_tensor(tmp_path):
    from encoders import ENCODERS

    import timm
    from safetensors.torch import save_file

    src = timm.create_model("test_resnet", pretrained=False, num_classes=7)  # another task's classifier
    for p in src.parameters():
        torch.nn.init.normal_(p)
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    enc = ENCODERS.create("timm", model_name="test_resnet", in_chans=1, image_size=32,
                          weights=resolve(str(tmp_path / "w.safetensors"), "test_resnet"))
    got, ref = enc.backbone.state_dict(), src.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in got.items() if k != "conv1.0.weight")
    assert torch.allclose(got["conv1.0.weight"], ref["conv1.0.weight"].sum(1, keepdim=True))  # stem folded


# -- image.pretrained that is not a regular file, or far too big ---------------------------------------------------
def test_a_device_or_huge_file_is_refused_before_it_is_read(capsys, cohort, tmp_path):
    def stuck(*_):
        raise TimeoutError("image.pretrained=/dev/zero is still being read")

    old = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(30)
    try:
        with pytest.raises(WeightsError, match="/dev/zero is not a regular file"):
            resolve("/dev/zero", "test_resnet")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    huge = tmp_path / "huge.safetensors"
    with open(huge, "wb") as f:  # sparse: no disk used, and never read
        f.truncate(9 << 30)
    with pytest.raises(WeightsError, match="over the 8 GiB"):
        resolve(str(huge), "test_resnet")
    os.mkfifo(tmp_path / "pipe.pth")
    code, _, err = _train(capsys, cohort, tmp_path, "image.encoder=test_resnet",
                          f"image.pretrained={tmp_path / 'pipe.pth'}")
    one_line_error(code, err, "pipe.pth is not a regular file")


# -- image.encoder is a name, checked before any file is written ---------------------------------------------------
@pytest.mark.parametrize("name", ["../../escaped", "hf-hub:timm/resnet10t.c3_in1k", "/tmp/x"])
def test_encoder_name_is_checked_before_any_file_is_written(capsys, cohort, tmp_path, name):
    f = _timm_file(tmp_path / "w.safetensors")
    before = {p for p in tmp_path.rglob("*")}
    code, _, err = _train(capsys, cohort, tmp_path, f"image.encoder={name}", f"image.pretrained={f}")
    one_line_error(code, err, "is not a timm architecture name")
    assert {p for p in tmp_path.rglob("*")} - before <= {tmp_path / "cache"}, "a file was written"


# -- text architectures that can load something remote -------------------------------------------------------------
@pytest.mark.parametrize("hf_config", [{"model_type": "detr", "use_timm_backbone": False, "backbone": "resnet50"},
                                       {"model_type": "timm_wrapper", "architecture": "resnet18"},
                                       {"model_type": "bert", "hidden_size": 16, "num_attention_heads": 2,
                                        "attn_implementation": "kernels-community/flash-attn"},
                                       {"model_type": "bert", "hidden_size": 16, "num_attention_heads": 2,
                                        "quantization_config": {"quant_method": "bitsandbytes"}}])
def test_text_architecture_outside_the_allowlist_is_refused_at_train(capsys, cohort, tmp_path, hf_config):
    code, _, err = _train(capsys, cohort, tmp_path, "modalities=text,tabular", "text.encoder=hf",
                          f"text.hf_config={json.dumps(hf_config)}")
    one_line_error(code, err, "text encoder")
    assert "is not one mmdx builds" in err or "is not allowed" in err
    model = DiagnosisModel.from_config(CFG, **(TINY | {"modalities": "text,tabular", "text.encoder": "hf",
                                                       "text.hf_config": hf_config}))
    with pytest.raises(UserError, match="text encoder"):
        model.fit(cohort["train"], cohort["val"], progress=False)
