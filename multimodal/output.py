"""Writing result files atomically: a reader never sees half a file, a crash never leaves one."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pandas as pd


def _atomic(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_table(df: pd.DataFrame, path) -> Path:
    """CSV, or Parquet when the name ends in .parquet."""
    if str(path).endswith((".parquet", ".pq")):
        return _atomic(path, lambda t: df.to_parquet(t, index=False))
    return _atomic(path, lambda t: df.to_csv(t, index=False))


def write_json(obj, path) -> Path:
    return _atomic(path, lambda t: Path(t).write_text(json.dumps(obj, indent=2) + "\n"))
