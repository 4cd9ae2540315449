"""Records → one `PatientExplanation` per record, in order (`explain(model, records)`).

Batches come from the same loader as predict; each is attributed by explain/attribution.py, and its
tensors are turned here into what a reader of a report needs: words, feature values, view labels,
per-modality shares, the missing-modality ablation and the fusion's attention. A batch that fails is
retried one patient at a time, so only the culprit comes back with `error` set.

Outputs per patient
    image_maps: one [H, W] map per model-input image (channels summed, signed) at model input
    resolution; `images`: the same images in display space [0, 1].
    words / word_scores: whitespace-delimited words of the report (punctuation stays attached),
    token attributions summed into the word whose character span contains the token; words
    cut off by `text.max_length` are listed with score 0.
    features / feature_values / feature_scores: one signed score per tabular feature.
    modality_share: sum of |score| over the reported units (pixels of the maps, tokens,
    features) per modality, divided by the total over present modalities.
    modality_ablation: target probability minus target probability with the modality hidden
    through the fusion's missing-modality mask (`net(batch, absent=[m])`).
    attention: last-block CLS attention mass per modality (attention fusion only; {} otherwise).
    members: a fusion strategy's networks (unimodal / auto): each one's weight, its own probability and
    its part of the attributions above (word_scores, feature_scores, image_maps of what it reads, and
    their signed sum per modality), from the same one Integrated Gradients pass split by network.
A modality a patient lacks gets no entry anywhere (no maps/words/features, no share/ablation/attention).
"""
from __future__ import annotations

import bisect
import copy
import math
import re
from typing import Iterator, Optional, Union

import numpy as np
import torch
import torch.nn as nn

from multimodal.data.batches import RecordDataset, one_line
from multimodal.data.preprocess.text import clean
from multimodal.data.batches import make_loader, to_device
from multimodal.evaluation.metrics import cuts, predicted
from multimodal.model.network import members

from .attribution import (METHODS, _BatchResult, _cuda_safe, _fixed_target, _select, attribute_batch, class_probs,
                          eval_mode, gradcam_layers, split_by_member)
from .budget import largest_row, rows_per_pass
from .types import PatientExplanation


def _ablation(net, batch: dict, probs: torch.Tensor, tgt: torch.Tensor, task: str) -> dict[str, torch.Tensor]:
    out = {}
    with torch.no_grad():
        p_full = probs.gather(1, tgt[:, None])[:, 0]
        for m in net.modalities:
            p = class_probs(net(batch, absent=[m]).float(), task).cpu().gather(1, tgt[:, None])[:, 0]
            out[m] = p_full - p
    return out


def _attention(net, batch: dict) -> Optional[dict[str, torch.Tensor]]:
    """Attention per modality token, averaged over ensemble members."""
    heads = [n.fusion for n in members(net)]
    if not all(hasattr(f, "last_attention") for f in heads):
        return None
    for f in heads:
        f.last_attention = None
    with torch.no_grad():
        net(batch, return_attention=True)
    atts = [f.last_attention for f in heads]
    if not all(atts):
        return None
    if any(set(a) != set(atts[0]) for a in atts):  # per-modality networks: each attends to one modality only
        return None
    return {m: sum(a[m].float().sum(1) for a in atts).cpu() / len(atts) for m in atts[0]}


def _member_votes(model, net, batch: dict, tgt: torch.Tensor) -> Optional[list[list[dict]]]:
    """A fusion strategy's networks (fusion.strategy unimodal / auto), per patient: each one's
    modalities, mixture weight and own calibrated probability of the explained class, None where it
    does not speak for the patient (it sees none of the patient's inputs and never learnt what their
    absence says). Its part of the attributions is added by `_member_scores`."""
    if not getattr(net, "weighted", False) or "image_group" in batch:
        return None
    from multimodal.model.build import member_plan

    with torch.no_grad():
        z, seen = net.member_logits(batch, calibrated=True)
    task = model.config.task.type
    p = [class_probs(zi.float(), task).cpu().gather(1, tgt[:, None])[:, 0] for zi in z]
    plan, w = member_plan(model.config), net.member_weights.tolist()
    return [[{"network": "+".join(mods) + (f" (seed {model.config.train.seed + off})" if model.config.train.ensemble > 1
                                          else ""),
              "weight": round(float(w[i]), 4), "probability": float(p[i][b]) if bool(seen[i, b]) else None}
             for i, (mods, off) in enumerate(plan)] for b in range(z.shape[1])]


