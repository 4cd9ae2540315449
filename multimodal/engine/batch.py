"""Batch prediction over records files of any length: streamed, resumable, and shardable.

A hospital archive is 10^5-10^7 rows, so a job must never hold the whole file, must survive a kill -9,
and must be splittable across processes without changing a byte of the result:

- records are read in chunks of `chunk_rows`; each chunk's predictions are written at once, as one
  Parquet part (exact floats) in a hidden folder beside the output, by atomic rename;
- `resume=True` skips the chunks whose part is there, after checking that the input file, the model
  and the chunking are the ones the interrupted run used;
- under torchrun (WORLD_SIZE > 1) chunk i belongs to rank i % WORLD_SIZE; rank 0 merges the parts in
  input order into the one output file, which appears whole by rename, then removes the parts.

The chunks are the same for any number of processes, and so are the batches inside them, which is
why a sharded run's probabilities are byte-identical to a single process's.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import pandas as pd

from multimodal.errors import UserError
from multimodal.output import atomic_file, check_file_target, claim, defuse_frame, strict_json
from multimodal.data.records import iter_record_chunks

log = logging.getLogger("mmdx")
PARTS_TAG = ".mmdx-parts"
JOB = "job.json"


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls) -> "Shard":
        """torchrun's WORLD_SIZE / RANK; a plain process is rank 0 of 1."""
        world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
        if not 0 <= rank < world:
            raise UserError(f"RANK={rank} is outside WORLD_SIZE={world}")
        return cls(rank, world)


def parts_dir(out: Path) -> Path:
    return out.parent / f".{out.name}{PARTS_TAG}"


def _part(parts: Path, i: int) -> Path:
    return parts / f"part-{i:06d}.parquet"


def _identity(model, records: Path, chunk_rows: int, batch_size: int, out: Path) -> dict:
    """What must not change between an interrupted run and its resumption."""
    st = records.stat()
    digest = None
    if model.model_dir is not None and (Path(model.model_dir) / "checksums.json").is_file():
        digest = hashlib.sha256((Path(model.model_dir) / "checksums.json").read_bytes()).hexdigest()
    return {"records": str(records.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "model": digest, "chunk_rows": chunk_rows, "batch_size": batch_size, "output": out.name}


def _clear(parts: Path) -> None:
    """Only what an earlier job of ours wrote there: its job file, parts, locks and temporaries."""
    for f in parts.iterdir():
        if f.name == JOB or f.name.startswith(("part-", ".part-")):
            f.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        parts.rmdir()


def _prepare(parts: Path, identity: dict, resume: bool) -> int:
    """Make the parts folder ready; returns how many parts an interrupted run left to reuse."""
    if parts.exists():
        try:
            old = json.loads((parts / JOB).read_text())
        except (OSError, ValueError):
            raise UserError(f"{parts} exists but is not an mmdx batch job's folder; move it away") from None
        if resume and old != identity:
            changed = sorted(k for k in identity if old.get(k) != identity[k])
            raise UserError(f"--resume: the interrupted run differs in {', '.join(changed)}; "
                            f"rerun without --resume to start over")
        if resume:
            return len(list(parts.glob("part-*.parquet")))
        log.warning("an interrupted run of this prediction was found; starting over (--resume continues it)")
        _clear(parts)
    elif resume:
        log.warning("--resume: no interrupted run found for this output; starting from the first record")
    parts.mkdir(parents=True, exist_ok=True)
    (parts / JOB).write_text(strict_json(identity) + "\n")
    return 0


def _write_part(df: pd.DataFrame, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False)
    strings = pa.schema([pa.field(f.name, pa.string()) if pa.types.is_null(f.type) else f for f in table.schema])
    atomic_file(path, lambda tmp: pq.write_table(table.cast(strings), tmp))


def _merge(parts: Path, n_chunks: int, out: Path, inputs) -> dict:
    """Parts → one file, in input order, one part in memory at a time."""
    import pyarrow.parquet as pq

    files = [_part(parts, i) for i in range(n_chunks)]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise UserError(f"batch job incomplete: {len(missing)} of {n_chunks} parts missing (e.g. {missing[0]}); "
                        f"rerun with --resume")
    counts = {"rows": 0, "errors": 0}

    def write(tmp: str) -> None:
        if str(out).endswith((".parquet", ".pq")):
            schema = pq.read_schema(files[0])
            with pq.ParquetWriter(tmp, schema) as w:
                for f in files:
                    t = pq.read_table(f).cast(schema)
                    counts["rows"] += t.num_rows
                    counts["errors"] += int(t.column("status").to_pandas().eq("error").sum())
                    w.write_table(t)
            return
        with open(tmp, "w", newline="") as fh:
            for k, f in enumerate(files):
                df = pd.read_parquet(f)
                counts["rows"] += len(df)
                counts["errors"] += int((df["status"] == "error").sum())
                defuse_frame(df).to_csv(fh, header=k == 0, index=False)

    atomic_file(out, write, inputs)
    return counts


def _barrier(shard: Shard) -> None:
    if shard.world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        dist.barrier()


def predict_file(model, records, out, *, chunk_rows: int = 10_000, resume: bool = False, batch_size: int = 64,
                 workers: int = 0, progress: bool = False, shard: Optional[Shard] = None,
                 inputs: Iterable = ()) -> dict:
    """Predict every row of `records` (CSV or Parquet) into `out`, one row per input row, in input order.

    Returns {"rows", "ok", "errors", "chunks", "reused_chunks", "seconds"} (counts on rank 0 only)."""
    from multimodal.progress import bar as progress_bar

    if chunk_rows < 1:
        raise UserError("chunk_rows must be at least 1")
    shard = shard or Shard()
    records, out = Path(records), Path(out)
    inputs = [records, model.model_dir, *inputs]
    out = check_file_target(out, inputs)
    if not records.is_file():
        raise UserError(f"records file not found: {records}")
    parts, t0 = parts_dir(out), time.perf_counter()
    identity = _identity(model, records, chunk_rows, batch_size, out)
    if resume and identity["model"] is None:
        raise UserError("--resume needs a model loaded from its directory (its checksums identify it)")
    lock = claim(out) if shard.rank == 0 else contextlib.nullcontext()
    with lock:
        reused = _prepare(parts, identity, resume) if shard.rank == 0 else 0
        _barrier(shard)
        n_chunks, done = 0, 0
        bar = progress_bar(desc="predict", unit="rec", enabled=progress and shard.rank == 0)
        try:
            chunks = iter_record_chunks(records, model.config, chunk_rows, model.config.data.image_root)
            for i, rec in enumerate(chunks):
                n_chunks = i + 1
                if i % shard.world != shard.rank or _part(parts, i).exists():
                    bar.update(len(rec) if i % shard.world == shard.rank else 0)
                    continue
                result = model._infer(rec, batch_size, workers, False)  # a deferred network builds in the first one
                _write_part(model._frame(rec, result), _part(parts, i))
                done += len(rec)
                bar.update(len(rec))
        except BaseException:
            if shard.world == 1 and not done and not reused:  # nothing to resume: leave no folder behind
                _clear(parts)
            raise
        bar.close()
        _barrier(shard)
        if shard.rank != 0:
            return {"rows": done, "chunks": n_chunks, "reused_chunks": 0, "seconds": time.perf_counter() - t0}
        counts = _merge(parts, n_chunks, out, inputs)
        _clear(parts)
    return {"rows": counts["rows"], "ok": counts["rows"] - counts["errors"], "errors": counts["errors"],
            "chunks": n_chunks, "reused_chunks": reused, "seconds": time.perf_counter() - t0}
