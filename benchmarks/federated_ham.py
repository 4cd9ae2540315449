"""Federated training on HAM10000 (issue #31): three sites made of body-site (`localization`) groups,
against the same network trained on the pooled records, both scored on the validation lesions.

    python benchmarks/federated_ham.py --out runs/federated_ham      # about 25 min on 2 cores

The training lesions are split into three sites by whole localization values, assigned largest first
to the site with the fewest lesions so far: each site sees its own body sites only, the shift a
multi-hospital study has where clinics specialise. Both models use configs/ham10000.yaml's joint recipe
(one network: fusion.strategy joint, train.ensemble 1), the pooled one for train.epochs epochs and the
federated one for as many rounds of one local epoch at each site, so each saw every training lesion as
often. Validation (1,120 lesions, never seen in training or in any choice here): AUROC with its 95%
bootstrap CI for each, and the paired difference, federated minus pooled. Results (no record ids) go to
benchmarks/results/federated_ham.json; the model directories to --out.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "ham10000"


def site_groups(train: pd.DataFrame, n_sites: int) -> list[list[str]]:
    """Whole localization values per site, largest first to the smallest site so far (missing: 'unknown')."""
    counts = train["localization"].fillna("unknown").value_counts()
    sites, sizes = [[] for _ in range(n_sites)], [0] * n_sites
    for value, n in counts.items():
        i = sizes.index(min(sizes))
        sites[i].append(value)
        sizes[i] += int(n)
    return sites


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, help="folder for the two model directories")
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--results", default=str(ROOT / "benchmarks/results/federated_ham.json"))
    a = ap.parse_args()

    import torch

    from multimodal import DiagnosisModel, federate
    from multimodal.config import load_config
    from multimodal.evaluation.comparison import compare

    torch.set_num_threads(2)
    train_csv, val_csv = DATA / "records_train.csv", DATA / "records_val.csv"
    train = pd.read_csv(train_csv)
    overrides = {"fusion.strategy": "joint", "train.ensemble": 1, "data.image_root": str(DATA)}
    cfg = load_config(ROOT / "configs/ham10000.yaml", overrides)
    epochs = cfg.train.epochs
    out = Path(a.out)
    groups = site_groups(train, a.sites)
    where = train["localization"].fillna("unknown")
    report = {"date": time.strftime("%Y-%m-%d"), "config": "configs/ham10000.yaml", "overrides": overrides,
              "epochs": epochs, "sites": []}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for i, values in enumerate(groups):
            part = train[where.isin(values)]
            paths[f"site{i + 1}"] = Path(tmp) / f"site{i + 1}.csv"
            part.to_csv(paths[f"site{i + 1}"], index=False)
            report["sites"].append({"name": f"site{i + 1}", "localization": values, "lesions": len(part),
                                    "malignant": int(part[cfg.label_columns()[0]].sum())})
            print(f"site{i + 1}: {len(part)} lesions ({report['sites'][-1]['malignant']} malignant): "
                  f"{', '.join(values)}", flush=True)
        t0 = time.perf_counter()
        fed = federate(cfg, paths, rounds=epochs, local_epochs=1, progress=True)
        report["federated_seconds"] = time.perf_counter() - t0
    fed.save(out / "federated", overwrite=True)
    t0 = time.perf_counter()
    pooled = DiagnosisModel.from_config(cfg).fit(train_csv, progress=True)
    report["pooled_seconds"] = time.perf_counter() - t0
    pooled.save(out / "pooled", overwrite=True)

    frames = {}
    for name, model in (("federated", fed), ("pooled", pooled)):
        frames[name] = model.predict(val_csv)
        m = model.evaluate(val_csv, n_boot=a.n_boot)
        report[name] = {"auroc": m["overall"]["auroc"], "operating_point": m.get("operating_point"),
                        "threshold": model.prep.labels.thresholds}
    labels = pd.read_csv(val_csv)
    c = compare(frames, labels, label_column=cfg.label_columns()[0], id_column=cfg.data.id, n_boot=a.n_boot,
                seed=cfg.train.seed, group_column=cfg.data.group, class_names=cfg.task.names)
    report["difference"] = c["comparisons"][0]
    Path(a.results).write_text(json.dumps(report, indent=1, default=float))
    f, p, d = report["federated"], report["pooled"], report["difference"]
    print(f"validation AUROC: federated {f['auroc']}, pooled {p['auroc']}; federated - pooled {d}", flush=True)
    print(f"training: federated {report['federated_seconds']:.0f} s, pooled {report['pooled_seconds']:.0f} s")


if __name__ == "__main__":
    main()
