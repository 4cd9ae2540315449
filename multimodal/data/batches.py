"""Records → batches. Each record is loaded independently; any failure becomes that row's error,
so one bad file never stops a batch job or shifts other rows."""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from multimodal.config import Config
from multimodal.errors import RecordError
from multimodal.data.preprocess import Preprocessing
from multimodal.data.preprocess.image import oriented, record_paths
from multimodal.data.records import Records
from multimodal.data.shown import printable


@dataclass(frozen=True)
class BatchKeys:
    """The batch fields one modality produces, named here and nowhere else: Collate writes them, the
    modality's encoders read them (their input_keys), the ONNX graph takes them (model.export.INPUTS)
    and attributions are of them (explain.attribution). A field an encoder read without its being
    declared would be missing from the graph, the attribution path or a cached batch."""

    modality: str
    tensors: tuple[str, ...]
    """What every batch with this modality carries, [B, ...], a row that failed to load included."""
    attributed: tuple[str, ...]
    """The subset of `tensors` attributions are of; the rest (masks) go along unchanged."""
    cached: tuple[str, ...] = ()
    """Encoder inputs only a feature cache adds: where cached image activations were cut
    (image_stage), a frozen text encoder's output (text_x). An encoder computes them when absent."""
    graph: tuple[str, ...] = ()
    """The ONNX graph's inputs in the order it takes them, when its layout differs from `tensors`
    (image_slot: the graph gets only the present images and where each goes)."""
    aside: tuple[str, ...] = ()
    """Fields of the batch no encoder reads: the network's view groups (image_group), the token
    offsets explanations map attributions back to words with (text_encodings)."""

    def __post_init__(self):
        if not set(self.attributed) <= set(self.tensors):
            raise ValueError(f"{self.modality}: attributed fields must be batch tensors")
        if not self.graph:
            object.__setattr__(self, "graph", self.tensors)

    @property
    def inputs(self) -> tuple[str, ...]:
        """Every field an encoder of this modality may read."""
        return tuple(dict.fromkeys(self.graph + self.tensors + self.cached))

    @property
    def unattributed(self) -> tuple[str, ...]:
        """The tensors an attribution passes through as they are."""
        return tuple(k for k in self.tensors if k not in self.attributed)


IMAGE_KEYS = BatchKeys("image", tensors=("image", "image_mask"), attributed=("image",), cached=("image_stage",),
                       graph=("image", "image_slot", "image_mask"), aside=("image_group",))
TEXT_KEYS = BatchKeys("text", tensors=("text_ids", "text_mask"), attributed=("text_ids",), cached=("text_x",),
                      aside=("text_encodings",))
TABULAR_KEYS = BatchKeys("tabular", tensors=("num", "num_missing", "cat"), attributed=("num", "num_missing", "cat"))
MODALITY_KEYS = {k.modality: k for k in (IMAGE_KEYS, TEXT_KEYS, TABULAR_KEYS)}
"""In the order the ONNX graph takes the modalities."""


def one_line(e: BaseException) -> str:
    """A record's error as its row shows it: one line, and printable (an exception may quote a file)."""
    if isinstance(e, RecordError):
        msg = str(e)
    else:
        msg = f"{type(e).__name__}: {e}"
    return printable(" ".join(msg.split())[:300])


