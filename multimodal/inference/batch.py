"""Batch prediction over records files of any length: streamed, resumable, and shardable.

A hospital archive is 10^5-10^7 rows, so a job must never hold the whole file, must survive a kill -9,
and must be splittable across processes without changing a byte of the result:

- records are read in chunks of `chunk_rows`; each chunk's predictions are written at once, as one
  Parquet part (exact floats) in a hidden folder beside the output, by atomic rename;
- `resume=True` keeps the parts of an interrupted run of the same job, each checked against the
  journal written with it (see multimodal.inference.journal); the merge goes by column name;
- under torchrun (WORLD_SIZE > 1) chunk i belongs to rank i % WORLD_SIZE; rank 0 merges the parts in
  input order into the one output file, which appears whole by rename, then removes the parts.

The chunks are the same for any number of processes, and so are the batches inside them, which is
why a sharded run's probabilities are byte-identical to a single process's.
"""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import pandas as pd

from multimodal.output import sha256_file

from multimodal.data.records import iter_record_chunks
from multimodal import distributed
from multimodal.distributed import ProcessState
from multimodal.inference import journal
from multimodal.errors import UserError
from multimodal.formats import defuse_frame
from multimodal.output import atomic_file, check_file_target, claim

log = logging.getLogger("mmdx")


