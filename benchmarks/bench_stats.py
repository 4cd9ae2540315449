"""Statistics for the real-data benchmark: seed-averaged metrics with patient-bootstrap CIs, computed on
shared resamples so that differences between models are paired.

Every model variant has one probability vector per seed over the same patients. A bootstrap resample
draws patients with replacement; each variant's metric is computed per seed on that resample and
averaged over seeds. The 2.5/97.5 percentiles give a CI that reflects patient sampling (seed noise is
averaged out and reported separately as the across-seed SD); the same resamples give paired CIs of
differences such as fusion minus the best single modality. The resampling, intervals and paired
differences are `mmdx compare`'s (multimodal.evaluation.comparison), so the benchmark and the command agree.
"""
from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from multimodal.evaluation.calibration import expected_calibration_error
from multimodal.evaluation.bootstrap import bootstrap_stats, ci95, difference

METRICS = ("auroc", "auprc", "ece")


def binary_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    if len(np.unique(y)) < 2:
        return {m: np.nan for m in METRICS}
    return {"auroc": roc_auc_score(y, p), "auprc": average_precision_score(y, p),
            "ece": expected_calibration_error(y, np.stack([1 - p, p], 1), "binary")}


def seed_mean(y: np.ndarray, seeds: list[np.ndarray]) -> dict[str, float]:
    per = [binary_metrics(y, p) for p in seeds]
    return {m: float(np.mean([d[m] for d in per])) for m in METRICS}


def bootstrap(y: np.ndarray, variants: dict[str, list[np.ndarray]], n_boot: int = 1000,
              seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """{variant: {metric: [n_boot] seed-mean values}}; resamples with one class only are NaN."""
    def stat(idx):
        return {(v, m): val for v, seeds in variants.items()
                for m, val in seed_mean(y[idx], [p[idx] for p in seeds]).items()}

    flat = bootstrap_stats(y, stat, n_boot, seed)
    return {v: {m: flat.get((v, m), np.full(n_boot, np.nan)) for m in METRICS} for v in variants}


ci = ci95


def summarise(y: np.ndarray, variants: dict[str, list[np.ndarray]], boots: dict) -> dict[str, dict]:
    """Point value (seed mean on all patients), patient-bootstrap CI and across-seed SD per metric."""
    out = {}
    for v, seeds in variants.items():
        per = [binary_metrics(y, p) for p in seeds]
        out[v] = {m: {"value": float(np.mean([d[m] for d in per])), "ci95": ci(boots[v][m]),
                      "seed_sd": float(np.std([d[m] for d in per], ddof=1)) if len(per) > 1 else 0.0,
                      "per_seed": [float(d[m]) for d in per]} for m in METRICS}
    return out


def paired_difference(y: np.ndarray, variants: dict, boots: dict, a: str, b: str, metric: str = "auroc") -> dict:
    """a minus b on the same resamples; `p_le_0` is the bootstrap fraction where a does not beat b."""
    point = seed_mean(y, variants[a])[metric] - seed_mean(y, variants[b])[metric]
    return {"a": a, "b": b, "metric": metric} | difference(point, boots[a][metric], boots[b][metric])


def ece_floor(p: np.ndarray, n_sim: int = 200, seed: int = 0) -> float:
    """Mean ECE of a perfectly calibrated model with these probabilities on this many patients:
    labels drawn as Bernoulli(p). An observed ECE near this value is as good as n allows."""
    rng = np.random.default_rng(seed)
    P = np.stack([1 - p, p], 1)
    return float(np.mean([expected_calibration_error((rng.random(len(p)) < p).astype(int), P, "binary")
                          for _ in range(n_sim)]))
