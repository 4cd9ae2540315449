"""Do the attributions find what was planted? Checks on the synthetic cohort (`multimodal.synth`).

`faithfulness(model, test_csv, truth_csv)` returns a flat JSON-able dict:

pointing_game
    Positive patients with a lesion that reaches the model input: share whose lesion-image map
    peaks inside the planted box (mapped to model-input pixels). The map is the *signed* IG map
    (positive = evidence for the positive class, which a bright lesion is), smoothed with a 3x3
    average before the argmax (a flat maximum counts at its centroid). `pointing_game_abs` uses
    |map| instead; `pointing_game_gradcam` the signed Grad-CAM map the same way;
    `pointing_game_randomized_model[_abs]` is the IG pointing game of the re-initialised copy used
    by the sanity check -- the control: IG multiplies by (input - black), and the lesion is the
    brightest blob, so part of any IG pointing score is brightness rather than the model.
text_top3
    Positive patients whose report holds "spiculated mass": share where "spiculated" or "mass"
    is among the three words with the largest (signed, towards positive) score.
tabular_top1
    Positive patients with a planted high CRP: share where `crp` has the largest signed score.
deletion
    Per modality, over all patients with that modality: mean drop of the positive-class
    probability when the top 10% of units (pixels over all views / non-special tokens / features;
    at least one) by signed attribution are set to the IG baseline (black pixel, pad token with
    the attention mask kept, training mean / unknown category), against the same number of random
    units (mean of 3 draws).
sanity_rank_corr
    Adebayo et al.'s model-randomisation test: mean |Spearman rho| per modality between the
    signed maps of the trained model and of a copy with every parameter re-initialised
    (`reset_parameters()` where a module has one, Gaussian noise of the trained tensor's scale
    otherwise), per patient over its pixels (all views) / non-special tokens. Tabular has only 4
    features per patient (a per-patient |rho| takes a handful of values and is ~0.5 by chance), so
    there the value is |rho| over all (patient, feature) scores pooled; `sanity_rank_corr_detail`
    has both forms and the chance level. `sanity_reference_rank_corr`: the same statistic between
    two trained-model runs with n_steps and n_steps // 2, i.e. what an unchanged model gives.
convergence
    |convergence delta| of the IG runs, absolute and relative to |logit(input) - logit(baseline)|,
    split by whether the patient has images (the pixel path from a black image is the rough one).
passed
    The issue's acceptance criteria: pointing_game, text_top3, tabular_top1 >= 0.90; deletion:
    top beats random on average over modalities; sanity: every sanity_rank_corr < 0.5.
"""
from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from multimodal.data.batches import to_device
from multimodal.data.imageio import read_image
from multimodal.data.preprocess.image import split_paths
from multimodal.synth import LAB, PHRASE

from .attribution import baseline_batch, class_probs, eval_mode
from .patients import iter_batches, with_net

TOP_FRACTION = 0.10
N_RANDOM = 3
PHRASE_WORDS = tuple(PHRASE.split())
TARGETS = {"pointing_game": 0.90, "text_top3": 0.90, "tabular_top1": 0.90, "sanity_rank_corr": 0.5}


# -- ground truth in model-input coordinates -----------------------------------------------------
def lesion_in_input(row, truth, cfg, root: Path) -> Optional[tuple[int, tuple[float, float, float, float]]]:
    """(image index in the model's image list, box x0, y0, x1, y1 in model-input pixels) or None when
    the lesion does not reach the model (no lesion, beyond max_images, frame not selected)."""
    if int(truth["lesion"]) != 1 or not str(truth["lesion_box"]).strip():
        return None
    paths = [p for c in cfg.image.columns for p in split_paths(row[c])]
    j, frame = int(truth["lesion_image"]), int(truth["lesion_frame"])
    if not 0 <= j < len(paths):
        return None

    def n_images(p):
        return len(read_image(root / p if not Path(p).is_absolute() else Path(p), window=cfg.image.window,
                              frames=cfg.image.frames))

    index = sum(n_images(p) for p in paths[:j])
    if cfg.image.frames == "all":
        index += max(frame, 0)
    elif not (frame < 0 or cfg.image.frames == "middle"):  # the synthetic lesion is in the middle frame
        return None
    if index >= cfg.image.max_images:
        return None
    W, H = (float(v) for v in str(truth["image_size"]).split(","))
    x0, y0, x1, y1 = (float(v) for v in str(truth["lesion_box"]).split(","))
    s = cfg.image.size
    return index, (x0 * s / W, y0 * s / H, x1 * s / W, y1 * s / H)