def _write_part(df: pd.DataFrame, path: Path) -> str:
    """Writes the part by atomic rename; → the sha256 of the bytes that were renamed into place."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False)
    strings = pa.schema([pa.field(f.name, pa.string()) if pa.types.is_null(f.type) else f for f in table.schema])
    digest = []

    def write(tmp: str) -> None:
        pq.write_table(table.cast(strings), tmp)
        digest.append(sha256_file(tmp))

    atomic_file(path, write)
    return digest[0]


def _same_rows(table, rec, id_column: str) -> bool:
    """A kept part holds the ids of its chunk, in order: no row lost, added or moved."""
    if table.num_rows != len(rec):
        return False
    return list(map(str, table.column("id").to_pylist())) == list(map(str, rec.df[id_column].tolist()))


def _merge(parts: Path, ident: dict, n_chunks: int, out: Path, inputs) -> dict:
    """Parts → one file, in input order, one part in memory at a time, each checked against the journal."""
    import pyarrow.parquet as pq

    counts, ids = {"rows": 0, "errors": 0}, []

    def tables():
        for i in range(n_chunks):
            t = journal.check(parts, i, ident)
            if t is None:
                what = "missing" if not journal.part_path(parts, i).exists() else "changed since it was written"
                name = journal.part_path(parts, i).name
                raise UserError(f"batch job incomplete: part {i + 1} of {n_chunks} ({name}) is {what}; "
                                f"rerun with --resume")
            counts["rows"] += t.num_rows
            counts["errors"] += int(t.column("status").to_pandas().eq("error").sum())
            ids.append(pd.util.hash_array(t.column("id").to_pandas().astype(str).to_numpy(object)))
            yield t

    def write(tmp: str) -> None:
        if str(out).endswith((".parquet", ".pq")):
            writer = None
            try:
                for t in tables():
                    writer = writer or pq.ParquetWriter(tmp, t.schema)
                    writer.write_table(t.cast(writer.schema))
            finally:
                if writer is not None:
                    writer.close()
            return
        with open(tmp, "w", newline="") as fh:
            for k, t in enumerate(tables()):
                defuse_frame(t.to_pandas()).to_csv(fh, header=k == 0, index=False)

    atomic_file(out, write, inputs)
    counts["repeated_ids"] = _repeats(ids)
    return counts


def _repeats(hashes: list) -> int:
    """Rows whose id an earlier row already had (8 bytes a row, however long the file)."""
    h = np.sort(np.concatenate(hashes)) if hashes else np.zeros(0, np.uint64)
    return int((h[1:] == h[:-1]).sum())


def _barrier(shard: ProcessState) -> None:
    if shard.world > 1:
        import torch

        distributed.init(torch.device("cpu"))  # a gloo group: the ranks only wait for each other here
        distributed.barrier()


def predict_file(model, records, out, *, chunk_rows: int = 10_000, resume: bool = False, batch_size: int = 64,
                 workers: int = 0, progress: bool = False, shard: Optional[ProcessState] = None,
                 inputs: Iterable = ()) -> dict:
    """Predict every row of `records` (CSV or Parquet) into `out`, one row per input row, in input order.

    Returns {"rows", "ok", "errors", "chunks", "reused_chunks", "seconds"} (counts on rank 0 only)."""
    if chunk_rows < 1:
        raise UserError("--chunk-rows must be at least 1")
    if batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    shard = shard or ProcessState()
    records, out = Path(records), Path(out)
    inputs = [records, model.model_dir, *inputs]
    out = check_file_target(out, inputs)
    if not records.is_file():
        raise UserError(f"records file not found: {records}")
    if resume and model.model_dir is None:
        raise UserError("--resume needs a model loaded from its directory (its checksums identify it)")
    parts, t0 = journal.parts_dir(out), time.perf_counter()
    sets = ("prediction_set", "set_size") if model.prep.labels.conformal is not None else ()  # task.conformal
    columns = ["id", *(f"prob_{c}" for c in model.classes), "pred", *sets, "status", "error"]
    with claim(out) if shard.rank == 0 else contextlib.nullcontext():
        ident = journal.identity(model, records, chunk_rows, batch_size, out, columns)
        reused = journal.prepare(parts, ident, resume) if shard.rank == 0 else 0
        _barrier(shard)
        n_chunks, done = _predict_chunks(model, records, parts, ident, shard, workers, progress and shard.rank == 0,
                                         keep=bool(reused))
        _barrier(shard)
        if shard.rank != 0:
            return {"rows": done, "chunks": n_chunks, "reused_chunks": 0, "seconds": time.perf_counter() - t0}
        if sha256_file(records) != ident["records_sha256"]:  # the chunks were read from two versions of it
            raise UserError(f"{records} changed while it was being predicted; rerun without --resume")
        counts = _merge(parts, ident, n_chunks, out, inputs)
        journal.clear(parts)
    if counts["repeated_ids"]:
        log.warning("%s: %d rows repeat the id of an earlier row (column '%s'); each still has its own output "
                    "row, in input order: join on the row number, not the id", records, counts["repeated_ids"],
                    model.config.data.id)
    return {"rows": counts["rows"], "ok": counts["rows"] - counts["errors"], "errors": counts["errors"],
            "chunks": n_chunks, "reused_chunks": reused, "seconds": time.perf_counter() - t0}


def _predict_chunks(model, records: Path, parts: Path, ident: dict, shard: ProcessState, workers: int, progress: bool,
                    keep: bool) -> tuple[int, int]:
    """Predicts this rank's chunks that have no part yet, or none that holds their rows.
    → (chunks in the file, rows predicted)."""
    from multimodal.progress import bar as progress_bar

    n_chunks, done = 0, 0
    bar = progress_bar(desc="predict", unit="rec", enabled=progress)
    try:
        chunks = iter_record_chunks(records, model.config, ident["chunk_rows"], model.config.data.image_root)
        for i, rec in enumerate(chunks):
            n_chunks = i + 1
            mine = i % shard.world == shard.rank
            if mine and not _kept(parts, i, ident, rec, model.config.data.id):
                frame = model.predict(rec, batch_size=ident["batch_size"], workers=workers)  # a deferred network builds here
                sha = _write_part(frame, journal.part_path(parts, i))
                journal.record(parts, i, ident, len(rec), sha)
                done += len(rec)
            bar.update(len(rec) if mine else 0)
    except BaseException:
        if shard.world == 1 and not done and not keep:  # nothing to resume: leave no folder behind
            journal.clear(parts)
        raise
    bar.close()
    return n_chunks, done


def _kept(parts: Path, i: int, ident: dict, rec, id_column: str) -> bool:
    """Part i of an interrupted run may stand: it matches its journal entry and holds this chunk's rows."""
    if not journal.part_path(parts, i).exists():
        return False
    table = journal.check(parts, i, ident)
    if table is not None and _same_rows(table, rec, id_column):
        return True
    log.warning("--resume: %s does not hold the rows of chunk %d; computing it again",
                journal.part_path(parts, i).name, i)
    return False
