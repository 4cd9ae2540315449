"""Nothing mmdx writes may destroy a user's file: guarded targets, one run per target, atomic and honest
output (findings 1, 4, 5 and 10 of issue #8)."""
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pandas as pd
import pytest

from multimodal import UserError
from multimodal import formats, output

from conftest import REPO, SYNTH_CONFIG, TINY, one_line_error, run_cli

CFG = str(SYNTH_CONFIG)


run = run_cli


def snapshot(d):
    """Every file below d with its content hash: 'left untouched' means equal snapshots."""
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture
def user_folder(tmp_path, cohort):
    """A folder as a user has it: a records CSV, notes and a subfolder of images."""
    d = tmp_path / "study"
    (d / "images").mkdir(parents=True)
    pd.read_csv(cohort["train"], dtype=str).to_csv(d / "records.csv", index=False)
    (d / "notes.txt").write_text("do not lose me\n")
    (d / "images" / "a.dcm").write_bytes(b"\0" * 300)
    return d


# -- 1: train --out never deletes a folder it did not write ---------------------------------------------------
@pytest.mark.parametrize("target", ["folder", "cwd", "records_folder"])
def test_train_out_refuses_a_foreign_folder(capsys, user_folder, cohort, monkeypatch, target):
    before = snapshot(user_folder)
    records = cohort["train"]
    if target == "cwd":
        monkeypatch.chdir(user_folder)
        out = "."
    elif target == "records_folder":
        records, out = user_folder / "records.csv", user_folder
    else:
        out = user_folder
    t0 = time.perf_counter()
    code, _, err = run(capsys, "train", "--config", CFG, "--records", records, "--out", out, "train.epochs=1")
    assert code == 2 and err.startswith("mmdx: error:") and ("refusing to replace" in err or "holds an input" in err), err
    assert time.perf_counter() - t0 < 20  # refused before training, not after
    assert snapshot(user_folder) == before


def test_train_out_equal_to_records_file(capsys, user_folder):
    before = snapshot(user_folder)
    code, _, err = run(capsys, "train", "--config", CFG, "--records", user_folder / "records.csv",
                       "--out", user_folder / "records.csv")
    one_line_error(code, err, "")
    assert snapshot(user_folder) == before


