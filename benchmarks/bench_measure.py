"""The real-data benchmark's side measurements (real_data.py; cached_tail.py and gpu_check.py reuse
cached_epoch_speed): a cached epoch against an end-to-end one, `mmdx predict` throughput against the
in-process and pure forward passes, and the machine and library versions the report names.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd


def cached_epoch_speed(cfg_path: Path, overrides: dict, train) -> dict:
    """The two-stage path's claim, measured side by side: the dataset's image encoder frozen up to its
    last stage, one epoch over cached activations (4 cached flips) against one end-to-end epoch
    (pixels through the frozen layers every step, with augmentation). Filling the cache is not part
    of an epoch: it happens once, and is reported apart."""
    from multimodal import DiagnosisModel

    common = overrides | {"image.freeze": 1, "train.epochs": 1, "train.min_epochs": 1, "train.calibrate": False,
                          "train.ensemble": 1, "image.train_views": "first",
                          "image.predict_views": "first"}  # one network; the views the cache holds
    rates, fill = {}, time.perf_counter()
    for name, ov in (("cached", {"image.cache_features": True, "image.cache_views": 4, "image.augment": None}),
                     ("end_to_end", {"image.cache_features": False, "image.cache_views": 1})):
        t = time.perf_counter()
        m = DiagnosisModel.from_config(cfg_path, **(common | ov)).fit(train, None, progress=False)
        rates[name] = m.metrics["training"]["history"][0]["patients_per_s"]
        if name == "cached":
            fill = time.perf_counter() - t - m.metrics["training"]["train_seconds"]
    return {"cached_patients_per_s": rates["cached"], "end_to_end_patients_per_s": rates["end_to_end"],
            "speedup": rates["cached"] / rates["end_to_end"], "cache_fill_seconds": fill}


def throughput(model, test, records_csv: Path, work: Path, threads: int) -> dict:
    """`mmdx predict` end to end (process start, model load, decoding, writing) vs in-process predict vs
    the pure forward pass on the same, already collated batches."""
    import torch

    from multimodal.data.batches import RecordDataset, to_device
    from multimodal.data.batches import make_loader

    model_dir = model.model_dir or model.save(work / "model", overwrite=True)
    mmdx = Path(sys.executable).with_name("mmdx")
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    t = time.perf_counter()
    subprocess.run([str(mmdx), "predict", "--model", str(model_dir), "--records", str(records_csv),
                    "--out", str(work / "predictions.csv"), "--quiet"], check=True, env=env, capture_output=True)
    cli_s = time.perf_counter() - t
    n_cli = len(pd.read_csv(work / "predictions.csv"))
    t = time.perf_counter()
    model.predict(test)
    api_s = time.perf_counter() - t
    cfg = model.config
    dl = make_loader(RecordDataset(test, model.prep, cfg.modalities, cfg), cfg, model.prep, False, model.device, 64)
    batches = [to_device(b, model.device) for b in dl]
    model.net.eval()
    with torch.no_grad():
        model.net(batches[0])  # warm-up
        t = time.perf_counter()
        for b in batches:
            model.net(b)
        fwd_s = time.perf_counter() - t
    n = len(test)
    return {"cli_patients_per_s": n_cli / cli_s, "cli_seconds": cli_s, "n_cli": n_cli,
            "api_patients_per_s": n / api_s, "forward_patients_per_s": n / fwd_s, "forward_seconds": fwd_s,
            "forward_share_of_api": fwd_s / api_s, "n": n}


def environment(threads: int, malloc_tuned: bool = False) -> dict:
    """Python, library versions, CPU, cores, threads and GPU, as the report names them."""
    import captum
    import sklearn
    import timm
    import torch
    import transformers

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else "?"
    return {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "transformers": transformers.__version__, "captum": captum.__version__, "scikit-learn": sklearn.__version__,
            "cpu": cpu, "cores": os.cpu_count(), "torch_threads": threads,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "platform": platform.platform(),
            "malloc_tuned": malloc_tuned}
