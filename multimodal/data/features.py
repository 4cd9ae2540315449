"""Two-stage training: the frozen part of the image encoder runs once per image, not once per epoch.

With `image.freeze` set, the first layers of the CNN never change, so their output for a given image
is a fact of (file content, preprocessing, weights, cut point). `FeatureCache` computes it once,
keeps it on disk under MMDX_CACHE (else ~/.cache/mmdx)/features/<identity>/ and in memory, and the
training loop then feeds those activations to the trainable rest (see encoders/image.py). An epoch
then costs what the small trainable part costs.

What it gives up: random augmentation. `image.cache_views` keeps 1, 2, 4 or 8 fixed flips/rotations
per image and training draws one per epoch. The saved model is still the whole network, so predict
and explain start from raw records as before.

Entries are keyed by a hash of every image file's bytes and of everything that shapes the
activation, so a changed image, a changed setting or other weights simply miss the cache.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Optional

import torch

from multimodal.config import Config
from multimodal.errors import RecordError, UserError
from multimodal.data.preprocess.image import oriented, record_paths
from multimodal.data.preprocess.text import clean

log = logging.getLogger("mmdx")
FORMAT = 1


def identity(cfg: Config, encoder, weights_digest: str, prep=None) -> str:
    """Everything the cached activation depends on, as one hash. The frozen part's own tensors are in
    it, not only the name of its weights: a random-init encoder is named "random-init" whatever its
    seed, and a hub tag names whatever the hub serves today. `prep`: the fitted preprocessing, whose
    normalisation is what the config's mean/std (null: the weights' own) came to."""
    ic = cfg.image
    facts = {"format": FORMAT, "arch": ic.encoder, "weights": weights_digest, "cut": encoder.cut,
             "frozen": frozen_image_digest(encoder),
             "in_chans": ic.in_chans, "size": ic.size, "window": ic.window, "frames": ic.frames,
             "max_images": ic.max_images, "mean": ic.mean, "std": ic.std, "views": ic.cache_views,
             "limits": ic.limits.model_dump(), "jpeg_draft": ic.jpeg_draft,
             "normalise": prep.image.state() if prep is not None and prep.image is not None else None}
    if ic.resize != "squash":  # squash, what every cache written so far holds, keeps its keys
        facts["resize"] = ic.resize
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _tensors_digest(h, named) -> None:
    """Add (name, dtype, shape, bytes) of every tensor to the hash `h`."""
    for name, t in named:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())


def frozen_image_digest(encoder) -> str:
    """sha256 of what the frozen part of an image encoder computes with: the parameters and buffers
    (BatchNorm statistics) of its frozen modules, or of the whole backbone when all of it is frozen."""
    backbone = getattr(encoder, "backbone", None)
    if backbone is not None and not any(p.requires_grad for p in backbone.parameters()):
        modules = [backbone]
    else:
        modules = list(encoder.frozen)
    h = hashlib.sha256()
    for k, m in enumerate(modules):
        _tensors_digest(h, ((f"{k}.{n}", t) for n, t in m.state_dict().items()))
    return h.hexdigest()


def cache_root() -> Path:
    from multimodal.pretrained import cache_dir

    return cache_dir() / "features"


def _series_fingerprint(h, folder: Path) -> None:
    """A series folder as every slice file's name and stat (size, mtime_ns, ctime_ns, inode, device;
    symlinks followed). Which slices are read depends on every slice's header (their order) and on
    max_images, so only the whole folder determines the features; reading every slice's bytes on each
    run would cost about what the cache saves (a CT series is hundreds of MB). The stat changes
    whenever any slice does: a rewrite changes mtime and ctime (which no user tool can set back, as
    cp -p or touch set mtime), a replaced file has another inode. A copied folder misses the cache."""
    try:
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    except OSError:
        h.update(b"<unreadable folder>")
        return
    h.update(f"<series {len(files)}>".encode())
    for p in files:
        try:
            st = p.stat()
            h.update(f"{p.name}\0{st.st_size} {st.st_mtime_ns} {st.st_ctime_ns} {st.st_ino} {st.st_dev}\0"
                     .encode("utf-8", "surrogateescape"))
        except OSError:
            h.update(p.name.encode("utf-8", "surrogateescape") + b"<unreadable>")


class FeatureCache:
    """Frozen activations per record: [V, views, C', h, w] float16, V = that record's images."""

    def __init__(self, cfg: Config, prep, encoder, weights_digest: str, root: Optional[Path] = None):
        self.cfg, self.prep, self.encoder = cfg, prep, encoder
        self.dir = (root or cache_root()) / identity(cfg, encoder, weights_digest, prep)
        self.memory: dict[str, torch.Tensor] = {}
        self.hits = self.misses = 0

    @property
    def stage(self) -> int:
        return self.encoder.cut

    def key(self, records, i: int) -> str:
        """Hash of what the record's first max_images image paths hold: each path as written, then the
        bytes of the file it names (located as loading locates it), or a series folder's fingerprint."""
        row = records.row(i)
        h = hashlib.sha256()
        for rel in record_paths([row[c] for c in self.cfg.image.columns])[: self.cfg.image.max_images]:
            h.update(rel.encode("utf-8", "replace") + b"\0")
            try:
                path, _ = self.prep.image.locate(rel, records.root)
            except RecordError:  # refused (outside the image root): loading fails the same way
                h.update(b"<refused>")
                continue
            if path.is_dir():
                _series_fingerprint(h, path)
                continue
            try:
                with open(path, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
            except OSError:
                h.update(b"<unreadable>")
        return h.hexdigest()

    def _file(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.safetensors"

    def _compute(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Frozen activations for several records' images at once (one forward per 64 images)."""
        n_views = self.cfg.image.cache_views
        flat = torch.cat([oriented(self.prep.image.normalize(x), n_views).flatten(0, 1) for x in xs]) \
            if xs else torch.zeros(0)
        device = next(self.encoder.parameters()).device
        was = self.encoder.training
        self.encoder.eval()
        outs = [self.encoder.frozen_features(flat[j:j + 64].to(device)).cpu() for j in range(0, len(flat), 64)]
        self.encoder.train(was)
        acts = torch.cat(outs) if outs else flat
        res, k = [], 0
        for x in xs:
            m = len(x) * n_views
            res.append(acts[k:k + m].reshape(len(x), n_views, *acts.shape[1:]).to(torch.float16))
            k += m
        return res

    def fill(self, records, progress: bool = False) -> dict[int, str]:
        """Make sure every loadable record of `records` is cached; → {row index: error} for the others."""
        from safetensors.torch import load_file, save_file
        from multimodal.progress import bar as progress_bar

        self.keys = [self.key(records, i) for i in range(len(records))]
        errors, todo = {}, []
        for i, key in enumerate(self.keys):
            if key in self.memory:
                self.hits += 1
            elif self._file(key).is_file():
                try:
                    self.memory[key] = load_file(str(self._file(key)))["x"]
                    self.hits += 1
                    continue
                except Exception:  # noqa: BLE001 — a damaged entry is recomputed
                    pass
                todo.append(i)
            else:
                todo.append(i)
        bar = progress_bar(total=len(todo), desc="caching frozen features", unit="rec", enabled=progress and bool(todo))
        for j in range(0, len(todo), 32):
            chunk, xs = [], []
            for i in todo[j:j + 32]:
                row = records.row(i)
                try:
                    xs.append(self.prep.image.load([row[c] for c in self.cfg.image.columns], records.root))
                    chunk.append(i)
                except RecordError as e:
                    errors[i] = str(e)
                except Exception as e:  # noqa: BLE001 — a record's failure stays that record's
                    errors[i] = f"{type(e).__name__}: {e}"
            for i, act in zip(chunk, self._compute(xs)):
                key = self.keys[i]
                self.memory[key] = act
                path = self._file(key)
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                save_file({"x": act.contiguous()}, str(tmp))
                os.replace(tmp, path)
                self.misses += 1
            bar.update(len(todo[j:j + 32]))
        bar.close()
        self.errors = errors
        return errors

    def get(self, i: int, view: int = 0) -> torch.Tensor:
        """Record i's activations for one view, [V, C', h, w] float32."""
        return self.memory[self.keys[i]][:, view].float()


_FROZEN_TEXT: dict[str, dict] = {}  # one frozen text part's outputs, text → tensor, for this process


def frozen_text_identity(encoder, prep) -> str:
    """What a frozen text part's output for a report depends on: the tokenizer and its limits, the
    frozen weights, and where the trainable layers begin."""
    h = hashlib.sha256(prep.text.to_json().encode())
    h.update(json.dumps([prep.text.max_length, prep.text.max_chars, encoder.n_top]).encode())
    _tensors_digest(h, ((n, p) for n, p in encoder.named_parameters() if not p.requires_grad))
    return h.hexdigest()


def known_text_features(encoder, prep) -> dict:
    """text → the frozen part's output, kept in memory for the process: ensemble members, CV folds and
    a benchmark's seeds and variants over the same reports run the frozen transformer over each
    report once. Only the latest frozen part is kept, which bounds memory to one cohort's outputs."""
    key = frozen_text_identity(encoder, prep)
    if key not in _FROZEN_TEXT:
        _FROZEN_TEXT.clear()
        _FROZEN_TEXT[key] = {}
    return _FROZEN_TEXT[key]


def text_features(records, cfg: Config, prep, encoder, batch_size: int = 64,
                  known: Optional[dict] = None) -> dict[int, torch.Tensor]:
    """The frozen part's output per record (`encoder.frozen_hidden`: the whole transformer, or its
    layers below the trainable last N), computed once (in memory: a forward over a few thousand reports
    takes seconds to a minute, far less than an epoch each).
    `known`: text → output, filled here and kept by the caller (`known_text_features`), so reports
    already read by an earlier member, fold or run are not read again."""
    device = next(encoder.parameters()).device
    known = {} if known is None else known
    texts = [clean(records.cell(i, cfg.text.column), prep.text.max_chars) for i in range(len(records))]
    todo = list(dict.fromkeys(t for t in texts if t not in known))
    probe = bool(encoder.n_top) and not known  # checked once per frozen part, not per split or member
    encoder.eval()
    with torch.no_grad():
        for j in range(0, len(todo), batch_size):
            chunk = todo[j: j + batch_size]
            encs = []
            for t in chunk:
                try:
                    encs.append(prep.text.encode(t))
                except RecordError:
                    encs.append(prep.text.empty())
            lengths = [len(e.ids) for e in encs]
            ids, mask, _ = prep.text.pad(encs)
            try:
                h = encoder.frozen_hidden(ids.to(device), mask.to(device), check=j == 0 and probe)
            except ValueError as e:
                raise UserError(str(e)) from None
            h = h.cpu().to(torch.float16)
            for b, t in enumerate(chunk):
                known[t] = h[b, : lengths[b]].clone()
    return {i: known[t] for i, t in enumerate(texts)}
