"""Subgroup tables for `mmdx compare --by sex,location`: does the result hold for women, for each body
site, for each scanner? TRIPOD+AI asks for performance by subgroup, and a model that is better
overall can be worse in a group that matters.

Each group is resampled on its own (whole patients where records are grouped) by the one bootstrap
(multimodal.evaluation.bootstrap), every model on the same resamples, so the difference between two
models within a group is paired as it is overall. What is measured per record is the caller's
`statistic` (multimodal.evaluation.comparison builds it: AUROC, and sensitivity and specificity at
each file's operating point), so AUROC has one definition.

A group with fewer than MIN_PER_CLASS records of an outcome is reported with a warning, not hidden:
below 10 positives one patient moves sensitivity by more than 10 points, and a resample often holds
two or three positives, so neither the value nor its interval can be judged.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from multimodal.errors import UserError
from multimodal.evaluation.bootstrap import bootstrap_stats, ci95, difference

MIN_PER_CLASS = 10
MAX_LEVELS = 30  # more values than this is a continuous column (age): bin it into a column of its own first
MISSING = "(missing)"
METRICS = ("auroc", "sensitivity", "specificity")
SHOWN = {"auroc": "AUROC", "sensitivity": "sensitivity", "specificity": "specificity"}


def subgroup_tables(columns: Mapping[str, Sequence[str]], outcome: np.ndarray, outcomes: Sequence[str],
                    statistic: Callable[[np.ndarray], dict], models: Sequence[str], pairs: Sequence[tuple],
                    n_boot: int, seed: int, groups: Optional[Sequence] = None) -> tuple[dict, list[str]]:
    """({column: [one entry per value]}, warnings). `columns`: each column's value per record, as
    text (MISSING where empty); `outcome`: each record's outcome (one of `outcomes`), for the counts
    and the small-group rule; `statistic(idx) -> {(model, metric): value}` on records idx; `pairs`:
    (a, b) model pairs whose AUROC difference a − b is reported per group."""
    tables, warnings = {}, []
    for column, values in columns.items():
        values = np.asarray(values, dtype=object)
        levels = sorted(set(values), key=lambda v: (v == MISSING, v))
        if len(levels) > MAX_LEVELS:
            raise UserError(f"--by {column}: {len(levels)} different values; subgroups need a column of at most "
                            f"{MAX_LEVELS} (bin a continuous column such as age into one first)")
        tables[column] = []
        for level in levels:
            rows = np.flatnonzero(values == level)
            entry = _one_group(rows, outcome, outcomes, statistic, models, pairs, n_boot, seed, groups)
            entry = {"value": level} | entry
            tables[column].append(entry)
            if entry["too_small"]:
                counts = ", ".join(f"{k} {v}" for k, v in entry["counts"].items())
                warnings.append(f"{column}={level}: {counts}: too few to judge (fewer than {MIN_PER_CLASS} of an "
                                f"outcome; one patient moves sensitivity or specificity by over 10 points)")
    return tables, warnings


def _one_group(rows: np.ndarray, outcome: np.ndarray, outcomes: Sequence[str], statistic, models, pairs,
               n_boot: int, seed: int, groups: Optional[Sequence]) -> dict:
    sub_groups = None if groups is None else [groups[i] for i in rows]
    point = statistic(rows)
    boots = bootstrap_stats(outcome[rows], lambda idx: statistic(rows[idx]), n_boot, seed, sub_groups)
    missing = np.full(n_boot, np.nan)
    counts = {o: int((outcome[rows] == o).sum()) for o in outcomes}
    per_model = {m: {k: {"value": float(point[(m, k)]), "ci95": ci95(boots.get((m, k), missing))}
                     for k in METRICS if (m, k) in point} for m in models}
    diffs = [{"a": a, "b": b} | difference(point[(a, "auroc")] - point[(b, "auroc")],
                                           boots.get((a, "auroc"), missing), boots.get((b, "auroc"), missing))
             for a, b in pairs]
    return {"n": int(len(rows)), "counts": counts, "too_small": min(counts.values()) < MIN_PER_CLASS,
            "models": per_model, "differences": diffs}


def format_subgroups(r: dict) -> list[str]:
    """The printed subgroup tables: one row per group and model, then the paired AUROC differences."""
    lines = []
    for column, entries in r.get("subgroups", {}).items():
        shown = [k for k in METRICS if any(k in m for e in entries for m in e["models"].values())]
        lines.append(f"subgroups by {column}: {', '.join(SHOWN[k] for k in shown)}"
                     + (" at each file's operating point" if len(shown) > 1 else "")
                     + f"; 95% CIs from {r['n_boot']} resamples within each group")
        w = max(len(column), *(len(str(e["value"])) for e in entries)) + 2
        mw = max(len(m) for m in r["auroc"]) + 2
        outcomes = list(entries[0]["counts"])
        head = f"  {column:{w}s}{'n':>6s}" + "".join(f"{o[:9]:>10s}" for o in outcomes)
        pad = " " * len(head)
        lines.append(f"{head}  {'model':{mw}s}" + "".join(f"{SHOWN[k]:24s}" for k in shown).rstrip())
        for e in entries:
            lead = f"  {e['value']:{w}s}{e['n']:6d}" + "".join(f"{v:10d}" for v in e["counts"].values())
            for i, (m, vals) in enumerate(e["models"].items()):
                cells = "".join(f"{_cell(vals.get(k)):24s}" for k in shown)
                lines.append(f"{lead if i == 0 else pad}  {m:{mw}s}{cells}".rstrip())
            lines += [f"{pad}  {d['a']} - {d['b']} AUROC {_cell(d, '+')}" for d in e["differences"]]
    return lines + [f"warning: {w}" for w in r.get("subgroup_warnings", [])]


def _cell(v: Optional[dict], sign: str = "") -> str:
    if v is None or not np.isfinite(v["value"]):
        return "n/a"
    lo, hi = v["ci95"]
    f = f"{sign}.3f"
    return f"{v['value']:{f}} [{lo:{f}}, {hi:{f}}]" if np.isfinite(lo) else f"{v['value']:{f}} [n/a]"