def _display(model, x: torch.Tensor) -> np.ndarray:
    """[C, H, W] normalised → [H, W] or [H, W, 3] in [0, 1]."""
    p = model.prep.image
    img = (x.cpu() * p.std + p.mean).clamp(0, 1)
    return img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy()


def word_spans(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in re.finditer(r"\S+", text)]


def merge_words(text: str, encoding, token_scores: np.ndarray) -> tuple[list[str], list[float]]:
    """Token scores → (words of `text`, summed score per word). Special tokens are skipped; a token
    belongs to the whitespace-delimited word whose span contains its first character."""
    spans = word_spans(text)
    starts = [s for s, _ in spans]
    scores = np.zeros(len(spans))
    for j, (wid, (s, e)) in enumerate(zip(encoding.word_ids, encoding.offsets)):
        if wid is None or e <= s or j >= len(token_scores):
            continue
        k = bisect.bisect_right(starts, s) - 1
        if k >= 0 and s < spans[k][1]:
            scores[k] += float(token_scores[j])
    return [text[s:e] for s, e in spans], scores.tolist()


def token_words(text: str, encoding) -> list[int]:
    """Word index (into word_spans(text)) per token, -1 for special/padding tokens."""
    spans = word_spans(text)
    starts = [s for s, _ in spans]
    out = []
    for wid, (s, e) in zip(encoding.word_ids, encoding.offsets):
        k = bisect.bisect_right(starts, s) - 1 if wid is not None and e > s else -1
        out.append(k if k >= 0 and s < spans[k][1] else -1)
    return out


def _raw_value(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip()):
        return "missing"
    if isinstance(v, (float, np.floating)):
        return f"{float(v):g}"
    return str(v).strip()


def _probs_pred(p: np.ndarray, classes: list[str], task: str, thresholds) -> tuple[dict[str, float], str]:
    """The class(es) the model calls at its stored operating point, as `predict` does: a page must never
    headline a class the prediction file does not."""
    probs = {c: float(v) for c, v in zip(classes, p)}
    decided = predicted(p[None], task, thresholds)[0]
    if task == "multilabel":
        return probs, ";".join(c for c, d in zip(classes, decided) if d)
    return probs, classes[int(np.argmax(decided))]


def _cut(target: int, classes: list[str], task: str, thresholds) -> Optional[float]:
    """The operating point as a cut-off on P(target); multiclass calls the most probable class, so it has none."""
    if task == "multiclass":
        return None
    t = cuts(thresholds, task, len(classes))
    if task == "binary":
        return float(t[0]) if target == 1 else float(1 - t[0])
    return float(t[target])


def _true_labels(model, rec, rows: list[int]) -> list[Optional[str]]:
    """Each row's label in the model's class names, None where the records have no (known) label."""
    labels = model.prep.labels
    if not all(c in rec.df.columns for c in labels.columns):
        return [None] * len(rows)
    y = labels.encode(rec.df.iloc[rows])
    if model.config.task.type == "multilabel":
        return [None if np.isnan(r).any() else ";".join(c for c, v in zip(model.classes, r) if v) for r in y]
    return [model.classes[int(v)] if v >= 0 else None for v in y]


def _view_labels(row, cfg, n: int) -> list[str]:
    """The column of each view, when every path gave one image; else plain numbers (a multi-frame file
    or a series folder gives several images per path, and which is which is not worth re-reading)."""
    from multimodal.data.preprocess.image import split_paths

    cols = [c for c in cfg.image.columns for _ in split_paths(row[c])]
    if len(cols) != n:
        return [f"image {k + 1}" for k in range(n)]
    seen: dict[str, int] = {}
    out = []
    for c in cols:
        seen[c] = seen.get(c, 0) + 1
        out.append(c if cols.count(c) == 1 else f"{c} {seen[c]}")
    return out


