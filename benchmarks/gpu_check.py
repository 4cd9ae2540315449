"""The CUDA and mixed-precision paths, checked in one prepared run on a lent GPU.

CI has no GPU, and the device tool lends one to some sessions only, for 15 minutes of device time in
all (starts included), so what needs a GPU is one script that ends in a few minutes and writes one
JSON file of figures. It runs on the built-in synthetic cohort (the real data does not travel to the
device machine) and needs no weights:

- training on CUDA with bf16 autocast, and with fp16 autocast plus gradient scaling (what a GPU
  without bf16 gets), each against the same training in fp32 on the CPU: validation AUROC and time;
- a model trained on the GPU, saved, and loaded on the CPU (a model directory moves between
  machines): the largest probability difference between the two devices;
- attributions on CUDA (the LSTM's backward runs with cuDNN off): finite, and the same modality ranked
  first as on the CPU;
- the two-stage path's epoch ratio (issue #9), EfficientNet-Lite0 frozen up to its last stage at 160 px,
  with the harness's own `cached_epoch_speed`.

The device machine's image holds torch, timm, transformers, pandas and scikit-learn; the rest travels
as wheels that `benchmarks/gpu_wheels.sh` fetches here into .whl/. Then one device call (on an H200:
about 5.5 min; on 2 CPU cores it takes 50 s at --n 200 --speed-n 200):

    run(carry=[".whl"], timeout_s=420, command="python3 -m pip install -q --no-index --no-deps
        --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site
        PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT")

`--device cpu` runs the same checks on the CPU alone (to try the script anywhere; figures then say cpu).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

SHORT = {"train.epochs": 12, "train.min_epochs": 10, "train.patience": 12}


@contextmanager
def timed(into: dict, key: str):
    t = time.perf_counter()
    yield
    into[key] = round(time.perf_counter() - t, 2)


def auroc(model, records) -> float:
    return round(model.evaluate(records, n_boot=0)["overall"]["auroc"]["value"], 4)


def train(cfg: Path, paths: dict, device: str, prep=None, **overrides):
    """`prep`: another run's fitted preprocessing, so that runs differ by device and precision alone
    (the WordPiece vocabulary can differ between fits: README, known limitations)."""
    from multimodal import DiagnosisModel

    model = DiagnosisModel.from_config(cfg, **(SHORT | {"train.device": device} | overrides))
    model.prep = prep
    return model.fit(paths["train"], paths["val"], progress=False, reuse_preprocessing=prep is not None)


def top_modality(explanations) -> list[str]:
    return [max(e.modality_share, key=lambda m: abs(e.modality_share[m])) for e in explanations]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu, to try the script without a GPU")
    ap.add_argument("--n", type=int, default=600, help="synthetic patients")
    ap.add_argument("--speed-n", type=int, default=1500, help="patients for the cached-epoch ratio")
    a = ap.parse_args(argv)

    import numpy as np
    import torch

    from multimodal import DiagnosisModel
    from multimodal.config import load_config
    from multimodal.data.records import load_records
    from multimodal.inference.forward import amp_dtype, resolve_device
    from multimodal.synth import config_path, make_cohort

    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu to try the script here", file=sys.stderr)
        return 2
    a.out.mkdir(parents=True, exist_ok=True)
    cfg = config_path()
    res: dict = {"device": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
                 "torch": torch.__version__, "n": a.n, "seconds": {}}
    work = Path(tempfile.mkdtemp(prefix="mmdx-gpu-"))
    paths = make_cohort(work / "cohort", n=a.n, seed=0)

    with timed(res["seconds"], "cpu_fp32"):
        cpu = train(cfg, paths, "cpu")
    with timed(res["seconds"], f"{a.device}_amp"):
        gpu = train(cfg, paths, a.device, cpu.prep)  # train.amp defaults to on: bf16 where supported
    res["amp_dtype"] = str(amp_dtype(resolve_device(a.device)))
    if a.device.startswith("cuda"):
        with mock.patch("torch.cuda.is_bf16_supported", return_value=False), \
                timed(res["seconds"], f"{a.device}_fp16_scaled"):
            fp16 = train(cfg, paths, a.device, cpu.prep)
    else:
        fp16 = None
    res["val_auroc"] = {"cpu_fp32": auroc(cpu, paths["val"]), "amp": auroc(gpu, paths["val"]),
                        "fp16_scaled": auroc(fp16, paths["val"]) if fp16 is not None else None}

    gpu.save(work / "gpu-model")  # trained on the GPU, loaded on the CPU
    on_cpu = DiagnosisModel.load(work / "gpu-model", device="cpu")
    p_gpu, p_cpu = gpu.predict(paths["test"]), on_cpu.predict(paths["test"])
    cols = [c for c in p_gpu.columns if c.startswith("prob_")]
    res["moved_model"] = {"rows": len(p_cpu), "same_ids": bool((p_gpu["id"] == p_cpu["id"]).all()),
                          "max_abs_prob_diff": float(np.abs(p_gpu[cols].to_numpy() - p_cpu[cols].to_numpy()).max())}

    few = on_cpu.records(paths["test"]).subset(range(8))  # explain 8 patients, not the whole split
    with timed(res["seconds"], "explain_8"):
        ex_gpu = gpu.explain(few, n_steps=16, ablation=False)
    ex_cpu = on_cpu.explain(few, n_steps=16, ablation=False)
    res["explain"] = {"finite": bool(all(np.isfinite(list(e.modality_share.values())).all() for e in ex_gpu)),
                      "top_modality_agrees": float(np.mean([g == c for g, c in zip(top_modality(ex_gpu),
                                                                                     top_modality(ex_cpu))]))}

    from bench_measure import cached_epoch_speed  # the harness's own measurement, on synthetic images here

    speed = {"modalities": "image,tabular", "image.encoder": "tf_efficientnet_lite0", "image.size": 160,
             "image.max_images": 1, "train.device": a.device}  # HAM10000's shape: one image, tabular
    big = make_cohort(work / "speed", n=a.speed_n, seed=1, image_size=160)
    with timed(res["seconds"], "cache_speed"):
        res["cache_speed"] = cached_epoch_speed(cfg, speed, load_records(big["train"], load_config(cfg, speed),
                                                                         labels=True))
    (a.out / "gpu_check.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
