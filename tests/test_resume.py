"""--resume merges only what provably belongs to the job: parts checked against their journal entry,
the job identified by content, columns by name; and a killed run leaves nothing that blocks it."""
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO, one_line_error, run_cli
from test_batch import model_dir  # noqa: F401  (a fixture: the tiny model, saved)

CHUNK, BATCH = 25, 8


@pytest.fixture(scope="module")
def records(cohort):
    """The test cohort repeated with fresh ids: several chunks of CHUNK rows, the last one shorter."""
    df = pd.read_csv(cohort["test"], dtype=str, keep_default_na=False)
    reps = pd.concat([df] * 5, ignore_index=True)
    reps["patient_id"] = [f"r{i:05d}" for i in range(len(reps))]
    path = cohort["dir"] / "resume.csv"
    reps.to_csv(path, index=False)
    assert len(reps) % CHUNK and len(reps) > 3 * CHUNK
    return path


def _argv(model_dir, records, out, *more):
    return ["predict", "--model", model_dir, "--records", records, "--out", out, "--chunk-rows", CHUNK,
            "--batch-size", BATCH, "--quiet", *more]


@pytest.fixture(scope="module")
def full(model_dir, records, tmp_path_factory):
    """What an uninterrupted run writes."""
    from multimodal import DiagnosisModel

    out = tmp_path_factory.mktemp("full") / "p.csv"
    DiagnosisModel.load(model_dir).predict_file(records, out, chunk_rows=CHUNK, batch_size=BATCH)
    return out.read_bytes()


def _interrupted(model_dir, records, out, after=3, **kw):
    """A run stopped after `after` chunks, as by Ctrl-C: its parts folder is left for --resume."""
    from multimodal import DiagnosisModel

    m, calls = DiagnosisModel.load(model_dir), []
    real = m._infer

    def infer(*a, **k):
        if len(calls) == after:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **k)

    m._infer = infer
    with pytest.raises(KeyboardInterrupt):
        m.predict_file(records, out, chunk_rows=CHUNK, batch_size=BATCH, **kw)
    parts = out.parent / f".{out.name}.mmdx-parts"
    assert len(list(parts.glob("part-*.parquet"))) == after
    return parts


def _rewrite(path: Path, table: pa.Table) -> None:
    pq.write_table(table, path)


def _tamper(kind, parts, tmp_path, model_dir, records):
    p1 = parts / "part-000001.parquet"
    t = pq.read_table(p1)
    if kind == "altered":  # one probability edited
        probs = t.column("prob_1").to_pylist()
        probs[0] = 0.999
        _rewrite(p1, t.set_column(t.column_names.index("prob_1"), "prob_1", pa.array(probs)))
    elif kind == "short":  # rows lost
        _rewrite(p1, t.slice(0, 5))
    elif kind == "truncated":  # bytes cut (a disk full, a copy interrupted)
        p1.write_bytes(p1.read_bytes()[:200])
    elif kind == "duplicated":  # chunk 0's part and entry copied over chunk 1's
        shutil.copy(parts / "part-000000.parquet", p1)
        shutil.copy(parts / "part-000000.json", parts / "part-000001.json")
    elif kind == "reordered":  # the same values, prob_1 before prob_0
        _rewrite(p1, t.select(["id", "prob_1", "prob_0", "pred", "status", "error"]))
    elif kind == "linked":  # a link to a device that never ends
        p1.unlink()
        p1.symlink_to("/dev/zero")
    elif kind == "no_entry":  # killed between the part's rename and its entry's
        (parts / "part-000001.json").unlink()
    elif kind == "foreign":  # part 1 and its entry from a job on other records
        other = tmp_path / "other.csv"
        df = pd.read_csv(records, dtype=str, keep_default_na=False)
        df.iloc[::-1].to_csv(other, index=False)
        oparts = _interrupted(model_dir, other, tmp_path / "o.csv", after=2)
        shutil.copy(oparts / "part-000001.parquet", p1)
        shutil.copy(oparts / "part-000001.json", parts / "part-000001.json")


@pytest.mark.parametrize("kind", ["altered", "short", "truncated", "duplicated", "reordered", "linked", "no_entry",
                                  "foreign"])
def test_resume_computes_again_a_part_that_does_not_match_its_journal(capsys, model_dir, records, full, tmp_path,
                                                                      kind):
    out = tmp_path / "p.csv"
    parts = _interrupted(model_dir, records, out)
    _tamper(kind, parts, tmp_path, model_dir, records)
    code, stdout, err = run_cli(capsys, *_argv(model_dir, records, out, "--resume"))
    assert code == 0, err
    assert out.read_bytes() == full  # no row altered, lost, duplicated or swapped
    assert "computing it again" in err, err
    assert f"2 of {-(-len(pd.read_csv(records)) // CHUNK)} chunks kept" in stdout, stdout
    assert not parts.exists()