def _explanations(model, rec, res: _BatchResult, method: str, ablation: bool, net) -> list[PatientExplanation]:
    cfg, task, classes = model.config, model.config.task.type, model.classes
    batch = res.batch
    abl = _ablation(net, batch, res.probs, res.target, task) if ablation else None
    att = _attention(net, batch)
    votes = _member_votes(model, net, batch, res.target)
    truth, thresholds = _true_labels(model, rec, res.rows), model.prep.labels.thresholds
    out = []
    for b, i in enumerate(res.rows):
        row = rec.row(i)
        probs, pred = _probs_pred(res.probs[b].numpy(), classes, task, thresholds)
        e = PatientExplanation(id=str(row[cfg.data.id]), target=classes[int(res.target[b])], probs=probs,
                               pred=pred, method=method, label=truth[b],
                               threshold=_cut(int(res.target[b]), classes, task, thresholds))
        has = {m: bool(p[b]) for m, p in res.present.items()}
        units = _Units(model, row, batch, b, has)
        if has.get("image"):
            e.images = [_display(model, batch["image"][b, v]) for v in units.views]
            e.image_labels = _view_labels(row, cfg, len(units.views))
        if has.get("text"):
            e.words = units.words
        if has.get("tabular"):
            e.features = list(model.prep.tabular.features)
            e.feature_values = [_raw_value(row[c]) for c in e.features]
        scores, totals = units.scores({"image": res.image, "text": res.text, "tabular": res.tabular}, absolute=True)
        e.image_maps, e.word_scores, e.feature_scores = (scores.get(k, []) for k in (
            "image_maps", "word_scores", "feature_scores"))
        if method != "ig":
            totals.pop("image", None)  # Grad-CAM maps are not on the Integrated Gradients scale
        s = sum(totals.values())
        e.modality_share = {m: (v / s if s > 0 else 0.0) for m, v in totals.items()}
        if abl is not None:
            e.modality_ablation = {m: float(abl[m][b]) for m in abl if has.get(m)}
        if att is not None:
            e.attention = {m: float(att[m][b]) for m in att if has.get(m)}
        e.convergence_delta = float(res.delta[b]) if res.delta is not None else None
        e.members = votes[b] if votes is not None else []
        for vote, part in zip(e.members, res.members or []):
            vote.update(_member_scores(units, part, method))
        out.append(e)
    return out


class _Units:
    """One patient's reported units, for the whole model's attributions and each network's alike: the
    images (views), the words of the report and the tabular features it has."""

    def __init__(self, model, row, batch: dict, b: int, has: dict[str, bool]):
        self.b, self.has = b, has
        self.views = batch["image_mask"][b].nonzero(as_tuple=True)[0].tolist() if has.get("image") else []
        if has.get("text"):
            self.text = clean(row[model.config.text.column], model.config.text.max_chars)
            self.encoding = batch["text_encodings"][b]
            self.words = [self.text[s:e] for s, e in word_spans(self.text)]

    def scores(self, tensors: dict, absolute: bool) -> tuple[dict[str, list], dict[str, float]]:
        """(image_maps / word_scores / feature_scores of the modalities the patient has and `tensors`
        holds, each modality's total: sum of |score| where `absolute`, else signed) over the units:
        pixels of the maps, the report's tokens, the features."""
        b, out, totals = self.b, {}, {}
        agg = (lambda a: float(np.abs(a).sum())) if absolute else (lambda a: float(np.sum(a, dtype=np.float64)))
        if self.has.get("image") and tensors.get("image") is not None:
            out["image_maps"] = [tensors["image"][b, v].numpy().astype(np.float32) for v in self.views]
            totals["image"] = sum(agg(m) for m in out["image_maps"])
        if self.has.get("text") and tensors.get("text") is not None:
            tok = tensors["text"][b].numpy()
            out["word_scores"] = merge_words(self.text, self.encoding, tok)[1]
            totals["text"] = agg(tok[np.array(self.encoding.attention_mask[: len(tok)], bool)])
        if self.has.get("tabular") and tensors.get("tabular") is not None:
            out["feature_scores"] = [float(v) for v in tensors["tabular"][b].numpy()]
            totals["tabular"] = agg(tensors["tabular"][b].numpy())
        return out, totals


def _member_scores(units: _Units, part: dict[str, torch.Tensor], method: str) -> dict:
    """One network's part of the patient's attributions (explain/attribution.py, split_by_member): its
    image_maps / word_scores / feature_scores, aligned with the page's images, words and features, for
    the modalities it reads and the patient has, and `attribution`: their signed sum per modality, in
    logit units (Grad-CAM maps are not, so they get no sum)."""
    scores, totals = units.scores(part, absolute=False)
    if method != "ig":
        totals.pop("image", None)
    return scores | {"attribution": totals}


def _error(model, rec, i: int, msg: str, target, method: str) -> PatientExplanation:
    fixed = _fixed_target(target, model.classes, model.config.task.type)
    return PatientExplanation(id=str(rec.cell(i, model.config.data.id)),
                              target=model.classes[fixed] if fixed is not None else "", method=method,
                              error=" ".join(str(msg).split())[:300])


