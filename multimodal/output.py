"""The one way mmdx writes anything: guarded, locked and atomic.

A user's folders hold records, DICOM archives and earlier models, so a mistyped `--out` must fail with
one line before any work is done, never delete or overwrite what mmdx did not write. Every command
states what it reads (records, every image they name, model directory, ONNX file, configs) to `guard`:
- a file output may not be an input (by path or inode: a hard link or symlink to one too), lie in a
  folder the run reads as a DICOM series, be a directory, or lie inside a model directory;
- a folder output may not hold an input, and replaces only an earlier output of its own kind (KINDS)
  holding nothing but the files its manifest lists, each with the sha256 recorded there: a file mmdx
  cannot prove it wrote is never deleted;
- one run at a time per target; the final file or folder appears by rename, with the mode the umask
  gives (not mkstemp's 0600); temporaries of a killed run are removed by the next write to the target.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union

from multimodal.errors import UserError
from multimodal.formats import defuse_frame, strict_json
from multimodal.inputs import Many, not_read

PathLike = Union[str, Path]
TMP_TAG = ".mmdx-tmp-"
MODEL_MANIFEST = "checksums.json"
OUTPUT_MANIFEST = ".mmdx-output.json"  # {"kind": ..., "files": {relative path: sha256}}
# What each kind of folder is called in messages; a folder is replaced only by a run writing its kind.
KINDS = {"model": "model directory (mmdx train)", "report": "report folder (mmdx explain)",
         "cv": "cross-validation folder (mmdx cv)", "baselines": "baselines folder (mmdx baselines)",
         "synth": "synthetic cohort folder (mmdx synth)", "demo": "demo folder (mmdx demo)"}
_held: dict[str, int] = {}  # lock path -> depth: a run may claim its own target again
Inputs = Iterable[Any]  # paths (None skipped), or Many: files named in bulk (a records file's images)


# -- what may be written where ----------------------------------------------------------------------------------
def guard(out: Union[PathLike, list], kind: str = "file", inputs: Inputs = (), overwrite: bool = False) -> Path:
    """The check every command makes before any work: `out` (a file, or a list of files, for kind
    "file"; else a folder of that kind, see KINDS) may not destroy or change any of the run's `inputs`,
    a model directory, or a folder mmdx did not write. Returns the (first) target."""
    targets = [Path(p) for p in (out if isinstance(out, list) else [out])]
    inputs = list(inputs)
    paths = [i for i in inputs if not isinstance(i, Many)]
    for t in targets:
        check_file_target(t, paths) if kind == "file" else check_dir_target(t, kind, overwrite, paths)
    not_read(targets, [i for i in inputs if isinstance(i, Many)])  # after the cheap checks: one pass for all
    return targets[0]


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


def _paths(inputs: Inputs) -> list[Path]:
    return [Path(s) for s in inputs if s is not None and not isinstance(s, Many)]


def check_file_target(path: PathLike, inputs: Inputs = ()) -> Path:
    """Refuse, before any work, an output file that would destroy an input or a model."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--out {path} is a directory; give a file name, e.g. {path / 'predictions.csv'}")
    model = _enclosing_model_dir(path)
    if model is not None:
        raise UserError(f"--out {path} is inside the model directory {model}; only `mmdx train` writes there")
    for src in _paths(inputs):
        if _same(path, src):
            raise UserError(f"--out {path} is also an input of this run ({src}); choose another output")
        if src.is_dir() and _inside(path, src):
            raise UserError(f"--out {path} is inside {src}, an input of this run; choose another output")
    not_read([path], [i for i in inputs if isinstance(i, Many)])
    return path


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _written(d: Path) -> tuple[Optional[str], dict[str, str], str]:
    """(kind, {relative path: sha256}, manifest name) of the earlier mmdx output in folder `d`, by its
    manifest; kind None when `d` has no manifest mmdx could have written."""
    if is_model_dir(d):
        listed, name, kind = _json(d / MODEL_MANIFEST), MODEL_MANIFEST, "model"
    else:
        listed, name = _json(d / OUTPUT_MANIFEST), OUTPUT_MANIFEST
        kind = listed.get("kind") if isinstance(listed, dict) else None
        listed = listed.get("files") if kind in KINDS else None
    if not isinstance(listed, dict) or not all(isinstance(v, str) for v in listed.values()):
        return None, {}, name
    return kind, {str(k): v for k, v in listed.items()}, name


def sha256_file(path: PathLike, max_bytes: Optional[int] = None) -> str:
    """`max_bytes`: read no further (a file that grows while it is hashed cannot hold the reader)."""
    h = hashlib.sha256()
    left = max_bytes if max_bytes is not None else -1
    with open(path, "rb") as f:
        while left:
            chunk = f.read(1 << 20 if left < 0 else min(1 << 20, left))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk) if left > 0 else 0
    return h.hexdigest()


