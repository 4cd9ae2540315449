"""The one bootstrap: resamples of rows or of whole patients, and their percentile intervals.

Every confidence interval mmdx reports (evaluate, operating points, compare, cv, the fusion
strategies' comparisons) resamples through `resampler`, so records of one patient go in or out
together everywhere: they are not independent evidence, and resampling them apart makes CIs too
narrow."""
from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import pandas as pd


def resampler(n: int, groups: Optional[Sequence] = None) -> Callable[[np.random.Generator], np.ndarray]:
    """Row indices of one resample. With `groups`, whole groups are drawn with replacement: records of
    one patient are not independent evidence, and resampling them apart makes CIs too narrow."""
    if groups is None:
        return lambda rng: rng.integers(0, n, n)
    codes = pd.factorize(pd.Series(list(groups)))[0]
    k, rows = int(codes.max()) + 1, np.arange(n)
    return lambda rng: np.repeat(rows, np.bincount(rng.integers(0, k, k), minlength=k)[codes])


def bootstrap_stats(y, statistic: Callable[[np.ndarray], dict], n_boot: int = 2000, seed: int = 0,
                    groups: Optional[Sequence] = None) -> dict:
    """{key: [n_boot] values} of `statistic(idx) -> {key: value}`, every key on the same resamples so
    that any two can be differenced. A resample that lacks a class of `y` is NaN for every key, as
    AUROC is undefined there (keys never computed are absent)."""
    y = np.asarray(y)
    draw, k = resampler(len(y), groups), len(np.unique(y))
    rng = np.random.default_rng(seed)
    out: dict = {}
    for b in range(n_boot):
        idx = draw(rng)
        if len(np.unique(y[idx])) < k:
            continue
        for key, v in statistic(idx).items():
            out.setdefault(key, np.full(n_boot, np.nan))[b] = v
    return out


def ci95(samples) -> list[float]:
    """Percentile interval; NaN when fewer than 10 resamples were defined (no honest interval then)."""
    s = np.asarray(samples, dtype=float)
    s = s[np.isfinite(s)]
    return [float(np.percentile(s, 2.5)), float(np.percentile(s, 97.5))] if len(s) >= 10 else [np.nan, np.nan]


def shifted_ci95(value: float, samples, low: float = 0.0) -> list[float]:
    """The percentile interval moved by the resamples' bias (their mean minus `value`), floored at
    `low`. For a statistic whose resamples sit above it by construction (the calibration error of a
    resample, with fewer points per bin and so more noise counted as miscalibration), the plain
    interval can leave out the value itself, as 0.047 [0.052, 0.120] did."""
    s = np.asarray(samples, dtype=float)
    s = s[np.isfinite(s)]
    lo, hi = ci95(s)
    if not np.isfinite(lo):
        return [lo, hi]
    bias = float(s.mean()) - value
    return [max(low, lo - bias), max(low, hi - bias)]


def difference(value: float, samples_a, samples_b) -> dict:
    """a − b. `p_le_0`: the share of resamples where a does not beat b, a one-sided bootstrap p-value."""
    d = np.asarray(samples_a, dtype=float) - np.asarray(samples_b, dtype=float)
    d = d[np.isfinite(d)]
    return {"value": float(value), "ci95": ci95(d), "p_le_0": float((d <= 0).mean()) if len(d) else np.nan}


def point_and_resamples(statistic: Callable[[np.ndarray], dict], n: int, n_boot: int, seed: int = 0,
                        groups: Optional[Sequence] = None) -> tuple[dict, dict]:
    """`statistic(idx) -> {key: value}` on all n rows and on each of `resamples`: → (point, {key: the
    resamples' finite values}). A resample where a key is undefined (NaN) is skipped for that key
    alone; ci95 of the values is its interval."""
    point = statistic(np.arange(n))
    boots: dict = {k: [] for k in point}
    for idx in resamples(n, n_boot, seed, groups):
        for k, v in statistic(idx).items():
            if np.isfinite(v):
                boots[k].append(v)
    return point, boots


def resamples(n: int, n_boot: int, seed: int = 0, groups: Optional[Sequence] = None) -> Iterator[np.ndarray]:
    """The row indices of `n_boot` seeded resamples (see resampler)."""
    draw, rng = resampler(n, groups), np.random.default_rng(seed)
    for _ in range(n_boot):
        yield draw(rng)