def iter_batches(model, records, *, target=None, method: str = "ig", n_steps: int = 32,
                 internal_batch_size: Optional[int] = None, batch_size: int = 8, ablation: bool = True,
                 progress: bool = False, net: Optional[nn.Module] = None
                 ) -> Iterator[tuple[Optional[_BatchResult], list[PatientExplanation]]]:
    """Yields (raw result of the ok rows or None, explanations of every row of the batch in order)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if model.net is None:
        raise ValueError("model is not trained")
    net = net if net is not None else model.net
    _fixed_target(target, model.classes, model.config.task.type)  # fail fast on a bad target
    rec = model.records(records)
    device = next(net.parameters()).device
    ds = RecordDataset(rec, model.prep, model.config.modalities, model.config, views="first")
    dl = make_loader(ds, model.config, model.prep, False, device, batch_size)
    from multimodal.progress import bar as progress_bar

    bar = progress_bar(total=len(ds), desc=f"explain ({method})", unit="rec", enabled=progress)
    with eval_mode(net), _cuda_safe(device), torch.autocast(device.type, enabled=False):
        split = split_by_member(net)  # made in eval mode: a copy keeps the mode it was made in
        cam_layers = None
        if method == "gradcam" and "image" in net.modalities:
            cam_layers = gradcam_layers(split, model.config, device)
        kw = dict(target=target, method=method, n_steps=n_steps, internal_batch_size=internal_batch_size, net=split,
                  cam_layers=cam_layers)
        for batch in dl:
            idx, ok = batch["index"].tolist(), batch["ok"]
            by_row: dict[int, PatientExplanation] = {
                i: _error(model, rec, i, e, target, method) for i, e, k in zip(idx, batch["error"], ok.tolist())
                if not k}
            res = None
            if ok.any():
                good = _select(batch, ok)
                if kw["internal_batch_size"] is None:
                    one = to_device(_select(good, largest_row(good)), device)
                    kw["internal_batch_size"] = rows_per_pass(split, one, n_steps * batch_size, device,
                                                              model.config.image.max_images)
                try:
                    res = attribute_batch(model, good, **kw)
                    for e, i in zip(_explanations(model, rec, res, method, ablation, net), res.rows):
                        by_row[i] = e
                except Exception:  # noqa: BLE001 — retry one patient at a time, so only a culprit fails
                    res = None
                    for j in good["index"].tolist():
                        one = _select(good, good["index"] == j)
                        try:
                            r = attribute_batch(model, one, **kw)
                            by_row[j] = _explanations(model, rec, r, method, ablation, net)[0]
                        except Exception as err:  # noqa: BLE001
                            by_row[j] = _error(model, rec, j, f"attribution failed: {one_line(err)}", target,
                                               method)
            bar.update(len(idx))
            yield res, [by_row[i] for i in idx]
    bar.close()


def explain(model, records, *, target: Union[str, int, None] = None, method: str = "ig", n_steps: int = 32,
            internal_batch_size: Optional[int] = None, batch_size: int = 8, ablation: bool = True,
            progress: bool = False) -> list[PatientExplanation]:
    """One PatientExplanation per record of `records` (path, DataFrame or Records), in order.

    target: class name or index. Default: binary → the positive class (classes[1]); multiclass →
    each patient's predicted class; multilabel → each patient's highest-probability label.
    The attributed quantity is that class's calibrated logit (binary: the single logit, negated
    when the negative class is asked for), not its probability.
    method: "ig" (joint multimodal Integrated Gradients) or "gradcam" (Grad-CAM image maps,
    Integrated Gradients for text and tabular). n_steps: IG path steps; internal_batch_size:
    at most this many (step × patient) rows per forward/backward pass (None: as many as fit half the
    memory available, measured on the first record: explain.budget). ablation: also compute `modality_ablation` (one extra forward pass per
    modality and batch). Records that fail to load (or to attribute) come back with `error` set.
    Runs in eval mode and fp32 on the model's device.
    """
    out: list[PatientExplanation] = []
    for _, exps in iter_batches(model, records, target=target, method=method, n_steps=n_steps,
                                internal_batch_size=internal_batch_size, batch_size=batch_size,
                                ablation=ablation, progress=progress):
        out += exps
    return out


def with_net(model, net: nn.Module):
    """A shallow copy of `model` that predicts with another network (e.g. re-initialised weights)."""
    m = copy.copy(model)
    m.net = net
    return m


__all__ = ["explain", "iter_batches", "merge_words", "token_words", "word_spans", "with_net",
           "PatientExplanation"]
