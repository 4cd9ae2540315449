"""Frozen ImageNet features per patient, for the baseline a researcher fits in an afternoon:
logistic regression on EfficientNet-Lite0's pooled features (the mean over a patient's images).

Decoding and resizing go through the engine's own image preprocessing, so the baseline sees exactly
the pixels the fused model sees; only what happens after the frozen network differs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np


def pooled_features(records, cfg, cache: Optional[Path] = None, arch: str = "tf_efficientnet_lite0",
                    weights: str = "efficientnet_lite0", batch: int = 64) -> np.ndarray:
    """[n_records, D] mean of globally pooled frozen features over each record's images (NaN: none)."""
    import torch

    from encoders import ENCODERS
    from encoders.weights import pretrained_stats, resolve
    from multimodal.data.preprocess.image import ImagePreprocessor

    if cache is not None and cache.is_file():
        return np.load(cache)["x"]
    ic = cfg.image
    mean, std = pretrained_stats(arch, ic.in_chans)
    prep = ImagePreprocessor(ic, mean, std)
    enc = ENCODERS.create("timm", model_name=arch, in_chans=ic.in_chans, image_size=ic.size,
                          weights=resolve(weights, arch), freeze="all").eval()
    out = np.full((len(records), enc.output_dim), np.nan, np.float32)
    pending: list[tuple[int, torch.Tensor]] = []

    def flush():
        if not pending:
            return
        x = torch.cat([v for _, v in pending])
        with torch.no_grad():
            f = enc.frozen_features(prep.normalize(x)).mean((-1, -2)).numpy()
        k = 0
        for i, v in pending:
            out[i] = f[k:k + len(v)].mean(0)
            k += len(v)
        pending.clear()

    for i in range(len(records)):
        row = records.row(i)
        try:
            x = prep.load([row[c] for c in ic.columns], records.root)
        except Exception:  # noqa: BLE001 — the baseline, like the engine, skips unreadable records
            continue
        if len(x):
            pending.append((i, x))
        if sum(len(v) for _, v in pending) >= batch:
            flush()
    flush()
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, x=out)
    return out
