"""Device/AMP choice and the batched forward pass shared by validation, calibration, predict and evaluate."""
from __future__ import annotations

import contextlib
import itertools
import os
import time
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from multimodal.data.batches import RecordDataset, make_loader, to_device
from multimodal.data.preprocess.image import MAX_VIEW_GROUPS
from multimodal.errors import UserError
from multimodal.progress import bar as progress_bar


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        return torch.device("cpu")
    return dev


def amp_dtype(device: torch.device, enabled: bool = True) -> Optional[torch.dtype]:
    """bf16 where the GPU supports it (no loss scaling needed), else fp16; None (fp32) on CPU."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def scored(values: np.ndarray) -> np.ndarray:
    """Rows run_inference could score (error rows are NaN), for [N] or [N, K] outputs."""
    return ~np.isnan(values).any(1) if values.ndim == 2 else ~np.isnan(values)


def probabilities(logits: torch.Tensor, task: str) -> torch.Tensor:
    """Binary → [N] positive-class probability; multiclass → softmax; multilabel → sigmoid."""
    logits = logits.float()
    if task == "binary":
        return torch.sigmoid(logits[:, 0])
    return torch.softmax(logits, 1) if task == "multiclass" else torch.sigmoid(logits)


def shared_memory_budget(cap: int = 512 << 20) -> int:
    """Bytes of decoded batches that may wait in worker queues: a quarter of what /dev/shm has free
    (containers often give it 64 MB), at most `cap`."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return 0
    return min(cap, st.f_bavail * st.f_frsize // 4)


def start_early(ds, loader: Callable[..., DataLoader], batch_size: int, workers: int,
                sizes: Optional[Sequence[int]] = None, budget: Optional[int] = None) -> Iterable[dict]:
    """The batches `loader(ds, workers)` yields, in the same order and the same composition, with
    decoding already under way in worker processes when this returns, so that it runs while the
    caller builds its network: timm's import and the weights are seconds of a short job's start
    (`mmdx predict` loads the network lazily for this).

    With `workers=0`, one worker decodes the leading batches that fit in `budget` bytes and exits; the
    main process decodes the rest as usual. `sizes`: bytes per decoded record; a batch takes its
    largest record's size times its length (it is padded to it). None (nothing worth decoding ahead,
    e.g. no images) starts nothing early, nor does a job of one batch: its decoding takes less than
    starting the worker (0.2 s more per call, measured on a 24-record predict)."""
    if workers > 0:
        return iter(loader(ds, workers))  # forks the workers now; they start on their first batches
    n, budget = len(ds), shared_memory_budget() if budget is None else budget
    k = 0  # records decoded ahead: whole batches, or all of them
    if sizes is not None:
        batches = (sizes[i:i + batch_size] for i in range(0, n, batch_size))
        padded = np.cumsum([max(b) * len(b) for b in batches])
        k = min(n, int(np.searchsorted(padded, budget, side="right")) * batch_size)
    if k == 0 or n <= batch_size:
        return loader(ds, 0)
    head = iter(loader(Subset(ds, range(k)), 1, prefetch=-(-k // batch_size), persistent=False))  # starts now
    return itertools.chain(head, loader(Subset(ds, range(k, n)), 0) if k < n else ())


@torch.no_grad()
def run_inference(net, loader: Iterable[dict], device: torch.device, task: str, amp: Optional[torch.dtype] = None,
                  progress: bool = False, desc: str = "predict", absent=None, logits: bool = False,
                  n: Optional[int] = None) -> dict:
    """Probabilities (or raw logits) for every record the loader yields, in dataset order; error rows get NaN.
    `n`: how many records, where `loader` is not a DataLoader (start_early's batches)."""
    net.eval()
    n = len(loader.dataset) if n is None else n
    probs, errors = None, [None] * n
    t_model, t0 = 0.0, time.perf_counter()
    bar = progress_bar(total=n, desc=desc, unit="rec", enabled=progress)
    for batch in loader:
        idx = batch["index"].numpy()
        for i, e in zip(idx, batch["error"]):
            errors[i] = e
        ok = batch["ok"]
        if ok.any():
            b = to_device(batch, device)
            t1 = time.perf_counter()
            with autocast(device, amp):
                z = net(b, absent=absent)
                p = z.float() if logits else probabilities(z, task)
            p = p.cpu().numpy()
            t_model += time.perf_counter() - t1
            if probs is None:
                probs = np.full((n,) + p.shape[1:], np.nan, np.float64)
            probs[idx[ok.numpy()]] = p[ok.numpy()]
        bar.update(len(idx))
        bar.set_postfix(rec_per_s=f"{bar.n / max(time.perf_counter() - t0, 1e-9):.0f}")
    bar.close()
    if probs is None:  # every record failed
        probs = np.full((n,), np.nan) if task == "binary" and not logits else np.full((n, net.num_outputs), np.nan)
    return {"logits" if logits else "probs": probs, "errors": errors, "seconds": time.perf_counter() - t0, "model_seconds": t_model}


def infer_records(network: Callable[[], object], rec, cfg, prep, device: torch.device, *, batch_size: int = 64,
                  workers: int = 0, progress: bool = False, absent=None, logits: bool = False,
                  early: bool = False) -> dict:
    """run_inference over `rec` (Records) with the fitted preprocessing `prep`. `network()` is called
    once the batches are under way, so with `early=True` a network still to be built (a lazily loaded
    model directory) builds while the first images decode (see start_early)."""
    if batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    ds = RecordDataset(rec, prep, cfg.modalities, cfg)

    def loader(d, w: int, **kw):
        return make_loader(d, cfg, prep, False, device, batch_size, workers=w, **kw)

    if early:
        sizes = None  # no images: nothing worth decoding ahead
        if "image" in cfg.modalities:
            groups = MAX_VIEW_GROUPS if ds.all_views else 1
            sizes = [prep.image.decoded_bytes(cells, groups) * ds.flips
                     for cells in rec.df[cfg.image.columns].itertuples(index=False)]
        batches = start_early(ds, loader, batch_size, workers, sizes)
    else:
        batches = loader(ds, workers)
    return run_inference(network(), batches, device, cfg.task.type, amp_dtype(device, cfg.train.amp),
                         progress=progress, absent=absent, logits=logits, n=len(ds))


def member_logits(net, rec, cfg, prep, device: torch.device, *, batch_size: int = 64, workers: int = 0,
                  absent=None, calibrated: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A fusion strategy's networks side by side: logits [N, M, K] (each calibrated on its own, or raw)
    and whether each saw the patient [N, M]."""
    from multimodal.model.network import MemberOutputs

    K, M = net.num_outputs, len(net.members)
    out = infer_records(lambda: MemberOutputs(net, calibrated), rec, cfg, prep, device, batch_size=batch_size,
                        workers=workers, absent=absent, logits=True)["logits"]
    return out[:, :M * K].reshape(len(out), M, K), out[:, M * K:] > 0