def test_model_dir_replaced_only_with_overwrite(tiny_model, cohort, tmp_path):
    d = tiny_model.save(tmp_path / "m")
    first = snapshot(d)
    with pytest.raises(UserError, match="--overwrite"):
        tiny_model.save(d)
    assert snapshot(d) == first
    tiny_model.save(d, overwrite=True)
    assert set(snapshot(d)) == set(first)
    (d / "my_notes.txt").write_text("mine")
    with pytest.raises(UserError, match="my_notes.txt"):
        tiny_model.save(d, overwrite=True)
    assert (d / "my_notes.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    tiny_model.save(empty)
    assert (empty / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left behind


# -- 4: outputs never overwrite an input or a model ------------------------------------------------------------
def test_predict_out_cannot_be_an_input_or_inside_the_model(capsys, tiny_model, cohort, tmp_path):
    m = tiny_model.save(tmp_path / "m")
    rec = tmp_path / "r.csv"
    pd.read_csv(cohort["test"], dtype=str).to_csv(rec, index=False)
    before_rec, before_model = rec.read_bytes(), snapshot(m)
    code, _, err = run(capsys, "predict", "--model", m, "--records", rec, "--out", rec)
    one_line_error(code, err, "is also an input")
    code, _, err = run(capsys, "predict", "--model", m, "--records", rec, "--out", m / "model.safetensors")
    one_line_error(code, err, "inside the model directory")
    code, _, err = run(capsys, "evaluate", "--model", m, "--records", rec, "--out", rec)
    one_line_error(code, err, "is also an input")
    code, _, err = run(capsys, "predict", "--model", m, "--records", rec, "--out", tmp_path)
    one_line_error(code, err, "is a directory")
    assert rec.read_bytes() == before_rec and snapshot(m) == before_model


# -- 5: CSV formula injection --------------------------------------------------------------------------------------
def test_csv_cells_cannot_become_formulas(capsys, tiny_model, cohort, tmp_path):
    assert formats.defuse_cell("=HYPERLINK(\"x\")") == "'=HYPERLINK(\"x\")"
    assert [formats.defuse_cell(v) for v in ("+1+cmd", "@SUM(A1)", "-2+3", "-0.5", "1e-3", "ok")] == \
        ["'+1+cmd", "'@SUM(A1)", "'-2+3", "-0.5", "1e-3", "ok"]
    df = pd.read_csv(cohort["test"], dtype=str).iloc[:3]
    df.loc[0, "patient_id"] = "=1+1"
    df.loc[1, "patient_id"] = "@cmd"
    df.to_csv(cohort["dir"] / "inj.csv", index=False)
    m = tiny_model.save(tmp_path / "m")
    code, _, _ = run(capsys, "predict", "--model", m, "--records", cohort["dir"] / "inj.csv", "--out", tmp_path / "p.csv")
    assert code == 0
    out = pd.read_csv(tmp_path / "p.csv", dtype=str)
    assert out["id"].tolist()[:2] == ["'=1+1", "'@cmd"] and len(out) == 3
    output.write_table(pd.DataFrame({"=x": [1]}), tmp_path / "h.csv")
    assert (tmp_path / "h.csv").read_text().splitlines()[0] == "'=x"


# -- 10: output integrity ------------------------------------------------------------------------------------------
def test_killed_write_leaves_no_temporary_after_the_next_run(tmp_path):
    target = tmp_path / "out.csv"
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from multimodal.output import atomic_file
        def slow(t):
            open(t, "w").write("partial")
            print("writing", flush=True)
            time.sleep(60)
        atomic_file({str(target)!r}, slow)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    left = [q.name for q in tmp_path.iterdir()]
    assert not target.exists() and any("mmdx-tmp" in n for n in left)  # what kill -9 leaves...
    output.atomic_file(target, lambda t: open(t, "w").write("done"))
    assert target.read_text() == "done"
    assert [q.name for q in tmp_path.iterdir()] == ["out.csv"]  # ...the next write to it removes


def test_second_run_on_the_same_out_is_refused(capsys, tiny_model, cohort, tmp_path):
    m = tiny_model.save(tmp_path / "m")
    target = tmp_path / "p.csv"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from multimodal.output import claim
        with claim({str(target)!r}):
            print("held", flush=True)
            time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, _, err = run(capsys, "predict", "--model", m, "--records", cohort["test"], "--out", target)
        one_line_error(code, err, "another mmdx run is writing")
        assert not target.exists()
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / ".p.csv.mmdx-lock").is_file()  # what the killed holder left
    code, _, _ = run(capsys, "predict", "--model", m, "--records", cohort["test"], "--out", target)
    assert code == 0 and target.is_file()
    assert not (tmp_path / ".p.csv.mmdx-lock").exists()  # taken over, and removed on exit
    with output.claim(target), output.claim(target):  # one process may claim its own target twice
        pass


def test_output_mode_follows_umask_and_json_is_strict(tmp_path):
    old = os.umask(0o022)
    try:
        output.write_table(pd.DataFrame({"a": [1]}), tmp_path / "t.csv")
        output.write_json({"auroc": math.nan, "ci": [float("inf"), 0.5]}, tmp_path / "m.json")
    finally:
        os.umask(old)
    assert (tmp_path / "t.csv").stat().st_mode & 0o777 == 0o644
    text = (tmp_path / "m.json").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c}")) == {"auroc": None, "ci": [None, 0.5]}


def test_explain_replaces_its_own_report_and_refuses_a_foreign_folder(capsys, tiny_model, cohort, tmp_path):
    m = tiny_model.save(tmp_path / "m")
    out = tmp_path / "rep"
    args = ("explain", "--model", m, "--records", cohort["test"], "--method", "gradcam", "--quiet", "--out", out)
    ids = pd.read_csv(cohort["test"], dtype=str)["patient_id"].tolist()
    assert run(capsys, *args, "--ids", *ids[:3])[0] == 0
    assert len(list(out.glob("patient_*.html"))) == 3
    assert run(capsys, *args, "--ids", ids[3])[0] == 0
    assert len(list(out.glob("patient_*.html"))) == 1  # no stale pages beside the new index
    (out / "mine.txt").write_text("x")
    code, _, err = run(capsys, *args, "--ids", ids[0])
    one_line_error(code, err, "mine.txt")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.csv").write_text("a\n")
    code, _, err = run(capsys, *args[:-1], foreign, "--ids", ids[0])
    one_line_error(code, err, "not an mmdx report folder")
    assert (foreign / "keep.csv").read_text() == "a\n"


