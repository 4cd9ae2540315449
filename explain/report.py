"""Explanation reports: one self-contained HTML page per patient, an index, and machine-readable attributions.

    write_reports(explanations, out_dir, model_info={...}) -> {relative path: Path}

Layout of `out_dir`:

    index.html                     every patient in input order; failed records as rows with their error
    patient_<safe id>.html         one page per patient without `error` (no network access needed: images are
                                   base64 PNG data URIs, CSS is inline, a Content-Security-Policy forbids any fetch
                                   or script)
    attributions/<safe id>.json    PatientExplanation.to_dict() as strict JSON (NaN/inf -> null), every patient
    attributions.parquet           one row per patient (only when pyarrow is installed)

Colours mean the same thing everywhere: red pushes the model towards the explained class (`target`), blue pushes
away from it. Report text and ids are data: templates autoescape everything.
"""
from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from multimodal.formats import strict_json as _strict_json
from multimodal.formats import to_jsonable

from .figures import NEG_RGB, POS_RGB
from .sections import finite as _finite
from .sections import fmt_num as _fmt_num
from .sections import fmt_signed as _fmt_signed
from .sections import images_section, member_sections, member_summary, tabular_section, text_section
from .types import PatientExplanation

MODALITIES = ("image", "text", "tabular")
MODALITY_LABELS = {"image": "Images", "text": "Report text", "tabular": "Tabular data"}
MODALITY_COLOURS = {"image": "#0f766e", "text": "#b45309", "tabular": "#6d28d9"}
_EXTRA_COLOURS = ("#475569", "#be185d", "#15803d", "#a16207")

METHOD_NAMES = {
    "ig": "Integrated Gradients",
    "integrated_gradients": "Integrated Gradients",
    "saliency": "Saliency (input gradients)",
    "input_x_gradient": "Input × Gradient",
    "gradient_shap": "GradientSHAP",
    "gradshap": "GradientSHAP",
    "deeplift": "DeepLIFT",
    "occlusion": "Occlusion",
    "attention": "Attention weights",
    "gradcam": "Grad-CAM for images, Integrated Gradients for text and tabular",
}

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"


# -- public entry point -------------------------------------------------------------------------------------------
def write_reports(explanations: list[PatientExplanation], out_dir: Union[str, Path], *,
                  model_info: dict) -> dict[str, Path]:
    """Write the reports for `explanations` into `out_dir` (created if needed).

    `model_info` describes where the explanations came from, e.g. {"name", "model_dir", "classes", "versions",
    "created", "modalities"}; every key is optional and extra scalar keys are shown as they are. "modalities"
    (the modalities the model uses) decides which sections a page has; without it all three are shown.

    Returns every file written, keyed by its path relative to `out_dir` in POSIX form: "index.html",
    "patient_<safe id>.html", "attributions/<safe id>.json", "attributions.parquet". Use `safe_name(id)` for the
    name a given patient gets.
    """
    out = Path(out_dir)
    (out / "attributions").mkdir(parents=True, exist_ok=True)
    model_info = dict(model_info or {})
    modalities = _model_modalities(model_info)
    env = _environment()
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    model = _model_context(model_info)
    written: dict[str, Path] = {}

    names = _unique_names(e.id for e in explanations)
    rows = []
    for i, (e, name) in enumerate(zip(explanations, names)):
        rel_json = f"attributions/{name}.json"
        _write_text(out / rel_json, strict_json(e.to_dict()))
        written[rel_json] = out / rel_json
        pred, pred_prob = _prediction(e)
        row = {"n": i + 1, "id": str(e.id), "pred": pred, "pred_prob": _fmt_prob(pred_prob),
               "target": e.target, "target_prob": _fmt_prob(_finite((e.probs or {}).get(e.target))),
               "method": _method_name(e.method), "error": e.error, "href": None}
        if e.error is None:
            rel = f"patient_{name}.html"
            ctx = _patient_context(e, modalities)
            page = env.get_template("patient.html.j2").render(
                p=ctx, model=model, generated=generated, csp=CSP, title=f"Patient {e.id}")
            _write_text(out / rel, page)
            written[rel] = out / rel
            row["href"] = rel
        rows.append(row)

    parquet = _write_parquet(explanations, names, out / "attributions.parquet")
    if parquet is not None:
        written["attributions.parquet"] = parquet

    n_err = sum(r["error"] is not None for r in rows)
    index = env.get_template("index.html.j2").render(
        rows=rows, n_patients=len(rows), n_errors=n_err, n_reports=len(rows) - n_err, model=model,
        parquet=parquet is not None, generated=generated, csp=CSP, title="Explanation reports")
    _write_text(out / "index.html", index)
    written["index.html"] = out / "index.html"
    return written


