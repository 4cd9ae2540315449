"""A CT or MR series given as a folder of slice files: one image cell names the folder.

The slices are put in anatomical order (position along the slice normal from ImagePositionPatient
and ImageOrientationPatient, else InstanceNumber, else file name) and `image.max_images` of them are
taken evenly spaced from first to last, so a model sees the whole volume at a fixed cost. A folder
holding several series (SeriesInstanceUID differs) is refused: mixing a scout with the axial stack,
or two contrast phases, gives images that mean nothing together. Only headers are read here; the
chosen slices are decoded later, one by one, under the usual decode limits. Messages name counts
and the folder, never a header value (UIDs identify patients).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from multimodal.errors import RecordError
from multimodal.data.image_guard import looks_like_dicom
from multimodal.data.shown import printable

MAX_FILES = 5000  # a "series" folder bigger than this is more likely a whole archive


def _header(path: Path):
    import pydicom

    try:
        with path.open("rb") as f:
            head = f.read(140)
            size = path.stat().st_size
        start = 132 if head[128:132] == b"DICM" else 0
        if not looks_like_dicom(head[start:], size - start):
            return None
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[
            "SeriesInstanceUID", "ImagePositionPatient", "ImageOrientationPatient", "InstanceNumber"])
    except Exception:
        return None


def _inside(path: Path, root: Path, name: str) -> Path:
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        raise RecordError(f"series folder {name}: slice {printable(path.name)} lies outside the image root")
    return resolved


def _position(ds) -> float | None:
    try:
        ipp = np.asarray([float(v) for v in ds.ImagePositionPatient])
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        if ipp.shape != (3,) or iop.shape != (6,):
            return None
        return float(ipp @ np.cross(iop[:3], iop[3:]))
    except (AttributeError, TypeError, ValueError):
        return None


def series_slices(folder: Path, n: int, name: str, within: Optional[Path] = None) -> list[Path]:
    """`n` slice files of the one series in `folder`, evenly spaced in anatomical order. `within`: the
    resolved image root when images are confined: every slice is resolved (symlinks followed) and one
    that lies outside refuses the series before any header is read, as a symlinked file would be."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if len(files) > MAX_FILES:
        raise RecordError(f"series folder {name} holds {len(files)} files (more than {MAX_FILES}); name one series")
    if within is not None:
        files = [_inside(p, within, name) for p in files]
    slices = [(p, ds) for p in files if (ds := _header(p)) is not None]
    if not slices:
        raise RecordError(f"series folder {name} holds no DICOM files")
    series = {str(getattr(ds, "SeriesInstanceUID", "")) for _, ds in slices}
    if len(series) > 1:
        raise RecordError(f"series folder {name} mixes {len(series)} DICOM series (SeriesInstanceUID differs); "
                          f"give one folder per series")
    pos = [_position(ds) for _, ds in slices]
    inst = [getattr(ds, "InstanceNumber", None) for _, ds in slices]
    if all(p is not None for p in pos):
        order = np.argsort(pos, kind="stable")
    elif all(i is not None for i in inst):
        order = np.argsort([int(i) for i in inst], kind="stable")
    else:
        order = np.arange(len(slices))  # file names, already sorted
    ordered = [slices[i][0] for i in order]
    if len(ordered) <= n:
        return ordered
    pick = np.unique(np.round(np.linspace(0, len(ordered) - 1, n)).astype(int))
    return [ordered[i] for i in pick]
