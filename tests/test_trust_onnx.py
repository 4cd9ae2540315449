"""An ONNX file runs only if the model directory vouches for its exact bytes: its sha256, recorded by
export in exports.json (covered by checksums.json). Anything the file says about itself is ignored."""
import hashlib
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from multimodal import DiagnosisModel

from conftest import SYNTH_CONFIG, TINY, one_line_error, run_cli

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
GRID = {"text.encoder": "bow", "image.size": 64, "image.token_grid": 2}  # a model export can trace


@pytest.fixture(scope="module")
def exported(cohort, tmp_path_factory):
    """Two models of one architecture (seeds 0 and 5), each exported beside its directory."""
    root = tmp_path_factory.mktemp("onnx")
    out = {}
    for name, seed in (("a", 0), ("b", 5)):
        d = DiagnosisModel.from_config(SYNTH_CONFIG, **(TINY | GRID | {"train.seed": seed})) \
            .fit(cohort["train"], cohort["val"], progress=False).save(root / name)
        DiagnosisModel.load(d).export_onnx(root / f"{name}.onnx", cohort["val"])
        out[name] = (d, root / f"{name}.onnx")
    return out


def _predict(capsys, model_dir, onnx_file, cohort, out):
    return run_cli(capsys, "predict", "--model", model_dir, "--records", cohort["test"], "--out", out,
                   "--onnx", onnx_file, "--quiet")


def _refused(capsys, exported, cohort, tmp_path, forged, needle="was not exported from"):
    d, _ = exported["a"]
    code, _, err = _predict(capsys, d, forged, cohort, tmp_path / "p.csv")
    one_line_error(code, err, needle)
    assert not (tmp_path / "p.csv").exists()


def test_the_recorded_export_runs_and_the_record_is_covered_by_the_checksums(capsys, exported, cohort, tmp_path):
    d, f = exported["a"]
    recs = json.loads((d / "exports.json").read_text())
    assert list(recs) == [hashlib.sha256(f.read_bytes()).hexdigest()]
    assert json.loads((d / "checksums.json").read_text())["exports.json"] == \
        hashlib.sha256((d / "exports.json").read_bytes()).hexdigest()
    code, _, err = _predict(capsys, d, f, cohort, tmp_path / "p.csv")
    assert code == 0, err
    eager = DiagnosisModel.load(d).predict(cohort["test"])
    np.testing.assert_allclose(pd.read_csv(tmp_path / "p.csv")["prob_1"], eager["prob_1"], atol=1e-5)


def test_an_edited_initializer_is_refused(capsys, exported, cohort, tmp_path):
    """Every patient p = 1.0: the calibration bias pushed up, the file's own metadata kept as it was."""
    _, f = exported["a"]
    m = onnx.load(str(f))
    bias = next(t for t in m.graph.initializer if t.name.endswith("logit_bias"))
    arr = onnx.numpy_helper.to_array(bias) + 100.0
    bias.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), bias.name))
    onnx.save(m, str(tmp_path / "forged.onnx"))
    _refused(capsys, exported, cohort, tmp_path, tmp_path / "forged.onnx")


def test_another_models_graph_is_refused_even_with_this_models_hash_inside(capsys, exported, cohort, tmp_path):
    (a, _), (_, fb) = exported["a"], exported["b"]
    m = onnx.load(str(fb))
    weights = json.loads((a / "checksums.json").read_text())["model.safetensors"]
    onnx.helper.set_model_props(m, {"mmdx_weights_sha256": weights, "mmdx_inputs": "image,image_slot,image_mask,"
                                    "text_ids,text_mask,num,num_missing,cat"})
    onnx.save(m, str(tmp_path / "other.onnx"))
    _refused(capsys, exported, cohort, tmp_path, tmp_path / "other.onnx")
    _refused(capsys, exported, cohort, tmp_path, fb)  # as exported, for b


@pytest.mark.parametrize("props", [{"mmdx_inputs": "nonsense,,"}, {"mmdx_weights_sha256": "WEIGHTS"},
                                   {"mmdx_weights_sha256": "WEIGHTS", "mmdx_inputs": "num,cat"}])
def test_edited_onnx_metadata_is_one_line(capsys, exported, cohort, tmp_path, props):
    d, f = exported["a"]
    weights = json.loads((d / "checksums.json").read_text())["model.safetensors"]
    m = onnx.load(str(f))
    del m.metadata_props[:]
    onnx.helper.set_model_props(m, {k: v.replace("WEIGHTS", weights) for k, v in props.items()})
    onnx.save(m, str(tmp_path / "meta.onnx"))
    _refused(capsys, exported, cohort, tmp_path, tmp_path / "meta.onnx")


def _huge_graph(path, props):
    """A few hundred bytes that ask ONNX Runtime for 16 GB (ConstantOfShape to [4, 1024, 1024, 1024]),
    carrying the metadata an earlier mmdx trusted."""
    from onnx import TensorProto, helper, numpy_helper

    shape = numpy_helper.from_array(np.array([4, 1024, 1024, 1024], np.int64), "shape")
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["big"],
                              value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
             helper.make_node("ReduceSum", ["big"], ["logits"], keepdims=0)]
    graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
                              initializer=[shape])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(m, props)
    onnx.save(m, str(path))
    return path


