"""The tests a reviewer asks for beside `mmdx compare`'s paired bootstrap: DeLong's for two AUROCs
on the same patients, McNemar's for two sets of decisions at their operating points, and
non-inferiority / superiority of one AUROC over another at a stated margin.

The bootstrap stays the engine's one way to a CI (multimodal.evaluation.bootstrap); these are here
because papers and reviewers use them (pROC's roc.test, FuseMedML) and because two answers that agree
are worth more than one: DeLong's variance of a difference is the bootstrap's within a few percent
where its assumptions hold, and the output shows both. DeLong's and McNemar's tests assume
independent records; with several records per patient read the bootstrap, which resamples patients.

numpy and scipy only (scipy imported where used): `from multimodal import compare` needs no torch.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

Z975 = 1.959963984540054  # the normal quantile of a two-sided 95% interval (one-sided 2.5%)


# -- DeLong ------------------------------------------------------------------------------------------------------
def delong(y, S) -> tuple[np.ndarray, np.ndarray]:
    """AUROCs of the columns of S [n, k] for the 0/1 outcome y, and DeLong's covariance of them [k, k]
    (DeLong, DeLong & Clarke-Pearson 1988), by Sun & Xu's midrank algorithm (2014): three rankings
    per column, O(n log n), instead of the n_pos × n_neg comparisons of the original. Ties count half.

    The placement values V10 (per positive: the share of negatives it outscores) and V01 (per
    negative: the share of positives that outscore it) are the AUROC's structural components; their
    sample covariances over positives and over negatives, divided by the counts, give the covariance."""
    from scipy.stats import rankdata

    y = np.asarray(y).astype(bool)
    S = np.asarray(S, dtype=float).reshape(len(y), -1)
    pos, neg = S[y], S[~y]
    m, n = len(pos), len(neg)
    if m < 2 or n < 2:
        raise ValueError(f"DeLong's variance needs at least 2 positives and 2 negatives, got {m} and {n}")
    whole = rankdata(np.concatenate([pos, neg]), axis=0)  # midranks: ties get the mean of their ranks
    v10 = (whole[:m] - rankdata(pos, axis=0)) / n
    v01 = 1 - (whole[m:] - rankdata(neg, axis=0)) / m
    aucs = v10.mean(0)
    cov = np.atleast_2d(np.cov(v10, rowvar=False)) / m + np.atleast_2d(np.cov(v01, rowvar=False)) / n
    return aucs, cov


def delong_difference(y, a, b, bootstrap_diffs=None) -> dict:
    """DeLong's test of AUROC(a) − AUROC(b) on the same records: the difference, its standard error and
    95% CI (normal approximation), z, the two-sided p-value (pROC's roc.test) and the one-sided one for
    "a beats b". `bootstrap_diffs`: the paired bootstrap's differences, whose SE is shown beside it."""
    from scipy.stats import norm

    aucs, cov = delong(y, np.stack([np.asarray(a, float), np.asarray(b, float)], 1))
    d = float(aucs[0] - aucs[1])
    se = float(np.sqrt(max(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1], 0.0)))
    z = d / se if se > 0 else (0.0 if d == 0 else np.copysign(np.inf, d))
    out = {"value": d, "se": se, "ci95": [d - Z975 * se, d + Z975 * se], "z": float(z),
           "p_two_sided": float(2 * norm.sf(abs(z))), "p_a_not_better": float(norm.sf(z))}
    if bootstrap_diffs is not None:
        s = np.asarray(bootstrap_diffs, dtype=float)
        s = s[np.isfinite(s)]
        out["bootstrap_se"] = float(s.std(ddof=1)) if len(s) > 1 else float("nan")
    return out


# -- margins ------------------------------------------------------------------------------------------------------
def margin_tests(a: str, b: str, bootstrap: dict, diffs, margin: float, delong_result: Optional[dict] = None) -> dict:
    """Non-inferiority (AUROC(a) − AUROC(b) > −margin) and superiority (> +margin) of a over b, each
    one-sided at 2.5%: shown when the lower end of the two-sided 95% CI of the difference lies above
    the bound, the convention of CONSORT's non-inferiority extension. The bootstrap's CI decides
    (`bootstrap`: the comparison's value and ci95); DeLong's, when given, is reported beside it.
    p: the share of resamples at or below the bound (bootstrap) and DeLong's one-sided p."""
    from scipy.stats import norm

    d = np.asarray(diffs, dtype=float)
    d = d[np.isfinite(d)]
    out = {"margin": float(margin)}
    for kind, bound in (("non_inferiority", -margin), ("superiority", margin)):
        low = bootstrap["ci95"][0]
        r = {"hypothesis": f"AUROC({a}) - AUROC({b}) > {bound:+g}, one-sided at 2.5%",
             "bound": float(bound), "lower_95": low, "lower_95_from": "paired bootstrap (2.5th percentile)",
             "shown": bool(np.isfinite(low) and low > bound),
             "p_bootstrap": float((d <= bound).mean()) if len(d) else float("nan")}
        if delong_result is not None:
            se = delong_result["se"]
            r["delong_lower_95"] = delong_result["ci95"][0]
            r["delong_shown"] = bool(delong_result["ci95"][0] > bound)
            r["p_delong"] = float(norm.sf((delong_result["value"] - bound) / se)) if se > 0 else float(
                delong_result["value"] <= bound)
        out[kind] = r
    return out


