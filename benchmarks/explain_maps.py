"""Which image map should a report draw? Pointing game and deletion of raw and smoothed maps on the demo cohort.

    python benchmarks/explain_maps.py [--n 600] [--seed 0] [--threads 2] [--out benchmarks/results/explain_maps.json]

Trains the demo's fused model (synthetic config, `make demo`'s cohort size and seed), then for Integrated
Gradients and Grad-CAM maps, each raw and blurred by a Gaussian of σ = fraction × the image side
(explain.figures.smooth_maps), measures on the test patients:
    pointing game   positive patients whose lesion reaches the model: share whose map peaks in the lesion box
    deletion        mean drop of P(positive) when the top 10% of pixels by the map are set to black, against
                    as many random pixels (the same random draws for every map)
A smoothed map is worth drawing when it points as well and its top pixels matter at least as much;
explain.figures.SMOOTH_FRACTION is the fraction this chose.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from explain.faithfulness import _cohort, _lesions, inside, peak  # noqa: E402
from explain.figures import smooth_maps  # noqa: E402
from explain.patients import iter_batches  # noqa: E402
from explain.perturbation import deletion, finite_mean  # noqa: E402
from multimodal import DiagnosisModel  # noqa: E402
from multimodal.data.batches import to_device  # noqa: E402
from multimodal.synth import config_path, make_cohort  # noqa: E402

FRACTIONS = (0.0, 0.01, 0.02, 0.04, 0.08, 0.16)


def measure(model, cohort: dict, method: str, n_steps: int) -> dict:
    """fraction → {pointing, deletion top, random, n} for one attribution method's maps."""
    rec, planted = _cohort(model, cohort["test"], cohort["truth"], None, 0)
    lesion = _lesions(model.config, rec, planted)
    acc = {f: {"hits": [], "deletion": {}, "rng": np.random.default_rng(0)} for f in FRACTIONS}
    seen = 0
    for res, exps in iter_batches(model, rec, method=method, n_steps=n_steps, ablation=False):
        first, seen = seen, seen + len(exps)
        if res is None or res.image is None:
            continue
        res.batch = to_device(res.batch, model.device)
        for f, a in acc.items():
            maps = smooth_maps(res.image, f)
            deletion(model, dataclasses.replace(res, image=maps, text=None, tabular=None), a["rng"], a["deletion"])
            for b, i in enumerate(res.rows):
                if i in lesion and exps[i - first].error is None:
                    v, box = lesion[i]
                    a["hits"].append(inside(peak(maps[b, v].numpy()), box))
    out = {}
    for f, a in acc.items():
        d = a["deletion"].get("image", {"top": [], "random": []})
        out[f] = {"pointing_game": finite_mean(a["hits"]), "n_pointing": len(a["hits"]),
                  "deletion_top": finite_mean(d["top"]), "deletion_random": finite_mean(d["random"]),
                  "n_deletion": len(d["top"])}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cohort = make_cohort(tmp, n=args.n, seed=args.seed)
        model = DiagnosisModel.from_config(config_path(), **{"train.seed": args.seed})
        model.fit(cohort["train"], cohort["val"], progress=False)
        results = {m: measure(model, cohort, m, args.n_steps) for m in ("ig", "gradcam")}
    print(f"{'map':9s} {'σ/side':>7s} {'pointing':>9s} {'deletion top':>13s} {'random':>8s} {'top−random':>11s}")
    for m, rows in results.items():
        for f, r in rows.items():
            print(f"{m:9s} {f:7.2f} {r['pointing_game']:9.3f} {r['deletion_top']:+13.3f} "
                  f"{r['deletion_random']:+8.3f} {r['deletion_top'] - r['deletion_random']:+11.3f}")
    n = next(iter(results["ig"].values()))
    print(f"pointing over {n['n_pointing']} lesion patients, deletion over {n['n_deletion']} patients with images")
    if args.out:
        Path(args.out).write_text(json.dumps({"n": args.n, "seed": args.seed, "n_steps": args.n_steps,
                                              "results": {m: {str(f): r for f, r in rows.items()}
                                                          for m, rows in results.items()}}, indent=1))


if __name__ == "__main__":
    main()
