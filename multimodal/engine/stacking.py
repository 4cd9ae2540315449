"""Weights for a fusion strategy's networks (fusion.strategy unimodal / auto), fitted on hold-out logits.

Each network was early-stopped on the hold-out, never trained on it, so its hold-out logits are the
fairest evidence of how much it should count. The weights are non-negative and sum to 1 (a softmax
of free parameters), fitted by the negative log-likelihood of the combination under a free scale
and bias (the same loss calibration uses afterwards), with a weak pull towards equal weights: on a
hold-out of a hundred patients, four free weights would otherwise chase its noise.
"""
from __future__ import annotations

import numpy as np
import torch

from multimodal.engine.calibration import _nll


def _combined(z: torch.Tensor, seen: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    from multimodal.model.network import combine

    return combine(z.permute(1, 0, 2), seen.T, w)


def fit_member_weights(z: np.ndarray, seen: np.ndarray, y: np.ndarray, task: str, prior: float = 1.0) -> np.ndarray:
    """z [N, M, K] raw member logits, seen [N, M] whether member m saw patient n → weights [M].
    `prior`: strength of the pull towards equal weights, in patients' worth of log-likelihood."""
    ok = np.isfinite(z).all((1, 2))
    Z = torch.as_tensor(z[ok], dtype=torch.float64)
    S = torch.as_tensor(seen[ok])
    yt = torch.as_tensor(y[ok], dtype=torch.float64)
    M, K = Z.shape[1], Z.shape[2]
    a = torch.zeros(M, dtype=torch.float64, requires_grad=True)
    log_s = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(K, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([a, log_s, b], lr=0.1, max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = _nll(_combined(Z, S, torch.softmax(a, 0)) * log_s.exp() + b, yt, task)
        loss = loss + prior / max(len(Z), 1) * (a ** 2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return torch.softmax(a.detach(), 0).numpy()


def auroc(z: np.ndarray, y: np.ndarray, task: str) -> float:
    """Macro one-vs-rest AUROC of logits z [N, K] (binary: K = 1), as the metrics report it."""
    from sklearn.metrics import roc_auc_score

    from multimodal.engine.inference import probabilities

    ok = np.isfinite(z).all(1)
    P = probabilities(torch.as_tensor(z[ok]), task).double().numpy()
    y = np.asarray(y)[ok]
    if task == "binary":
        return float(roc_auc_score(y, P)) if len(np.unique(y)) == 2 else float("nan")
    Y = np.eye(P.shape[1])[y.astype(int)] if task == "multiclass" else y
    scores = []
    for j in range(P.shape[1]):
        valid = ~np.isnan(Y[:, j])
        if len(np.unique(Y[valid, j])) == 2:
            scores.append(roc_auc_score(Y[valid, j], P[valid, j]))
    return float(np.mean(scores)) if scores else float("nan")


def strategy_report(strategy: str, plan: list, z: np.ndarray, seen: np.ndarray, y: np.ndarray, w: np.ndarray,
                    task: str) -> dict:
    """What metrics.json keeps of the choice: each network's weight and hold-out AUROC, and the
    hold-out AUROC of each candidate the strategy weighed (with auto: the joint networks alone, the
    per-modality ones alone with their own fitted weights, and the combination of all)."""
    def score(weights: np.ndarray) -> float:
        zz = _combined(torch.as_tensor(z), torch.as_tensor(seen), torch.as_tensor(weights)).numpy()
        return round(auroc(zz, y, task), 4)

    members = [{"modalities": list(mods), "seed_offset": offset, "weight": round(float(wi), 4),
                "holdout_auroc": round(auroc(z[:, i], y, task), 4)}
               for i, ((mods, offset), wi) in enumerate(zip(plan, w))]
    candidates = {"equal weights": score(np.ones(len(w))), "fitted weights": score(w)}
    if strategy == "auto":
        joint = np.array([len(m) > 1 for m, _ in plan], dtype=float)
        alone = 1.0 - joint
        candidates["joint"] = score(joint)
        sub = np.flatnonzero(alone)
        if len(sub) > 1:
            fitted = np.zeros(len(w))
            fitted[sub] = fit_member_weights(z[:, sub], seen[:, sub], y, task)
            candidates["unimodal"] = score(fitted)
    return {"strategy": strategy, "members": members, "holdout_auroc": candidates}


def against_members(y: np.ndarray, P: np.ndarray, z: np.ndarray, plan: list, task: str, n_boot: int = 1000,
                    seed: int = 0, groups=None) -> dict:
    """The fused output beside what one would get without fusing: each modality's own network(s) and
    the plain mean of their probabilities, as AUROCs with 95% CIs and paired-bootstrap differences
    (fused minus each) on the same resamples of the same patients. y: labels, P: fused probabilities
    [N] or [N, K], z: the members' raw logits [N, M, K]."""
    from multimodal.engine.comparison import auroc as fast_auroc
    from multimodal.engine.comparison import bootstrap_stats, ci95, difference
    from multimodal.engine.inference import probabilities
    from multimodal.engine.metrics import onehot, prob_matrix

    if task == "multilabel":
        return {}
    ok = np.isfinite(np.asarray(P, dtype=float).reshape(len(P), -1)).all(1) & np.isfinite(z).all((1, 2))
    P, z, y = prob_matrix(P, task)[ok], z[ok], np.asarray(y)[ok]
    Y = onehot(y, task, P.shape[1])
    cols = [1] if task == "binary" else list(range(P.shape[1]))
    member_p = [prob_matrix(probabilities(torch.as_tensor(z[:, i]), task).double().numpy(), task)
                for i in range(z.shape[1])]
    alone = {}
    for (mods, _), p in zip(plan, member_p):
        if len(mods) == 1:
            alone.setdefault(mods[0], []).append(p)
    if not alone:
        return {}
    S = {"fused": P[:, cols]} | {f"{m} only": np.mean(ps, 0)[:, cols] for m, ps in alone.items()}
    S["mean of the single-modality networks"] = np.mean([np.mean(ps, 0) for ps in alone.values()], 0)[:, cols]

    def stat(idx):
        return {name: fast_auroc(Y[idx][:, cols], s[idx]) for name, s in S.items()}

    point = stat(np.arange(len(y)))
    boots = bootstrap_stats(y, stat, n_boot, seed, None if groups is None else np.asarray(groups)[ok])
    best = max((n for n in S if n.endswith(" only")), key=point.get)
    diffs = {f"fused minus best single modality ({best})": best,
             "fused minus mean of the single-modality networks": "mean of the single-modality networks"}
    return {"n": int(len(y)), "auroc": {n: {"value": point[n], "ci95": ci95(boots[n])} for n in S},
            "differences": {label: difference(point["fused"] - point[other], boots["fused"], boots[other])
                            for label, other in diffs.items()}}


def format_against(d: dict) -> str:
    """What `mmdx evaluate` prints of against_members."""
    if not d:
        return ""
    lines = [f"fused beside its own single-modality networks (n = {d['n']}, paired bootstrap):"]
    for name, a in d["auroc"].items():
        lines.append(f"  {name:50s} AUROC {a['value']:.3f} [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}]")
    for label, a in d["differences"].items():
        lines.append(f"  {label:50s} {a['value']:+.3f} [{a['ci95'][0]:+.3f}, {a['ci95'][1]:+.3f}]")
    return "\n".join(lines)
