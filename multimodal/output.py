"""The one way mmdx writes anything: guarded, locked and atomic.

A user's folders hold records, DICOM archives and earlier models, so a mistyped `--out` must fail
with one line before any work is done, never delete or overwrite what mmdx did not write:

- a file output may not be an input of the same run, an existing directory, or lie inside a model
  directory (only `mmdx train` writes those);
- a directory output (a model, a report folder) may replace only a directory of the same kind that
  mmdx wrote and that holds nothing but what its manifest lists; anything else is refused;
- the final file or folder appears by rename, with the mode the umask gives (not mkstemp's 0600);
  temporaries left by a killed run are removed by the next write to the same target;
- one run at a time per target: a second run writing the same `--out` is refused while the first holds it.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union

from multimodal.errors import UserError

PathLike = Union[str, Path]
TMP_TAG = ".mmdx-tmp-"
MODEL_MANIFEST = "checksums.json"
REPORT_MANIFEST = ".mmdx-report.json"
_FORMULA = re.compile(r"^[=+\-@\t\r]")
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_held: dict[str, int] = {}  # lock path -> depth: a run may claim its own target again


# -- what may be written where ----------------------------------------------------------------------------------
def _same(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def is_model_dir(d: Path) -> bool:
    return d.is_dir() and (d / MODEL_MANIFEST).is_file() and (d / "config.json").is_file()


def _enclosing_model_dir(path: Path) -> Optional[Path]:
    for parent in Path(os.path.abspath(path)).parents:
        if is_model_dir(parent):
            return parent
    return None


def check_file_target(path: PathLike, inputs: Iterable[Optional[PathLike]] = ()) -> Path:
    """Refuse, before any work, an output file that would destroy an input or a model."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--out {path} is a directory; give a file name, e.g. {path / 'predictions.csv'}")
    model = _enclosing_model_dir(path)
    if model is not None:
        raise UserError(f"--out {path} is inside the model directory {model}; only `mmdx train` writes there")
    for src in inputs:
        if src is not None and _same(path, Path(src)):
            raise UserError(f"--out {path} is also an input of this run ({src}); choose another output")
    return path


def _manifest_files(d: Path, kind: str) -> Optional[set[str]]:
    """Files mmdx wrote in `d` by its manifest (relative POSIX paths), or None if `d` is not of `kind`."""
    name = MODEL_MANIFEST if kind == "model" else REPORT_MANIFEST
    try:
        listed = json.loads((d / name).read_text())
    except (OSError, ValueError):
        return None
    if kind == "model" and not is_model_dir(d):
        return None
    files = listed if isinstance(listed, list) else list(listed) if isinstance(listed, dict) else None
    return None if files is None else {str(f) for f in files} | {name}


def _present_files(d: Path) -> set[str]:
    return {p.relative_to(d).as_posix() for p in d.rglob("*") if not p.is_dir()}


def check_dir_target(path: PathLike, kind: str, overwrite: bool = False,
                     inputs: Iterable[Optional[PathLike]] = ()) -> Path:
    """`kind` is "model" or "report". Missing or empty: fine. An earlier output of the same kind holding
    only its manifest's files: replaced (a model only with `overwrite`). Anything else: refused."""
    path = Path(path)
    for src in inputs:
        if src is not None and (_same(path, Path(src)) or _inside(Path(src), path)):
            raise UserError(f"--out {path} holds an input of this run ({src}); choose another output folder")
    if not path.exists():
        if _enclosing_model_dir(path) is not None:
            raise UserError(f"--out {path} is inside the model directory {_enclosing_model_dir(path)}")
        return path
    if not path.is_dir():
        raise UserError(f"--out {path} exists and is not a directory; refusing to replace it")
    present = _present_files(path)
    if not present and not any(path.iterdir()):
        return path
    known = _manifest_files(path, kind)
    what = "model directory" if kind == "model" else "report folder"
    if known is None:
        raise UserError(f"--out {path} exists and is not an mmdx {what}; refusing to replace it "
                        f"(choose a new or empty folder)")
    extra = sorted(present - known)
    if extra:
        raise UserError(f"--out {path}: an earlier {what} that now also holds {extra[0]!r}"
                        f"{f' and {len(extra) - 1} more' if len(extra) > 1 else ''}; refusing to replace it")
    if kind == "model" and not overwrite:
        raise UserError(f"--out {path} already holds a model; pass --overwrite (API: save(..., overwrite=True)) "
                        f"to replace it")
    return path