# -- McNemar -----------------------------------------------------------------------------------------------------
def mcnemar(correct_a, correct_b) -> dict:
    """McNemar's exact test of two sets of decisions on the same records: only the discordant records
    count (a right where b is wrong, and the other way), which under "equally accurate" split 50:50;
    the exact two-sided binomial p-value is statsmodels' mcnemar(exact=True), here from scipy, which
    mmdx already needs."""
    from scipy.stats import binomtest

    ca, cb = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    only_a, only_b = int((ca & ~cb).sum()), int((~ca & cb).sum())
    p = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    return {"a_right_b_wrong": only_a, "b_right_a_wrong": only_b, "both_right": int((ca & cb).sum()),
            "both_wrong": int((~ca & ~cb).sum()), "accuracy_a": float(ca.mean()), "accuracy_b": float(cb.mean()),
            "p_exact": float(p)}


# -- the printed part ---------------------------------------------------------------------------------------------
def format_tests(r: dict) -> list[str]:
    """The lines `mmdx compare` prints for --test and --margin, after the bootstrap's differences."""
    lines: list[str] = []
    comps = r["comparisons"]
    if "delong" in r.get("tests", []):
        lines.append("DeLong's test (records taken as independent): difference [95% CI], its SE beside the paired "
                     "bootstrap's, z and two-sided p")
        if r.get("delong_note"):
            lines.append(f"  note: {r['delong_note']}")
        for c in comps:
            t = c["delong"]
            lines.append(f"  {c['a']} - {c['b']}  {t['value']:+.3f} [{t['ci95'][0]:+.3f}, {t['ci95'][1]:+.3f}]  "
                         f"SE {t['se']:.4f} (bootstrap {t['bootstrap_se']:.4f})  z {t['z']:.3f}  "
                         f"p {t['p_two_sided']:.4g}")
    if r.get("margin") is not None:
        lines += _format_margins(comps, r["margin"])
    if "mcnemar" in r.get("tests", []):
        ops = "; ".join(f"{n}: {_cut_text(o)} ({o['from']})" for n, o in r["operating_points"].items())
        lines.append(f"McNemar's exact test of the decisions at each file's operating point ({ops})")
        for c in comps:
            t = c["mcnemar"]
            lines.append(f"  {c['a']} vs {c['b']}: accuracy {t['accuracy_a']:.3f} vs {t['accuracy_b']:.3f}; "
                         f"{c['a']} right where {c['b']} is wrong on {t['a_right_b_wrong']}, the other way on "
                         f"{t['b_right_a_wrong']}; exact two-sided p {t['p_exact']:.4g}")
    return lines


def _format_margins(comps: list, margin: float) -> list[str]:
    lines = []
    for kind, word, sign in (("non_inferiority", "non-inferior", "-"), ("superiority", "superior", "+")):
        lines.append(f"{kind.replace('_', '-')} at margin {margin:g} (H1: AUROC(reference) - AUROC(other) > "
                     f"{sign}{margin:g}, one-sided at 2.5%: shown where the 95% CI's lower end is above it)")
        for c in comps:
            t = c["margin"][kind]
            verdict = f"{c['a']} is {word} to {c['b']}" if t["shown"] else f"{kind.replace('_', '-')} not shown"
            line = (f"  {c['a']} - {c['b']}: lower 95% bound {_num(t['lower_95'])} (bootstrap) -> {verdict}; "
                    f"share of resamples <= {t['bound']:+g}: {t['p_bootstrap']:.4f}")
            if "delong_lower_95" in t:
                line += f"; DeLong: lower bound {t['delong_lower_95']:+.3f}, p {t['p_delong']:.4g}"
            lines.append(line)
    return lines


def _num(v: float) -> str:
    return f"{v:+.3f}" if np.isfinite(v) else "n/a"


def _cut_text(o: dict) -> str:
    t = o["threshold"]
    if t is None:
        return "most probable class"
    return f"{t:.3g}" if not isinstance(t, list) else "per fold " + ", ".join(f"{x:.3g}" for x in t)
