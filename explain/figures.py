"""The report's pictures: an image beside its signed attribution overlay, and the tabular bar chart.

Both are drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend switch,
nothing left open) and come back as PNG data URIs, so a page needs no file or network beside it.
Colours mean the same as on the rest of the page: red towards the explained class, blue against it.
"""
from __future__ import annotations

import base64
import io
from typing import Optional

import numpy as np

POS_RGB = (220, 38, 38)   # towards target
NEG_RGB = (37, 99, 235)   # against target
OUTLIER_PERCENTILE = 99.0
"""Heatmap colour limits are ±(this percentile of |attribution|), so one extreme pixel cannot wash out the rest."""
SMOOTH_FRACTION = 0.04
"""Reports draw each image map blurred by a Gaussian of σ = this fraction of the image's shorter side: raw
Integrated Gradients is pixel speckle that a reader takes for texture. The value is the one the pointing
game and deletion on the demo cohort chose (benchmarks/explain_maps.py, BENCHMARKS.md); the JSON beside
the page keeps the raw map."""


def smooth_maps(maps, fraction: float = SMOOTH_FRACTION):
    """[..., H, W] signed maps (tensor or array, returned as given) blurred over H and W; fraction 0 = unchanged."""
    import torch
    from torchvision.transforms.functional import gaussian_blur

    t = torch.as_tensor(maps, dtype=torch.float32)
    sigma = fraction * min(t.shape[-2:])
    if sigma <= 0:
        return maps
    size = min(2 * int(np.ceil(3 * sigma)) + 1, 2 * ((min(t.shape[-2:]) - 1) // 2) + 1)
    flat = t.reshape(-1, 1, *t.shape[-2:])
    out = gaussian_blur(flat, [size, size], [sigma, sigma]).reshape(t.shape)
    return out if isinstance(maps, torch.Tensor) else out.numpy().astype(np.asarray(maps).dtype)


def _signed(x: float) -> str:
    return f"{x:+.2g}"


def _png_data_uri(fig) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi, bbox_inches="tight", pad_inches=0.05, facecolor="white")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _display_image(img: np.ndarray) -> np.ndarray:
    a = np.asarray(img, dtype=np.float64)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 3 and a.shape[-1] == 4:
        a = a[..., :3]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] != 3):
        raise ValueError(f"image must be [H, W] or [H, W, 3], got shape {a.shape}")
    return np.clip(np.nan_to_num(a, nan=0.0), 0.0, 1.0)


def image_figure(img: np.ndarray, amap: Optional[np.ndarray]) -> tuple[str, Optional[str]]:
    """Image | image with the signed map overlaid (RdBu_r, symmetric limits, opacity grows with |attribution| so
    unimportant areas stay readable) + colour bar. Returns (PNG data URI, note for the caption or None).

    Uses matplotlib's object API with an Agg canvas: no pyplot, no global backend switch, nothing left open.
    """
    import matplotlib
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    disp = _display_image(img)
    h, w = disp.shape[:2]
    extent = (0, w, h, 0)
    note = None
    if amap is not None:
        amap = np.squeeze(amap)
        if amap.ndim != 2:
            note, amap = f"attribution map has shape {amap.shape}, expected [H, W]: not shown", None
    lim = 0.0
    if amap is not None:
        mag = np.abs(amap[np.isfinite(amap)])
        if mag.size:
            lim = float(np.percentile(mag, OUTLIER_PERCENTILE)) or float(mag.max())
        if lim <= 0:
            note, amap = "attribution map is zero everywhere", None
    elif note is None:
        note = "no attribution map for this image"

    aspect = h / max(w, 1)
    panel = 4.2  # inches per panel at 100 dpi: a 128-px input shows at about 3x, enough to read a lesion
    fig = Figure(figsize=(2 * panel + 0.7, panel * aspect + 0.45), dpi=100)
    gs = fig.add_gridspec(1, 3, width_ratios=[1, 1, 0.06], wspace=0.08)
    ax0, ax1, cax = fig.add_subplot(gs[0]), fig.add_subplot(gs[1]), fig.add_subplot(gs[2])
    kw = {"cmap": "gray", "vmin": 0.0, "vmax": 1.0} if disp.ndim == 2 else {}
    ax0.imshow(disp, extent=extent, interpolation="antialiased", **kw)
    ax0.set_title("image", fontsize=9)
    ax1.imshow(disp, extent=extent, interpolation="antialiased", **kw)
    cmap = matplotlib.colormaps["RdBu_r"]
    norm = Normalize(vmin=-lim, vmax=lim) if lim else None
    if amap is not None:
        m = np.nan_to_num(amap, nan=0.0)
        rgba = cmap(norm(np.clip(m, -lim, lim)))
        rgba[..., 3] = 0.75 * np.clip(np.abs(m) / lim, 0.0, 1.0) ** 0.7
        # The map may be at a different resolution than the image: the shared extent lines them up.
        ax1.imshow(rgba, extent=extent, interpolation="bilinear")
        ax1.set_title("attribution overlay", fontsize=9)
    for ax in (ax0, ax1):
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
    if amap is None:
        ax1.images[0].set_alpha(0.25)
        ax1.text(0.5, 0.5, "no attribution\nmap", transform=ax1.transAxes, ha="center", va="center",
                 fontsize=9, color="#334155")
        cax.set_visible(False)
        return _png_data_uri(fig), note
    cb = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax)
    cb.ax.tick_params(labelsize=7)
    cb.set_ticks([-lim, 0, lim])
    cb.set_ticklabels([_signed(-lim), "0", _signed(lim)])
    return _png_data_uri(fig), note


def feature_chart(rows: list[dict]) -> str:
    """Horizontal bars, largest |attribution| on top, labelled "feature = value"."""
    from matplotlib.figure import Figure

    labels = [_clip_label(f"{r['feature']} = {r['value']}") for r in rows][::-1]
    scores = [r["score"] for r in rows][::-1]
    colours = ["#%02x%02x%02x" % (POS_RGB if s > 0 else NEG_RGB) for s in scores]
    fig = Figure(figsize=(6.4, 0.32 * len(rows) + 0.9), dpi=100)
    ax = fig.add_subplot()
    y = np.arange(len(rows))
    ax.barh(y, scores, color=colours, height=0.65)
    ax.set_yticks(y, labels, fontsize=8)
    ax.axvline(0, color="#334155", lw=0.8)
    ax.tick_params(axis="x", labelsize=8)
    ax.set_xlabel("attribution (→ towards target, ← against)", fontsize=8)
    lim = max(abs(s) for s in scores) * 1.15
    ax.set_xlim(-lim, lim)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return _png_data_uri(fig)


def _clip_label(s: str, n: int = 42) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


__all__ = ["image_figure", "feature_chart", "smooth_maps", "POS_RGB", "NEG_RGB", "SMOOTH_FRACTION"]