def test_merge_goes_by_column_name(capsys, model_dir, records, full, tmp_path):
    """A part whose columns are in another order but that is journaled (as a part written by another
    version of mmdx might be) is merged by name: prob_0 and prob_1 are not swapped."""
    from multimodal.inference import journal

    out = tmp_path / "p.csv"
    parts = _interrupted(model_dir, records, out)
    p1 = parts / "part-000001.parquet"
    t = pq.read_table(p1)
    _rewrite(p1, t.select(["error", "status", "pred", "prob_1", "prob_0", "id"]))
    ident = json.loads((parts / "job.json").read_text())
    journal.record(parts, 1, ident, t.num_rows, hashlib.sha256(p1.read_bytes()).hexdigest())
    code, stdout, err = run_cli(capsys, *_argv(model_dir, records, out, "--resume"))
    assert code == 0, err
    assert "3 of" in stdout and "again" not in err  # the part was kept, not recomputed
    assert out.read_bytes() == full


def test_resume_refuses_a_records_file_reordered_with_the_same_size_and_mtime(capsys, model_dir, records, tmp_path):
    mine = records.parent / f"{tmp_path.name}.csv"  # beside the images its relative paths name
    shutil.copy(records, mine)
    out = tmp_path / "p.csv"
    parts = _interrupted(model_dir, mine, out)
    st = mine.stat()
    lines = mine.read_text().splitlines(keepends=True)
    mine.write_text(lines[0] + "".join(reversed(lines[1:])))  # same bytes, other order
    os.utime(mine, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert mine.stat().st_size == st.st_size and mine.stat().st_mtime_ns == st.st_mtime_ns
    code, _, err = run_cli(capsys, *_argv(model_dir, mine, out, "--resume"))
    one_line_error(code, err, "records_sha256")
    assert parts.exists() and not out.exists()


def test_records_changed_during_the_run_are_not_merged(model_dir, records, tmp_path):
    """Chunks are read as the job goes: rows re-sorted under it would come out lost and duplicated."""
    from multimodal import DiagnosisModel
    from multimodal.errors import UserError

    mine = records.parent / f"{tmp_path.name}.csv"
    shutil.copy(records, mine)
    m, out = DiagnosisModel.load(model_dir), tmp_path / "p.csv"
    real = m._infer

    def infer(rec, *a, **k):
        if rec.df["patient_id"].iloc[0] == "r00000":  # while the first chunk is predicted
            lines = mine.read_text().splitlines(keepends=True)
            mine.write_text(lines[0] + "".join(reversed(lines[1:])))
        return real(rec, *a, **k)

    m._infer = infer
    with pytest.raises(UserError, match="changed while it was being predicted"):
        m.predict_file(mine, out, chunk_rows=CHUNK, batch_size=BATCH)
    assert not out.exists()


def test_resume_refuses_another_image_root(capsys, model_dir, records, tmp_path):
    out = tmp_path / "p.csv"
    parts = _interrupted(model_dir, records, out)
    elsewhere = tmp_path / "images"
    shutil.copytree(records.parent / "images", elsewhere)
    code, _, err = run_cli(capsys, *_argv(model_dir, records, out, "--resume", "--image-root", tmp_path))
    one_line_error(code, err, "image_root")
    assert parts.exists() and not out.exists()


def test_a_symlinked_parts_folder_is_never_followed(capsys, model_dir, records, tmp_path):
    target = tmp_path / "precious"
    target.mkdir()
    files = {"job.json": b'{"records": "x"}\n', "part-000000.parquet": b"not ours", "part-000001.json": b"{}",
             "notes.txt": b"mine"}
    for name, data in files.items():
        (target / name).write_bytes(data)
    out = tmp_path / "p.csv"
    (tmp_path / ".p.csv.mmdx-parts").symlink_to(target, target_is_directory=True)
    for more in ((), ("--resume",)):
        code, _, err = run_cli(capsys, *_argv(model_dir, records, out, *more))
        one_line_error(code, err, "symbolic link")
        assert {p.name: p.read_bytes() for p in target.iterdir()} == files
        assert not out.exists()


def test_duplicate_ids_are_kept_row_by_row_with_a_warning(capsys, model_dir, records, tmp_path):
    dup = records.parent / f"{tmp_path.name}.csv"
    df = pd.read_csv(records, dtype=str, keep_default_na=False)
    df.loc[[30, 61], "patient_id"] = df.loc[2, "patient_id"]  # in other chunks than the first
    df.to_csv(dup, index=False)
    out = tmp_path / "p.csv"
    code, _, err = run_cli(capsys, *_argv(model_dir, dup, out))
    assert code == 0, err
    assert "2 rows repeat the id of an earlier row" in err, err
    assert list(pd.read_csv(out, dtype=str)["id"]) == list(df["patient_id"])  # one output row per input row


def test_batch_size_zero_is_one_line(capsys, model_dir, records, tmp_path):
    code, _, err = run_cli(capsys, "predict", "--model", model_dir, "--records", records, "--out",
                           tmp_path / "p.csv", "--batch-size", 0)
    one_line_error(code, err, "--batch-size must be at least 1")
    assert not list(tmp_path.iterdir())
    code, _, err = run_cli(capsys, "evaluate", "--model", model_dir, "--records", records, "--batch-size", 0)
    one_line_error(code, err, "--batch-size must be at least 1")


# -- what a kill -9 leaves behind -----------------------------------------------------------------------------------
def _children(pid):
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _decoding_worker(pid):
    for c in _children(pid):
        try:
            if Path(f"/proc/{c}/comm").read_text().strip() == "pt_data_worker":
                return c
        except OSError:
            pass
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_9_takes_the_decoding_worker_along_and_resume_succeeds(capsys, model_dir, cohort, tmp_path):
    """End to end: kill -9 while the early-decode worker holds batches, then --resume. Whether the
    old worker outlived its parent here depended on timing (its queue had to be full); the next test
    makes that state certain."""
    df = pd.read_csv(cohort["test"], dtype=str, keep_default_na=False)
    big = pd.concat([df] * (2000 // len(df) + 1), ignore_index=True)
    big["patient_id"] = [f"k{i:05d}" for i in range(len(big))]
    recs = cohort["dir"] / "kill9.csv"
    big.to_csv(recs, index=False)
    out = tmp_path / "p.csv"
    argv = ["predict", "--model", str(model_dir), "--records", str(recs), "--out", str(out), "--chunk-rows", "5000",
            "--batch-size", "4", "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "multimodal.cli", *argv], env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, worker = time.time() + 120, None
    while worker is None and proc.poll() is None and time.time() < deadline:
        worker = _decoding_worker(proc.pid)
        time.sleep(0.02)
    assert worker is not None, "no decoding worker started"
    time.sleep(0.3)  # let it fill its queue
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 5
    while Path(f"/proc/{worker}").exists() and time.time() < deadline:
        time.sleep(0.05)
    alive = Path(f"/proc/{worker}").exists()
    if alive:
        os.kill(worker, signal.SIGKILL)
    assert not alive, "the decoding worker outlived its killed parent"
    # a pid as a whole token, as torch names its segments (torch_<pid>_...): 2792 is not 27929, and the
    # digits inside another name's hex id (joblib_memmapping_folder_<pid>_<uuid>) are not a pid
    ours = re.compile(rf"(?<![0-9A-Za-z])({worker}|{proc.pid})(?![0-9A-Za-z])")
    assert not [p for p in os.listdir("/dev/shm") if ours.search(p)]
    code, _, err = run_cli(capsys, *argv[:-1], "--resume", "--quiet")
    assert code == 0, err
    assert list(pd.read_csv(out, dtype=str)["id"]) == list(big["patient_id"])  # every row exactly once, in order


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_an_early_decoding_worker_dies_with_its_parent(model_dir, cohort, tmp_path):
    """The worst case, made certain: the parent is killed while it builds its network and reads
    nothing, so the worker's queue is full; its feeder thread then blocked its exit for ever."""
    df = pd.read_csv(cohort["test"], dtype=str, keep_default_na=False)
    big = pd.concat([df] * (2000 // len(df) + 1), ignore_index=True)
    recs = cohort["dir"] / "parent_dies.csv"
    big.to_csv(recs, index=False)
    script = textwrap.dedent(f"""
        import multiprocessing, os, sys, time
        sys.path.insert(0, {str(REPO)!r})
        import multimodal.api as api
        import multimodal.inference.forward as forward

        def reads_nothing(net, batches, *a, **k):  # stands in for the forward pass: never takes a batch
            print(*(p.pid for p in multiprocessing.active_children()), flush=True)
            time.sleep(120)

        forward.run_inference = reads_nothing
        m = api.DiagnosisModel.load({str(model_dir)!r}, device="cpu", defer_network=True)
        m.predict({str(recs)!r}, batch_size=4)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    workers = [int(p) for p in proc.stdout.readline().split()]
    assert workers, "no decoding worker started"
    time.sleep(3)  # it decodes everything it may and fills its queue
    proc.kill()
    proc.wait()
    deadline = time.time() + 5
    while any(Path(f"/proc/{w}").exists() for w in workers) and time.time() < deadline:
        time.sleep(0.05)
    alive = [w for w in workers if Path(f"/proc/{w}").exists()]
    for w in alive:
        os.kill(w, signal.SIGKILL)
    assert not alive, "the decoding worker outlived its killed parent"


def test_a_lock_whose_holder_is_gone_is_taken_over(tmp_path):
    """The holder was killed, but a child it forked still holds the lock file open (and so the flock)."""
    from multimodal.output import claim

    target = tmp_path / "p.csv"
    script = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {str(REPO)!r})
        from multimodal.output import claim
        with claim({str(target)!r}):
            if os.fork() == 0:
                time.sleep(60)
                os._exit(0)
            print("held", flush=True)
            time.sleep(60)
    """)
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    child = _children(holder.pid)
    holder.kill()
    holder.wait()
    try:
        assert child and Path(f"/proc/{child[0]}").exists()  # the lock is still flock'ed by it
        with claim(target):
            pass
    finally:
        for c in child:
            os.kill(c, signal.SIGKILL)
