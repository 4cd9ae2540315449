"""predict --engine ray: what one process writes (ids, order, probabilities within 1e-6, per-row errors),
from 10× the validation records on a local Ray of 2 workers, also when a worker is killed mid-job; the
local Ray listens on loopback only, keeps usage stats off and writes nothing under $HOME."""
import ipaddress
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from conftest import REPO, one_line_error, run_cli
from test_batch import model_dir  # noqa: F401  (a fixture: the tiny model, saved)

ray = pytest.importorskip("ray")

from multimodal import raydata  # noqa: E402
from multimodal.api import DiagnosisModel  # noqa: E402
from multimodal.errors import UserError  # noqa: E402


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """One local Ray for the module, started as predict_ray starts its own (2 workers + the reader), with
    HOME and the temp folder on empty folders. → HOME, which Ray's processes inherit; the temp folder
    (Ray's session: logs, sockets) must be empty again once the cluster has stopped."""
    home = tmp_path_factory.mktemp("home")
    scratch = Path(tempfile.mkdtemp(prefix="mrt", dir="/tmp"))  # short enough for Ray's sockets below it
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("HOME", str(home))
            mp.setattr(tempfile, "tempdir", str(scratch))
            with raydata.cluster(None, num_cpus=3):
                assert len(list(scratch.iterdir())) == 1  # the session folder
                yield home
        assert list(scratch.iterdir()) == []
    finally:
        shutil.rmtree(scratch)


@pytest.fixture(scope="module")
def records(cohort):
    """10× the validation records with fresh ids, one naming an image that does not exist; beside the
    images that their relative paths name."""
    val = pd.read_csv(cohort["val"], dtype=str, keep_default_na=False, na_values=[""])
    big = pd.concat([val.assign(patient_id=val["patient_id"] + f"-{k}") for k in range(10)], ignore_index=True)
    big.loc[7, "image_path"] = "images/missing.dcm"
    path = cohort["dir"] / "ray_records.csv"
    big.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def one_process(model_dir, records, tmp_path_factory):
    out = tmp_path_factory.mktemp("ray") / "one.parquet"
    DiagnosisModel.load(model_dir).predict_file(records, out, batch_size=16)
    return pd.read_parquet(out)


def _same_output(got: pd.DataFrame, want: pd.DataFrame) -> None:
    assert list(got.columns) == list(want.columns)
    assert list(got["id"]) == list(want["id"])  # every row once, in input order
    assert list(got["status"]) == list(want["status"])
    assert got["error"].fillna("").tolist() == want["error"].fillna("").tolist()
    probs = [c for c in want.columns if c.startswith("prob_")]
    np.testing.assert_allclose(got[probs].to_numpy(), want[probs].to_numpy(), rtol=0, atol=1e-6, equal_nan=True)
    assert got["pred"].fillna("").tolist() == want["pred"].fillna("").tolist()


def _crash_once(marker: Path):
    """A Scorer whose first batch, in whichever actor gets it, kills that actor's process; only once
    in the job (the marker file is created exclusively)."""
    class CrashOnce(raydata.Scorer):
        def __call__(self, batch):
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return super().__call__(batch)
            os._exit(1)

    return CrashOnce


def test_ray_engine_writes_what_one_process_writes(capsys, local_ray, model_dir, records, one_process, tmp_path):
    out = tmp_path / "p.parquet"
    code, stdout, err = run_cli(capsys, "predict", "--engine", "ray", "--ray-workers", 2, "--model", model_dir,
                                "--records", records, "--out", out, "--batch-size", 16, "--quiet")
    assert code == 0, err
    got = pd.read_parquet(out)
    _same_output(got, one_process)
    assert len(got) == len(pd.read_csv(records)) and (got["status"] == "ok").sum() == len(got) - 1
    assert got.loc[7, "status"] == "error" and "image not found" in got.loc[7, "error"]
    assert f"wrote {len(got)} rows to {out} ({len(got) - 1} ok, 1 errors) with 2 Ray workers" in stdout
    assert not any(local_ray.iterdir())  # nothing under $HOME: Ray's auth token went through the environment


def test_a_killed_worker_is_retried_without_losing_or_repeating_rows(local_ray, model_dir, records, one_process,
                                                                     tmp_path):
    marker, out = tmp_path / "crashed", tmp_path / "p.parquet"
    s = raydata.predict_ray(model_dir, records, out, num_workers=2, batch_size=16, scorer=_crash_once(marker))
    assert marker.exists()  # an actor process died mid-job
    got = pd.read_parquet(out)
    _same_output(got, one_process)
    assert got["id"].is_unique and s["rows"] == len(one_process) and s["errors"] == 1
    assert not any(local_ray.iterdir())