class RecordDataset(Dataset):
    def __init__(self, records: Records, prep: Preprocessing, modalities: list[str], cfg,
                 labels: Optional[np.ndarray] = None, train: bool = False, cache: bool = False,
                 features=None, text_features: Optional[dict] = None, views: Optional[str] = None):
        """`train`: augment images. `cache`: keep decoded, resized images in memory across epochs.
        `features`: a filled multimodal.data.features.FeatureCache: images come as frozen activations.
        `text_features`: {record index: frozen text encoder output [L, D]} (see features.text_features).
        `views`: "first" or "all" groups of max_images to score (default: image.predict_views; training
        reads per image.train_views)."""
        self.records, self.prep, self.mods, self.cfg = records, prep, modalities, cfg
        ic = cfg.image if "image" in modalities else None
        scored = not train and features is None and ic is not None
        self.all_views = scored and (views or ic.predict_views) == "all"
        self.flips = ic.predict_flips if scored and views != "first" else 1
        self.labels, self.train, self.use_cache = labels, train, cache
        self.cache: dict = {}  # record index, or (record, path) for a random draw's path
        self.features, self.feature_errors, self.text_features = features, {}, text_features
        if features is not None:  # filled for these records by FeatureCache.fill
            self.feature_errors = features.errors

    def __len__(self) -> int:
        return len(self.records)

    def _images(self, i: int, row) -> torch.Tensor:
        ic = self.cfg.image
        if self.train and ic.train_views == "random":
            paths = record_paths(row[c] for c in ic.columns)
            if len(paths) > ic.max_images:  # this epoch's draw, in listed order; each path decoded once
                chosen = sorted(random.sample(range(len(paths)), ic.max_images))
                return torch.cat([self._cached((i, j), lambda j=j: self.prep.image.load_paths(
                    [paths[j]], self.records.root)) for j in chosen])[: ic.max_images]
        return self._cached(i, lambda: self.prep.image.load([row[c] for c in ic.columns], self.records.root))

    def _scored_groups(self, i: int, row) -> tuple[torch.Tensor, torch.Tensor]:
        """What scoring reads: the record's groups of images (predict_views), each also mirrored
        (predict_flips) as a group of its own; the network averages the logits over groups. Mirrors
        are made here, not cached: a flip costs less than the memory it would hold."""
        cells = [row[c] for c in self.cfg.image.columns]
        if self.all_views:
            x, group = self._cached(i, lambda: self.prep.image.load_groups(cells, self.records.root))
        else:
            x = self._cached(i, lambda: self.prep.image.load(cells, self.records.root))
            group = torch.zeros(len(x), dtype=torch.long)
        if self.flips == 1 or not len(x):
            return x, group
        n = int(group.max()) + 1
        x = oriented(x, self.flips).transpose(0, 1).flatten(0, 1)  # all images as they are, then mirrored
        return x, torch.cat([group + k * n for k in range(self.flips)])

    def _cached(self, key, decode) -> torch.Tensor:
        if key in self.cache:
            return self.cache[key]
        x = decode()
        if self.use_cache:
            self.cache[key] = x
        return x

    def __getitem__(self, i: int) -> dict:
        row = self.records.row(i)
        item = {"index": i, "error": None}
        try:
            if "image" in self.mods and self.features is not None:
                if i in self.feature_errors:
                    raise RecordError(self.feature_errors[i])
                n = self.cfg.image.cache_views
                item["image"] = self.features.get(i, random.randrange(n) if self.train and n > 1 else 0)
            elif "image" in self.mods and (self.all_views or self.flips > 1):
                x, item["image_group"] = self._scored_groups(i, row)
                item["image"] = self.prep.image.normalize(x)
            elif "image" in self.mods:
                x = self._images(i, row)
                item["image"] = self.prep.image.normalize(self.prep.image.augment(x) if self.train else x)
            if "text" in self.mods:
                item["text"] = self.prep.text.encode(row[self.cfg.text.column])
                if self.text_features is not None:
                    item["text_x"] = self.text_features[i]
            if "tabular" in self.mods:
                item.update(self.prep.tabular.transform(row))
        except Exception as e:  # noqa: BLE001 — any failure is this record's, reported per row
            item = {"index": i, "error": one_line(e)}
        if self.labels is not None:
            item["y"] = self.labels[i]
        return item