def _unproven(d: Path, kind: str, files: dict[str, str], manifest: str) -> list[str]:
    """What in `d` mmdx cannot prove it wrote: anything but a regular file its manifest lists with the
    sha256 the file still has; in a model directory also any name but a top-level JSON or safetensors
    file (all mmdx train writes there), so a forged manifest cannot hand a user's file over to deletion."""
    bad = []
    for p in sorted(d.rglob("*")):
        rel, mode = p.relative_to(d).as_posix(), os.lstat(p).st_mode
        if stat.S_ISDIR(mode) or rel == manifest:
            continue
        named = kind != "model" or ("/" not in rel and not rel.startswith(".") and rel.endswith((".json", ".safetensors")))
        if not (named and stat.S_ISREG(mode) and rel in files and sha256_file(p) == files[rel]):
            bad.append(rel)
    return bad


def check_dir_target(path: PathLike, kind: str, overwrite: bool = False, inputs: Inputs = ()) -> Path:
    """Missing or empty: fine. An earlier output of the same `kind` (see KINDS) holding only its
    manifest's files, unchanged: replaced (a model only with `overwrite`). Anything else: refused."""
    path, what = Path(path), KINDS[kind]
    name = what.split(" (")[0]
    for src in _paths(inputs):
        if _same(path, src) or _inside(src, path):
            raise UserError(f"--out {path} holds an input of this run ({src}); choose another output folder")
    if not path.exists():
        if _enclosing_model_dir(path) is not None:
            raise UserError(f"--out {path} is inside the model directory {_enclosing_model_dir(path)}")
    elif not path.is_dir():
        raise UserError(f"--out {path} exists and is not a directory; refusing to replace it")
    elif any(path.iterdir()):
        found, files, manifest = _written(path)
        if found is None:
            raise UserError(f"--out {path} exists and is not an mmdx {name}; refusing to replace it (choose a new "
                            f"or empty folder)")
        if found != kind:
            raise UserError(f"--out {path} is an mmdx {KINDS[found]}; this run replaces only a {what}; "
                            f"choose another folder")
        extra = _unproven(path, kind, files, manifest)
        if extra:
            more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
            raise UserError(f"--out {path}: an earlier {name} that now also holds {extra[0]!r}{more} (not as mmdx "
                            f"wrote it); refusing to replace it")
        if kind == "model" and not overwrite:
            raise UserError(f"--out {path} already holds a model; pass --overwrite (API: save(..., overwrite=True)) "
                            f"to replace it")
    not_read([path], [i for i in inputs if isinstance(i, Many)])
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


def atomic_file(path: PathLike, write: Callable[[str], Any], inputs: Inputs = ()) -> Path:
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
def staged_dir(path: PathLike, kind: str, overwrite: bool = False, inputs: Inputs = ()) -> Iterator[Path]:
    """Yield an empty sibling folder to fill; on success its content replaces that of `path` (checked by
    `guard` before and again at the swap), on failure it is removed and `path` is left as it was.

    An existing folder is emptied and filled, not renamed over: it may be the working directory or a
    mount point, which must stay the same folder. The manifest moves in last, so an interruption leaves
    nothing that passes for a whole output. Every kind but a model gets its manifest (OUTPUT_MANIFEST)
    here; a model directory writes its own."""
    out = guard(path, kind, inputs, overwrite)
    full = Path(os.path.abspath(out))  # staged beside it: "." has no sibling to stage in
    full.parent.mkdir(parents=True, exist_ok=True)
    with claim(full):
        _remove_stale(full)
        tmp = Path(tempfile.mkdtemp(prefix=_tmp_name(full), dir=full.parent))
        old, filling = None, False
        try:
            yield tmp
            if kind != "model":  # a model directory writes its own (checksums.json)
                files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
                (tmp / OUTPUT_MANIFEST).write_text(json.dumps({"kind": kind, "files": files}, indent=1) + "\n")
            guard(out, kind, inputs, overwrite)  # unchanged while we worked
            if not full.is_dir():
                os.chmod(tmp, _final_mode(full, True))
                os.replace(tmp, full)
            else:
                old = Path(tempfile.mkdtemp(prefix=_tmp_name(full), dir=full.parent))
                _move_all(full, old)
                filling = True
                _move_all(tmp, full)
        except BaseException:
            if filling:  # what came from tmp goes; the earlier output comes back
                for p in full.iterdir():
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            if old is not None:
                _move_all(old, full)
            raise
        finally:
            for d in (tmp, old):
                if d is not None:
                    shutil.rmtree(d, ignore_errors=True)


def _move_all(src: Path, dst: Path) -> None:
    """Every entry of `src` into `dst` by rename, a manifest last."""
    for p in sorted(src.iterdir(), key=lambda p: p.name in (MODEL_MANIFEST, OUTPUT_MANIFEST)):
        os.replace(p, dst / p.name)


# -- tables and JSON, written atomically ------------------------------------------------------------------
def write_table(df, path: PathLike, inputs: Inputs = ()) -> Path:
    """CSV (formula-safe), or Parquet when the name ends in .parquet."""
    if str(path).endswith((".parquet", ".pq")):
        return atomic_file(path, lambda t: df.to_parquet(t, index=False), inputs)
    safe = defuse_frame(df)
    return atomic_file(path, lambda t: safe.to_csv(t, index=False), inputs)


def write_json(obj, path: PathLike, inputs: Inputs = ()) -> Path:
    return atomic_file(path, lambda t: Path(t).write_text(strict_json(obj), encoding="utf-8"), inputs)