def test_evaluate_says_how_many_rows_had_no_label(capsys, tiny_model, cohort, tmp_path):
    df = pd.read_csv(cohort["test"], dtype=str)
    df.loc[:4, "label"] = None
    df.to_csv(cohort["dir"] / "unl.csv", index=False)
    m = tiny_model.save(tmp_path / "m")
    code, out, _ = run(capsys, "evaluate", "--model", m, "--records", cohort["dir"] / "unl.csv", "--out",
                       tmp_path / "e.json", "--n-boot", "20")
    assert code == 0 and "5 records have no label" in out
    assert json.loads((tmp_path / "e.json").read_text())["n_unlabelled"] == 5


# -- one guard that knows every input of the command ----------------------------------------------------------------
@pytest.fixture
def study(tmp_path, cohort):
    """The test split and its images, copied: a guard that fails may destroy these, never the shared cohort."""
    d = tmp_path / "study"
    shutil.copytree(cohort["dir"] / "images", d / "images")
    shutil.copy(cohort["test"], d / "records.csv")
    return d


def _first_image(records) -> str:
    cells = pd.read_csv(records, dtype=str, keep_default_na=False)["image_path"]
    return next(c for c in cells if c).split(";")[0]


def test_an_output_may_not_be_an_image_the_records_name(capsys, tiny_model, study, tmp_path):
    m = tiny_model.save(tmp_path / "m")
    rec, image = study / "records.csv", study / _first_image(study / "records.csv")
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(rec, tmp_path / "elsewhere" / "records.csv")
    os.link(image, tmp_path / "alias.dcm")  # the same file under another name
    before = snapshot(study)
    for args in (["--records", rec, "--out", image],
                 ["--records", rec, "--out", tmp_path / "alias.dcm"],
                 ["--records", tmp_path / "elsewhere" / "records.csv", "--image-root", study, "--out", image]):
        code, _, err = run(capsys, "predict", "--model", m, *args)
        one_line_error(code, err, "names (an input of this run)")
    code, _, err = run(capsys, "evaluate", "--model", m, "--records", rec, "--out", image, "--n-boot", 10)
    one_line_error(code, err, "names (an input of this run)")
    assert snapshot(study) == before
    (study / "series").mkdir()  # a folder of slices is one image: nothing may be written into it
    shutil.copy(image, study / "series" / "1.dcm")
    df = pd.read_csv(rec, dtype=str)
    df.loc[0, "image_path"] = "series"
    df.to_csv(study / "series.csv", index=False)
    before = snapshot(study)
    code, _, err = run(capsys, "predict", "--model", m, "--records", study / "series.csv", "--out",
                       study / "series" / "p.csv")
    one_line_error(code, err, "would be written into an image that")
    assert snapshot(study) == before


def test_an_output_may_not_be_the_onnx_file_or_the_records_of_an_export(capsys, cohort, tmp_path):
    pytest.importorskip("onnxruntime")
    from multimodal import DiagnosisModel

    m = DiagnosisModel.from_config(CFG, **TINY, **{"text.encoder": "bow"}).fit(
        cohort["train"], cohort["val"], progress=False).save(tmp_path / "m")
    onnx = tmp_path / "m.onnx"
    assert run(capsys, "export", "--model", m, "--records", cohort["test"], "--out", onnx)[0] == 0
    before = onnx.read_bytes()
    code, _, err = run(capsys, "predict", "--model", m, "--onnx", onnx, "--records", cohort["test"], "--out", onnx)
    one_line_error(code, err, "is also an input")
    assert onnx.read_bytes() == before
    rec = tmp_path / "records.onnx"  # a CSV, whatever its name: the loader reads it
    shutil.copy(cohort["test"], rec)
    code, _, err = run(capsys, "export", "--model", m, "--records", rec, "--out", rec)
    one_line_error(code, err, "is also an input")
    assert rec.read_bytes() == cohort["test"].read_bytes()


