"""The resume journal of a batch job: what the parts folder may hold, and what of it may be merged.

A part is reused only when it is provably the prediction of this job for those rows. The folder
beside the output therefore holds:

- job.json: the job's identity by content: sha256 of the records file, the digest of the model
  directory (its checksums manifest) and the engine, the folder images resolve against, the chunking,
  the batch size and the output columns. Size and mtime would not do: a records file re-sorted in
  place keeps both, and a different --image-root reads other images for the same rows;
- part-NNNNNN.parquet, written by atomic rename, then part-NNNNNN.json, its journal entry: the job's
  digest, the chunk number, the row range [start, stop) and the part's sha256.

A job whose identity differs is someone else's: --resume refuses it (one line), a plain run starts
over. A part that does not match its entry (edited, truncated, copied from another chunk or job, or
written without an entry by a run killed between the two renames) cannot come from this job: it is
computed again, with a warning. The merge reads each part's bytes once, checks them against the entry
again and selects the columns by name. A forger who rewrites a part and its entry can pass; this is
integrity, like the model directory's checksums, not authenticity.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import stat
from pathlib import Path
from typing import Optional

from multimodal.output import sha256_file

from multimodal.errors import UserError
from multimodal.formats import strict_json
from multimodal.output import MODEL_MANIFEST, atomic_file

log = logging.getLogger("mmdx")
PARTS_TAG = ".mmdx-parts"
JOB = "job.json"
FORMAT = 2  # 1: identity by size and mtime, no journal entries


def parts_dir(out: Path) -> Path:
    return out.parent / f".{out.name}{PARTS_TAG}"


def part_path(parts: Path, i: int) -> Path:
    return parts / f"part-{i:06d}.parquet"


def entry_path(parts: Path, i: int) -> Path:
    return parts / f"part-{i:06d}.json"


def image_root(model, records: Path) -> str:
    """The folder relative image paths resolve against, as iter_record_chunks resolves it."""
    folder = records.resolve().parent
    root = Path(model.config.data.image_root or folder)
    return str((root if root.is_absolute() else folder / root).resolve())


def identity(model, records: Path, chunk_rows: int, batch_size: int, out: Path, columns: list) -> dict:
    """What must not change between an interrupted run and its resumption, by content."""
    manifest = Path(model.model_dir) / MODEL_MANIFEST if model.model_dir is not None else None
    return {"format": FORMAT, "records_sha256": sha256_file(records),
            "model": sha256_file(manifest) if manifest is not None and manifest.is_file() else None,
            "engine": "onnx" if model.engine is not None else "pytorch",
            "image_root": image_root(model, records), "chunk_rows": chunk_rows, "batch_size": batch_size,
            "columns": columns, "output": out.name}


def job_digest(ident: dict) -> str:
    return hashlib.sha256(strict_json(ident).encode()).hexdigest()


def clear(parts: Path) -> None:
    """Only what an earlier job of ours wrote there: its job file, parts, entries, locks and temporaries
    (never through a symbolic link: they would be the link target's files)."""
    if parts.is_symlink():
        return
    ours = [f for f in parts.iterdir() if f.name.startswith(("part-", ".part-", f".{JOB}"))]
    for f in [*ours, parts / JOB]:  # the job file last: a folder killed half-cleared is still known as ours
        f.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        parts.rmdir()


def _regular_bytes(path: Path) -> Optional[bytes]:
    """The file's bytes if it is a regular file and not a link (a part linked to /dev/zero or a FIFO
    would never finish reading); else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        return fh.read() if stat.S_ISREG(os.fstat(fd).st_mode) else None


def _json(path: Path) -> Optional[dict]:
    try:
        value = json.loads(_regular_bytes(path) or b"")
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def prepare(parts: Path, ident: dict, resume: bool) -> int:
    """Make the parts folder ready; returns how many parts of an interrupted run are kept."""
    if parts.is_symlink():  # clearing it would delete files in whatever it points to
        raise UserError(f"{parts} is a symbolic link; mmdx keeps a batch job's parts only in a real folder "
                        f"beside --out (remove the link)")
    if parts.exists():
        old = _json(parts / JOB) if parts.is_dir() else None
        if old is None:
            raise UserError(f"{parts} exists but is not an mmdx batch job's folder; move it away")
        if resume and old.get("format") != FORMAT:
            raise UserError("--resume: the interrupted run was written by another version of mmdx; "
                            "rerun without --resume to start over")
        if resume and old != ident:
            changed = sorted(k for k in set(ident) | set(old) if old.get(k) != ident.get(k))
            raise UserError(f"--resume: the interrupted run differs in {', '.join(changed)}; "
                            f"rerun without --resume to start over")
        if resume:
            return _keep_matching(parts, ident)
        log.warning("an interrupted run of this prediction was found; starting over (--resume continues it)")
        clear(parts)
    elif resume:
        log.warning("--resume: no interrupted run found for this output; starting from the first record")
    parts.mkdir(parents=True, exist_ok=True)
    atomic_file(parts / JOB, lambda tmp: Path(tmp).write_text(strict_json(ident) + "\n"))
    return 0


def _keep_matching(parts: Path, ident: dict) -> int:
    """Remove the parts that do not match their journal entry (they are computed again); → parts kept."""
    kept, bad = 0, []
    for f in sorted(parts.glob("part-*.parquet")):
        try:
            i = int(f.stem.split("-", 1)[1])
        except ValueError:
            i = -1
        if i >= 0 and f.name == part_path(parts, i).name and check(parts, i, ident) is not None:
            kept += 1
            continue
        bad.append(f.name)
        f.unlink(missing_ok=True)
        if i >= 0:
            entry_path(parts, i).unlink(missing_ok=True)
    if bad:
        log.warning("--resume: %d part%s did not match the job's journal (edited, truncated, copied or "
                    "unfinished: %s%s); computing %s again", len(bad), "s" * (len(bad) > 1), bad[0],
                    f" and {len(bad) - 1} more" if len(bad) > 1 else "", "them" if len(bad) > 1 else "it")
    return kept


def record(parts: Path, i: int, ident: dict, rows: int, sha256: str) -> None:
    """The journal entry of part i, written after the part itself: a part without one is not reused."""
    start = i * ident["chunk_rows"]
    entry = {"job": job_digest(ident), "chunk": i, "rows": [start, start + rows], "sha256": sha256}
    atomic_file(entry_path(parts, i), lambda tmp: Path(tmp).write_text(strict_json(entry) + "\n"))


def check(parts: Path, i: int, ident: dict):
    """Part i as a pyarrow Table if it is what its entry says (this job, chunk i and its row range, its
    bytes, the output's columns), else None. Read once, from the bytes that were hashed, so that what
    is checked is what is merged."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    entry, start, data = _json(entry_path(parts, i)), i * ident["chunk_rows"], _regular_bytes(part_path(parts, i))
    if data is None or entry is None or entry.get("job") != job_digest(ident) or entry.get("chunk") != i:
        return None
    rows = entry.get("rows")
    if not (isinstance(rows, list) and len(rows) == 2 and rows[0] == start and start < rows[1] <= start
            + ident["chunk_rows"]) or entry.get("sha256") != hashlib.sha256(data).hexdigest():
        return None
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError):
        return None
    if sorted(table.column_names) != sorted(ident["columns"]) or table.num_rows != rows[1] - rows[0]:
        return None
    return table.select(ident["columns"])  # by name: a part's column order need not be the output's
