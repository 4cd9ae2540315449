"""Operating point on real data: HAM10000, `task.threshold: sensitivity:0.9`, chosen at fit time on the
inner hold-out (with `train.ensemble_holdout: crossfit`, on each hold-out lesion's out-of-fold output),
then evaluate and predict on the validation lesions.

    python benchmarks/operating_point.py     # needs the model real_data.py keeps in benchmarks/results/work

It reads the threshold the benchmark's fusion model stored when `mmdx train` fitted it, and checks
that predict's labels follow it."""
import json, sys, time
from pathlib import Path

import numpy as np, torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(2)
from multimodal import DiagnosisModel
D = str(ROOT.parent / "shared" / "data" / "ham10000") + "/"
t0 = time.time()
model = DiagnosisModel.load(ROOT / "benchmarks/results/work/ham10000/model")
t = model.prep.labels.thresholds[0]
rule = model.config.task.threshold
m = model.evaluate(D + "records_val.csv", n_boot=1000)
p = model.predict(D + "records_val.csv")
pos = model.classes[1]
agree = bool((p["pred"] == np.where(p[f"prob_{pos}"] >= t, pos, model.classes[0])).all())
op = m["operating_point"]
inner = model.metrics["validation"]
out = {"threshold": t, "rule": rule, "n_inner_val": inner["n"], "inner_operating_point": inner.get("operating_point"), "val_auroc": m["overall"]["auroc"], "operating_point": op,
       "pred_agrees_with_threshold": agree, "seconds": time.time() - t0}
print(json.dumps(out, indent=1))
json.dump(out, open(ROOT / "benchmarks/results/ham_threshold.json", "w"), indent=1)
