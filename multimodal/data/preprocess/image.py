"""Image cells → fixed-size tensors: read (DICOM/PNG/JPEG), fix channels, resize, augment, normalise.

A cell may hold several paths joined with ';' (views, slices), or a folder holding one DICOM series
(multimodal.data.series); multi-frame DICOM adds one image per selected frame. Mean/std are a preprocessing fact of the weights, so they are saved with the model.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from multimodal.config import ImageConfig
from multimodal.errors import RecordError
from multimodal.data.imageio import read_image
from multimodal.data.series import series_slices
from multimodal.data.shown import printable, shown_path


RASTER_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


MAX_VIEW_GROUPS = 16  # image.predict_views: all scores at most this many groups of max_images per record


def split_paths(cell) -> list[str]:
    if cell is None or (isinstance(cell, float) and np.isnan(cell)):
        return []
    return [p.strip() for p in str(cell).split(";") if p.strip()]


def record_paths(cells) -> list[str]:
    """A record's image paths in listed order: its image columns' cells, each split at ';'."""
    return [p for cell in cells for p in split_paths(cell)]


def placement(h: int, w: int, size: int, mode: str) -> tuple[int, int, int, int]:
    """Where an h x w image lands in the size x size model input: (resized height, width, top, left).
    squash stretches both sides to size; pad fits the longer side and centres the image on black (the
    attribution baseline, so padding carries no evidence); crop fills the shorter side and keeps the centre
    (negative offsets). The one geometry that preprocessing and any box mapped into the input share."""
    if mode == "squash" or h == w:
        return size, size, 0, 0
    scale = size / (max(h, w) if mode == "pad" else min(h, w))
    rh, rw = max(1, round(h * scale)), max(1, round(w * scale))
    return rh, rw, (size - rh) // 2, (size - rw) // 2


def sized(t: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """[C, H, W] → [C, size, size] by `placement`."""
    rh, rw, top, left = placement(*t.shape[-2:], size, mode)
    if tuple(t.shape[-2:]) != (rh, rw):
        t = F.interpolate(t[None], size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)[0]
    if top >= 0 and left >= 0:
        return F.pad(t, (left, size - rw - left, top, size - rh - top)) if (rh, rw) != (size, size) else t
    return t[:, -min(top, 0): -min(top, 0) + size, -min(left, 0): -min(left, 0) + size]


def oriented(x: torch.Tensor, n: int) -> torch.Tensor:
    """[V, C, H, W] → [V, n, C, H, W]: identity, h-flip, v-flip, both, then the same turned 90°. The
    cached views (image.cache_views) and the scored ones (image.predict_flips) are these, in this order."""
    out = [x, x.flip(-1), x.flip(-2), x.flip(-1, -2)]
    out += [v.transpose(-1, -2) for v in out]
    return torch.stack(out[:n], 1)


class ImagePreprocessor:
    def __init__(self, cfg: ImageConfig, mean: list[float], std: list[float], *, confine: bool = True):
        """confine: refuse paths that resolve outside the image root (data.confine_images). On unless
        a caller turns it off, so every reader of records (training, predict, baselines) is confined."""
        self.cfg = cfg
        self.confine = confine
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self._augment = None

    def _to_tensor(self, img: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))
        t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
        if t.shape[0] != self.cfg.in_chans:
            t = t.mean(0, keepdim=True) if self.cfg.in_chans == 1 else t.expand(3, -1, -1)
        return sized(t, self.cfg.size, self.cfg.resize).clamp_(0, 1)

    def decoded_bytes(self, cells: list, groups: int = 1) -> int:
        """What load() (groups=1) or load_groups() returns for these cells takes in memory, bounded
        without reading a file: a PNG or JPEG-like name is one view (Pillow reads the first frame),
        anything else (a DICOM file, perhaps multi-frame; a series folder) counts as max_images. Only a
        multi-frame DICOM file under a raster name would be counted short."""
        c = self.cfg
        views = sum(1 if Path(p).suffix.lower() in RASTER_SUFFIXES else c.max_images for p in record_paths(cells))
        return min(views, c.max_images * groups) * c.in_chans * c.size ** 2 * 4

    def load(self, cells: list, root: Path) -> torch.Tensor:
        """All images of one record as [V, C, H, W] in [0, 1] (V may be 0), capped at max_images."""
        return self.load_paths(record_paths(cells), root)

    def load_paths(self, paths: list[str], root: Path) -> torch.Tensor:
        """load() of these paths, in this order (a training draw of some of a record's paths)."""
        return self._stack(self._read(paths, root)[0])

    def load_groups(self, cells: list, root: Path, max_groups: int = MAX_VIEW_GROUPS) -> tuple[torch.Tensor, torch.Tensor]:
        """Every image of a record in groups of what load() reads (image.predict_views: all): a group
        is max_images images read from the next unread path on. → ([V, C, H, W], [V] group index)."""
        paths, out, group = record_paths(cells), [], []
        while paths and len(set(group)) < max_groups:
            images, used = self._read(paths, root)
            out += images
            group += [len(set(group))] * len(images)
            paths = paths[used:]
        return self._stack(out), torch.tensor(group, dtype=torch.long)

    def _read(self, paths: list[str], root: Path) -> tuple[list[torch.Tensor], int]:
        """Up to max_images images from these paths in order, and how many paths that used (a path
        read only in part, a long series, counts as used)."""
        out, used = [], 0
        for rel in paths:
            remaining = self.cfg.max_images - len(out)
            if remaining <= 0:  # the rest would be dropped: don't decode them
                break
            used += 1
            path, name = self.locate(rel, Path(root))
            if not path.exists():
                raise RecordError(f"image not found: {name}")
            files = self._slices(path, remaining, name, Path(root)) if path.is_dir() else [(path, name)]
            for f, shown in files:  # a folder is one series: its slices in order, evenly spaced
                if len(out) >= self.cfg.max_images:
                    break
                images = read_image(f, window=self.cfg.window, frames=self.cfg.frames,
                                    max_count=self.cfg.max_images - len(out), limits=self.cfg.limits,
                                    min_size=self.cfg.size if self.cfg.jpeg_draft else None, name=shown)
                out += [self._to_tensor(a) for a in images]
        return out[: self.cfg.max_images], used

    def _stack(self, images: list[torch.Tensor]) -> torch.Tensor:
        if not images:
            return torch.zeros(0, self.cfg.in_chans, self.cfg.size, self.cfg.size)
        return torch.stack(images)

    def locate(self, rel: str, root: Path) -> tuple[Path, str]:
        """The file a cell names, and how messages name it (relative to the root: the full path may
        carry a patient's name). Confined, it is the resolved path (symlinks followed), so what is read
        is what was checked; a path escaping the root would let a records file probe which files exist
        and pull any readable image into a model or a report."""
        path = Path(rel)
        path = path if path.is_absolute() else root / path
        name = shown_path(path, root)
        if not self.confine:
            return path, name
        try:
            resolved, base = path.resolve(), root.resolve()
        except (OSError, RuntimeError):  # symlink loop, unreadable folder
            raise RecordError(f"cannot resolve image path: {name}") from None
        if not resolved.is_relative_to(base):
            raise RecordError(f"image path outside the image root: {name}")
        return resolved, name

    def _slices(self, folder: Path, n: int, name: str, root: Path) -> list[tuple[Path, str]]:
        """A series folder's chosen slices, each confined like a listed file when images are."""
        files = series_slices(folder, n, name, within=root.resolve() if self.confine else None)
        return [(f, f"{name}/{printable(f.name)}") for f in files]

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        aug = self.cfg.augment
        if aug is None or len(x) == 0:
            return x
        if self._augment is None:
            from torchvision.transforms import v2

            self._augment = v2.Compose(
                ([v2.RandomHorizontalFlip()] if aug.hflip else [])
                + [v2.RandomAffine(degrees=aug.degrees, scale=aug.scale),
                   v2.ColorJitter(brightness=aug.intensity, contrast=aug.intensity)])
        return torch.stack([self._augment(v) for v in x]).clamp_(0, 1)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def state(self) -> dict:
        return {"mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}
