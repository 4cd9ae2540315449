"""Image cells → fixed-size tensors: read (DICOM/PNG/JPEG), fix channels, resize, augment, normalise.

A cell may hold several paths joined with ';' (views, slices); multi-frame DICOM adds one image per
selected frame. Mean/std are a preprocessing fact of the weights, so they are saved with the model.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import ImageConfig
from ..errors import RecordError
from ..imageio import read_image


def split_paths(cell) -> list[str]:
    if cell is None or (isinstance(cell, float) and np.isnan(cell)):
        return []
    return [p.strip() for p in str(cell).split(";") if p.strip()]


class ImagePreprocessor:
    def __init__(self, cfg: ImageConfig, mean: list[float], std: list[float]):
        self.cfg = cfg
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self._augment = None

    def _to_tensor(self, img: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))
        t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
        if t.shape[0] != self.cfg.in_chans:
            t = t.mean(0, keepdim=True) if self.cfg.in_chans == 1 else t.expand(3, -1, -1)
        size = (self.cfg.size, self.cfg.size)
        if tuple(t.shape[-2:]) != size:
            t = F.interpolate(t[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
        return t.clamp_(0, 1)

    def load(self, cells: list, root: Path) -> torch.Tensor:
        """All images of one record as [V, C, H, W] in [0, 1] (V may be 0), capped at max_images."""
        out = []
        paths = [p for cell in cells for p in split_paths(cell)]
        for rel in paths:
            if len(out) >= self.cfg.max_images:  # the rest would be dropped: don't decode them
                break
            path = Path(rel) if Path(rel).is_absolute() else root / rel
            if not path.exists():
                raise RecordError(f"image not found: {path}")
            out += [self._to_tensor(a) for a in read_image(path, window=self.cfg.window, frames=self.cfg.frames)]
        if not out:
            return torch.zeros(0, self.cfg.in_chans, self.cfg.size, self.cfg.size)
        return torch.stack(out[: self.cfg.max_images])

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
