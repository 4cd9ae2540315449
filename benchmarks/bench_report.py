"""BENCHMARKS.md from the real-data benchmark's results (real_data.py). The hand-written analysis lives in
benchmarks/findings.md and is included verbatim, so regenerating the tables never loses it."""
from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path

FINDINGS = Path(__file__).resolve().parent / "findings.md"


def _ci(s: dict, digits: int = 3) -> str:
    lo, hi = s["ci95"]
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{s['value']:.{digits}f}"
    return f"{s['value']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _training_split(d: dict) -> str:
    """Who trained on what: one hold-out, or (train.ensemble_holdout: crossfit) one fold per member."""
    from multimodal.config import load_config

    root = Path(__file__).resolve().parents[1]
    tc = load_config(root / d["config"]).train if (root / d["config"]).is_file() else None
    if tc is not None and tc.ensemble > 1 and tc.ensemble_holdout == "crossfit":
        return (f"each of a model's {tc.ensemble} ensemble members trained on {d['n_train']} patients and "
                f"early-stopped on its own {d['n_inner_val']} (crossfit folds of the training records), "
                f"with calibration and the operating point fitted on the {tc.ensemble} folds' out-of-fold outputs.")
    return (f"each model trained on {d['n_train']} patients, with {d['n_inner_val']} more held out of the "
            f"training records for early stopping and calibration.")


def _runs(d: dict, variant: str) -> list[dict]:
    return [r for r in d["runs"] if r["variant"] == variant]


