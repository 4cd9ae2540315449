"""A model directory is data, not code: loading it reaches no network, runs nothing from it, reads no
foreign folder, and refuses files its manifest does not vouch for (findings 2, 3, 7 and 9 of #8)."""
import hashlib
import json
import socket

import pandas as pd
import pytest

from multimodal import DiagnosisModel, UserError
from multimodal.cli import main

from conftest import REPO, SYNTH_CONFIG


def rehash(d):
    """What an attacker (or a careless edit) does after changing a file: recompute the manifest."""
    sums = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.iterdir()) if p.is_file() and p.name != "checksums.json"}
    (d / "checksums.json").write_text(json.dumps(sums))


def edit_json(path, fn):
    obj = json.loads(path.read_text())
    fn(obj)
    path.write_text(json.dumps(obj))


@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to open a connection or resolve a host is recorded and fails."""
    attempts = []

    def refuse(*a, **k):
        attempts.append(a[:2])
        raise OSError("network blocked by test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # an attacker's config must not depend on the user's env
    return attempts


@pytest.fixture
def evil_folder(tmp_path):
    """A transformers folder whose custom code, if ever imported, leaves a marker file."""
    d = tmp_path / "evil"
    d.mkdir()
    marker = tmp_path / "PWNED"
    (d / "evil_model.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                     "from transformers import BertModel as EvilModel\n")
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1,
                                               "num_attention_heads": 2, "intermediate_size": 32, "vocab_size": 50,
                                               "auto_map": {"AutoModel": "evil_model.EvilModel"}}))
    return d, marker


@pytest.fixture
def opened(monkeypatch):
    """Paths passed to open(): loading may read the model directory and the records, nothing foreign."""
    import builtins
    import io

    seen, real = [], builtins.open

    def spy(file, *a, **k):
        seen.append(str(file))
        return real(file, *a, **k)

    monkeypatch.setattr(builtins, "open", spy)
    monkeypatch.setattr(io, "open", spy)
    return seen


def _attack(d, config_edit=None, prep_edit=None):
    if config_edit:
        edit_json(d / "config.json", config_edit)
    if prep_edit:
        edit_json(d / "preprocessing.json", prep_edit)
    rehash(d)


def _set(*path_value):
    def fn(obj):
        for path, value in path_value:
            node = obj
            for k in path[:-1]:
                node = node.setdefault(k, {})
            node[path[-1]] = value
    return fn


@pytest.mark.parametrize("attack", ["text_hub_id", "text_folder_remote_code", "text_config_auto_map",
                                    "timm_hf_hub", "timm_local_dir"])
def test_loading_reaches_no_network_and_runs_no_foreign_code(tiny_model, cohort, tmp_path, no_network,
                                                             evil_folder, opened, attack):
    folder, marker = evil_folder
    d = tiny_model.save(tmp_path / "m")
    evil_cfg = json.loads((folder / "config.json").read_text()) | {"_name_or_path": str(folder)}
    edits = {
        "text_hub_id": (_set((["config", "text", "encoder"], "hf"), (["config", "text", "pretrained"],
                                                                     "bert-base-uncased")),
                        _set((["text_encoder_config"], None))),
        "text_folder_remote_code": (_set((["config", "text", "encoder"], "hf"),
                                         (["config", "text", "pretrained"], str(folder))),
                                    _set((["text_encoder_config"], None))),
        "text_config_auto_map": (_set((["config", "text", "encoder"], "hf")),
                                 _set((["text_encoder_config"], evil_cfg))),
        "timm_hf_hub": (_set((["config", "image", "encoder"], "hf-hub:timm/resnet10t.c3_in1k"),
                             (["config", "image", "pretrained"], True)), None),
        "timm_local_dir": (_set((["config", "image", "encoder"], f"local-dir:{folder}"),
                                (["config", "image", "pretrained"], True)), None),
    }[attack]
    _attack(d, *edits)
    opened.clear()
    try:
        DiagnosisModel.load(d).predict(cohort["test"])
    except UserError:
        pass  # refusing is fine; reaching out or running code is not
    assert no_network == [], f"network attempts: {no_network}"
    assert not marker.exists(), "code from a foreign folder ran"
    assert not [f for f in opened if str(folder) in f], "a foreign folder was read at load"


def test_predict_cli_with_hub_config_is_one_line(capsys, tiny_model, cohort, tmp_path, no_network):
    d = tiny_model.save(tmp_path / "m")
    _attack(d, _set((["config", "image", "encoder"], "hf-hub:timm/resnet10t.c3_in1k")))
    code = main(["predict", "--model", str(d), "--records", str(cohort["test"]), "--out", str(tmp_path / "p.csv")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("mmdx: error:") and "not a timm architecture" in err and len(err.splitlines()) == 1
    assert no_network == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # the network failed to build: no job folder left


@pytest.mark.parametrize("text_config", [
    {"model_type": "detr", "use_timm_backbone": False, "backbone": "facebook/resnet-50", "use_pretrained_backbone": True},
    {"model_type": "timm_wrapper", "architecture": "resnet18", "pretrained_cfg": {"hf_hub_id": "timm/resnet18.a1_in1k"}},
    {"model_type": "bert", "hidden_size": 16, "num_attention_heads": 2, "attn_implementation": "kernels-community/x"},
])
def test_stored_text_architecture_outside_the_allowlist_is_one_line(capsys, tiny_model, cohort, tmp_path,
                                                                     no_network, text_config):
    d = tiny_model.save(tmp_path / "m")
    _attack(d, _set((["config", "text", "encoder"], "hf")), _set((["text_encoder_config"], text_config)))
    err = _cli_error(capsys, d, cohort, tmp_path)
    assert "is not one mmdx builds" in err or "is not allowed" in err
    assert no_network == []


# -- 3: the manifest must vouch for every file ---------------------------------------------------------------------
def test_manifest_must_list_every_file(tiny_model, tmp_path):
    d = tiny_model.save(tmp_path / "m")
    sums = json.loads((d / "checksums.json").read_text())
    (d / "checksums.json").write_text("{}")
    with pytest.raises(UserError, match="not listed"):
        DiagnosisModel.load(d)
    (d / "checksums.json").write_text(json.dumps({k: v for k, v in sums.items() if k != "metrics.json"}))
    with pytest.raises(UserError, match="metrics.json is not listed"):
        DiagnosisModel.load(d)
    (d / "checksums.json").write_text(json.dumps(sums))
    (d / "extra.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="extra.bin is not listed"):
        DiagnosisModel.load(d)
    (d / "extra.bin").unlink()
    (d / "tokenizer.json").unlink()
    rehash(d)
    with pytest.raises(UserError, match="tokenizer.json is missing"):
        DiagnosisModel.load(d)


def test_edited_image_root_does_not_redirect_reads(tiny_model, cohort, tmp_path):
    d = tiny_model.save(tmp_path / "m")
    want = DiagnosisModel.load(d).predict(cohort["test"])
    _attack(d, _set((["config", "data", "image_root"], str(tmp_path / "elsewhere"))))
    got = DiagnosisModel.load(d).predict(cohort["test"])
    assert (got["status"] == "ok").all()
    pd.testing.assert_frame_equal(got, want)


# -- 9: model-directory mistakes are one line, not a traceback -----------------------------------------------------
def _cli_error(capsys, d, cohort, tmp_path):
    code = main(["predict", "--model", str(d), "--records", str(cohort["test"]), "--out", str(tmp_path / "p.csv")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("mmdx: error:") and len(err.strip().splitlines()) == 1, err
    return err


def test_weights_that_do_not_fit_the_config(capsys, tiny_model, cohort, tmp_path):
    d = tiny_model.save(tmp_path / "m")
    _attack(d, _set((["config", "fusion", "dim"], 32)))
    assert "model.safetensors does not fit" in _cli_error(capsys, d, cohort, tmp_path)


def test_broken_tokenizer_is_refused_at_load(capsys, tiny_model, cohort, tmp_path):
    d = tiny_model.save(tmp_path / "m")
    edit_json(d / "tokenizer.json", _set((["model", "unk_token"], "[NOT-IN-VOCAB]")))
    rehash(d)
    assert "tokenizer.json is not a usable tokenizer" in _cli_error(capsys, d, cohort, tmp_path)
    (d / "tokenizer.json").unlink()
    rehash(d)
    assert "tokenizer.json is missing" in _cli_error(capsys, d, cohort, tmp_path)


def test_not_valid_json_is_one_line(capsys, tiny_model, cohort, tmp_path):
    d = tiny_model.save(tmp_path / "m")
    (d / "preprocessing.json").write_text("{not json")
    rehash(d)
    assert "preprocessing.json is not valid JSON" in _cli_error(capsys, d, cohort, tmp_path)


# -- 7: training-set identifiers stay out of the model directory ---------------------------------------------------
def test_identifiers_of_one_patient_do_not_travel_with_the_model(cohort):
    from multimodal.config import load_config
    from multimodal.data.preprocess import Preprocessing
    from multimodal.data.records import load_records

    cfg = load_config(SYNTH_CONFIG, {"text.vocab_size": 2000})
    df = pd.read_csv(cohort["train"], dtype=str)
    df.loc[0, "report_text"] = str(df.loc[0, "report_text"]) + " Patient Quixotely Zanzibarson MRN 48213377"
    cat = cfg.tabular.categorical[0]
    df.loc[1, cat] = "Quixotely-Ward-7"
    prep = Preprocessing.fit(cfg, load_records(df, cfg, labels=True))
    stored = prep.text.to_json().lower() + json.dumps(prep.state()).lower()
    for secret in ("quixotely", "zanzibarson", "48213377", "ward-7"):
        assert secret not in stored, secret
    assert "lesion" in prep.text.tokenizer.get_vocab() or prep.text.vocab_size > 100  # common words still learnt
    scrubbed = load_config(SYNTH_CONFIG, {"text.scrub": True, "text.min_doc_freq": 1})
    df.loc[5:, "report_text"] = df.loc[5:, "report_text"].astype(str) + " seen 20190412"
    vocab = Preprocessing.fit(scrubbed, load_records(df, scrubbed, labels=True)).text.tokenizer.get_vocab()
    assert "20190412" not in vocab and "seen" in vocab


# -- an edited architecture is checked against the stored weights before it gets any memory -----------------------
def test_oversized_architecture_is_refused_before_it_is_built(tiny_model, tmp_path):
    import subprocess
    import sys

    d = tiny_model.save(tmp_path / "m")
    probe = ("import resource, sys\nfrom multimodal import DiagnosisModel, UserError\n"
             "try:\n    DiagnosisModel.load(sys.argv[1])\nexcept UserError as e:\n    print('refused:', e)\n"
             "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)\n")

    def peak_rss_mb():
        return subprocess.run([sys.executable, "-c", probe, str(d)], capture_output=True, text=True, timeout=300,
                              cwd=REPO, env={**__import__("os").environ, "PYTHONPATH": str(REPO)}).stdout.splitlines()

    honest = int(peak_rss_mb()[-1])  # what importing torch and loading the true model costs on this machine
    _attack(d, _set((["config", "fusion", "dim"], 12000)))  # ~4.7 GB of fusion weights if built
    out = peak_rss_mb()
    assert int(out[-1]) < honest + 1000, f"peak RSS {out[-1]} MB against {honest} MB for the true model: " \
                                         "the network was built before its weights were checked"
    assert out[0].startswith("refused:") and "model.safetensors does not fit" in out[0], out
    assert "(3, 12000)" in out[0]


@pytest.mark.parametrize("edit", [(["config", "fusion", "layers"], 10 ** 6), (["config", "text", "layers"], 10 ** 6)])
def test_a_layer_count_no_stored_file_can_fill_is_refused_before_any_build(capsys, tiny_model, cohort, tmp_path,
                                                                           monkeypatch, edit):
    from multimodal.model import build

    d = tiny_model.save(tmp_path / "m")
    _attack(d, _set(edit))
    monkeypatch.setattr(build, "build_network", lambda *a, **k: pytest.fail("built before the check"))
    assert "asks for 1000000 layers" in _cli_error(capsys, d, cohort, tmp_path)


# -- every file of the model directory gets the mode the umask gives ---------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_model_files_share_one_mode(tiny_model, tmp_path, umask):
    import os
    import stat

    old = os.umask(umask)
    try:
        d = tiny_model.save(tmp_path / "m")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in d.iterdir()}
    assert set(modes.values()) == {0o666 & ~umask}, {k: oct(v) for k, v in modes.items()}


# -- an edited tokenizer.json is the model's one-line error, not torch's traceback --------------------------------
@pytest.mark.parametrize("shift", [1, 1000])
def test_tokenizer_with_shifted_ids_is_one_line(capsys, tiny_model, cohort, tmp_path, shift):
    d = tiny_model.save(tmp_path / "m")
    edit_json(d / "tokenizer.json",
              lambda t: t["model"].update(vocab={k: v + shift for k, v in t["model"]["vocab"].items()}))
    rehash(d)
    assert "tokenizer.json does not fit the model" in _cli_error(capsys, d, cohort, tmp_path)