class Collate:
    """Pads views and tokens to the batch maximum; rows with errors carry empty modalities and ok=False."""

    def __init__(self, prep: Preprocessing, modalities: list[str], cfg, image_stage: int = 0):
        """`image_stage`: 0 for pixels, else the encoder cut the cached activations come from."""
        self.prep, self.mods, self.cfg, self.image_stage = prep, modalities, cfg, image_stage

    def __call__(self, items: list[dict]) -> dict:
        ok = [it["error"] is None for it in items]
        batch = {"index": torch.tensor([it["index"] for it in items]), "ok": torch.tensor(ok),
                 "error": [it["error"] for it in items]}
        if "image" in self.mods:
            ic = self.cfg.image
            imgs = [it.get("image") for it in items]
            n = torch.tensor([0 if x is None else len(x) for x in imgs])
            V = max(1, int(n.max()))
            shape = next((x.shape[1:] for x in imgs if x is not None and len(x)), None)
            if shape is None:  # no image in the batch: what the first stage expects
                shape = (ic.in_chans, ic.size, ic.size) if not self.image_stage else (1, 1, 1)
            batch["image"], batch["image_mask"] = _pad_rows(imgs, V, shape), torch.arange(V) < n[:, None]
            if self.image_stage:  # cached activations, not pixels
                batch["image_stage"] = self.image_stage
            groups = [it.get("image_group") for it in items]
            if any(g is not None and len(g) and int(g[-1]) > 0 for g in groups):  # predict_views: all
                batch["image_group"] = _pad_rows(groups, V, dtype=torch.long)
        if "text" in self.mods:
            t = self.prep.text
            batch["text_ids"], batch["text_mask"], batch["text_encodings"] = t.pad(
                [it.get("text") or t.empty() for it in items])
            xs = [it.get("text_x") for it in items]
            if any(x is not None for x in xs):  # cached frozen encoder output, padded like the ids
                D = next(x for x in xs if x is not None).shape[-1]
                L = max(batch["text_ids"].shape[1], max(len(x) for x in xs if x is not None))
                batch["text_x"] = _pad_rows(xs, L, (D,))
        if "tabular" in self.mods:
            t = self.prep.tabular
            n_num, n_cat = len(t.numeric), len(t.categorical)
            empty = {"num": np.zeros(n_num, np.float32), "num_missing": np.ones(n_num, np.float32),
                     "cat": np.zeros(n_cat, np.int64)}  # a failed row: every feature missing
            for k, default in empty.items():
                batch[k] = torch.tensor(np.stack([it.get(k, default) for it in items]))
        if "y" in items[0]:
            batch["y"] = torch.tensor(np.stack([it["y"] for it in items]))
        return batch


def _pad_rows(rows: list, length: int, shape: tuple = (), dtype=torch.float32) -> torch.Tensor:
    """[B, length, *shape] zeros with each row's items written from the start (cast to `dtype`); rows
    that are None or empty stay zero, which their mask marks as padding."""
    out = torch.zeros(len(rows), length, *shape, dtype=dtype)
    for b, x in enumerate(rows):
        if x is not None and len(x):
            out[b, : len(x)] = x
    return out


def to_device(batch: dict, device: torch.device) -> dict:
    nb = device.type == "cuda"
    return {k: v.to(device, non_blocking=nb) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def make_loader(ds, cfg: Config, prep: Preprocessing, shuffle: bool, device: torch.device, batch_size: int,
                seed: int = 0, workers: int = 0, sampler=None, prefetch: Optional[int] = None,
                persistent: bool = True) -> DataLoader:
    """`prefetch`: batches each worker may run ahead (DataLoader's prefetch_factor; its default 2 when
    None). `persistent`: keep the workers between epochs."""
    g = torch.Generator().manual_seed(seed)
    features = getattr(getattr(ds, "dataset", ds), "features", None)  # a Subset's too
    stage = features.stage if features is not None else 0
    return die_with_parent(DataLoader(
        ds, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler, generator=g,
        num_workers=workers, prefetch_factor=prefetch if workers else None,
        collate_fn=Collate(prep, cfg.modalities, cfg, image_stage=stage), pin_memory=device.type == "cuda",
        persistent_workers=persistent and workers > 0))


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(loader: DataLoader) -> DataLoader:
    """`loader`, whose worker processes end when this process does, even by kill -9: an orphaned
    worker would keep its decoded batches (hundreds of MB of shared memory) and every file this
    process had open, the --out lock included, so that --resume is refused until someone kills it."""
    loader.worker_init_fn = functools.partial(_tie_to_parent, os.getpid(), loader.worker_init_fn)
    return loader


def _tie_to_parent(parent: int, then: Optional[Callable], worker_id: int) -> None:
    """DataLoader worker_init_fn. Linux: the kernel sends SIGKILL when the parent dies; elsewhere a
    thread watches the parent. DataLoader's own watchdog is not enough: a worker whose queue feeder
    is blocked on a pipe nobody reads never gets back to it."""
    watch = True
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            watch = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0
    if os.getppid() != parent:  # it died before the line above took effect
        os._exit(1)
    if watch:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    if then is not None:
        then(worker_id)


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)
