"""The two perturbation checks of `explain.faithfulness`: deletion (the top units of a patient's input
set to the IG baseline, against as many random ones) and model randomisation (Adebayo et al.: the rank
correlation between the maps of the trained model and of a copy with re-initialised parameters).

Both read an `attribution._BatchResult` (the raw per-unit scores of one batch); the definitions of the
numbers they feed are in `explain.faithfulness`'s docstring.
"""
from __future__ import annotations

import copy
import math
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from .attribution import baseline_batch, class_probs

TOP_FRACTION = 0.10
N_RANDOM = 3


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


def deletion(model, res, rng: np.random.Generator, acc: dict) -> None:
    """Per modality, append each patient's drop of the target-class probability with its top
    TOP_FRACTION units (by signed score) set to the baseline to acc[m]["top"], and the mean drop over
    N_RANDOM draws of as many random units to acc[m]["random"]."""
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


def flat_maps(res) -> dict[int, dict[str, np.ndarray]]:
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


def rank_corr(pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    """Mean per-patient |rho|; with few units per patient (tabular) a per-patient rho has only a
    handful of possible values and a high chance level, so `value` is then the |rho| of all
    (patient, unit) scores pooled, which still asks "does the randomised model rank the same units
    of the same patients high?"."""
    per = [abs(_spearman(a, b)) for a, b in pairs]
    ns = [len(a) for a, _ in pairs]
    chance = finite_mean([_chance_abs_rho(n) for n in sorted(set(ns))]) if ns else None
    pooled = abs(_spearman(np.concatenate([a for a, _ in pairs]), np.concatenate([b for _, b in pairs]))) \
        if pairs else float("nan")
    few = bool(ns) and float(np.median(ns)) < 10
    return {"value": none_if_nan(pooled) if few else finite_mean(per), "per_patient": finite_mean(per),
            "pooled": none_if_nan(pooled), "chance_per_patient": chance, "units": "pooled" if few else "per_patient",
            "n": len(pairs)}


# -- averages that skip what is missing -------------------------------------------------------------
def none_if_nan(x) -> Optional[float]:
    """A float, or None for a missing or NaN value (JSON has no NaN)."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def finite_mean(xs) -> Optional[float]:
    """Mean of the values that are neither None nor NaN; None when there are none."""
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(xs)) if xs else None