def test_synth_and_demo_refuse_a_folder_they_did_not_write(capsys, tmp_path):
    d = tmp_path / "mine"
    (d / "images").mkdir(parents=True)
    (d / "records_train.csv").write_text("patient_id,label\nP1,1\n")
    (d / "images" / "SYN0001_0.dcm").write_bytes(b"a patient's scan")
    before = snapshot(d)
    code, _, err = run(capsys, "synth", "--out", d, "--n", 20)
    one_line_error(code, err, "not an mmdx synthetic cohort folder")
    t0 = time.perf_counter()
    code, _, err = run(capsys, "demo", "--out", d, "--n", 20)
    one_line_error(code, err, "not an mmdx demo folder")
    assert time.perf_counter() - t0 < 20  # refused before any training
    assert snapshot(d) == before
    own = tmp_path / "cohort"
    assert run(capsys, "synth", "--out", own, "--n", 20)[0] == 0
    first = snapshot(own)
    assert run(capsys, "synth", "--out", own, "--n", 20)[0] == 0  # its own earlier cohort: replaced
    assert snapshot(own) == first
    (own / "records_train.csv").write_text("edited by a user\n")
    code, _, err = run(capsys, "synth", "--out", own, "--n", 20)
    one_line_error(code, err, "records_train.csv")
    assert (own / "records_train.csv").read_text() == "edited by a user\n"


def test_a_folder_is_replaced_only_by_a_run_of_its_kind(capsys, tiny_model, cohort, tmp_path):
    m = tiny_model.save(tmp_path / "m")
    rep = tmp_path / "rep"
    first = pd.read_csv(cohort["test"], dtype=str)["patient_id"].iloc[0]
    assert run(capsys, "explain", "--model", m, "--records", cohort["test"], "--method", "gradcam", "--quiet",
               "--ids", first, "--out", rep)[0] == 0
    before = snapshot(rep)
    code, _, err = run(capsys, "baselines", "--config", CFG, "--records", cohort["train"], "--predict", cohort["test"],
                       "--image-weights", "none", "--out", rep)
    one_line_error(code, err, "is an mmdx report folder (mmdx explain)")
    code, _, err = run(capsys, "cv", "--config", CFG, "--records", cohort["train"], "--folds", 2, "--out", rep)
    one_line_error(code, err, "is an mmdx report folder (mmdx explain)")
    code, _, err = run(capsys, "synth", "--out", rep, "--n", 20)
    one_line_error(code, err, "is an mmdx report folder (mmdx explain)")
    other = tiny_model.save(tmp_path / "other")
    code, _, err = run(capsys, "explain", "--model", m, "--records", cohort["test"], "--ids", first, "--out", other)
    one_line_error(code, err, "is an mmdx model directory")
    assert snapshot(rep) == before and (other / "model.safetensors").is_file()


def test_overwrite_never_deletes_a_file_a_forged_manifest_lists(capsys, tiny_model, tmp_path):
    d = tiny_model.save(tmp_path / "m")
    sums = json.loads((d / "checksums.json").read_text())
    (d / "precious.txt").write_text("a user's file\n")
    forged = sums | {"precious.txt": hashlib.sha256(b"a user's file\n").hexdigest()}  # even with its true sha256
    (d / "checksums.json").write_text(json.dumps(forged))
    with pytest.raises(UserError, match="precious.txt"):
        tiny_model.save(d, overwrite=True)
    code, _, err = run(capsys, "train", "--config", CFG, "--records", REPO / "nope.csv", "--out", d, "--overwrite")
    one_line_error(code, err, "precious.txt")
    assert (d / "precious.txt").read_text() == "a user's file\n"
    (d / "precious.txt").unlink()
    (d / "checksums.json").write_text(json.dumps(sums))
    (d / "metrics.json").write_text("a user's notes, under a name mmdx uses\n")  # listed, but not what mmdx wrote
    with pytest.raises(UserError, match="metrics.json"):
        tiny_model.save(d, overwrite=True)
    assert (d / "metrics.json").read_text().startswith("a user's notes")


def test_a_swap_that_fails_midway_puts_the_earlier_output_back(tmp_path, monkeypatch):
    out = tmp_path / "rep"
    with output.staged_dir(out, "report") as d:
        (d / "index.html").write_text("first\n")
    before = snapshot(out)
    real, calls = output._move_all, []

    def failing(src, dst):  # the earlier output moves out, then the new one fails halfway in
        calls.append(src)
        real(src, dst)
        if len(calls) == 2:
            raise OSError("disk full")

    monkeypatch.setattr(output, "_move_all", failing)
    with pytest.raises(OSError, match="disk full"):
        with output.staged_dir(out, "report") as d:
            (d / "index.html").write_text("second\n")
            (d / "extra.html").write_text("second\n")
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]  # no staging folder left
