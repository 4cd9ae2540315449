"""`mmdx predict --engine ray`: the records scored by Ray Data actors, on a local Ray or a cluster.

What a single process gives, on as many machines as a cluster has: the same rows in the same order,
the same probabilities (within float rounding: a batch may hold other rows beside a record), and the
same per-row errors. Each step is chosen for that:

- the records are read as `predict_file` reads them (records.iter_record_chunks: the same parser,
  options and column checks), in one Ray task that numbers every row (`_row`, its place in the file).
  Ray's own read_csv/read_parquet cannot give that number: their readers know no file offset, and
  `monotonically_increasing_id` depends on task ids, which a retried task changes;
- `Scorer` is a stateful callable class: each actor loads the model once, then scores batches. A
  record's failure is its row's status "error", and so is an exception that escapes a whole batch
  (the batch is then scored row by row), so that one bad record never fails the job;
- a killed actor is restarted and its batch recomputed: Ray Data's own default for an actor pool
  (max_restarts and max_task_retries -1, without end; set through the remote arguments that Ray 2.60
  deprecates, so mmdx leaves them alone). A record that kills every process reading it would so be
  retried for ever; the decoders' limits (multimodal.data.image_guard) are what stop such records;
- Ray Data keeps input order (`preserve_order`), and the driver checks it: `_row` must run 0, 1, 2...
  with no gap or repeat, else nothing is written. The output is one Parquet file with predict_file's
  columns, written as every output is (multimodal.output: claimed, guarded, whole or not at all).

Privacy: a local Ray listens on 127.0.0.1 only, with no dashboard, and writes nothing under $HOME (see
`_contained`); usage stats are off through multimodal.runtime's TELEMETRY_OFF. An existing cluster
(`address`) is configured by whoever started it.
"""
from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from multimodal.data.batches import one_line
from multimodal.data.records import Records, iter_record_chunks
from multimodal.errors import RecordError, UserError
from multimodal.output import atomic_file, check_file_target, claim

log = logging.getLogger("mmdx")

ROW = "_row"  # a record's place in the records file: the order key, checked before anything is written
# Ray Data hands a task's output on in blocks of up to 128 MiB by default: the actors would wait for that
# much of the records to be read. In blocks of this size, scoring starts after the first MiB.
BLOCK_BYTES = 1 << 20