def peak(m: np.ndarray, absolute: bool = False) -> tuple[float, float]:
    """(x, y) of the maximum of the 3x3-average-smoothed map (signed, or of |map|). A flat maximum
    (e.g. an upsampled 3x3 Grad-CAM cell) counts at its centroid, not at its first pixel."""
    t = torch.as_tensor(np.abs(m) if absolute else m, dtype=torch.float32)[None, None]
    t = F.avg_pool2d(t, 3, stride=1, padding=1, count_include_pad=False)[0, 0]
    top = float(t.max())
    ys, xs = (t >= top - 1e-6 * max(abs(top), 1e-12)).nonzero(as_tuple=True)
    return float(xs.float().mean()), float(ys.float().mean())


def inside(xy: tuple[int, int], box) -> bool:
    x, y = xy
    x0, y0, x1, y1 = box
    return x0 <= x + 0.5 < x1 and y0 <= y + 0.5 < y1


def _norm_word(w: str) -> str:
    return re.sub(r"[^a-z]", "", w.lower())


# -- model randomisation -------------------------------------------------------------------------
def randomized_copy(net: nn.Module, seed: int = 0) -> nn.Module:
    """Deep copy with every parameter re-initialised (buffers such as BN running stats reset too)."""
    torch.manual_seed(seed)
    r = copy.deepcopy(net)
    done: set[int] = set()
    for m in r.modules():
        for name in ("reset_parameters", "_reset_parameters"):
            f = getattr(m, name, None)
            if callable(f):
                f()
                done |= {id(p) for p in m.parameters(recurse=False)}
                break
    with torch.no_grad():
        for p in r.parameters():
            if id(p) not in done:
                sd = float(p.std()) if p.numel() > 1 else 0.0
                p.normal_(0.0, sd if sd > 0 else 0.02)
    return r


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


# -- deletion --------------------------------------------------------------------------------------
def _units(res, model) -> dict[str, list[np.ndarray]]:
    """Per modality and row: flat indices of the units eligible for deletion (empty when absent)."""
    batch, out = res.batch, {}
    b = len(res.rows)
    if res.image is not None:
        V, H, W = res.image.shape[1:]
        valid = batch["image_mask"].cpu()[:, :, None, None].expand(b, V, H, W).reshape(b, -1)
        out["image"] = [valid[i].nonzero(as_tuple=True)[0].numpy() if res.present["image"][i] else np.array([], int)
                        for i in range(b)]
    if res.text is not None:
        special = np.array([e.special_tokens_mask for e in batch["text_encodings"]], bool)
        valid = batch["text_mask"].cpu().numpy() & ~special
        out["text"] = [np.flatnonzero(valid[i]) if res.present["text"][i] else np.array([], int) for i in range(b)]
    if res.tabular is not None:
        Fn = res.tabular.shape[1]
        out["tabular"] = [np.arange(Fn) if res.present["tabular"][i] else np.array([], int) for i in range(b)]
    return out


def _scores(res, m: str) -> torch.Tensor:
    return {"image": res.image, "text": res.text, "tabular": res.tabular}[m].reshape(len(res.rows), -1)


