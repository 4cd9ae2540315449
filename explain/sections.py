"""What a patient page shows per modality (images, report text, tabular data), and per network of a fusion
strategy's ensemble the same views of its own part of the attributions.

Each builder takes a PatientExplanation and returns the template's context; report.py puts them on the page.
One builder per view, so the whole model's words and one network's words are drawn alike: a network's part
is shown by passing a copy of the explanation that holds its scores (`_as_member`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import numpy as np

from .figures import NEG_RGB, POS_RGB, SMOOTH_FRACTION, feature_chart, image_figure, smooth_maps
from .types import PatientExplanation

MAX_IMAGES = 16
"""Images rendered per patient (multi-frame studies can have many); the rest are listed as omitted."""
MAX_FEATURE_BARS = 20
"""Bars in the tabular chart; every feature is still listed in the table below it."""
TOP_UNITS = 3
"""Inputs named per network in the table of networks: its largest |attribution|s."""
MEMBER_SCORES = {"image": "image_maps", "text": "word_scores", "tabular": "feature_scores"}
"""Where a network's part of each modality's attributions is stored in its `members` entry."""


def finite(x: Any) -> Optional[float]:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def fmt_num(x: Any, digits: int = 3) -> str:
    f = finite(x)
    if f is None:
        return "n/a"
    if f != 0 and (abs(f) < 10 ** -digits or abs(f) >= 1e5):
        return f"{f:.{max(digits - 1, 1)}e}"
    return f"{f:.{digits}f}"


def fmt_signed(x: Any, digits: int = 3) -> str:
    f = finite(x)
    if f is None:
        return "n/a"
    s = fmt_num(f, digits)
    return s if s.startswith("-") else "+" + s


# -- one modality ---------------------------------------------------------------------------------------------------
def text_section(e: PatientExplanation) -> dict:
    scores = [finite(s) for s in e.word_scores]
    scores += [None] * (len(e.words) - len(scores))
    magnitudes = [abs(s) for s in scores if s is not None]
    vmax = max(magnitudes) if magnitudes else 0.0
    words = []
    for w, s in zip(e.words, scores):
        if s is None or vmax == 0:
            words.append({"w": str(w), "style": "", "title": "attribution: n/a" if s is None else "attribution: 0",
                          "sign": "none", "alpha": 0.0})
            continue
        alpha = round(abs(s) / vmax, 3)
        rgb = POS_RGB if s > 0 else NEG_RGB
        style = "background-color: rgba(%d, %d, %d, %.3f)" % (*rgb, alpha * 0.85)
        if alpha > 0.6:
            style += "; color: #fff"
        words.append({"w": str(w), "style": style, "title": f"attribution: {fmt_signed(s, 4)}",
                      "sign": "pos" if s > 0 else ("neg" if s < 0 else "none"), "alpha": alpha})
    top = sorted((i for i, s in enumerate(scores) if s is not None and s != 0), key=lambda i: -abs(scores[i]))[:5]
    return {"words": words, "vmax": vmax, "mismatch": len(e.word_scores) != len(e.words),
            "top": [{"w": str(e.words[i]), "score": scores[i]} for i in top]}


def tabular_section(e: PatientExplanation, chart: bool = True) -> dict:
    n = len(e.features)
    values = [str(v) for v in e.feature_values] + ["n/a"] * (n - len(e.feature_values))
    scores = [finite(s) for s in e.feature_scores] + [None] * (n - len(e.feature_scores))
    order = sorted(range(n), key=lambda i: -abs(scores[i]) if scores[i] is not None else 1.0)
    rows = [{"feature": str(e.features[i]), "value": values[i], "score": scores[i],
             "sign": "pos" if (scores[i] or 0) > 0 else ("neg" if (scores[i] or 0) < 0 else "none")}
            for i in order]
    shown = [r for r in rows if r["score"] is not None][:MAX_FEATURE_BARS]
    drawn = feature_chart(shown) if chart and shown and any(r["score"] != 0 for r in shown) else None
    return {"rows": rows, "chart": drawn, "n_omitted": max(0, sum(r["score"] is not None for r in rows) - len(shown))}


def images_section(e: PatientExplanation) -> dict:
    items = []
    for i, img in enumerate(e.images[:MAX_IMAGES]):
        amap = e.image_maps[i] if i < len(e.image_maps) else None
        shown = None if amap is None else smooth_maps(np.asarray(amap, dtype=np.float64), SMOOTH_FRACTION)
        png, note = image_figure(np.asarray(img), shown)
        items.append({"n": i + 1, "label": _image_label(e, i), "png": png, "note": note,
                      "shape": "×".join(str(s) for s in np.shape(img))})
    return {"figures": items, "n_omitted": max(0, len(e.images) - MAX_IMAGES), "smooth_pct": 100 * SMOOTH_FRACTION}


def _image_label(e: PatientExplanation, i: int) -> str:
    return e.image_labels[i] if i < len(e.image_labels) else f"image {i + 1}"


# -- the networks of a fusion strategy ------------------------------------------------------------------------------
def member_summary(e: PatientExplanation) -> list[dict]:
    """Each network as the parquet summary and the page's table show it: name, weight, its own P(target)
    (None where it does not speak for the patient) and its attribution per modality it reads (signed sum,
    logit units; {} where the explanation carries none)."""
    return [{"network": str(n.get("network", "")), "weight": finite(n.get("weight")),
             "probability": finite(n.get("probability")),
             "attribution": {str(m): finite(v) for m, v in (n.get("attribution") or {}).items()}}
            for n in (e.members or [])]


def member_sections(e: PatientExplanation) -> list[dict]:
    """Per network, what the page shows of its part of the attributions: the summary, its strongest inputs,
    and its own word, feature and image views. Its image overlays only where more than one network reads
    the images: with one, its maps are the page's image maps, drawn once there."""
    image_readers = sum("image_maps" in n for n in e.members or [])
    out = []
    for n, row in zip(e.members or [], member_summary(e)):
        mine = _as_member(e, n)
        reads = [m for m, key in MEMBER_SCORES.items() if key in n]
        row = row | {"reads": reads, "total": _total(row["attribution"]), "top": _top_units(mine, n),
                     "text": text_section(mine) if "text" in reads else None,
                     "tabular": tabular_section(mine, chart=False) if "tabular" in reads else None,
                     "images": images_section(mine) if "image" in reads and image_readers > 1 else None,
                     "images_on_page": "image" in reads and image_readers == 1}
        out.append(row)
    return out