def _ray():
    """Ray and Ray Data, or the one-line way to get them."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise UserError("--engine ray needs the optional extra: pip install 'mmdx[ray]'") from None
    return ray


def predict_ray(model_dir, records, out, *, address: Optional[str] = None, num_workers: int = 2,
                threads_per_worker: int = 1, batch_size: int = 64, onnx=None, image_root=None,
                progress: bool = False, scorer: Optional[type] = None) -> dict:
    """Predict every row of `records` (CSV or Parquet) into `out` (.parquet), with `num_workers` Ray actors
    of `threads_per_worker` threads each; what predict_file writes, one row per input row, in input order.

    `address`: an existing cluster (what `ray.init(address=...)` takes; mmdx, the model directory, the
    records and the images must be at the same paths on every node). Without it a local Ray is started
    for the job and stopped after it; in a process already connected to Ray, that connection is used.
    `image_root`: relative image paths resolve against it (itself relative to the records' folder), else
    against the records' folder. `scorer`: the callable class each actor runs, a subclass of `Scorer`.
    Returns {"rows", "ok", "errors", "workers", "seconds"}."""
    t0 = time.perf_counter()
    _ray()  # a missing extra is said before anything loads
    records, out = Path(records), Path(out)
    if not str(out).endswith((".parquet", ".pq")):
        raise UserError(f"--out {out}: --engine ray writes Parquet; give a .parquet file")
    for name, value in (("--ray-workers", num_workers), ("--batch-size", batch_size),
                        ("threads_per_worker", threads_per_worker)):
        if value < 1:
            raise UserError(f"{name} must be at least 1")
    from multimodal.api import DiagnosisModel

    model = DiagnosisModel.load(model_dir, device="cpu", onnx=onnx, threads=1, defer_network=True)  # checks it
    inputs = [records, model.model_dir, *([onnx] if onnx else [])]
    out = check_file_target(out, inputs)
    first = next(iter_record_chunks(records, model.config, 1, image_root))  # one line for a bad file, before Ray
    actor = dict(model_dir=str(Path(model_dir).resolve()), onnx=str(Path(onnx).resolve()) if onnx else None,
                 root=str(first.root), source=str(records), batch_size=batch_size, threads=threads_per_worker)
    with claim(out), cluster(address, num_workers * threads_per_worker + 1) as ray, _context(ray, progress):
        ds = _pipeline(ray, records.resolve(), model.config, scorer or Scorer, actor, num_workers)
        counts = write_in_order(ds.iter_batches(batch_size=None, batch_format="pyarrow"), out, inputs)
    return {**counts, "ok": counts["rows"] - counts["errors"], "workers": num_workers,
            "seconds": time.perf_counter() - t0}


def _pipeline(ray, records: Path, config, scorer: type, actor: dict, num_workers: int):
    """records → numbered rows (one reading task) → blocks of one batch → `num_workers` actors of `scorer`.
    A block goes to one actor: blocks of one batch spread the batches over all of them. The split runs in
    the reading task (Ray fuses the two), and Ray does not fuse a repartition into the actors after it."""
    batch, threads = actor["batch_size"], actor["threads"]
    ds = ray.data.from_items([{"path": str(records)}]).map_batches(
        read_numbered, batch_size=1, batch_format="pandas", fn_kwargs=dict(config=config))
    ds = ds.repartition(target_num_rows_per_block=batch)
    return ds.map_batches(scorer, fn_constructor_kwargs=actor, batch_size=batch, batch_format="pyarrow",
                          compute=ray.data.ActorPoolStrategy(size=num_workers), num_cpus=threads)


def read_numbered(batch: pd.DataFrame, config, rows: int = 10_000):
    """The records file named in `batch`, in chunks of `rows` (predict_file's), each row numbered by its
    place in the file. A generator: Ray passes the chunks on in blocks (BLOCK_BYTES) as they are read, so
    no process holds the whole file. The chunks are Arrow tables, which give back the frame that was read
    (missing cells NaN, as predict_file sees them); a pandas block comes back with pd.NA, which the
    preprocessing does not read as missing."""
    import pyarrow as pa

    n = 0
    for path in batch["path"]:
        for rec in iter_record_chunks(path, config, rows):
            df = rec.df.copy()
            df.insert(0, ROW, np.arange(n, n + len(df), dtype=np.int64))
            n += len(df)
            yield pa.Table.from_pandas(df, preserve_index=False)


class Scorer:
    """One per Ray actor: loads the model once, then scores each batch into predict_file's columns and `_row`.

    No record, and no exception, fails the job from here: `model.predict` already turns a record that
    cannot be read into its row's error; anything else a batch raises is retried row by row, and a row
    that still raises gets status "error" with the exception's type (not its text, which may quote the
    record). A process that dies (killed, out of memory) is Ray's to restart."""

    def __init__(self, model_dir: str, onnx: Optional[str], root: str, source: str, batch_size: int, threads: int):
        import torch

        from multimodal.api import DiagnosisModel

        torch.set_num_threads(threads)
        self.model = DiagnosisModel.load(model_dir, device="cpu", onnx=onnx, threads=threads)
        self.root, self.source, self.batch_size = Path(root), source, batch_size

    def __call__(self, batch):
        df = batch.to_pandas()
        rows = df.pop(ROW).to_numpy()
        rec = Records(df, self.root, self.source)
        try:
            frame = self.model.predict(rec, batch_size=self.batch_size)
        except Exception as e:  # noqa: BLE001 — not one record's: find the rows it belongs to
            log.warning("a batch of %d records raised %s; scoring them one by one", len(rec), type(e).__name__)
            frame = pd.concat([self._one(rec, i) for i in range(len(rec))], ignore_index=True)
        frame.insert(0, ROW, rows)
        return _arrow(frame)

    def _one(self, rec: Records, i: int) -> pd.DataFrame:
        """Record i alone: its prediction, or an error row (id, no probabilities, status error)."""
        one = rec.subset([i])
        try:
            return self.model.predict(one, batch_size=1)
        except Exception as e:  # noqa: BLE001 — this record's, reported on its row
            why = one_line(e) if isinstance(e, RecordError) else f"prediction failed ({type(e).__name__})"
            frame = pd.DataFrame({"id": one.df[self.model.config.data.id].to_numpy()})
            for c in self.model.classes:
                frame[f"prob_{c}"] = np.nan
            frame["pred"] = None
            if self.model.prep.labels.conformal is not None:  # task.conformal: predict's set columns, empty
                frame["prediction_set"], frame["set_size"] = None, pd.array([pd.NA], dtype="Int64")
            return frame.assign(status="error", error=why)


def _arrow(frame: pd.DataFrame):
    """The frame as predict_file writes its parts: no index, a column of only nulls typed string."""
    import pyarrow as pa

    table = pa.Table.from_pandas(frame, preserve_index=False)
    return table.cast(pa.schema([pa.field(f.name, pa.string()) if pa.types.is_null(f.type) else f
                                 for f in table.schema]))


def write_in_order(tables, out: Path, inputs) -> dict:
    """The scored blocks → one Parquet file, `_row` dropped, after checking that they arrive in file order
    with no row missing or repeated (a block out of place fails the job: the file is then not written)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    counts = {"rows": 0, "errors": 0}

    def write(tmp: str) -> None:
        writer = None
        try:
            for t in tables:
                if not t.num_rows:
                    continue
                expected = np.arange(counts["rows"], counts["rows"] + t.num_rows)
                if not np.array_equal(t.column(ROW).to_numpy(), expected):
                    raise RuntimeError(f"Ray returned records out of order after row {counts['rows']}; "
                                       f"{out} was not written")
                t = t.drop_columns([ROW])
                writer = writer or pq.ParquetWriter(tmp, t.schema)
                writer.write_table(t.cast(writer.schema))
                counts["rows"] += t.num_rows
                counts["errors"] += int(pc.sum(pc.equal(t.column("status"), "error")).as_py() or 0)
        finally:
            if writer is not None:
                writer.close()

    atomic_file(out, write, inputs)
    return counts


@contextlib.contextmanager
def cluster(address: Optional[str] = None, num_cpus: Optional[int] = None):
    """Ray for the duration: this process's existing connection, else `address`'s cluster, else a local
    one on 127.0.0.1 with `num_cpus` logical CPUs and no dashboard, stopped (and its files removed) at the end."""
    ray = _ray()
    if ray.is_initialized():
        yield ray
        return
    with contextlib.nullcontext() if address else _contained(ray) as temp:
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _temp_dir=temp,
                     logging_level=logging.WARNING)
        try:
            if not address and not ipaddress.ip_address(ray.util.get_node_ip_address()).is_loopback:
                raise UserError(f"Ray {ray.__version__} would listen beyond 127.0.0.1 here; start a cluster "
                                f"yourself and give its address (--ray-address)")
            yield ray
        finally:
            ray.shutdown()


_AUTH = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
_TOKEN: list[str] = []  # this process's token for the local clusters it starts (_contained)


@contextlib.contextmanager
def _contained(ray):
    """What keeps a local Ray on this machine, out of $HOME, and leaves nothing behind, while it runs:
    - Ray resolves a node address of 127.0.0.1 (ray.init's _node_ip_address included) to the machine's
      network address, and its servers then listen on every interface, except where clusters are off (its
      rule on macOS and Windows). That switch is read once, at import, so it is set on the loaded module
      for this process and in the environment for the cluster's; `cluster` checks the address it got.
    - it authenticates its processes with a token that it generates into ~/.ray/auth_token; the cluster
      lives for one job, so its token is made here and reaches its processes through their environment.
      One token per process: Ray keeps the first token it reads for the life of the process, so a later
      cluster with a new one would refuse this process's calls (predict --engine ray after federate).
      Authentication settings of the user's own are left alone.
    - its session folder (logs, sockets, spilled blocks) would stay in /tmp/ray; it is a fresh temporary
      folder instead (→ yielded), removed with everything in it once the cluster has stopped."""
    from ray._private import ray_constants

    env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    if not any(v in os.environ for v in _AUTH):
        _TOKEN[:] = _TOKEN or [secrets.token_hex(32)]
        env["RAY_AUTH_TOKEN"] = _TOKEN[0]
    saved, clusters = {k: os.environ.get(k) for k in (*env, *_AUTH)}, ray_constants.ENABLE_RAY_CLUSTER
    os.environ.update(env)
    ray_constants.ENABLE_RAY_CLUSTER = False
    temp = tempfile.mkdtemp(prefix="mmdx-ray-", dir=_temp_parent())
    try:
        yield temp
    finally:
        shutil.rmtree(temp, ignore_errors=True)
        ray_constants.ENABLE_RAY_CLUSTER = clusters
        for k, v in saved.items():  # ray.init sets RAY_AUTH_MODE itself
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _temp_parent() -> str:
    """The temp folder, unless it is too deep for Ray: its sockets lie up to 64 characters below the session
    folder, and AF_UNIX allows 107 bytes; /tmp then, which is Ray's own choice."""
    base = tempfile.gettempdir()
    return base if len(base) + len("/mmdx-ray-12345678") + 64 <= 107 else "/tmp"


@contextlib.contextmanager
def _context(ray, progress: bool):
    """Ray Data's settings for one job: input order kept, small blocks, and its progress (bars, and the
    plan and timing it logs) only when asked for."""
    ctx, log_ = ray.data.DataContext.get_current(), logging.getLogger("ray.data")
    saved = ctx.execution_options.preserve_order, ctx.target_max_block_size, ctx.enable_progress_bars, log_.level
    ctx.execution_options.preserve_order, ctx.target_max_block_size, ctx.enable_progress_bars = \
        True, BLOCK_BYTES, progress
    log_.setLevel(log_.level if progress else logging.WARNING)
    try:
        yield ctx
    finally:
        ctx.execution_options.preserve_order, ctx.target_max_block_size, ctx.enable_progress_bars, level = saved
        log_.setLevel(level)