def _masked(model, res, m: str, chosen: list[np.ndarray], base: dict) -> dict:
    """The batch with the chosen units of modality m set to their baseline value."""
    batch = dict(res.batch)
    b = len(res.rows)
    if m == "image":
        img = batch["image"].clone()
        B, V, C, H, W = img.shape
        sel = torch.zeros(b, V * H * W, dtype=torch.bool)
        for i, c in enumerate(chosen):
            sel[i, torch.as_tensor(c, dtype=torch.long)] = True
        sel = sel.reshape(b, V, 1, H, W).expand(b, V, C, H, W).to(img.device)
        batch["image"] = torch.where(sel, base["image"], img)
    elif m == "text":
        ids = batch["text_ids"].clone()
        for i, c in enumerate(chosen):
            ids[i, torch.as_tensor(c, dtype=torch.long)] = base["text_ids"][i, torch.as_tensor(c, dtype=torch.long)]
        batch["text_ids"] = ids
    else:  # feature f < n_numeric is num/num_missing column f, else categorical column f - n_numeric
        n_num = batch["num"].shape[1]
        v = {k: batch[k].clone() for k in ("num", "num_missing", "cat")}
        for i, c in enumerate(chosen):
            for f in np.asarray(c, dtype=int).tolist():
                if f < n_num:
                    v["num"][i, f] = base["num"][i, f]
                    v["num_missing"][i, f] = base["num_missing"][i, f]
                else:
                    v["cat"][i, f - n_num] = base["cat"][i, f - n_num]
        batch.update(v)
    return batch


