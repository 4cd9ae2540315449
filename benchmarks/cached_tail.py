"""Why the two-stage path's epoch ratio stops where it does: the harness's cached-vs-end-to-end epoch on
HAM10000 (`bench_measure.cached_epoch_speed`, as real_data.py runs it), then, in the same process, the
trainable tail alone (what stays to be computed over cached activations: EfficientNet-Lite0's last
stage, conv_head and its BatchNorm, forward and backward, one batch of 32) and its FLOPs. If the tail alone takes longer than
a tenth of an end-to-end batch, no code around it can make the cached epoch 10x faster.

    MMDX_CACHE=<dir> python benchmarks/cached_tail.py [--data ../shared/data] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]


def tail_step_ms(enc, act, repeats: int = 20) -> float:
    def step():
        out = enc._pool(enc._run(act, enc.cut, len(enc._seq)))
        out.float().sum().backward()

    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return 1e3 * sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import bench_measure
    import real_data as rd
    from encoders.image import TimmImageEncoder
    from multimodal.config import load_config
    from multimodal.runtime import tune_malloc

    torch.set_num_threads(a.threads)
    tuned = tune_malloc()  # as the harness runs
    cfg_path = ROOT / "configs" / "ham10000.yaml"
    cfg = load_config(cfg_path, {})
    parts, _ = rd.splits(Path(a.data) / "ham10000", cfg, 0, False)
    train = parts[0][1]
    epochs = bench_measure.cached_epoch_speed(cfg_path, {"train.seed": 0}, train)

    im = cfg.image
    enc = TimmImageEncoder(im.encoder, in_chans=im.in_chans, image_size=im.size, freeze=1).train()
    act = enc.frozen_features(torch.randn(32, im.in_chans, im.size, im.size))
    with FlopCounterMode(display=False) as fc:
        enc._pool(enc._run(act, enc.cut, len(enc._seq)))
    fwd = fc.get_total_flops()
    # the first convolution's input is the cached activation: it needs no input gradient
    first = next(m for m in enc._seq[enc.cut][1].modules() if isinstance(m, torch.nn.Conv2d))
    with FlopCounterMode(display=False) as fc:
        first(act)
    bwd = 2 * fwd - fc.get_total_flops()  # weight gradients of every conv, input gradients of all but the first
    ms = tail_step_ms(enc, act)
    out = {"malloc_tuned": tuned, **epochs,
           "cached_ms_per_batch": 32e3 / epochs["cached_patients_per_s"],
           "end_to_end_ms_per_batch": 32e3 / epochs["end_to_end_patients_per_s"],
           "ms_per_batch_for_10x": 3.2e3 / epochs["end_to_end_patients_per_s"],
           "tail_alone_ms_per_batch": ms, "tail_gflop_forward": fwd / 1e9, "tail_gflop_backward": bwd / 1e9,
           "tail_gflop_per_s": (fwd + bwd) / ms / 1e6}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