# -- one run per target -----------------------------------------------------------------------------------------
@contextlib.contextmanager
def claim(path: PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on `path` for the duration: a second run aiming at it fails at once.

    The lock file names its holder (pid and host). A lock whose holder is gone but that something
    it left behind still holds open (a child process, once an orphaned decoding worker) is stale: it
    is taken over, so that a killed run never blocks its own --resume."""
    path = Path(path)
    lock = path.parent / f".{path.name}.mmdx-lock"
    key = os.path.abspath(lock)
    if key in _held:
        _held[key] += 1
        try:
            yield path
        finally:
            _held[key] -= 1
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            locked = False
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino  # not unlinked by a run that just finished
        except FileNotFoundError:
            same = False
        if not locked:
            holder = os.pread(fd, 256, 0).decode(errors="replace").split()
            os.close(fd)
            if not same:  # a run that just finished removed it
                continue
            if len(holder) == 2 and holder[0].isdigit() and holder[1] == os.uname().nodename \
                    and not _alive(int(holder[0])):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lock)  # a fresh file, that nothing holds, is the lock from now on
                continue
            who = f" (pid {holder[0]})" if holder and holder[0].isdigit() else ""
            raise UserError(f"another mmdx run is writing {path}{who}; wait for it or choose another --out") from None
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {os.uname().nodename}\n".encode())
    _held[key] = 1
    try:
        yield path
    finally:
        del _held[key]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)


# -- atomic writes ----------------------------------------------------------------------------------------------
def _final_mode(path: Path, is_dir: bool) -> int:
    if path.exists():
        return path.stat().st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if is_dir else 0o666) & ~umask


def _remove_stale(path: Path) -> None:
    """Temporaries of earlier runs on this target whose process is gone (killed mid-write)."""
    for tmp in path.parent.glob(f".{glob_escape(path.name)}{TMP_TAG}*"):
        try:
            pid = int(tmp.name.rsplit(TMP_TAG, 1)[1].split(".", 1)[0])
        except (ValueError, IndexError):
            continue
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tmp_name(path: Path) -> str:
    return f".{path.name}{TMP_TAG}{os.getpid()}."


def atomic_file(path: PathLike, write: Callable[[str], Any], inputs: Iterable[Optional[PathLike]] = ()) -> Path:
    """`write(tmp_path)` writes the content; the target then appears whole, or not at all."""
    path = check_file_target(path, inputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    with claim(path):
        _remove_stale(path)
        fd, tmp = tempfile.mkstemp(prefix=_tmp_name(path), dir=path.parent)
        os.close(fd)
        try:
            write(tmp)
            os.chmod(tmp, _final_mode(path, False))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path


@contextlib.contextmanager
def staged_dir(path: PathLike, kind: str, overwrite: bool = False,
               inputs: Iterable[Optional[PathLike]] = ()) -> Iterator[Path]:
    """Yield an empty sibling folder to fill; on success it replaces `path` (checked by check_dir_target
    before and again at the swap), on failure it is removed and `path` is untouched.

    A report folder gets its manifest here; a model directory writes its own (checksums.json)."""
    out = check_dir_target(path, kind, overwrite, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    with claim(out):
        _remove_stale(out)
        tmp = Path(tempfile.mkdtemp(prefix=_tmp_name(out), dir=out.parent))
        old = None
        try:
            yield tmp
            if kind == "report":
                (tmp / REPORT_MANIFEST).write_text(json.dumps(sorted(_present_files(tmp))) + "\n")
            os.chmod(tmp, _final_mode(out, True))
            check_dir_target(out, kind, overwrite, inputs)  # unchanged while we worked
            if out.exists() and any(out.iterdir()):
                old = Path(tempfile.mkdtemp(prefix=_tmp_name(out), dir=out.parent))
                os.replace(out, old / "previous")
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if old is not None and (old / "previous").exists() and not out.exists():
                os.replace(old / "previous", out)
            raise
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)


# -- formats ----------------------------------------------------------------------------------------------------
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
    from pandas.api.types import is_object_dtype, is_string_dtype

    out = df.copy()
    out.columns = [defuse_cell(str(c)) for c in df.columns]
    for c in out.columns:
        if is_object_dtype(out[c]) or is_string_dtype(out[c]):
            out[c] = out[c].map(defuse_cell)
    return out


def write_table(df, path: PathLike, inputs: Iterable[Optional[PathLike]] = ()) -> Path:
    """CSV (formula-safe), or Parquet when the name ends in .parquet."""
    if str(path).endswith((".parquet", ".pq")):
        return atomic_file(path, lambda t: df.to_parquet(t, index=False), inputs)
    safe = defuse_frame(df)
    return atomic_file(path, lambda t: safe.to_csv(t, index=False), inputs)


def write_json(obj, path: PathLike, inputs: Iterable[Optional[PathLike]] = ()) -> Path:
    return atomic_file(path, lambda t: Path(t).write_text(strict_json(obj), encoding="utf-8"), inputs)