def _dataset(d: dict, plots_base: Path, md_dir: Path) -> list[str]:
    s = d["summary"]
    lines = [f"## {d['dataset']}: `{d['task']}` ({' + '.join(d['modalities'])})", "",
             f"Config `{d['config']}`. Scored on {d['n_eval']} patients ({d['split']}; prevalence "
             f"{d['prevalence']:.3f}); {_training_split(d)} "
             f"{len(_runs(d, 'attention'))} runs per variant; {d['seconds'] / 60:.1f} min for this dataset.", "",
             "| model | AUROC [95% CI] | seed SD | AUPRC [95% CI] | ECE calibrated [95% CI] | ECE raw | "
             "ECE floor | epochs (best) | s / run |", "|---|---|---|---|---|---|---|---|---|"]
    for v in [v for v in s if ", " not in v and not v.startswith("baseline: ")]:
        runs = _runs(d, v)
        epochs = "/".join(f"{r['epochs_run']}({r['best_epoch']})" for r in runs[:6])
        secs = sum(r["train_seconds"] for r in runs) / max(len(runs), 1)
        lines.append(f"| {v} | {_ci(s[v]['auroc'])} | {s[v]['auroc']['seed_sd']:.3f} | {_ci(s[v]['auprc'])} | "
                     f"{_ci(s[v]['ece'])} | {d['ece_uncalibrated'].get(v, float('nan')):.3f} | "
                     f"{d['ece_floor'][v]:.3f} | {epochs} | {secs:.0f} |")
    choices = {v: [r.get("strategy_choice") for r in _runs(d, v)] for v in s if ", " not in v}
    choices = {v: c for v, c in choices.items() if c and all(c)}
    if choices:
        lines += ["", "What each fusion strategy chose on its hold-out (runs): " + "; ".join(
            f"{v}: " + ", ".join(f"{k} ({c.count(k)})" for k in dict.fromkeys(c)) for v, c in choices.items()) + "."]
    base = [v for v in s if v.startswith("baseline: ")]
    if base:
        lines += ["", "What a researcher would fit instead (`mmdx baselines`, multimodal/evaluation/baselines.py: "
                  "scikit-learn on the same training records, choices by 5-fold CV on them; image features: frozen ImageNet "
                  "EfficientNet-Lite0, mean over a patient's images):", "",
                  "| baseline | AUROC [95% CI] | AUPRC [95% CI] | ECE [95% CI] |", "|---|---|---|---|"]
        for v in base:
            lines.append(f"| {v.removeprefix('baseline: ')} | {_ci(s[v]['auroc'])} | {_ci(s[v]['auprc'])} | "
                         f"{_ci(s[v]['ece'])} |")
        chosen = d.get("baselines", [{}])[0].get("chosen")
        if chosen:
            lines += ["", "Per-modality choice (by CV AUROC on the training records): "
                      + ", ".join(f"{m}: {c}" for m, c in chosen.items()) + "."]
    lines += ["", "Paired bootstrap over patients (same resamples, seed-averaged AUROC; the first line is "
              "the headline: attention fusion minus the best baseline):", ""]
    for c in d["comparisons"]:
        lines.append(f"- {c['a']} − {c['b']}: **{c['value']:+.3f}** [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}], "
                     f"P(difference ≤ 0) = {c['p_le_0']:.3f}")
    ablations = [v for v in s if v.startswith(("attention, ", "concat, "))]
    if ablations:
        lines += ["", "Missing modality at test time (the fused model, modalities hidden through its mask), next to "
                  "the model trained on what is left:", "", "| fused model, at test time | AUROC [95% CI] | "
                  "model trained on that alone |", "|---|---|---|"]
        for v in ablations:
            left = _left(v, d["modalities"])
            single = f"{left} only: {_ci(s[f'{left} only']['auroc'])}" if left and f"{left} only" in s else ""
            lines.append(f"| {v} | {_ci(s[v]['auroc'])} | {single} |")
    tp = d.get("throughput")
    if tp:
        lines += ["", f"Throughput (seed-0 attention model, {tp['n']} validation patients, CPU): "
                  f"training {_runs(d, 'attention')[0]['train_patients_per_s']:.0f} patients/s (median epoch); "
                  f"`mmdx predict` {tp['cli_patients_per_s']:.1f} patients/s end to end ({tp['cli_seconds']:.1f} s "
                  f"incl. process start and model load); in-process `predict` {tp['api_patients_per_s']:.0f} "
                  f"patients/s; pure forward on the same collated batches {tp['forward_patients_per_s']:.0f} patients/s "
                  f"({100 * tp['forward_share_of_api']:.0f}% of in-process predict time)."]
    cs = d.get("cache_speed")
    if cs:
        lines += ["", f"Two-stage path (`image.cache_features`), this config's encoder frozen up to its last stage "
                  f"(`image.freeze: 1`): an epoch over cached frozen activations ran at "
                  f"{cs['cached_patients_per_s']:.0f} patients/s, an end-to-end epoch (pixels through the frozen "
                  f"layers every step, with augmentation) at {cs['end_to_end_patients_per_s']:.0f} patients/s: "
                  f"**{cs['speedup']:.1f}×** faster, side by side in {cs.get('measured', 'this run')} (epochs include their validation "
                  f"pass; filling the cache took {cs['cache_fill_seconds']:.0f} s once, before the first epoch)."]
    if d.get("plots"):
        links = ", ".join(f"[{Path(p).stem}]({os.path.relpath(plots_base / p, md_dir)})" for p in d["plots"])
        lines += ["", f"Plots (seed-0 attention model, calibrated): {links}."]
    return lines + [""]


def _left(variant: str, modalities: list[str]) -> str | None:
    """'attention, without image' on image+tabular → 'tabular'; 'attention, text kept' → 'text'."""
    what = variant.split(", ", 1)[1]
    if what.endswith(" kept"):
        return what[:-5]
    rest = [m for m in modalities if m != what.removeprefix("without ")]
    return rest[0] if len(rest) == 1 else None


def previous_report(path: Path, **settings) -> dict:
    """The report an --update keeps; refused unless it was run with the same `settings` (seeds,
    resamples, overrides...), since its other datasets' rows would otherwise sit beside rows measured
    differently."""
    if not path.exists():
        raise SystemExit(f"--update: no {path} to update")
    old = json.loads(path.read_text())
    for key, now in settings.items():
        if old[key] != now:
            raise SystemExit(f"--update: {path} was run with {key}={old[key]!r}, this run has {now!r}")
    return old


