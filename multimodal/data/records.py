"""Patient records: one row per patient (or study), read from CSV or Parquet and checked against the config."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np
import pandas as pd

from multimodal.config import Config
from multimodal.data.shown import printable
from multimodal.errors import UserError

log = logging.getLogger("mmdx")


@dataclass
class Records:
    """A records table plus the folder its relative image paths resolve against."""

    df: pd.DataFrame
    root: Path
    source: str = "records"
    _columns: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.df)

    def row(self, i: int) -> "Row":
        """Record i's cells. Unlike df.iloc[i], builds no pandas Series, which cost about as much as the
        rest of loading a cached record; a cell comes straight from its column, so an integer column
        stays integer beside float ones. Assumes df is not edited after the Records is made."""
        return Row(self, i)

    def cell(self, i: int, col: str):
        arr = self._columns.get(col)
        if arr is None:
            arr = self._columns[col] = self.df[col].to_numpy()
        return arr[i]

    def subset(self, idx) -> "Records":
        return Records(self.df.iloc[idx].reset_index(drop=True), self.root, self.source)


class Row:
    __slots__ = ("records", "i")

    def __init__(self, records: Records, i: int):
        self.records, self.i = records, i

    def __getitem__(self, col: str):
        return self.records.cell(self.i, col)


# Strings stay strings: ids like 007 and free text must not be coerced.
# A stray non-UTF-8 byte in one report becomes U+FFFD in that cell, not an unreadable file.
_CSV_OPTIONS = dict(dtype=str, keep_default_na=False, na_values=[""], encoding_errors="replace")


def read_table(path: Union[str, Path]) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"records file not found: {path}")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            df = pd.read_parquet(path)
        else:
            df = pd.read_csv(path, **_CSV_OPTIONS)
    except pd.errors.EmptyDataError:
        raise UserError(f"{path}: file is empty") from None
    except Exception as e:  # parser errors carry multi-line messages
        raise UserError(f"{path}: cannot read records ({str(e).splitlines()[0][:150]})") from None
    if df.empty:
        raise UserError(f"{path}: no records (header only)")
    return df


def load_records(path: Union[str, Path, pd.DataFrame], config: Config, *, labels: bool = False,
                 image_root: Optional[Union[str, Path]] = None) -> Records:
    """Read and check a records file. `labels=True` also requires the label column(s)."""
    if isinstance(path, pd.DataFrame):
        return checked(_plain_missing(path.reset_index(drop=True)), config, "records", Path.cwd(), labels, image_root)
    return checked(read_table(path), config, str(path), Path(path).resolve().parent, labels, image_root)


def _plain_missing(df: pd.DataFrame) -> pd.DataFrame:
    """pandas' nullable columns (string, Int64, boolean: what Dask, Spark's toPandas and
    dtype_backend="pyarrow" give) mark a missing cell pd.NA, which the preprocessing would read as the
    text "<NA>"; as object columns with NaN they read as a records file does."""
    nullable = [c for c in df.columns if getattr(df[c].dtype, "na_value", None) is pd.NA]
    if not nullable:
        return df
    df = df.copy()
    for c in nullable:
        df[c] = df[c].astype(object).where(df[c].notna(), np.nan)
    return df


def iter_record_chunks(path: Union[str, Path], config: Config, rows: int,
                       image_root: Optional[Union[str, Path]] = None) -> Iterator[Records]:
    """The records file in consecutive chunks of `rows` (the last may be shorter), each checked like
    load_records: a batch job's memory is one chunk, whatever the file's length."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"records file not found: {path}")
    folder, n = path.resolve().parent, 0
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            frames = (b.to_pandas() for b in pq.ParquetFile(path).iter_batches(batch_size=rows))
        else:
            frames = pd.read_csv(path, chunksize=rows, **_CSV_OPTIONS)
        for df in frames:
            n += len(df)
            yield checked(df.reset_index(drop=True), config, str(path), folder, False, image_root)
    except pd.errors.EmptyDataError:
        raise UserError(f"{path}: file is empty") from None
    except (UserError, GeneratorExit):
        raise
    except Exception as e:  # parser errors carry multi-line messages
        raise UserError(f"{path}: cannot read records after row {n} ({str(e).splitlines()[0][:150]})") from None
    if n == 0:
        raise UserError(f"{path}: no records (header only)")


def checked(df: pd.DataFrame, config: Config, source: str, folder: Path, labels: bool = False,
            image_root: Optional[Union[str, Path]] = None) -> Records:
    root = Path(image_root or config.data.image_root or folder)
    if not root.is_absolute():
        root = folder / root
    need = [config.data.id] + ([config.data.group] if config.data.group else []) + config.columns() + (config.label_columns() if labels else [])
    missing = [c for c in dict.fromkeys(need) if c not in df.columns]
    if missing:
        has = printable(", ".join(map(str, df.columns[:12])))
        raise UserError(f"{source}: unknown column{'s' if len(missing) > 1 else ''} "
                        f"{', '.join(repr(c) for c in missing)} (file has: {has})")
    if labels:
        cols = config.label_columns()
        if df[cols].isna().all(axis=None):
            raise UserError(f"{source}: label column {', '.join(map(repr, cols))} is empty")
        ids = df[config.data.id].astype(str)
        dup = ids.duplicated()
        if dup.any() and not config.data.group:
            raise UserError(f"{source}: {int(dup.sum())} rows repeat an id in '{config.data.id}' (e.g. "
                            f"{ids[dup].iloc[0]!r}); ids must be unique, or set data.group to the patient column "
                            f"when a patient has several records")
        if dup.any():
            log.warning("%s: %d rows repeat an id in '%s'; allowed because data.group is set", source,
                        int(dup.sum()), config.data.id)
    return Records(df, root, source)
