"""How a fusion strategy's networks (fusion.strategy unimodal / auto) are combined, fitted on hold-out logits.

Each network was early-stopped on the hold-out, never trained on it, so its hold-out logits are the
fairest evidence there is of how much it should count. Each network is calibrated on its own there
(temperature and bias), then the model's output is a weighted mean of their probabilities. Which
weights is itself chosen on the hold-out, by cross-validation inside it: equal weights, or weights
fitted by log-likelihood. On a hold-out of a hundred patients fitted weights chase its noise, so
they are kept only where they score better on hold-out patients they were not fitted on.
"""
from __future__ import annotations

import numpy as np
import torch

from multimodal.evaluation.calibration import _nll, fit_temperature

FOLDS = 5
MIN_ABSENT = 5  # hold-out patients without a network's inputs needed to calibrate what it says of them


def answers_absent(seen: np.ndarray) -> np.ndarray:
    """[M]: networks that met enough patients without their inputs (in training, as in the hold-out) to
    have learnt what that absence says; the others are left out of such patients' mixture."""
    return (~seen).sum(0) >= MIN_ABSENT


def calibrate_members(z: np.ndarray, seen: np.ndarray, y: np.ndarray, task: str,
                      bias: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """z [N, M, K] raw member logits → each member's temperature [M] and bias [M, K] (zeros without
    `bias`: train.calibrate_bias), fitted on the patients it speaks for, as a model of its own would be."""
    ts, bs = [], []
    for i in range(z.shape[1]):
        ok = seen[:, i] & np.isfinite(z[:, i]).all(1)
        if ok.sum() < 2:
            ts.append(1.0)
            bs.append(np.zeros(z.shape[2]))
            continue
        fitted = fit_temperature(z[ok, i], np.asarray(y)[ok], task, bias=bias)
        ts.append(fitted[0] if bias else fitted)
        bs.append(fitted[1] if bias else np.zeros(z.shape[2]))
    return np.array(ts), np.stack(bs)


def mixture_logits(z: np.ndarray, seen: np.ndarray, w: np.ndarray, task: str) -> np.ndarray:
    """Calibrated member logits [N, M, K] → the mixture's logits [N, K], as the network computes them."""
    from multimodal.model.network import mix

    return mix(torch.as_tensor(z).permute(1, 0, 2), torch.as_tensor(seen).T, torch.as_tensor(w, dtype=torch.float64),
               task).numpy()


def fit_member_weights(z: np.ndarray, seen: np.ndarray, y: np.ndarray, task: str, prior: float = 1.0) -> np.ndarray:
    """Weights [M] on the simplex maximising the likelihood of the mixture of calibrated members'
    probabilities. `prior`: the pull towards equal weights, in patients' worth of log-likelihood."""
    from multimodal.model.network import mix

    ok = np.isfinite(z).all((1, 2))
    Z = torch.as_tensor(z[ok], dtype=torch.float64).permute(1, 0, 2)
    S = torch.as_tensor(seen[ok]).T
    yt = torch.as_tensor(np.asarray(y)[ok], dtype=torch.float64)
    a = torch.zeros(Z.shape[0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([a], lr=0.1, max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = _nll(mix(Z, S, torch.softmax(a, 0), task), yt, task) + prior / max(len(yt), 1) * (a ** 2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return torch.softmax(a.detach(), 0).numpy()


def auroc(z: np.ndarray, y: np.ndarray, task: str) -> float:
    """Macro one-vs-rest AUROC of logits z [N, K] (binary: K = 1) over the columns where both outcomes
    occur, as the metrics report it (comparison.auroc per column, labels missing in a column skipped)."""
    from multimodal.evaluation.comparison import auroc as column_auroc
    from multimodal.inference.forward import probabilities

    ok = np.isfinite(z).all(1)
    P = probabilities(torch.as_tensor(z[ok]), task).double().numpy().reshape(int(ok.sum()), -1)
    y = np.asarray(y)[ok]
    Y = np.eye(P.shape[1])[y.astype(int)] if task == "multiclass" else np.asarray(y, float).reshape(len(y), -1)
    scores = [column_auroc(Y[v, j, None], P[v, j, None]) for j in range(P.shape[1])
              for v in [~np.isnan(Y[:, j])] if len(np.unique(Y[v, j])) == 2]
    return float(np.mean(scores)) if scores else float("nan")


def candidates(strategy: str, plan: list) -> dict[str, np.ndarray]:
    """The combinations a strategy weighs, as masks over its networks, simplest first: fixed equal
    weights over the masked networks, then "fitted" over all, then each modality's own networks
    alone. The per-modality networks with equal weights lead: it is the uni-modal ensemble that Du et
    al. (ICML 2023) found hard to beat where joint training under-learns the weaker modalities. The
    single modalities come last, as a guard: fusion is kept unless one modality alone is clearly
    better on the hold-out, so the model is never knowingly worse than its own best single modality."""
    every = np.ones(len(plan))
    alone = {f"{mods[0]} networks alone": np.array([m == mods for m, _ in plan], dtype=float)
             for mods, _ in plan if len(mods) == 1}
    if strategy != "auto":
        return {"equal weights": every, "fitted weights": every} | alone
    joint = np.array([len(m) > 1 for m, _ in plan], dtype=float)
    return {"equal weights, per-modality networks": 1 - joint, "equal weights, all networks": every,
            "joint network alone": joint, "fitted weights": every} | alone


def _out_of_fold(name: str, mask: np.ndarray, z: np.ndarray, seen: np.ndarray, y: np.ndarray, task: str,
                 folds: list) -> np.ndarray:
    """A candidate's hold-out logits from weights that never saw the patient (fixed weights see none)."""
    if not name.startswith("fitted"):
        return mixture_logits(z, seen, mask, task)
    oof = np.full((len(y), z.shape[2]), np.nan)
    for fit_rows, score_rows in folds:
        w = fit_member_weights(z[fit_rows], seen[fit_rows], y[fit_rows], task)
        oof[score_rows] = mixture_logits(z[score_rows], seen[score_rows], w, task)
    return oof


def choose_weights(strategy: str, plan: list, z: np.ndarray, seen: np.ndarray, y: np.ndarray, task: str,
                   seed: int = 0, n_boot: int = 200, groups=None) -> tuple[str, np.ndarray, dict[str, float]]:
    """Each candidate's AUROC on hold-out patients its weights were not fitted on (out-of-fold over
    FOLDS folds of the hold-out), then the simplest candidate that no later one beats by more than one
    standard error of their paired difference (patients resampled; Breiman's one-standard-error
    rule): on a hundred patients, differences smaller than that are the draw of the hold-out.
    `groups`: the patient of each row, so that a patient's rows are on one side of every inner fold.
    → (the choice, its weights fitted on the whole hold-out, every candidate's score)."""
    from multimodal.data.splits import folds as split
    from multimodal.evaluation.bootstrap import bootstrap_stats

    y = np.asarray(y)
    n, cands = len(y), candidates(strategy, plan)
    strat = task != "multilabel" and np.bincount(y.astype(int)).min() >= FOLDS
    units = n if groups is None else len(set(groups))
    folds = split(y if strat else np.zeros(n), groups, FOLDS, seed) if units >= 2 * FOLDS else []
    oof = {k: _out_of_fold(k, m, z, seen, y, task, folds) for k, m in cands.items() if folds or k[:6] != "fitted"}
    scores = {k: auroc(v, y, task) for k, v in oof.items()}
    boots = bootstrap_stats(y if task != "multilabel" else np.zeros(n), lambda idx: {
        k: auroc(v[idx], y[idx], task) for k, v in oof.items()}, n_boot, seed, groups) if task != "multilabel" else {}
    best = next(iter(oof))
    for k in list(oof)[1:]:
        d = np.asarray(boots.get(k, [np.nan])) - np.asarray(boots.get(best, [np.nan]))
        d = d[np.isfinite(d)]
        se = d.std() if len(d) >= 10 else np.inf
        if scores[k] - scores[best] > se:
            best = k
    w = fit_member_weights(z, seen, y, task) if best.startswith("fitted") else cands[best] / cands[best].sum()
    return best, w, scores


def strategy_report(strategy: str, plan: list, z: np.ndarray, y: np.ndarray, w: np.ndarray, chosen: str,
                    scores: dict, task: str) -> dict:
    """What metrics.json keeps of the choice: each network's weight and hold-out AUROC, and every
    candidate combination's out-of-fold hold-out AUROC."""
    members = [{"modalities": list(mods), "seed_offset": offset, "weight": round(float(wi), 4),
                "holdout_auroc": round(auroc(z[:, i], y, task), 4)}
               for i, ((mods, offset), wi) in enumerate(zip(plan, w))]
    return {"strategy": strategy, "chosen": chosen, "members": members,
            "holdout_auroc_out_of_fold": {k: round(v, 4) for k, v in scores.items()}}


def fit_mixture(strategy: str, plan: list, z: np.ndarray, seen: np.ndarray, y: np.ndarray, task: str,
                calibrate: bool = True, bias: bool = True, seed: int = 0, groups=None) -> tuple[dict, dict]:
    """Everything a strategy's mixture learns from the hold-out, from its networks' raw logits z
    [N, M, K] and whether each saw the patient [N, M]: → ({buffer name: value} for the Ensemble, the
    report metrics.json keeps)."""
    answers = answers_absent(seen)
    seen = seen | answers[None]
    M, K = z.shape[1], z.shape[2]
    t, b = calibrate_members(z, seen, y, task, bias) if calibrate else (np.ones(M), np.zeros((M, K)))
    z = z / t[None, :, None] + b[None]
    chosen, w, scores = choose_weights(strategy, plan, z, seen, y, task, seed, groups=groups)
    buffers = {"member_answers_absent": answers, "member_temperature": t, "member_bias": b, "member_weights": w}
    return buffers, strategy_report(strategy, plan, z, y, w, chosen, scores, task)


def against_members(y: np.ndarray, P: np.ndarray, z: np.ndarray, plan: list, task: str, n_boot: int = 1000,
                    seed: int = 0, groups=None) -> dict:
    """The fused output beside what one would get without fusing: each modality's own network(s) and
    the plain mean of their probabilities, as AUROCs with 95% CIs and paired-bootstrap differences
    (fused minus each) on the same resamples of the same patients. y: labels, P: fused probabilities
    [N] or [N, K], z: the members' calibrated logits [N, M, K]."""
    from multimodal.evaluation.comparison import auroc as fast_auroc
    from multimodal.evaluation.bootstrap import bootstrap_stats, ci95, difference
    from multimodal.inference.forward import probabilities
    from multimodal.evaluation.metrics import onehot, prob_matrix

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
