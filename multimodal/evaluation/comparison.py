"""`mmdx compare`: is one model really better than another on these patients?

Two AUROCs with overlapping CIs can still differ reliably, and two that look apart can be noise:
what decides is the difference on the *same* patients. So every prediction file is joined with the
labels on id, only patients that every file scored are kept, and one set of bootstrap resamples (of
patients, or of whole groups when a patient has several records) serves every model, which makes
the differences paired. benchmarks/bench_stats.py uses the same resampling code, and
`mmdx evaluate --predictions` (multimodal.evaluation.scorefile) the same reading and joining
(multimodal.evaluation.joining). DeLong's and McNemar's tests and the margins are in
multimodal.evaluation.significance, the subgroup tables in multimodal.evaluation.subgroups.

Only numpy, pandas and scipy: `from multimodal import compare` must not need a model or torch here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd

from multimodal.errors import UserError
from multimodal.evaluation.bootstrap import bootstrap_stats, ci95, difference
from multimodal.evaluation.joining import (PathOrFrame, as_text, class_truth, groups_of, id_order, need_columns,
                                           operating_point, positive_class, read_labels, read_predictions)
from multimodal.evaluation.significance import delong_difference, format_tests, margin_tests, mcnemar
from multimodal.evaluation.subgroups import MISSING, format_subgroups, subgroup_tables

MIN_PAIRED = 10
TESTS = ("delong", "mcnemar")  # beside the paired bootstrap, which always runs


# -- paired bootstrap -------------------------------------------------------------------------------------------
def auroc(Y: np.ndarray, S: np.ndarray) -> float:
    """Mean one-vs-rest AUROC over the columns of Y [n, J] (0/1) and scores S [n, J]; ties count half.
    The Mann-Whitney form gives sklearn's roc_auc_score exactly, at a fraction of its cost, which
    matters across thousands of resamples."""
    out = []
    for y, s in zip(np.asarray(Y, dtype=bool).T, np.asarray(S, dtype=float).T):
        _, inv, counts = np.unique(s, return_inverse=True, return_counts=True)
        rank = (np.cumsum(counts) - (counts - 1) / 2)[inv]
        n1 = int(y.sum())
        n0 = len(y) - n1
        out.append((rank[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))
    return float(np.mean(out))


def _named(predictions, names: Optional[Sequence[str]]) -> list[tuple[str, PathOrFrame]]:
    if isinstance(predictions, Mapping):
        items = list(predictions.items())
    else:
        items = list(predictions)
        stems = [Path(p).stem if not isinstance(p, pd.DataFrame) else f"model{i + 1}" for i, p in enumerate(items)]
        if len(set(stems)) < len(stems):
            stems = [str(p) if not isinstance(p, pd.DataFrame) else s for p, s in zip(items, stems)]
        items = list(zip(stems, items))
    if names is not None:
        if len(names) != len(items):
            raise UserError(f"{len(names)} names for {len(items)} prediction files")
        items = [(str(n), obj) for n, (_, obj) in zip(names, items)]
    if len(items) < 2:
        raise UserError(f"compare needs at least 2 prediction files, got {len(items)}")
    if len({n for n, _ in items}) < len(items):
        raise UserError("prediction names must differ (use --names)")
    return items


def _drops(**counts: int) -> dict[str, int]:
    return {k.replace("_", " "): int(v) for k, v in counts.items() if v}


# -- the comparison ---------------------------------------------------------------------------------------------
SIGN = ("a - b: how much a beats b (positive: a has the higher AUROC); a is the reference (the first file) in "
        "every pair with it, else the earlier file. p_le_0: the share of resamples where a is not better than b "
        "(a one-sided bootstrap p-value for 'a beats b')")


def compare(predictions: Union[Mapping[str, PathOrFrame], Sequence[PathOrFrame]], labels: PathOrFrame,
            label_column: str = "label", id_column: str = "patient_id", n_boot: int = 1000, seed: int = 0,
            group_column: Optional[str] = None, positive: Optional[str] = None,
            names: Optional[Sequence[str]] = None, all_pairs: bool = False,
            class_names: Optional[Mapping[str, str]] = None, tests: Sequence[str] = (),
            margin: Optional[float] = None, by: Sequence[str] = ()) -> dict:
    """AUROC with a 95% bootstrap CI per prediction file, and paired differences of the first (the
    reference) minus each other file, or of every earlier file minus every later one (`all_pairs`):
    positive means the first named is better (SIGN, also in the result as "difference"). Binary:
    AUROC of prob_<positive> (default: the last class); more classes: macro one-vs-rest AUROC, or one
    class against the rest with `positive`.

    Only patients that are labelled and scored (status ok) by every file count, so every number is
    on the same patients; `files[name]["dropped"]` says how many rows were left out and why.
    `class_names`: the config's task.names (label value → the class name the files' prob_ columns
    carry), when the labels file holds the raw values. The resamples are those of `evaluate` with
    the same n_boot, seed and groups (rows in id order, see id_order), so a file's AUROC CI is the same
    in both.

    Beside the bootstrap (multimodal.evaluation.significance): `tests` "delong" (DeLong's test of each
    difference, binary or one class) and "mcnemar" (McNemar's exact test of the decisions at each
    file's operating point, see operating_point); `margin`: non-inferiority and superiority of a over b
    at that AUROC margin; `by`: subgroup tables by these columns of the labels file
    (multimodal.evaluation.subgroups)."""
    items = _named(predictions, names)
    tests, by = _checked_options(tests, margin, n_boot), _as_list(by)
    lab = read_labels(labels, id_column, label_column, group_column)
    need_columns(lab["frame"], lab["source"], *by)
    preds = {name: read_predictions(obj, name, id_column) for name, obj in items}
    order = [n for n, _ in items]
    classes = _same_classes(preds, order[0])
    paired = lab["labelled"]
    for p in preds.values():
        paired = paired.intersection(p["ok"])
    paired = paired[id_order(paired)]  # row order of any file must not change the resamples
    if len(paired) < MIN_PAIRED:
        raise UserError(f"only {len(paired)} patients are labelled and scored (status ok) by every file; "
                        f"at least {MIN_PAIRED} are needed")
    truth = class_truth(lab, paired, classes, class_names)
    positive = positive_class(positive, classes)
    targets = [positive] if positive is not None else classes
    Y = np.stack([(truth == c).to_numpy() for c in targets], 1)
    if (Y.sum(0) == 0).any() or (Y.sum(0) == len(Y)).any():
        raise UserError(f"the {len(paired)} paired patients do not all have both outcomes for "
                        f"{', '.join(targets)}; AUROC is undefined")
    S = {name: p["probs"].loc[paired, targets].to_numpy() for name, p in preds.items()}
    codes = (Y * np.arange(1, Y.shape[1] + 1)).sum(1)  # class per patient (0: none of the targets)
    groups = groups_of(lab, paired, group_column)

    def stat(idx):
        return {name: auroc(Y[idx], s[idx]) for name, s in S.items()}

    point, boots = stat(np.arange(len(paired))), bootstrap_stats(codes, stat, n_boot, seed, groups)
    missing = np.full(n_boot, np.nan)
    pairs = [(order[i], order[j]) for i in range(len(order)) for j in range(i + 1, len(order)) if all_pairs or i == 0]
    result = {
        "n": len(paired), "n_groups": len(set(groups)) if groups else len(paired), "group_column": group_column,
        "metric": "auroc" if len(targets) == 1 else "macro one-vs-rest auroc", "positive": positive,
        "classes": classes, "reference": order[0], "n_boot": n_boot, "seed": seed,
        **_accounting(lab, preds, paired),
        "auroc": {n: {"value": point[n], "ci95": ci95(boots.get(n, missing))} for n in order},
        "difference": SIGN,
        "comparisons": [{"a": a, "b": b} | difference(point[a] - point[b], boots.get(a, missing), boots.get(b, missing))
                        for a, b in pairs],
    }
    if not (tests or margin is not None or by):
        return result
    paired_set = _Paired(preds, paired, classes, positive, Y, S, truth, groups)
    _add_tests(result, paired_set, boots, tests, margin)
    if by:
        _add_subgroups(result, paired_set, lab, by, pairs, seed)
    return result


def _same_classes(preds: dict, ref: str) -> list[str]:
    classes = list(preds[ref]["probs"].columns)
    for p in preds.values():
        if sorted(p["probs"].columns) != sorted(classes):
            raise UserError(f"{p['source']} has classes {list(p['probs'].columns)} but "
                            f"{preds[ref]['source']} has {classes}; the files must come from the same task")
    return classes


def _accounting(lab: dict, preds: dict, paired: pd.Index) -> dict:
    """How many rows of each file were paired, and why the others were left out."""
    files = {}
    for name, p in preds.items():
        ids = p["probs"].index
        bad = ~ids.isin(p["ok"])
        unl = ~bad & ~ids.isin(lab["labelled"])
        files[name] = {"source": p["source"], "rows": p["n_rows"], "paired": len(paired), "dropped": _drops(
            status_error=bad.sum(), without_label=unl.sum(), not_scored_by_every_file=(~bad & ~unl).sum()
            - len(paired))}
    lab_unl = ~lab["frame"].index.isin(lab["labelled"])
    return {"labels": {"source": lab["source"], "rows": len(lab["frame"]), "paired": len(paired), "dropped": _drops(
        without_label=lab_unl.sum(), not_scored_by_every_file=(~lab_unl).sum() - len(paired))}, "files": files}


# -- beside the bootstrap: DeLong, McNemar, margins, subgroups --------------------------------------------------
@dataclass
class _Paired:
    """What the tests beside the bootstrap read: the paired records' files, outcome and scores."""
    preds: dict
    ids: pd.Index
    classes: list
    positive: Optional[str]
    Y: np.ndarray
    S: dict
    truth: pd.Series
    groups: Optional[list]


def _as_list(values: Union[str, Sequence[str]]) -> list[str]:
    """`"delong,mcnemar"` from Python means what `--test delong,mcnemar` does."""
    return [v.strip() for v in values.split(",") if v.strip()] if isinstance(values, str) else list(values)


def _checked_options(tests: Union[str, Sequence[str]], margin: Optional[float], n_boot: int) -> list[str]:
    if n_boot < 1:
        raise UserError(f"n_boot must be at least 1, got {n_boot}")
    tests = _as_list(tests)
    for t in tests:
        if t not in TESTS:
            raise UserError(f"--test {t}: choose from {', '.join(TESTS)} (the paired bootstrap always runs)")
    if margin is not None and not 0 <= margin < 1:
        raise UserError(f"--margin {margin}: an AUROC margin is between 0 and 1, e.g. 0.02")
    return list(dict.fromkeys(tests))


def _add_tests(r: dict, d: _Paired, boots: dict, tests: list, margin: Optional[float]) -> None:
    """DeLong, the margins and McNemar for each comparison, into the result (see compare)."""
    if "delong" in tests and (d.positive is None or min(d.Y.sum(), len(d.Y) - d.Y.sum()) < 2):
        raise UserError("--test delong compares AUROCs of one class with at least 2 records of each outcome; "
                        "give --positive for a task of more classes")
    if "delong" in tests and d.groups and len(set(d.groups)) < len(d.groups):
        r["delong_note"] = (f"{len(d.groups)} records of {len(set(d.groups))} patients: DeLong takes records as "
                            f"independent, which makes its SE too small; read the bootstrap's")
    ops = _decisions(d) if "mcnemar" in tests else {}
    missing = np.full(r["n_boot"], np.nan)
    for c in r["comparisons"]:
        a, b = c["a"], c["b"]
        diffs = boots.get(a, missing) - boots.get(b, missing)
        if "delong" in tests:
            c["delong"] = delong_difference(d.Y[:, 0], d.S[a][:, 0], d.S[b][:, 0], diffs)
        if margin is not None:
            c["margin"] = margin_tests(a, b, c, diffs, margin, c.get("delong"))
        if ops:
            c["mcnemar"] = mcnemar(ops[a]["correct"], ops[b]["correct"])
    r["tests"], r["margin"] = ["bootstrap", *tests], margin
    if ops:
        r["operating_points"] = {n: o["point"] for n, o in ops.items()}


def _decisions(d: _Paired) -> dict:
    """Each file's decisions, right or wrong per record, and its cut: one class at the file's operating
    point (operating_point, as `evaluate --predictions` reads it), more classes the most probable one."""
    out = {}
    for name, p in d.preds.items():
        if d.positive is None:
            best = np.array(d.classes)[p["probs"].loc[d.ids, d.classes].to_numpy().argmax(1)]
            out[name] = {"correct": best == d.truth.to_numpy(), "point": {"threshold": None, "from": "argmax"}}
            continue
        s = d.S[name][:, 0]
        cut, source = operating_point(p, d.ids, s, d.positive, len(d.classes) == 2)
        cut = np.broadcast_to(np.ravel(np.asarray(cut, dtype=float)), s.shape)
        shown = sorted(set(cut.tolist()))
        out[name] = {"cut": cut, "correct": (s >= cut) == d.Y[:, 0].astype(bool),
                     "point": {"threshold": shown[0] if len(shown) == 1 else shown, "from": source}}
    return out


def _add_subgroups(r: dict, d: _Paired, lab: dict, by: Sequence[str], pairs: list, seed: int) -> None:
    """Tables by the labels file's columns `by`: each file's AUROC and, for one class, sensitivity and
    specificity at its operating point, on the same resamples within each group (subgroup_tables)."""
    from multimodal.evaluation.operating import confusion_metrics

    ops = _decisions(d) if d.positive is not None else {}

    def stat(idx):
        counts = d.Y[idx].sum(0)
        out = {}
        for name, s in d.S.items():
            out[(name, "auroc")] = auroc(d.Y[idx], s[idx]) if ((counts > 0) & (counts < len(idx))).all() else np.nan
            if ops:
                m = confusion_metrics(d.Y[idx, 0], s[idx, 0], ops[name]["cut"][idx])
                out[(name, "sensitivity")], out[(name, "specificity")] = m["sensitivity"], m["specificity"]
        return out

    one = d.positive is not None
    outcome = np.where(d.Y[:, 0], "positives", "negatives") if one else d.truth.to_numpy().astype(str)
    columns = {c: [as_text(v) if pd.notna(v) and as_text(v) else MISSING for v in lab["frame"].loc[d.ids, c]]
               for c in by}
    r["by"] = list(by)
    r["subgroups"], r["subgroup_warnings"] = subgroup_tables(
        columns, outcome, ["positives", "negatives"] if one else d.classes, stat, list(d.S), pairs, r["n_boot"],
        seed, d.groups)
    if ops:
        r.setdefault("operating_points", {n: o["point"] for n, o in ops.items()})


def _interval(v: float, ci: list, sign: str = "+") -> str:
    lo, hi = ci
    f = f"{sign}.3f"
    return f"{v:{f}} [{lo:{f}}, {hi:{f}}]" if np.isfinite(lo) else f"{v:{f}} [n/a]"


def format_report(r: dict) -> str:
    """What `mmdx compare` prints: who was left out and why, AUROCs, then the paired differences, each
    read as "how much the first named beats the second" (the sign of the JSON's comparisons)."""
    sources = [(r["labels"]["source"], r["labels"])] + [(f"{n} ({f['source']})", f) for n, f in r["files"].items()]
    lines = [f"{src}: {d['rows']} rows -> {d['paired']} paired"
             + "".join(f"; {k}: {v}" for k, v in d["dropped"].items()) for src, d in sources]
    what = f"AUROC of {r['positive']!r}" if r["positive"] is not None else "macro one-vs-rest AUROC"
    unit = f"{r['n_groups']} groups ({r['group_column']})" if r["group_column"] else "patients"
    rows = [(f"{n} (reference)" if n == r["reference"] else n, _interval(s["value"], s["ci95"], ""))
            for n, s in r["auroc"].items()]
    diffs = [(f"{c['a']} - {c['b']}", f"{_interval(c['value'], c['ci95'])}   "
              + f"share of resamples where {c['a']} is not better: {c['p_le_0']:.4f}") for c in r["comparisons"]]
    w = max(len(a) for a, _ in rows + diffs) + 2
    lines.append(f"\n{what} on {r['n']} paired patients; 95% CIs from {r['n_boot']} resamples of {unit}")
    lines += [f"  {a:{w}s}{b}" for a, b in rows]
    lines.append(f"paired differences: how much the reference ({r['reference']}, the first file) beats each other file")
    lines.append("(reference - other AUROC [95% CI]; positive = the reference is better)"
                 if len(r["comparisons"]) <= len(r["auroc"]) - 1 else "(reference - other AUROC [95% CI], then each "
                 "later pair as earlier - later file; positive = the first named is better)")
    lines += [f"  {a:{w}s}{b}" for a, b in diffs]
    return "\n".join(lines + format_tests(r) + format_subgroups(r))