# -- names and JSON -----------------------------------------------------------------------------------------------
def safe_name(patient_id: Any, max_len: int = 40) -> str:
    """A file-name-safe, unique stem for any id: ASCII slug (lower case, [a-z0-9._-]) + 8 hex chars of SHA-1.

    The hash is of the exact id, so ids that slugify alike ("a/b", "a b", "A B") still get different names, also
    on case-insensitive file systems.
    """
    text = str(patient_id)
    ascii_ = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9._-]+", "-", ascii_.lower()).strip("-._")[:max_len].strip("-._") or "patient"
    digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]
    return f"{slug}-{digest}"


def _unique_names(ids: Iterable[Any]) -> list[str]:
    """safe_name per id; a repeated id gets "-2", "-3"... so no record overwrites another's files."""
    seen: dict[str, int] = {}
    out = []
    for pid in ids:
        base = safe_name(pid)
        seen[base] = seen.get(base, 0) + 1
        out.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return out


def strict_json(obj: Any) -> str:
    return _strict_json(obj, indent=1)


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


# -- Jinja --------------------------------------------------------------------------------------------------------
def _environment():
    from jinja2 import Environment, PackageLoader, StrictUndefined

    # autoescape=True for every template (select_autoescape would not match the ".html.j2" names): ids and report
    # text are data, never markup.
    env = Environment(loader=PackageLoader(__package__ or "explain", "templates"), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["signed"] = _fmt_signed
    env.filters["num"] = _fmt_num
    env.filters["pct"] = _fmt_pct
    return env


def _fmt_pct(x: Any, digits: int = 1) -> str:
    f = _finite(x)
    return "n/a" if f is None else f"{100 * f:.{digits}f}%"


def _fmt_prob(x: Any) -> Optional[str]:
    f = _finite(x)
    return None if f is None else f"{f:.3f}"


# -- page contexts ------------------------------------------------------------------------------------------------
def _model_modalities(model_info: dict) -> list[str]:
    mods = model_info.get("modalities")
    if not mods:
        return list(MODALITIES)
    return [str(m) for m in mods]


def _model_context(info: dict) -> dict:
    known = ("name", "model_dir", "classes", "versions", "created", "modalities")
    versions = info.get("versions") or {}
    extra = {str(k): v for k, v in info.items() if k not in known and isinstance(v, (str, int, float, bool))}
    return {
        "name": str(info.get("name") or "unnamed model"),
        "model_dir": None if info.get("model_dir") is None else str(info["model_dir"]),
        "classes": [str(c) for c in info.get("classes") or []],
        "created": None if info.get("created") is None else str(info["created"]),
        "versions": {str(k): str(v) for k, v in versions.items()} if isinstance(versions, dict) else {},
        "extra": extra,
    }


def delta_quality(delta: Optional[float]) -> Optional[dict]:
    """A plain-language reading of the Integrated Gradients convergence delta (logit units: the sum of
    attributions minus the model's logit change from the baseline). Under 0.05 the attributions account
    for the prediction; under 0.25 roughly; above, the path integral is too coarse to trust the sizes."""
    d = _finite(delta)
    if d is None:
        return None
    a = abs(d)
    if a < 0.05:
        return {"level": "good", "text": "good: the attributions account for the prediction"}
    if a < 0.25:
        return {"level": "fair", "text": "fair: the attributions roughly account for the prediction; rankings "
                                         "are reliable, exact sizes less so"}
    return {"level": "poor", "text": "poor: sizes are unreliable; rerun with more steps (--n-steps 64 or 128)"}


def _method_name(method: Optional[str]) -> str:
    m = str(method or "unknown")
    full = METHOD_NAMES.get(m.lower())
    return f"{full} ({m})" if full else m


def _prediction(e: PatientExplanation) -> tuple[Optional[str], Optional[float]]:
    """(predicted class, its probability); the class falls back to the most probable one when `pred` is unset."""
    probs = {k: _finite(v) for k, v in (e.probs or {}).items()}
    pred = e.pred
    if pred is None:
        finite = {k: v for k, v in probs.items() if v is not None}
        pred = max(finite, key=finite.get) if finite else None
    return pred, probs.get(pred) if pred is not None else None


def _patient_context(e: PatientExplanation, modalities: list[str]) -> dict:
    pred, pred_prob = _prediction(e)
    probs = []
    for cls, p in (e.probs or {}).items():
        f = _finite(p)
        probs.append({"cls": str(cls), "p": f, "width": 0.0 if f is None else round(100 * min(max(f, 0.0), 1.0), 1),
                      "is_pred": str(cls) == str(pred), "is_target": str(cls) == str(e.target)})
    present = {"image": len(e.images) > 0, "text": len(e.words) > 0, "tabular": len(e.features) > 0}
    mods = list(modalities)
    for m in list(e.modality_share) + list(e.modality_ablation) + list(e.attention):
        if m not in mods:
            mods.append(m)
    # A modality with a share but no data in this record (e.g. a future modality) counts as present.
    for m in mods:
        present.setdefault(m, m in e.modality_share)

    return {
        "id": str(e.id),
        "target": str(e.target),
        "pred": pred,
        "pred_prob": pred_prob,
        "operating": _operating_context(e),
        "label": None if e.label is None else str(e.label),
        "probs": probs,
        "method": _method_name(e.method),
        "method_key": str(e.method or "").lower(),
        "members": member_sections(e),
        "convergence_delta": _finite(e.convergence_delta),
        "has_delta": e.convergence_delta is not None,
        "delta_quality": delta_quality(e.convergence_delta),
        "modalities": mods,
        "labels": {m: MODALITY_LABELS.get(m, m.capitalize()) for m in mods},
        "present": present,
        "modality": _modality_context(e, mods, present),
        "images": images_section(e) if "image" in mods and present["image"] else None,
        "text": text_section(e) if "text" in mods and present["text"] else None,
        "tabular": tabular_section(e) if "tabular" in mods and present["tabular"] else None,
        "pos_rgb": "rgb(%d, %d, %d)" % POS_RGB,
        "neg_rgb": "rgb(%d, %d, %d)" % NEG_RGB,
    }


def _operating_context(e: PatientExplanation) -> Optional[dict]:
    """Where P(target) stands against the model's operating point: the side it falls on and how far, so a
    score just under a screening cut-off reads as just under it, not as a confident negative."""
    cut, p = _finite(e.threshold), _finite((e.probs or {}).get(e.target))
    if cut is None or p is None:
        return None
    gap = p - cut
    return {"cut": cut, "p": p, "gap": abs(gap), "called": gap >= 0,
            "side": "at or above" if gap >= 0 else "below"}


def _modality_context(e: PatientExplanation, mods: list[str], present: dict) -> dict:
    colours = dict(MODALITY_COLOURS)
    extra = iter(_EXTRA_COLOURS * 4)
    for m in mods:
        colours.setdefault(m, next(extra))
    rows = []
    for m in mods:
        rows.append({"m": m, "label": MODALITY_LABELS.get(m, m.capitalize()), "colour": colours[m],
                     "present": present.get(m, False),
                     "share": _finite(e.modality_share.get(m)),
                     "ablation": _finite(e.modality_ablation.get(m)),
                     "attention": _finite(e.attention.get(m))})

    return {"rows": rows, "effect": _effect_bars(rows), "has_attention": any(r["attention"] is not None for r in rows),
            "has_share": any(r["share"] is not None for r in rows)}


def _effect_bars(rows: list[dict]) -> list[dict]:
    """The page's one contribution summary: how far P(target) moves when each modality is removed. Unlike
    the attribution share it does not grow with a modality's number of inputs (pixels against a handful of
    features), and it is the same whichever attribution method drew the maps. Bars are signed (red: the
    modality supported the explained class) and share one scale, the largest effect, at least 0.05."""
    shown = [r for r in rows if r["present"] and r["ablation"] is not None]
    scale = max([abs(r["ablation"]) for r in shown] + [0.05])
    return [{"label": r["label"], "colour": r["colour"], "value": r["ablation"],
             "sign": "pos" if r["ablation"] > 0 else ("neg" if r["ablation"] < 0 else "none"),
             "width": round(50 * abs(r["ablation"]) / scale, 2)} for r in shown]


# -- parquet ------------------------------------------------------------------------------------------------------
def _write_parquet(explanations: list[PatientExplanation], names: list[str], path: Path) -> Optional[Path]:
    try:
        import pandas as pd
        import pyarrow  # noqa: F401
    except ImportError:
        return None
    mods = list(MODALITIES)
    for e in explanations:
        for m in list(e.modality_share) + list(e.modality_ablation) + list(e.attention):
            if m not in mods:
                mods.append(m)
    rows = []
    for e, name in zip(explanations, names):
        pred, pred_prob = _prediction(e)
        row = {"id": str(e.id), "file": name, "target": str(e.target), "pred": pred, "pred_prob": pred_prob,
               "probs": json.dumps(to_jsonable(e.probs), allow_nan=False), "method": e.method,
               "members": json.dumps(member_summary(e), allow_nan=False),
               "convergence_delta": _finite(e.convergence_delta), "error": e.error,
               "n_images": len(e.images), "n_words": len(e.words), "n_features": len(e.features)}
        for m in mods:
            row[f"share_{m}"] = _finite(e.modality_share.get(m))
            row[f"ablation_{m}"] = _finite(e.modality_ablation.get(m))
            row[f"attention_{m}"] = _finite(e.attention.get(m))
        rows.append(row)
    df = pd.DataFrame(rows)
    for col in df.columns:
        if col.startswith(("share_", "ablation_", "attention_")) or col in ("pred_prob", "convergence_delta"):
            df[col] = df[col].astype("float64")
    df.to_parquet(path, index=False)
    return path


__all__ = ["write_reports", "safe_name", "strict_json", "to_jsonable"]
