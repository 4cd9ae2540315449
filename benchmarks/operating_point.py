"""Operating point on real data: HAM10000, `task.threshold: sensitivity:0.9` chosen on the inner hold-out
of the training records (the one fit used), then evaluate and predict on the validation lesions.

    python benchmarks/operating_point.py     # needs the model real_data.py keeps in benchmarks/results/work

It reuses the benchmark's fine-tuned fusion model and re-chooses its threshold (set_operating_point),
which is what `mmdx train` with configs/ham10000.yaml does at fit time."""
import json, sys, time
from pathlib import Path

import numpy as np, torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(2)
from multimodal import DiagnosisModel
from multimodal.data.records import load_records
from multimodal.engine.train import holdout_split
D = str(ROOT.parent / "shared" / "data" / "ham10000") + "/"
t0 = time.time()
model = DiagnosisModel.load(ROOT / "benchmarks/results/work/ham10000/model")
train = load_records(D + "records_train.csv", model.config, labels=True)
_, inner = holdout_split(train, model.config)
t = model.set_operating_point(inner, "sensitivity:0.9")[0]
m = model.evaluate(D + "records_val.csv", n_boot=1000)
p = model.predict(D + "records_val.csv")
pos = model.classes[1]
agree = bool((p["pred"] == np.where(p[f"prob_{pos}"] >= t, pos, model.classes[0])).all())
op = m["operating_point"]
out = {"threshold": t, "n_inner_val": len(inner), "val_auroc": m["overall"]["auroc"], "operating_point": op,
       "pred_agrees_with_threshold": agree, "seconds": time.time() - t0}
print(json.dumps(out, indent=1))
json.dump(out, open(ROOT / "benchmarks/results/ham_threshold.json", "w"), indent=1)