def updated(old: dict, new: dict) -> dict:
    """`old` with the datasets `new` reran replaced in place (others kept, in their order); the time
    in all is the sum of every dataset's own time, and the commands that made it are all listed."""
    fresh = {d["dataset"]: d for d in new["datasets"]}
    datasets = [fresh.pop(d["dataset"], d) for d in old["datasets"]] + list(fresh.values())
    updates = old.get("updates", []) + [{"command": new["command"], "datasets": [d["dataset"] for d in new["datasets"]],
                                          "date": time.strftime("%Y-%m-%d"), "environment": new["environment"]}]
    return {**old, "datasets": datasets, "seconds": sum(d["seconds"] for d in datasets), "updates": updates}


def write_markdown(report: dict, path: Path, plots_base: Path) -> Path:
    env = report["environment"]
    md_dir = path.resolve().parent
    lines = ["# Benchmarks", "",
             "Generated by `benchmarks/real_data.py`; the analysis under *Findings* is hand-written "
             "(`benchmarks/findings.md`).", "",
             f"- Command: `{report['command']}`" + (" (quick mode: subsampled, not a result)" if report["quick"] else ""),
             *[f"- Then rerun alone ({u['date']}): {', '.join(u['datasets'])}, `{u['command']}`"
               for u in report.get("updates", [])],
             f"- Run: {report.get('date', 'date not recorded')}, {report['seconds'] / 60:.1f} min in all; seeds "
             f"{', '.join(map(str, report['seeds']))}; {report['n_boot']} bootstrap resamples; overrides "
             f"{report['overrides'] or 'none'}",
             f"- Machine: {env['cpu']}, {env['cores']} cores, {env['torch_threads']} torch threads, "
             f"GPU: {env['gpu'] or 'none'} ({env['platform']})" +
             ("; malloc tuned as `mmdx` runs (`multimodal/runtime.py`)" if env.get("malloc_tuned") else ""),
             f"- Versions: Python {env['python']}, torch {env['torch']}, timm {env['timm']}, transformers "
             f"{env['transformers']}, captum {env['captum']}, scikit-learn {env['scikit-learn']}", "",
             "**How to read the tables.** Each variant is trained with the same config, epochs, early stopping and "
             "seeds; only the fusion head or the set of modalities differs. AUROC/AUPRC/ECE are averaged over seeds; "
             "the 95% CI is a percentile bootstrap over patients of that seed average, and *seed SD* is the spread "
             "across seeds. *ECE raw* is before temperature-and-bias scaling. *ECE floor* is the mean ECE a perfectly "
             "calibrated model with the same predicted probabilities would show on this many patients (labels "
             "drawn from its own probabilities): with few patients, ECE cannot go much below it. "
             "*epochs (best)* lists epochs run and the epoch kept, per run.", ""]
    if FINDINGS.exists() and not report["quick"]:
        lines += [FINDINGS.read_text().strip(), ""]
    for d in report["datasets"]:
        lines += _dataset(d, plots_base, md_dir)
    kept = sections(path.read_text()) if path.exists() else {}  # other scripts' sections survive a rerun
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "".join(f"\n{_fence(k, v)}\n" for k, v in kept.items()))
    return path


_SECTION = re.compile(r"<!-- section:(\w+) -->\n(.*?)\n<!-- /section:\1 -->", re.S)


def _fence(name: str, body: str) -> str:
    return f"<!-- section:{name} -->\n{body.strip()}\n<!-- /section:{name} -->"


def sections(text: str) -> dict[str, str]:
    """Blocks that another benchmark script (e.g. throughput.py) owns inside BENCHMARKS.md."""
    return {m.group(1): m.group(2) for m in _SECTION.finditer(text)}


def write_section(path: Path, name: str, body: str) -> Path:
    """Replace (or append) the block `name` in `path`, leaving the rest of the file as it is."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = _fence(name, body)
    text = _SECTION.sub(lambda m: block if m.group(1) == name else m.group(0), text) if name in sections(text) \
        else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
    return path
