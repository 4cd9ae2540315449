"""`mmdx demo`: the whole main job on the built-in synthetic cohort, in a few minutes on a laptop CPU.

synth → train the fused model (multimodal/synth/config.yaml's fusion strategy) → evaluate → batch predict,
then the same config restricted to each single modality, and the scikit-learn baselines a researcher
would fit instead (`mmdx baselines`), so that the fused model stands beside the best single modality,
the plain mean of the single-modality models and the best baseline, as paired differences on the same
patients: whether fusion is worth using at all; then explanation reports for a few test patients and
faithfulness checks against the planted signals.
Writes summary.json for scripts. Everything is written into a staged folder that replaces `--out` at the
end, only if that is new, empty or an earlier demo folder holding only what the demo wrote.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from multimodal.api import DiagnosisModel
from multimodal.evaluation.metrics import format_table
from multimodal.output import staged_dir, write_json, write_table
from multimodal.synth import config_path, make_cohort

SINGLE = ("image", "text", "tabular")


def _ci(a: dict) -> str:
    """{"value", "ci95"} → "0.900 [0.850, 0.940]"."""
    return f"{a['value']:.3f} [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}]"


def _fmt(m: dict) -> str:
    return _ci(m["overall"]["auroc"])


def _explain(model, cohort: dict, work: Path, out: Path, n_reports: int) -> dict:
    """Reports for the first test patients, then the faithfulness checks on the whole test split."""
    from explain.faithfulness import TARGETS, faithfulness

    exps = model.explain(model.records(cohort["test"]).subset(range(n_reports)))
    exps.to_html(work / "reports")
    print(f"[6/6] explanations: {len(exps)} patient reports → {out / 'reports' / 'index.html'}")
    faith = faithfulness(model, cohort["test"], cohort["truth"])
    print("      faithfulness on the held-out split (planted signals known):")
    rows = [("pointing game (IG peak in lesion box)", "pointing_game", ">="),
            ("pointing game, Grad-CAM", "pointing_game_gradcam", None),
            ("planted phrase in top-3 words", "text_top3", ">="),
            ("planted lab is top feature", "tabular_top1", ">="),
            ("randomised-model rank correlation", "sanity_rank_corr", "<")]
    for label, key, op in rows:
        v = faith.get(key)
        if isinstance(v, dict):  # per modality: report the mean
            v = float(sum(v.values()) / max(len(v), 1))
        goal = f"(target {op} {TARGETS[key]:.2f})" if op else ""
        print(f"        {label:40s} {v:.3f} {goal}" if v is not None else f"        {label:40s} n/a")
    for m, d in faith.get("deletion", {}).items():
        print(f"        deletion, {m:8s}: top-10% drop {d['top']:+.3f} vs random {d['random']:+.3f}")
    return faith


def _mean_of(frames: list):
    """The plain mean of several models' probabilities, in `predict`'s layout: what a researcher gets
    by training each modality apart and averaging."""
    out = frames[0][["id"]].copy()
    for c in [c for c in frames[0] if c.startswith("prob_")]:
        out[c] = sum(f[c].to_numpy() for f in frames) / len(frames)
    ok = [(f["status"] == "ok").to_numpy() for f in frames]
    out["status"] = ["ok" if all(k) else "error" for k in zip(*ok)]
    return out


def _against(cohort: dict, config: Path, preds: dict, work: Path, out: Path) -> dict:
    """The fused model beside what a researcher would use instead, on the same test patients (paired
    bootstrap): its own single-modality models, their plain mean, and the scikit-learn baselines fitted
    on the records the engine saw (train + val). The image baseline runs where the packaged ImageNet
    weights are installed (the `pretrained` extra); the demo itself needs none."""
    import pandas as pd

    from multimodal.pretrained import WeightsError, packaged_file
    from multimodal.evaluation.baselines import predict_baselines, write_baselines
    from multimodal.evaluation.comparison import compare

    try:
        packaged_file("efficientnet_lite0")
        weights = "efficientnet_lite0"
    except WeightsError:
        weights = None
    seen = pd.concat([pd.read_csv(cohort["train"]), pd.read_csv(cohort["val"])], ignore_index=True)
    # absolute: a relative image root resolves against each records file's folder (data.image_root)
    tables, info = predict_baselines(config, seen, cohort["test"], image_weights=weights,
                                     image_root=Path(cohort["dir"]).resolve())
    with staged_dir(work / "baselines", "baselines") as folder:
        write_baselines(tables, info, folder)
    singles = {f"{m} only": preds[m] for m in SINGLE}
    mean = "mean of the single-modality models"
    report = compare({"fusion": preds["fusion"], **singles, mean: _mean_of(list(singles.values())), **tables},
                     cohort["test"], label_column="label", id_column="patient_id", n_boot=1000)
    auc = {n: report["auroc"][n]["value"] for n in report["auroc"]}
    best_single = max(singles, key=auc.get)
    best_baseline = max(tables, key=auc.get)
    print(f"[4/6] what a researcher would use instead, on the same {report['n']} test patients (baselines: "
          f"scikit-learn on train+val; image: "
          f"{'LR on frozen ImageNet EfficientNet-Lite0 features' if weights else 'needs the pretrained extra'}):")
    for n in auc:
        print(f"      {n:36s} {_ci(report['auroc'][n])}")
    gaps = {}
    for label, other in (("best single modality", best_single), ("mean of single-modality models", mean),
                         ("best baseline", best_baseline)):
        d = next(c for c in report["comparisons"] if c["b"] == other)  # fusion − other
        gaps[label] = {"value": d["value"], "ci95": d["ci95"], "other": other}
        print(f"      fusion minus the {label} ({other}): {gaps[label]['value']:+.3f} "
              f"[{gaps[label]['ci95'][0]:+.3f}, {gaps[label]['ci95'][1]:+.3f}]")
    print(f"      (paired bootstrap; baselines' predictions → {out / 'baselines'})")
    return {"auroc": auc, "fusion_minus": gaps, "fusion_minus_best": gaps["best baseline"]}


def run_demo(out: str = "mmdx-demo", n: int = 600, epochs: Optional[int] = None, seed: int = 0,
             config: Optional[Path] = None, n_boot: int = 500, n_reports: int = 8) -> dict:
    out, config = Path(out), Path(config) if config is not None else config_path()
    with staged_dir(out, "demo") as work:  # refused before any work; appears whole at the end
        return _run(work, out, n, epochs, seed, config, n_boot, n_reports)


def _run(work: Path, out: Path, n: int, epochs: Optional[int], seed: int, config: Path, n_boot: int,
         n_reports: int) -> dict:
    """The demo, written into `work`; what it prints and records names the final folder `out`."""
    t0 = time.perf_counter()
    cohort = make_cohort(work / "cohort", n=n, seed=seed)
    print(f"[1/6] synthetic cohort: {n} patients (DICOM incl. MONOCHROME1, rescale/window, multi-frame; PNG; "
          f"reports; labs) → {out / 'cohort'}")
    overrides = {"train.seed": seed} | ({"train.epochs": epochs} if epochs else {})

    results, models = {}, {}
    fusion_kind = DiagnosisModel.from_config(config, **overrides).config.fusion.strategy + " strategy"
    for name in ("fusion",) + SINGLE:
        mods = ",".join(SINGLE) if name == "fusion" else name
        step = f"[2/6] fusion ({fusion_kind})" if name == "fusion" else f"[3/6] {name}-only model"
        print(f"{step}: training …", flush=True)
        model = DiagnosisModel.from_config(config, **overrides, modalities=mods)
        model.fit(cohort["train"], cohort["val"], progress=False)
        model.save(work / "models" / name)
        results[name] = model.evaluate(cohort["test"], n_boot=n_boot)
        models[name] = model
        t = model.metrics["training"]
        print(f"      {t['n_train']} patients, {len(t['history'])} epochs in {t['train_seconds']:.0f}s; "
              f"held-out AUROC {_fmt(results[name])}  → {out / 'models' / name}")
        if "fusion" in t:  # a strategy of several networks: how the validation split weighed them
            scores = ", ".join(f"{k} {v:.3f}" for k, v in t["fusion"]["holdout_auroc_out_of_fold"].items())
            weights = ", ".join(f"{'+'.join(m['modalities'])} {m['weight']:.2f}" for m in t["fusion"]["members"])
            print(f"      chosen on validation: {t['fusion']['chosen']} ({weights}); out-of-fold AUROC {scores}")
    fused = models["fusion"]
    test_preds = {name: models[name].predict(cohort["test"]) for name in models}
    preds = test_preds["fusion"]
    baselines = _against(cohort, config, test_preds, work, out)
    write_table(preds, work / "predictions.csv")
    print(f"[5/6] batch predict: {len(preds)} rows ({int((preds.status == 'ok').sum())} ok) → {out / 'predictions.csv'}")
    print(f"\nfusion ({fusion_kind}) on the held-out split:\n" + format_table(results["fusion"]))

    print("\nheld-out AUROC [95% CI]:")
    for name in ("fusion",) + SINGLE:
        label = "fusion (image+text+tabular)" if name == "fusion" else f"{name} only"
        print(f"  {label:30s} {_fmt(results[name])}")
    best_single = max(SINGLE, key=lambda m: results[m]["overall"]["auroc"]["value"])
    gain = results["fusion"]["overall"]["auroc"]["value"] - results[best_single]["overall"]["auroc"]["value"]
    print(f"  fusion minus best single modality ({best_single}): {gain:+.3f}")

    faith = _explain(fused, cohort, work, out, n_reports)

    summary = {name: results[name]["overall"]["auroc"]["value"] for name in ("fusion",) + SINGLE}
    summary["faithfulness"] = faith
    summary["baselines"] = baselines
    summary |= {"auroc_ci95": {k: results[k]["overall"]["auroc"]["ci95"] for k in results},
                "n_test": results["fusion"]["n"], "seconds": round(time.perf_counter() - t0, 1),
                "models": {k: str(out / "models" / k) for k in results}, "predictions": str(out / "predictions.csv")}
    write_json(summary, work / "summary.json")
    print(f"\nsummary → {out / 'summary.json'}  ({summary['seconds']:.0f}s in all)")
    return summary
