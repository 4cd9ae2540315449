"""Does explain's memory bound hold? Peak memory of Integrated Gradients passes against explain.budget's estimate.

    python benchmarks/explain_memory.py [--rows 8 32 128] [--size 160] [--views 2]

For each internal batch size (rows per pass), a fresh process builds an untrained three-network ensemble
(`fusion.strategy: unimodal`, image + text + tabular; memory does not depend on the weights) at the given
image size with two photographs per patient, explains 4 patients with 32 steps, and reports the rise of
its peak resident memory during `explain` against what autograd saves for that many rows
(explain.budget.row_bytes: per row, and once per pass). explain.budget.OVERHEAD must cover the largest ratio.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = """
import json, resource, sys, tempfile
import torch
torch.set_num_threads(2)
from explain.budget import row_bytes
from explain.patients import explain
from multimodal import DiagnosisModel
from multimodal.data.batches import Collate, RecordDataset
from multimodal.data.preprocess import Preprocessing
from multimodal.model.build import build_network
from multimodal.synth import config_path, make_cohort

rows, size, views = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
with tempfile.TemporaryDirectory() as tmp:
    paths = make_cohort(tmp, n=40, seed=0, image_size=size)
    m = DiagnosisModel.from_config(config_path(), **{"image.size": size, "image.max_images": views,
                                                     "fusion.strategy": "unimodal"})
    m.prep = Preprocessing.fit(m.config, m.records(paths["train"], labels=True))
    m.net = build_network(m.config, m.prep).eval()
    rec = m.records(paths["all"])
    ds = RecordDataset(rec, m.prep, m.config.modalities, m.config)
    idx = [k for k in range(len(ds)) if ds[k]["error"] is None and len(ds[k]["image"]) == views][:4]
    one = Collate(m.prep, m.config.modalities, m.config)([ds[idx[0]]])
    per_row, once = row_bytes(m.net, one)
    explain(m, rec.subset(idx[:1]), n_steps=4, internal_batch_size=1)          # warm-up: lazy allocations
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    explain(m, rec.subset(idx), n_steps=32, internal_batch_size=rows, batch_size=4)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"rows": rows, "saved_per_row": per_row, "saved_once": once, "rise": peak - before,
                      "patients": len(idx)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    results = []
    for rows in args.rows:
        done = subprocess.run([sys.executable, "-c", _CHILD, str(rows), str(args.size), str(args.views)],
                              cwd=ROOT, capture_output=True, text=True, check=True)
        r = json.loads(done.stdout.strip().splitlines()[-1])
        r["ratio"] = r["rise"] / (r["saved_once"] + r["rows"] * r["saved_per_row"])
        results.append(r)
        print(f"{rows:4d} rows per pass: saved {r['saved_per_row'] / 2**20:7.1f} MB/row, peak rise "
              f"{r['rise'] / 2**20:8.0f} MB = {r['ratio']:.2f} × (once + rows × per row)", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"size": args.size, "views": args.views, "results": results}, indent=1))


if __name__ == "__main__":
    main()