def _target_prob(model, batch: dict, target: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        p = class_probs(model.net(batch).float(), model.config.task.type).cpu()
    return p.gather(1, target[:, None])[:, 0]


def _deletion(model, res, rng: np.random.Generator, acc: dict) -> None:
    base = baseline_batch(model, res.batch, {m: p.to(res.batch["index"].device) for m, p in res.present.items()})
    p0 = res.probs.gather(1, res.target[:, None])[:, 0]
    for m, units in _units(res, model).items():
        rows = [i for i, u in enumerate(units) if len(u)]
        if not rows:
            continue
        scores = _scores(res, m).numpy()
        top, rand = [], [[] for _ in range(N_RANDOM)]
        for i, u in enumerate(units):
            k = max(1, math.ceil(TOP_FRACTION * len(u))) if len(u) else 0
            top.append(u[np.argsort(-scores[i, u], kind="stable")[:k]] if k else u)
            for r in range(N_RANDOM):
                rand[r].append(rng.choice(u, size=k, replace=False) if k else u)
        d_top = p0 - _target_prob(model, _masked(model, res, m, top, base), res.target)
        d_rand = torch.stack([p0 - _target_prob(model, _masked(model, res, m, c, base), res.target)
                              for c in rand]).mean(0)
        acc.setdefault(m, {"top": [], "random": []})
        acc[m]["top"] += d_top[rows].tolist()
        acc[m]["random"] += d_rand[rows].tolist()


def _flat_maps(res) -> dict[int, dict[str, np.ndarray]]:
    """Record index → modality → the signed attribution over the units that exist for that patient."""
    out: dict[int, dict[str, np.ndarray]] = {}
    units = _units(res, None)
    for m, per_row in units.items():
        s = _scores(res, m).numpy()
        for i, u in enumerate(per_row):
            if len(u):
                out.setdefault(res.rows[i], {})[m] = s[i, u]
    return out


def _chance_abs_rho(n: int, rng=np.random.default_rng(0)) -> float:
    """Expected |Spearman rho| between two unrelated rankings of n units."""
    if n < 3:
        return float("nan")
    if n > 50:
        return math.sqrt(2 / (math.pi * (n - 1)))
    a = np.arange(n)
    return float(np.mean([abs(_spearman(a, rng.permutation(n))) for _ in range(2000)]))


def _rank_corr(pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    """Mean per-patient |rho|; with few units per patient (tabular) a per-patient rho has only a
    handful of possible values and a high chance level, so `value` is then the |rho| of all
    (patient, unit) scores pooled, which still asks "does the randomised model rank the same units
    of the same patients high?"."""
    per = [abs(_spearman(a, b)) for a, b in pairs]
    ns = [len(a) for a, _ in pairs]
    chance = _mean([_chance_abs_rho(n) for n in sorted(set(ns))]) if ns else None
    pooled = abs(_spearman(np.concatenate([a for a, _ in pairs]), np.concatenate([b for _, b in pairs]))) \
        if pairs else float("nan")
    few = bool(ns) and float(np.median(ns)) < 10
    return {"value": _nan_none(pooled) if few else _mean(per), "per_patient": _mean(per),
            "pooled": _nan_none(pooled), "chance_per_patient": chance, "units": "pooled" if few else "per_patient",
            "n": len(pairs)}


def _nan_none(x) -> Optional[float]:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _mean(xs) -> Optional[float]:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(xs)) if xs else None


def faithfulness(model, test_csv, truth_csv, *, n_steps: int = 32, seed: int = 0,
                 max_patients: Optional[int] = None, batch_size: int = 8, sanity_patients: int = 48,
                 progress: bool = False) -> dict:
    """Pointing game, text top-3, tabular top-1, deletion vs random, and the model-randomisation
    check on a synthetic cohort's test records (binary task, positive class = classes[1])."""
    cfg = model.config
    rec = model.records(test_csv)
    if max_patients is not None and len(rec) > max_patients:
        rec = rec.subset(np.sort(np.random.default_rng(seed).choice(len(rec), max_patients, replace=False)))
    truth = pd.read_csv(truth_csv, dtype=str, keep_default_na=False).set_index("patient_id")
    ids = rec.df[cfg.data.id].astype(str).tolist()
    T = [truth.loc[i] if i in truth.index else None for i in ids]
    pos = [t is not None and int(t["label"]) == 1 for t in T]
    rng = np.random.default_rng(seed)

    lesion: dict[int, tuple] = {}
    if "image" in cfg.modalities:
        for i, t in enumerate(T):
            if pos[i]:
                try:
                    hit = lesion_in_input(rec.row(i), t, cfg, rec.root)
                except Exception:  # noqa: BLE001 — an unreadable record is an error row below anyway
                    hit = None
                if hit is not None:
                    lesion[i] = hit

    point, point_abs, text_hits, tab_hits, deletion, errors = [], [], [], [], {}, 0
    trained_maps: dict[int, dict[str, np.ndarray]] = {}
    deltas, rel, rel_img, rel_noimg, seen = [], [], [], [], 0
    sanity_rows = set(range(min(sanity_patients, len(rec))))
    with eval_mode(model.net):
        for res, exps in iter_batches(model, rec, n_steps=n_steps, batch_size=batch_size, ablation=False,
                                      progress=progress):
            first, seen = seen, seen + len(exps)       # the loader keeps record order
            by_row = {first + k: e for k, e in enumerate(exps)}
            errors += sum(e.error is not None for e in exps)
            if res is None:
                continue
            res.batch = to_device(res.batch, model.device)
            _deletion(model, res, rng, deletion)
            for i, fm in _flat_maps(res).items():
                if i in sanity_rows:
                    trained_maps[i] = fm
            for i in res.rows:
                e = by_row[i]
                if e.convergence_delta is not None:
                    deltas.append(abs(e.convergence_delta))
                    total = sum(float(x.sum()) for x in e.image_maps) + sum(e.word_scores) + sum(e.feature_scores)
                    r = abs(e.convergence_delta) / max(abs(total - e.convergence_delta), 1e-6)  # |delta| / |gap|
                    rel.append(r)
                    (rel_img if e.image_maps else rel_noimg).append(r)
                if i in lesion:
                    v, box = lesion[i]
                    if v < len(e.image_maps):
                        point.append(inside(peak(e.image_maps[v]), box))
                        point_abs.append(inside(peak(e.image_maps[v], absolute=True), box))
                t = T[i]
                if not pos[i]:
                    continue
                if int(t["phrase"]) == 1 and e.words:
                    top3 = [e.words[k] for k in np.argsort(-np.asarray(e.word_scores), kind="stable")[:3]]
                    text_hits.append(any(_norm_word(w) in PHRASE_WORDS for w in top3))
                if int(t["lab_high"]) == 1 and e.features:
                    tab_hits.append(e.features[int(np.argmax(e.feature_scores))] == LAB)

    point_cam = []
    if "image" in cfg.modalities and lesion:
        sub = rec.subset(sorted(lesion))
        for e, i in zip((x for _, exps in iter_batches(model, sub, method="gradcam", n_steps=n_steps,
                                                          batch_size=batch_size, ablation=False) for x in exps),
                        sorted(lesion)):
            v, box = lesion[i]
            if e.error is None and v < len(e.image_maps):
                point_cam.append(inside(peak(e.image_maps[v]), box))

    # model randomisation on the first `sanity_patients` records (rank correlation) and on every
    # lesion patient (the pointing game of a model that learnt nothing: what brightness alone scores);
    # an unchanged-model reference with n_steps // 2 on the sanity records
    rnet = randomized_copy(model.net, seed).to(model.device)
    pairs: dict[str, dict[str, list]] = {"random": {}, "reference": {}}
    point_rand, point_rand_abs = [], []
    runs = (("random", with_net(model, rnet), n_steps, sorted(sanity_rows | set(lesion))),
            ("reference", model, max(2, n_steps // 2), sorted(sanity_rows)))
    for kind, mdl, steps, sub_rows in runs:
        sub = rec.subset(sub_rows)
        pos_in_sub = 0
        for res, exps in iter_batches(mdl, sub, n_steps=steps, batch_size=batch_size, ablation=False):
            for k, e in enumerate(exps):
                i = sub_rows[pos_in_sub + k]
                if kind == "random" and i in lesion and e.error is None and lesion[i][0] < len(e.image_maps):
                    amap, box = e.image_maps[lesion[i][0]], lesion[i][1]
                    point_rand.append(inside(peak(amap), box))
                    point_rand_abs.append(inside(peak(amap, absolute=True), box))
            pos_in_sub += len(exps)
            if res is None:
                continue
            for j, fm in _flat_maps(res).items():
                i = sub_rows[j]
                if i not in sanity_rows:
                    continue
                for m, a in fm.items():
                    if m in trained_maps.get(i, {}):
                        pairs[kind].setdefault(m, []).append((trained_maps[i][m], a))
    sanity = {m: _rank_corr(v) for m, v in pairs["random"].items()}

    del_out = {m: {"top": _mean(v["top"]), "random": _mean(v["random"]),
                   "top_gt_random": bool(_mean(v["top"]) > _mean(v["random"])), "n": len(v["top"])}
               for m, v in deletion.items()}
    out = {
        "pointing_game": _mean(point), "pointing_game_abs": _mean(point_abs),
        "pointing_game_gradcam": _mean(point_cam),
        "pointing_game_randomized_model": _mean(point_rand),
        "pointing_game_randomized_model_abs": _mean(point_rand_abs),
        "text_top3": _mean(text_hits), "tabular_top1": _mean(tab_hits),
        "deletion": del_out,
        "deletion_top_gt_random": bool(del_out) and bool(
            np.mean([d["top"] for d in del_out.values()]) > np.mean([d["random"] for d in del_out.values()])),
        "sanity_rank_corr": {m: v["value"] for m, v in sanity.items()},
        "sanity_rank_corr_detail": sanity,
        "sanity_reference_rank_corr": {m: _rank_corr(v)["value"] for m, v in pairs["reference"].items()},
        "sanity_differs": bool(sanity) and all(v["value"] is not None and v["value"] < TARGETS["sanity_rank_corr"]
                                               for v in sanity.values()),
        "convergence": {"median_abs_delta": float(np.median(deltas)) if deltas else None,
                        "median_rel_delta": float(np.median(rel)) if rel else None,
                        "share_rel_delta_below_0.05": float(np.mean(np.asarray(rel) < 0.05)) if rel else None,
                        "median_rel_delta_with_images": float(np.median(rel_img)) if rel_img else None,
                        "median_rel_delta_without_images": float(np.median(rel_noimg)) if rel_noimg else None},
        "n": {"patients": len(rec), "errors": int(errors), "pointing": len(point),
              "pointing_gradcam": len(point_cam), "pointing_randomized": len(point_rand),
              "text": len(text_hits), "tabular": len(tab_hits), "sanity": len(sanity_rows)},
        "n_steps": n_steps,
    }
    out["passed"] = {k: (out[k] is not None and out[k] >= TARGETS[k])
                     for k in ("pointing_game", "text_top3", "tabular_top1")}
    out["passed"]["deletion"] = out["deletion_top_gt_random"]
    out["passed"]["sanity"] = out["sanity_differs"]
    return out
