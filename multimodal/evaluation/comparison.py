"""`mmdx compare`: is one model really better than another on these patients?

Two AUROCs with overlapping CIs can still differ reliably, and two that look apart can be noise:
what decides is the difference on the *same* patients. So every prediction file is joined with the
labels on id, only patients that every file scored are kept, and one set of bootstrap resamples (of
patients, or of whole groups when a patient has several records) serves every model, which makes
the differences paired. benchmarks/bench_stats.py uses the same resampling code, and
`mmdx evaluate --predictions` (multimodal.evaluation.scorefile) the same reading and joining.

Only numpy and pandas: `from multimodal import compare` must not need a model or torch here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd

from multimodal.errors import UserError
from multimodal.data.records import read_table
from multimodal.evaluation.bootstrap import bootstrap_stats, ci95, difference

MIN_PAIRED = 10
PathOrFrame = Union[str, Path, pd.DataFrame]


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


# -- reading and joining ----------------------------------------------------------------------------------------
def as_text(v) -> str:
    """Ids and labels as the engine spells them: 7, 7.0 and "7" are the same patient or class."""
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        v = int(v)
    return str(v).strip()


def _table(obj: PathOrFrame, what: str) -> tuple[pd.DataFrame, str]:
    if isinstance(obj, pd.DataFrame):
        return obj.reset_index(drop=True), what
    path = Path(obj)
    if not path.is_file():
        raise UserError(f"{what} file not found: {path}")
    return read_table(path), str(path)


def _need(df: pd.DataFrame, source: str, *cols: str) -> None:
    for c in cols:
        if c not in df.columns:
            raise UserError(f"{source}: no column {c!r} (file has: {', '.join(map(str, df.columns[:12]))})")


def _ids(df: pd.DataFrame, col: str, source: str) -> pd.Index:
    ids = pd.Index([as_text(v) for v in df[col]])
    dup = ids[ids.duplicated()]
    if len(dup):
        raise UserError(f"{source}: id {dup[0]!r} appears more than once; ids must name one record each")
    return ids


def read_predictions(obj: PathOrFrame, name: str, id_column: str) -> dict:
    """Probabilities indexed by id, the ids it scored (status ok and finite probabilities), and the
    whole table indexed the same way (its pred, threshold and fold columns, where it has them)."""
    df, source = _table(obj, f"predictions {name!r}")
    cols = [c for c in df.columns if str(c).startswith("prob_")]
    if not cols:
        raise UserError(f"{source}: no prob_<class> columns (expected a file written by `mmdx predict`)")
    id_col = "id" if "id" in df.columns else id_column
    _need(df, source, id_col)
    probs = df[cols].apply(pd.to_numeric, errors="coerce")
    probs.index = df.index = _ids(df, id_col, source)
    probs.columns = [str(c)[5:] for c in cols]
    status = df["status"].astype(str).str.strip().to_numpy() if "status" in df.columns else np.full(len(df), "ok")
    ok = (status == "ok") & np.isfinite(probs.to_numpy()).all(1)
    return {"source": source, "probs": probs, "ok": probs.index[ok], "n_rows": len(df), "frame": df}


def read_labels(labels: PathOrFrame, id_column: str, label_column: str, group_column: Optional[str] = None) -> dict:
    """The labels file indexed by id (as text), and the ids whose label is not empty."""
    lab, source = _table(labels, "labels")
    _need(lab, source, id_column, label_column, *([group_column] if group_column else []))
    lab.index = _ids(lab, id_column, source)
    return {"frame": lab, "source": source, "column": label_column,
            "labelled": lab.index[lab[label_column].notna().to_numpy()]}


def class_truth(lab: dict, ids: pd.Index, classes: list[str], class_names: Optional[Mapping] = None) -> pd.Series:
    """The class each id's label names, spelled as the prob_<class> columns spell it: `class_names`
    (the config's task.names) maps raw label values (0/1) to names. A value no column names is the
    user's mistake (another label column, or a config forgotten), refused in one line."""
    named = {as_text(k): v for k, v in (class_names or {}).items()}
    truth = pd.Series([named.get(as_text(v), as_text(v)) for v in lab["frame"].loc[ids, lab["column"]]], index=ids)
    unknown = sorted(set(truth) - set(classes))
    if len(classes) > 1 and unknown:
        hint = "" if class_names else "; with task.names, pass the config (--config) to map label values to names"
        raise UserError(f"{lab['source']}: label values {unknown[:5]} are not among the predicted classes "
                        f"{classes}{hint}")
    return truth


def positive_class(positive, classes: list[str]) -> Optional[str]:
    """The class scored against the rest: `positive`, else the last class when there are at most two
    (prob_<positive> is the second column `mmdx predict` writes), else None (macro over classes)."""
    if positive is None and len(classes) <= 2:
        positive = classes[-1]
    positive = None if positive is None else as_text(positive)
    if positive is not None and positive not in classes:
        raise UserError(f"positive class {positive!r} is not among the predicted classes {classes}")
    return positive


def groups_of(lab: dict, ids: pd.Index, group_column: Optional[str]) -> Optional[list[str]]:
    """The group (patient) of each id, resampled whole; an empty cell is its record's own group, as in
    multimodal.data.splits.patients, so a config's data.group groups alike here and in evaluate."""
    if not group_column:
        return None
    cells = [as_text(v) if pd.notna(v) else "" for v in lab["frame"].loc[ids, group_column]]
    return [f"group:{g}" if g else f"id:{i}" for i, g in zip(ids, cells)]


def id_order(ids) -> np.ndarray:
    """The order rows are resampled in: by id, as text. With one seed, `compare` and `evaluate` (from
    a model or a predictions file) then draw the same patients from the same file, and no file's row
    order changes a CI."""
    return np.argsort(np.array([as_text(v) for v in ids], dtype=object), kind="stable")


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
            class_names: Optional[Mapping[str, str]] = None) -> dict:
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
    in both."""
    items = _named(predictions, names)
    if n_boot < 1:
        raise UserError(f"n_boot must be at least 1, got {n_boot}")
    lab = read_labels(labels, id_column, label_column, group_column)
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
    return {
        "n": len(paired), "n_groups": len(set(groups)) if groups else len(paired), "group_column": group_column,
        "metric": "auroc" if len(targets) == 1 else "macro one-vs-rest auroc", "positive": positive,
        "classes": classes, "reference": order[0], "n_boot": n_boot, "seed": seed,
        **_accounting(lab, preds, paired),
        "auroc": {n: {"value": point[n], "ci95": ci95(boots.get(n, missing))} for n in order},
        "difference": SIGN,
        "comparisons": [{"a": a, "b": b} | difference(point[a] - point[b], boots.get(a, missing), boots.get(b, missing))
                        for a, b in pairs],
    }


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
    return "\n".join(lines)
