"""What does one explanation cost? CPU, one patient with image + text + tabular, default synthetic config.

    python benchmarks/explain_cost.py [--n-steps 32] [--repeats 3] [--threads N]

Prints the time of one forward pass, one forward+backward pass, `explain` (method="ig"), and the
naive alternative (Captum once per modality, internal_batch_size=1, i.e. one forward+backward per
step and modality), then explain_time / (n_steps x forward+backward) and the speedup over naive.
Weights are untrained (cost does not depend on them); the patient comes from a small synthetic cohort.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captum.attr import LayerIntegratedGradients  # noqa: E402

from explain.attribution import AttributionForward, baseline_batch  # noqa: E402
from explain.patients import explain  # noqa: E402
from multimodal import DiagnosisModel  # noqa: E402
from multimodal.model.build import build_network  # noqa: E402
from multimodal.data.batches import Collate, RecordDataset  # noqa: E402
from multimodal.data.preprocess import Preprocessing  # noqa: E402
from multimodal.synth import config_path, make_cohort  # noqa: E402

CONFIG = config_path()


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_cohort(tmp, n=40, seed=0)
        model = DiagnosisModel.from_config(CONFIG)
        model.prep = Preprocessing.fit(model.config, model.records(paths["train"], labels=True))
        model.net = build_network(model.config, model.prep).eval()
        rec = model.records(paths["all"])
        ds = RecordDataset(rec, model.prep, model.config.modalities, model.config)
        # first patient with exactly one image, a report and lab values: the typical case
        i = next(k for k in range(len(ds)) if ds[k]["error"] is None and len(ds[k]["image"]) == 1
                 and ds[k]["text"] and (ds[k]["num_missing"] < 0.5).any())
        one = rec.subset([i])
        batch = Collate(model.prep, model.config.modalities, model.config)([ds[i]])
        net = model.net

        def forward():
            with torch.no_grad():
                net(batch)

        emb = net.encoders["text"].embedding
        tab = net.encoders["tabular"].tokens

        def forward_backward():  # gradient of the logit w.r.t. pixels, token embeddings, feature tokens
            acts = []
            hooks = [m.register_forward_hook(lambda mod, i, o: (o.requires_grad_(True), acts.append(o))[1])
                     for m in (emb, tab)]
            try:
                b = dict(batch, image=batch["image"].clone().requires_grad_(True))
                z = net(b)[:, 0].sum()
                torch.autograd.grad(z, [b["image"]] + acts)
            finally:
                for h in hooks:
                    h.remove()

        t_fwd = timed(forward, args.repeats * 3)
        t_fb = timed(forward_backward, args.repeats * 3)
        t_explain = timed(lambda: explain(model, one, n_steps=args.n_steps), args.repeats)
        t_explain_noabl = timed(lambda: explain(model, one, n_steps=args.n_steps, ablation=False), args.repeats)

        # naive: one Captum run per modality, one (forward + backward) per step
        keys = ["image", "text_ids", "num", "num_missing", "cat"]
        extra_keys = ["image_mask", "text_mask"]
        fwd = AttributionForward(net, keys + extra_keys, model.config.task.type)
        inputs = tuple(batch[k] for k in keys)
        extra = tuple(batch[k] for k in extra_keys)
        base = baseline_batch(model, batch)

        def naive():
            for layer, own in ((fwd.pixels, {"image"}), (emb, {"text_ids"}), (tab, {"num", "num_missing", "cat"})):
                baselines = tuple(base[k] if k in own else batch[k] for k in keys)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    LayerIntegratedGradients(fwd, layer).attribute(
                        inputs, baselines=baselines, target=1, additional_forward_args=extra,
                        n_steps=args.n_steps, internal_batch_size=1, return_convergence_delta=True)

        t_naive = timed(naive, args.repeats)

    n = args.n_steps
    print(f"device cpu, torch threads {torch.get_num_threads()}, n_steps {n}, patient {one.df.iloc[0, 0]}, "
          f"image {model.config.image.size}px x1, {int(batch['text_mask'].sum())} text tokens, "
          f"{len(model.prep.tabular.features)} features")
    print(f"forward                      {t_fwd * 1e3:9.1f} ms")
    print(f"forward+backward             {t_fb * 1e3:9.1f} ms")
    print(f"explain (ig)                 {t_explain * 1e3:9.1f} ms   (ablation=False: {t_explain_noabl * 1e3:.1f} ms)")
    print(f"naive (3 x Captum, ibs=1)    {t_naive * 1e3:9.1f} ms")
    print(f"explain / (n_steps x fwd+bwd) = {t_explain / (n * t_fb):.3f}   (ablation=False: "
          f"{t_explain_noabl / (n * t_fb):.3f})")
    print(f"speedup over naive            = {t_naive / t_explain:.2f}x   (ablation=False: "
          f"{t_naive / t_explain_noabl:.2f}x)")


if __name__ == "__main__":
    main()