def _as_member(e: PatientExplanation, n: dict) -> PatientExplanation:
    """`e` holding network `n`'s scores instead of the whole model's (none for what it does not read)."""
    return dataclasses.replace(e, image_maps=list(n.get("image_maps", [])), word_scores=list(n.get("word_scores", [])),
                               feature_scores=list(n.get("feature_scores", [])))


def _total(attribution: dict) -> Optional[float]:
    values = [v for v in attribution.values() if v is not None]
    return float(sum(values)) if values else None


def _top_units(mine: PatientExplanation, n: dict) -> list[dict]:
    """The network's TOP_UNITS inputs with the largest |attribution|: words, "feature = value", whole images
    (a map's signed sum, where it has one on the Integrated Gradients scale)."""
    units = [(f'"{w}"', finite(s)) for w, s in zip(mine.words, mine.word_scores)]
    units += [(f"{f} = {v}", finite(s)) for f, v, s in zip(mine.features, mine.feature_values, mine.feature_scores)]
    if "image" in (n.get("attribution") or {}):
        units += [(_image_label(mine, i), float(np.sum(m, dtype=np.float64))) for i, m in enumerate(mine.image_maps)]
    units = sorted((u for u in units if u[1]), key=lambda u: -abs(u[1]))[:TOP_UNITS]
    return [{"label": label, "score": s, "sign": "pos" if s > 0 else "neg"} for label, s in units]


__all__ = ["finite", "fmt_num", "fmt_signed", "images_section", "member_sections", "member_summary",
           "tabular_section", "text_section", "MAX_FEATURE_BARS", "MAX_IMAGES"]