def test_a_graph_that_allocates_without_bound_is_never_parsed(capsys, exported, cohort, tmp_path):
    d, f = exported["a"]
    weights = json.loads((d / "checksums.json").read_text())["model.safetensors"]
    props = {p.key: p.value for p in onnx.load(str(f)).metadata_props} or {"mmdx_weights_sha256": weights,
                                                                          "mmdx_inputs": "num"}
    _refused(capsys, exported, cohort, tmp_path, _huge_graph(tmp_path / "huge.onnx", props))


def test_a_recorded_size_is_checked_before_the_file_is_read(capsys, exported, cohort, tmp_path, monkeypatch):
    import encoders.weights

    _, f = exported["a"]
    big = tmp_path / "big.onnx"
    with open(big, "wb") as fh:  # sparse: 9 GiB that must never be hashed
        fh.truncate(9 << 30)
    monkeypatch.setattr(encoders.weights, "sha256_file", lambda *a, **k: pytest.fail("hashed"))
    _refused(capsys, exported, cohort, tmp_path, big, needle="over the 8 GiB")
    with open(big, "wb") as fh:
        fh.truncate(f.stat().st_size + 1)
    _refused(capsys, exported, cohort, tmp_path, big)


def test_an_edited_exports_record_is_one_line(capsys, exported, cohort, tmp_path):
    d, f = exported["a"]
    copy = tmp_path / "m"
    shutil.copytree(d, copy)
    (copy / "exports.json").write_text(json.dumps({hashlib.sha256(f.read_bytes()).hexdigest(): {"inputs": 3}}))
    code, _, err = _predict(capsys, copy, f, cohort, tmp_path / "p.csv")
    one_line_error(code, err, "exports.json does not match its recorded checksum")
    sums = json.loads((copy / "checksums.json").read_text())
    sums["exports.json"] = hashlib.sha256((copy / "exports.json").read_bytes()).hexdigest()
    (copy / "checksums.json").write_text(json.dumps(sums))
    code, _, err = _predict(capsys, copy, f, cohort, tmp_path / "p.csv")
    one_line_error(code, err, "exports.json is not an ONNX sha256")
    (copy / "exports.json").write_text(json.dumps({hashlib.sha256(f.read_bytes()).hexdigest():
                                                   {"bytes": f.stat().st_size, "inputs": ["num"]}}))
    sums["exports.json"] = hashlib.sha256((copy / "exports.json").read_bytes()).hexdigest()
    (copy / "checksums.json").write_text(json.dumps(sums))
    code, _, err = _predict(capsys, copy, f, cohort, tmp_path / "p.csv")
    one_line_error(code, err, "the graph's inputs are not the ones")


def test_retraining_forgets_earlier_exports(capsys, exported, cohort, tmp_path):
    d, f = exported["a"]
    again = tmp_path / "m"
    shutil.copytree(d, again)
    DiagnosisModel.load(again).save(again, overwrite=True)  # what train --overwrite writes: no exports.json
    code, _, err = _predict(capsys, again, f, cohort, tmp_path / "p.csv")
    one_line_error(code, err, "was not exported from")


def test_a_graph_recorded_by_an_edited_directory_cannot_take_the_machines_memory(capsys, exported, cohort,
                                                                                 tmp_path):
    """Someone who edits exports.json and checksums.json can make any graph run; ONNX Runtime's arena is
    capped at half the machine's memory, so one that asks for 60% of it fails in one line."""
    import os

    from onnx import TensorProto, helper, numpy_helper

    d, _ = exported["a"]
    copy = tmp_path / "m"
    shutil.copytree(d, copy)
    floats = int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 0.6) // 4
    shape = numpy_helper.from_array(np.array([floats // 2**20, 2**20], np.int64), "shape")
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["big"],
                              value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
             helper.make_node("ReduceSum", ["big"], ["s"], keepdims=1),
             helper.make_node("Add", ["num", "s"], ["logits"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("num", TensorProto.FLOAT, ["batch", None])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], initializer=[shape])
    big = tmp_path / "big.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(big))
    (copy / "exports.json").write_text(json.dumps({hashlib.sha256(big.read_bytes()).hexdigest():
                                                   {"bytes": big.stat().st_size, "inputs": ["num"]}}))
    sums = json.loads((copy / "checksums.json").read_text())
    sums["exports.json"] = hashlib.sha256((copy / "exports.json").read_bytes()).hexdigest()
    (copy / "checksums.json").write_text(json.dumps(sums))
    code, _, err = _predict(capsys, copy, big, cohort, tmp_path / "p.csv")
    one_line_error(code, err, "ONNX Runtime could not run the graph")


def test_export_that_cannot_be_recorded_is_one_line_and_leaves_nothing(capsys, exported, cohort, tmp_path,
                                                                        monkeypatch):
    import errno

    from multimodal.model import artifact

    d, _ = exported["a"]
    copy = tmp_path / "m"
    shutil.copytree(d, copy)
    before = {p.name: p.read_bytes() for p in copy.iterdir()}

    def full(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(artifact, "_dump", full)  # the disk fills while the record is written
    code, _, err = run_cli(capsys, "export", "--model", copy, "--records", cohort["val"], "--out", tmp_path / "x.onnx")
    one_line_error(code, err, "cannot record the export in")
    assert not (tmp_path / "x.onnx").exists()
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no staging folder left behind
