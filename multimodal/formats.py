"""What mmdx writes, as text: JSON that standard parsers read (no bare NaN) and tables that a spreadsheet
opens without running a cell as a formula. Conversions only; `multimodal.output` writes them, guarded
and atomic (write_json, write_table).
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

_FORMULA = re.compile(r"^[=+\-@\t\r]")
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def to_jsonable(obj: Any) -> Any:
    """Plain Python for json: numpy scalars/arrays -> Python, NaN/inf -> None, tuples -> lists, Paths -> str."""
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if obj is None or isinstance(obj, str):
        return obj
    return str(obj)


def strict_json(obj: Any, indent: int = 2) -> str:
    """Standard JSON (no bare NaN, which most parsers reject): non-finite numbers become null."""
    return json.dumps(to_jsonable(obj), allow_nan=False, ensure_ascii=False, indent=indent) + "\n"


def defuse_cell(v: Any) -> Any:
    """A spreadsheet runs a cell starting with = + - @ as a formula: prefix such text with a quote
    (OWASP's advice); plain numbers such as -0.5 stay as they are."""
    if isinstance(v, str) and _FORMULA.match(v) and not _NUMBER.match(v):
        return "'" + v
    return v


def defuse_frame(df):
    """A copy of the data frame with every column name and text cell defused (defuse_cell)."""
    from pandas.api.types import is_object_dtype, is_string_dtype

    out = df.copy()
    out.columns = [defuse_cell(str(c)) for c in df.columns]
    for c in out.columns:
        if is_object_dtype(out[c]) or is_string_dtype(out[c]):
            out[c] = out[c].map(defuse_cell)
    return out
