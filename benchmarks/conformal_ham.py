"""Conformal prediction sets on HAM10000 (issue #31): a stored crossfit model's cuts fitted on its own
calibration records, then empirical coverage and set size on the validation lesions.

    OMP_NUM_THREADS=1 python benchmarks/conformal_ham.py --model /tmp/ham29/auto3 --out runs/ham_conformal

The model was trained before task.conformal existed, so the cuts are fitted here as `fit` would have
fitted them: each crossfit fold's hold-out is scored again by the networks that early-stopped on it
(recipe.holdout_logits), calibrated with the stored temperature and bias (recipe.calibrated), and
recipe.set_conformal fits the cuts; the validation lesions are seen only afterwards. The operating
point chosen again on the same probabilities must equal the stored one (a check that these are the
probabilities fit used). The source directory is read, never written: the model with its cuts goes
to --out. Both kinds of cut (per class, one for all) are scored on the same validation outputs; the
JSON (no record ids) goes to benchmarks/results/conformal_ham.json.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "ham10000"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="a model directory (read only)")
    ap.add_argument("--out", required=True, help="where the model with its cuts is saved")
    ap.add_argument("--train", default=str(DATA / "records_train.csv"), help="the records it was trained on")
    ap.add_argument("--val", default=str(DATA / "records_val.csv"))
    ap.add_argument("--coverage", type=float, default=0.9)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--results", default=str(ROOT / "benchmarks/results/conformal_ham.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)

    from multimodal import DiagnosisModel
    from multimodal.config import config_from_dict
    from multimodal.data.records import load_records
    from multimodal.data.splits import holdout_splits, labelled
    from multimodal.evaluation.conformal import fit_cuts, prediction_sets, set_metrics
    from multimodal.evaluation.evaluate import scored_metrics
    from multimodal.evaluation.operating import thresholds_for
    from multimodal.training.recipe import calibrated, holdout_logits, set_conformal

    t0 = time.perf_counter()
    model = DiagnosisModel.load(a.model, device="cpu")
    cfg = config_from_dict(model.config.model_dump(mode="json"), {"task.conformal": a.coverage})
    model.config, model.prep.labels.task = cfg, cfg.task
    tc = cfg.train
    train = load_records(a.train, cfg, labels=True)
    splits = holdout_splits(train, cfg, tc.ensemble if tc.ensemble_holdout == "crossfit" else 1)
    _, _, y, z = holdout_logits(model.net, model.prep, cfg, splits)
    P = calibrated(model.net, z, cfg.task.type)
    t_fit = time.perf_counter() - t0
    stored = model.prep.labels.thresholds
    again = thresholds_for(y, P, cfg.task.type, cfg.task.threshold) if stored else None
    state = set_conformal(model.prep, cfg, y, P)["conformal"]
    model.metrics.setdefault("training", {})["conformal"] = state
    model.save(a.out)
    print(f"cuts {state} from {len(y)} calibration records ({t_fit:.0f} s); operating point stored {stored}, "
          f"chosen again {again}", flush=True)

    allval = model.records(a.val, labels=True)
    rec, yv = labelled(allval, model.prep)
    frame = model.predict(rec)
    Pv = frame[[f"prob_{c}" for c in model.classes]].to_numpy(dtype=float)
    Pv = Pv[:, 1] if cfg.task.type == "binary" else Pv
    m = scored_metrics(cfg, model.prep, allval, rec, yv, Pv, a.n_boot)
    other = fit_cuts(y, P, a.coverage, not state["by_class"])  # the other kind of cut, same outputs
    m_other = set_metrics(yv, prediction_sets(Pv, other["cuts"]), model.classes, a.n_boot, tc.seed, state=other)
    out = {"model": str(a.model), "coverage_target": a.coverage, "n_calibration": int(len(y)),
           "calibration_records": "out-of-fold training records" if len(splits) > 1 else "training hold-out",
           "operating_point_stored": stored, "operating_point_chosen_again": again,
           "val_n": m["n"], "val_auroc": m["overall"]["auroc"], "conformal": m["conformal"],
           "conformal_other_cut": m_other, "seconds_calibration_scoring": t_fit,
           "seconds_total": time.perf_counter() - t0, "threads": torch.get_num_threads()}
    Path(a.results).write_text(json.dumps(out, indent=1) + "\n")
    from multimodal.evaluation.conformal import format_sets

    print(format_sets(m["conformal"]))
    print(format_sets(m_other))
    print(f"val AUROC {m['overall']['auroc']['value']:.4f}; {out['seconds_total']:.0f} s; wrote {a.results}")


if __name__ == "__main__":
    main()
