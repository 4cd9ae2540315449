"""Batch jobs: one row per input row in input order, whatever the chunking, after a kill -9 and a
resume, and with nothing of ours left beside the output."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from conftest import one_line_error, run_cli


@pytest.fixture(scope="module")
def model_dir(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("batch") / "model"
    tiny_model.save(d)
    return d


@pytest.fixture(scope="module")
def big_records(cohort, tmp_path_factory):
    """The test cohort repeated with fresh ids, one broken image row, and relative image paths kept."""
    df = pd.read_csv(cohort["test"], dtype=str, keep_default_na=False)
    reps = pd.concat([df] * 5, ignore_index=True)
    reps["patient_id"] = [f"p{i:05d}" for i in range(len(reps))]
    reps.loc[7, "image_path"] = "missing.png"
    path = cohort["dir"] / "big.csv"
    reps.to_csv(path, index=False)
    return path


def _leftovers(out):
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}"))


def test_chunked_output_matches_in_memory_predict(capsys, tiny_model, model_dir, big_records, tmp_path):
    out = tmp_path / "p.csv"
    code, stdout, err = run_cli(capsys, "predict", "--model", model_dir, "--records", big_records, "--out", out,
                                "--chunk-rows", 13, "--batch-size", 8, "--quiet")
    assert code == 0, err
    got = pd.read_csv(out, dtype={"id": str})
    want = tiny_model.predict(big_records)
    assert list(got["id"]) == list(want["id"])  # every row once, in input order
    assert got.loc[7, "status"] == "error" and (got["status"] == "ok").sum() == len(got) - 1
    np.testing.assert_allclose(got["prob_1"], want["prob_1"], atol=1e-6, equal_nan=True)
    assert f"wrote {len(want)} rows" in stdout
    assert _leftovers(out) == []


def test_parquet_chunks_keep_types(tiny_model, big_records, tmp_path):
    src = big_records.with_suffix(".parquet")  # beside the images its relative paths name
    pd.read_csv(big_records, dtype=str).to_parquet(src)
    s = tiny_model.predict_file(src, tmp_path / "p.parquet", chunk_rows=50)
    got = pd.read_parquet(tmp_path / "p.parquet")
    assert s["rows"] == len(got) == len(pd.read_parquet(src)) and s["chunks"] == -(-len(got) // 50)
    assert got["prob_1"].dtype == np.float64 and got["error"].notna().sum() == 1


def _wait_for_parts(proc, parts, n):
    deadline = time.time() + 120
    while time.time() < deadline:
        if parts.exists() and len(list(parts.glob("part-*.parquet"))) >= n:
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def test_kill_9_then_resume_gives_every_row_once(capsys, model_dir, big_records, tmp_path):
    out = tmp_path / "p.csv"
    full = tmp_path / "full.csv"
    argv = ["predict", "--model", str(model_dir), "--records", str(big_records), "--chunk-rows", "6",
            "--batch-size", "4", "--quiet"]
    assert run_cli(capsys, *argv, "--out", full)[0] == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "multimodal.cli", *argv, "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = out.parent / f".{out.name}.mmdx-parts"
    assert _wait_for_parts(proc, parts, 3), "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    # kill -9 leaves the run's lock file (the kernel drops its flock): the --resume below takes it over,
    # and removes it on its exit (no leftovers at the end)
    assert (out.parent / f".{out.name}.mmdx-lock").is_file()
    # a part counts once its journal entry exists: one killed between the two is computed again
    n_left = sum(part.with_suffix(".json").exists() for part in parts.glob("part-*.parquet"))
    n_chunks = -(-len(pd.read_csv(big_records)) // 6)
    assert 2 <= n_left < n_chunks

    code, stdout, err = run_cli(capsys, *argv, "--out", out, "--resume")
    assert code == 0, err
    assert f"{n_left} of {n_chunks} chunks kept" in stdout
    got, want = pd.read_csv(out, dtype={"id": str}), pd.read_csv(full, dtype={"id": str})
    assert list(got["id"]) == list(want["id"]) and list(got["status"]) == list(want["status"])  # each row once, in order
    # the killed run used 1 thread, this process may use more: last-bit float differences only
    np.testing.assert_allclose(got["prob_1"], want["prob_1"], rtol=0, atol=1e-6, equal_nan=True)
    assert _leftovers(out) == []


def test_resume_refuses_a_changed_input(capsys, model_dir, big_records, tmp_path):
    out = tmp_path / "p.csv"
    parts = out.parent / f".{out.name}.mmdx-parts"
    parts.mkdir()
    (parts / "job.json").write_text('{"format": 2, "records_sha256": "0"}')
    code, _, err = run_cli(capsys, "predict", "--model", model_dir, "--records", big_records, "--out", out,
                           "--resume", "--quiet")
    one_line_error(code, err, "differs in")
    assert parts.exists() and not out.exists()


def test_foreign_folder_with_our_parts_name_is_not_touched(capsys, model_dir, big_records, tmp_path):
    out = tmp_path / "p.csv"
    parts = out.parent / f".{out.name}.mmdx-parts"
    parts.mkdir()
    (parts / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "predict", "--model", model_dir, "--records", big_records, "--out", out, "--quiet")
    one_line_error(code, err, "not an mmdx batch job")
    assert (parts / "notes.txt").read_text() == "mine"


def test_torchrun_sharded_predict_is_byte_identical(capsys, model_dir, big_records, tmp_path):
    """2 CPU processes (gloo) under torchrun, each taking every other chunk; rank 0 merges."""
    single, sharded = tmp_path / "one.csv", tmp_path / "two.csv"
    common = ["predict", "--model", str(model_dir), "--records", str(big_records), "--chunk-rows", "25", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "multimodal.cli", *common, "--out", str(single)], env=env, check=True,
                   capture_output=True)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "multimodal.cli", *common, "--out", str(sharded)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("wrote ") == 1  # one summary, from rank 0
    assert sharded.read_bytes() == single.read_bytes()
    assert _leftovers(sharded) == []


def test_onnx_export_predicts_like_pytorch(capsys, cohort, tmp_path):
    pytest.importorskip("onnxruntime")
    from conftest import REPO, SYNTH_CONFIG, TINY
    from multimodal import DiagnosisModel

    d = tmp_path / "m"
    grid = {"text.encoder": "bow", "image.size": 64, "image.token_grid": 2}  # pooled 2x2: a fixed-size pool
    DiagnosisModel.from_config(SYNTH_CONFIG, **{**TINY, **grid}).fit(
        cohort["train"], cohort["val"], progress=False).save(d)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    code, out, err = run_cli(capsys, "export", "--model", d, "--records", cohort["val"], "--out", tmp_path / "m.onnx")
    assert code == 0, err
    after = {p.name: p.read_bytes() for p in d.iterdir()}  # training's files untouched; the export recorded
    assert set(after) == set(before) | {"exports.json"} and all(after[k] == v for k, v in before.items()
                                                                 if k != "checksums.json")
    eager, fast = tmp_path / "eager.csv", tmp_path / "onnx.csv"
    argv = ["predict", "--model", d, "--records", cohort["test"], "--batch-size", 7, "--quiet"]
    assert run_cli(capsys, *argv, "--out", eager)[0] == 0
    assert run_cli(capsys, *argv, "--out", fast, "--onnx", tmp_path / "m.onnx")[0] == 0
    a, b = pd.read_csv(eager), pd.read_csv(fast)
    assert list(a["id"]) == list(b["id"]) and list(a["status"]) == list(b["status"])
    np.testing.assert_allclose(a["prob_1"], b["prob_1"], atol=1e-5)  # batches of 7, traced on 8
    # ONNX predict builds no PyTorch network, and so never imports timm (seconds of start-up)
    probe = ("import sys; from multimodal import DiagnosisModel; "
             f"m = DiagnosisModel.load({str(d)!r}, onnx={str(tmp_path / 'm.onnx')!r}); "
             f"p = m.predict({str(cohort['test'])!r}); print(m.net is None, 'timm' in sys.modules, len(p))")
    r = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.stdout.split() == ["True", "False", str(len(a))], r.stderr[-2000:]
    # the graph takes only the present images: batches with none at all still run, and agree
    blank = pd.read_csv(cohort["test"], dtype=str).assign(image_path="")
    blank.to_csv(tmp_path / "no_images.csv", index=False)
    argv[4] = tmp_path / "no_images.csv"
    assert run_cli(capsys, *argv, "--out", eager)[0] == 0
    assert run_cli(capsys, *argv, "--out", fast, "--onnx", tmp_path / "m.onnx")[0] == 0
    a, b = pd.read_csv(eager), pd.read_csv(fast)
    assert (a["status"] == "ok").all() and a["prob_1"].nunique() > 1  # tabular and text still differ per row
    np.testing.assert_allclose(a["prob_1"], b["prob_1"], atol=1e-5)

    other = tmp_path / "other"
    DiagnosisModel.from_config(SYNTH_CONFIG, **{**TINY, **grid, "train.seed": 5}).fit(
        cohort["train"], cohort["val"], progress=False).save(other)
    code, _, err = run_cli(capsys, "predict", "--model", other, "--records", cohort["test"], "--out",
                           tmp_path / "x.csv", "--onnx", tmp_path / "m.onnx")
    one_line_error(code, err, "was not exported from")


# -- decoding starts while the network builds ----------------------------------------------------------------------
def _loader_and_dataset(model, records):
    from multimodal.data.batches import RecordDataset
    from multimodal.data.batches import make_loader

    rec = model.records(records)
    ds = RecordDataset(rec, model.prep, model.config.modalities, model.config)
    return ds, lambda d, w, **kw: make_loader(d, model.config, model.prep, False, model.device, 16, workers=w, **kw)


@pytest.mark.parametrize("budget_records, head_started", [(48, True), (10_000, True), (8, False)])
def test_start_early_yields_the_batches_of_a_plain_loader(tiny_model, big_records, budget_records, head_started):
    import multiprocessing

    import torch
    from torch.utils.data import Subset

    from multimodal.inference.forward import start_early

    ds, loader = _loader_and_dataset(tiny_model, big_records)
    assert len(ds) % 16 and len(ds) > 48  # a partial last batch, and a head shorter than the file
    before = set(multiprocessing.active_children())
    early = start_early(ds, loader, 16, 0, sizes=[1000] * len(ds), budget=budget_records * 1000)
    # the worker is decoding before the first batch is asked for (that is the point)
    assert bool(set(multiprocessing.active_children()) - before) == head_started
    got, want = list(early), list(loader(ds, 0))
    before = set(multiprocessing.active_children())
    start_early(Subset(ds, range(16)), loader, 16, 0, sizes=[1000] * 16, budget=10**9)
    assert not set(multiprocessing.active_children()) - before  # one batch: nothing to gain from a worker
    assert [len(b["index"]) for b in got] == [len(b["index"]) for b in want]
    for g, w in zip(got, want):
        assert g["error"] == w["error"]
        for k, v in w.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(g[k], v), k


def test_deferred_network_predicts_what_a_loaded_one_does(model_dir, big_records):
    from multimodal import DiagnosisModel

    lazy = DiagnosisModel.load(model_dir, defer_network=True)
    assert lazy._net is None and lazy.device.type == "cpu"  # checked, not built
    got = lazy.predict(big_records)
    assert lazy._net is not None
    pd.testing.assert_frame_equal(got, DiagnosisModel.load(model_dir).predict(big_records))


def test_predict_cli_of_a_model_without_images(capsys, cohort, tmp_path):
    """A text + tabular model through `mmdx predict`, whose network is built lazily: the head start
    once read image settings that such a model does not have (AttributeError on IU X-ray's model)."""
    from conftest import SYNTH_CONFIG, TINY

    from multimodal import DiagnosisModel

    import yaml

    cfg = yaml.safe_load(SYNTH_CONFIG.read_text())
    cfg["modalities"], cfg["image"] = ["text", "tabular"], None  # as configs/iu_xray.yaml: no image section
    m = DiagnosisModel.from_config(cfg, **{k: v for k, v in TINY.items() if not k.startswith("image.")})
    m.fit(cohort["train"], cohort["val"], progress=False)
    assert m.config.image is None
    m.save(tmp_path / "m")
    code, _, err = run_cli(capsys, "predict", "--model", tmp_path / "m", "--records", cohort["test"],
                           "--out", tmp_path / "p.csv", "--quiet")
    assert code == 0, err
    got = pd.read_csv(tmp_path / "p.csv")
    want = m.predict(cohort["test"])
    assert len(got) == len(pd.read_csv(cohort["test"])) and got["status"].eq("ok").all()
    np.testing.assert_allclose(got["prob_1"], want["prob_1"], rtol=1e-5)


def test_decoded_size_bound_counts_views_without_reading_files(tiny_model):
    pi = tiny_model.prep.image
    view = pi.cfg.in_chans * pi.cfg.size ** 2 * 4
    assert pi.decoded_bytes(["a.png;b.JPG"]) == min(2, pi.cfg.max_images) * view
    assert pi.decoded_bytes([None]) == 0
    for maybe_many in ("scan.dcm", "series_folder", "IM0001"):  # multi-frame DICOM, a series: the cap
        assert pi.decoded_bytes([maybe_many]) == pi.cfg.max_images * view
    assert pi.decoded_bytes([";".join(f"{i}.png" for i in range(9))]) == pi.cfg.max_images * view


@pytest.mark.parametrize("grid", [{"image.size": 96, "image.token_grid": 2, "text.encoder": "bow"},
                                  {"image.size": 96, "image.token_grid": 2, "text.encoder": "lstm",
                                   "text.layers": 2}])
def test_onnx_export_where_the_feature_map_does_not_divide_into_the_token_grid(cohort, tmp_path, grid):
    """A 3x3 map pooled to 2x2 tokens: adaptive pooling's overlapping cells, which ONNX cannot export as
    such (the HAM10000 recipe's 5x5 map and token_grid 4 failed with a torch traceback); and the BiLSTM,
    whose packed sequences have no ONNX form, over reports of different lengths in batches of 7."""
    pytest.importorskip("onnxruntime")
    from conftest import SYNTH_CONFIG, TINY
    from multimodal import DiagnosisModel

    m = DiagnosisModel.from_config(SYNTH_CONFIG, **{**TINY, "train.epochs": 1, **grid}).fit(
        cohort["train"], cohort["val"], progress=False)
    m.save(tmp_path / "m")
    m = DiagnosisModel.load(tmp_path / "m")
    assert m.net.encoders["image"].tokens_per_image == 4
    info = m.export_onnx(tmp_path / "m.onnx", cohort["val"])
    onnx = DiagnosisModel.load(tmp_path / "m", onnx=tmp_path / "m.onnx")
    got, want = (x.predict(cohort["test"], batch_size=7)["prob_1"] for x in (onnx, m))
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert info["max_abs_diff"] < 1e-4 and want.std() > 0.01