def _listening(port: int) -> list:
    """The addresses a socket listens on at `port`, from /proc/net/tcp and tcp6 (each 32-bit word of an
    address is printed in host order, little-endian here)."""
    found = []
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        for line in table.read_text().splitlines()[1:] if table.exists() else []:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if state == "0A" and int(p, 16) == port:
                raw = bytes.fromhex(addr)
                found.append(ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))))
    return found


def _loopback(a) -> bool:
    return a.is_loopback or (a.version == 6 and a.ipv4_mapped is not None and a.ipv4_mapped.is_loopback)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/net")
def test_local_ray_listens_on_loopback_only_with_usage_stats_off(local_ray):
    node = ray.nodes()[0]
    gcs_port = int(ray.get_runtime_context().gcs_address.rsplit(":", 1)[1])
    for port in (gcs_port, node["NodeManagerPort"], node["ObjectManagerPort"]):
        found = _listening(port)
        assert found and all(map(_loopback, found)), (port, found)

    @ray.remote(num_cpus=0)
    def settings():
        return os.environ.get("RAY_USAGE_STATS_ENABLED"), os.environ.get("RAY_USAGE_STATS_PROMPT_ENABLED")

    assert ray.get(settings.remote()) == ("0", "0")  # what Ray's own processes were started with


SECOND_CLUSTER = """
import os, sys
from multimodal import raydata
def pid():
    return os.getpid()

pids = []
for _ in range(2):
    with raydata.cluster(num_cpus=1) as ray:
        pids.append(ray.get(ray.remote(num_cpus=0)(pid).remote()))
print(pids[0] != pids[1])
"""


def test_a_second_local_cluster_in_one_process_answers(tmp_path):
    """Ray keeps the first auth token it reads for the life of the process: a later local cluster (predict
    --engine ray after federate, in one session) must come up with the same one, or its calls are refused."""
    env = {**os.environ, "HOME": str(tmp_path)}
    for k in raydata._AUTH:
        env.pop(k, None)
    run = subprocess.run([sys.executable, "-c", SECOND_CLUSTER], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "True"


def test_blocks_out_of_order_or_repeated_write_nothing(tmp_path):
    def block(start, n):
        return pa.table({raydata.ROW: np.arange(start, start + n), "id": [f"p{i}" for i in range(start, start + n)],
                         "status": ["ok"] * n})

    out = tmp_path / "p.parquet"
    assert raydata.write_in_order([block(0, 2), block(2, 3)], out, [])["rows"] == 5
    for blocks in ([block(0, 2), block(3, 1)], [block(0, 2), block(0, 2)], [block(2, 2), block(0, 2)]):
        out.unlink(missing_ok=True)
        with pytest.raises(RuntimeError, match="out of order"):
            raydata.write_in_order(blocks, out, [])
        assert not out.exists()


def test_a_batch_that_raises_is_scored_row_by_row(model_dir, records, monkeypatch):
    """An exception that no record's loader caught: the batch's other rows are still scored, and the row
    that raises gets the exception's type in its error, not its text (which may quote the record)."""
    batch = pa.Table.from_pandas(pd.read_csv(records, dtype=str, nrows=4).assign(**{raydata.ROW: range(4)}))
    ids = batch.column("patient_id").to_pylist()
    import torch

    # this process's own thread count: a Scorer sets it, and the suite's later trainings run on it
    scorer = raydata.Scorer(str(model_dir), None, str(records.parent), str(records), 16, torch.get_num_threads())
    predict = scorer.model.predict

    def flaky(rec, batch_size):
        if len(rec) > 1 or rec.df["patient_id"].iloc[0] == ids[1]:
            raise ValueError(f"patient {rec.df['patient_id'].iloc[0]}")
        return predict(rec, batch_size=batch_size)

    monkeypatch.setattr(scorer.model, "predict", flaky)
    got = scorer(batch).to_pandas()
    assert got[raydata.ROW].tolist() == [0, 1, 2, 3] and got["id"].tolist() == ids
    assert got["status"].tolist() == ["ok", "error", "ok", "ok"] and got["prob_1"].isna().tolist()[1]
    assert got.loc[1, "error"] == "prediction failed (ValueError)"


def test_engine_ray_refusals_are_one_line(capsys, model_dir, records, tmp_path, monkeypatch):
    base = ["predict", "--engine", "ray", "--model", model_dir, "--records", records]
    code, _, err = run_cli(capsys, *base, "--out", tmp_path / "p.csv")
    one_line_error(code, err, "writes Parquet")
    code, _, err = run_cli(capsys, *base, "--out", tmp_path / "p.parquet", "--resume")
    one_line_error(code, err, "--engine local")
    monkeypatch.setitem(sys.modules, "ray", None)  # as where the extra is not installed
    with pytest.raises(UserError, match=r"pip install 'mmdx\[ray\]'"):
        raydata.predict_ray(model_dir, records, tmp_path / "p.parquet")
