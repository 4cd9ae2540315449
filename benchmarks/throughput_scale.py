"""The parts of benchmarks/throughput.py that scale the job out or up, against issue #30's bars: the
fixed start-up costs, torchrun's sharding at one and at several times the validation records, and the
shipped HAM10000 config. Run through throughput.py, which saves and reports everything together."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pandas as pd

from throughput import MMDX, _model, _timed, bare_cnn, bare_onnx_rate, collated, timed_rate


def repeated(records: Path, copies: int, out: Path) -> Path:
    """`records` `copies` times over, each copy's ids made new: a larger job over the same images."""
    df = pd.read_csv(records, dtype=str)
    big = pd.concat([df.assign(patient_id=df["patient_id"] + f"~{k}") for k in range(copies)], ignore_index=True)
    big.to_csv(out, index=False)
    return out


def sharding(model_dir: Path, onnx_path: Path, records: Path, work: Path, threads: int, copies: int = 1) -> dict:
    """torchrun, 2 ranks x 1 thread, and Ray Data with 2 one-thread actors, against one process with 1
    thread (the issue's bar) and with `threads`; `--onnx`, 64-row chunks (every rank gets as many chunks as
    the other, give or take one)."""
    src = records if copies == 1 else repeated(records, copies, work / f"records_x{copies}.csv")
    base = ["predict", "--model", str(model_dir), "--records", str(src), "--image-root", str(records.parent),
            "--quiet", "--chunk-rows", "64", "--onnx", str(onnx_path)]
    one, one_1t, two = (work / f"shard_{name}_x{copies}.csv" for name in ("one", "one_1t", "two"))
    out = {"rows": sum(1 for _ in open(src)) - 1,
           "one_process_seconds": _timed([str(MMDX), *base, "--out", str(one)], threads)[0],
           "one_process_1_thread_seconds": _timed([str(MMDX), *base, "--out", str(one_1t)], 1)[0],
           "two_process_seconds": _timed([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                          "--nproc_per_node=2", str(MMDX), *base, "--out", str(two)], 1)[0]}
    out["sharded_identical"] = two.read_bytes() == one_1t.read_bytes()
    ray_out = work / f"shard_ray_x{copies}.parquet"
    out["ray_2_workers_seconds"] = _timed([str(MMDX), *base, "--engine", "ray", "--ray-workers", "2",
                                           "--out", str(ray_out)], 1)[0]
    got, want = pd.read_parquet(ray_out), pd.read_csv(one_1t, dtype={"id": str})
    out["ray_same_ids"] = got["id"].astype(str).tolist() == want["id"].tolist()
    out["ray_max_abs_diff"] = float((got["prob_1"] - want["prob_1"]).abs().max())
    out["errors"] = int((want["status"] == "error").sum())
    ray_out.unlink()
    for f in (one, one_1t, two):
        f.unlink()
    if copies > 1:
        src.unlink()
    return out


def startup(threads: int) -> dict:
    """The fixed costs every end-to-end row pays once: a Python process that imports torch, and
    torchrun's launcher with two ranks that import torch and join a gloo group, doing nothing else."""
    noop = ("import torch, torch.distributed as d\nd.init_process_group('gloo')\nd.barrier()\n"
            "d.destroy_process_group()")
    script = Path(os.environ.get("TMPDIR", "/tmp")) / "mmdx_torchrun_noop.py"
    script.write_text(noop)
    out = {"import_torch_seconds": _timed([sys.executable, "-c", "import torch"], threads)[0],
           "torchrun_noop_seconds": _timed([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                            "--nproc_per_node=2", str(script)], 1)[0]}
    script.unlink()
    return out


def recommended(ham: Path, work: Path, threads: int, n_train: int = 300) -> dict:
    """`configs/ham10000.yaml` as shipped (EfficientNet-Lite0 at 160 px, every photograph and its mirror,
    three joint, three image and three tabular networks), trained for one epoch on its first `n_train`
    training lesions (speed does not depend on how well it learnt), against the bare CNN doing the same
    work: every CNN pass predict makes, i.e. each image network over every view it scores."""
    import torch

    from multimodal import DiagnosisModel
    from multimodal.model.build import member_plan

    torch.set_num_threads(threads)
    records = work / "recommended_train.csv"
    pd.read_csv(ham / "records_train.csv", dtype=str).iloc[:n_train].to_csv(records, index=False)
    model_dir = _model(work / "recommended", records, {"train.epochs": 1, "data.image_root": str(ham)})
    model = DiagnosisModel.load(model_dir)
    model.config.data.image_root = str(ham)
    onnx_path = work / "recommended.onnx"
    model.export_onnx(onnx_path, ham / "records_val.csv")
    batches, n_views, _ = collated(model, model.records(ham / "records_val.csv"))
    passes = sum("image" in mods for mods, _ in member_plan(model.config))
    plain, _ = bare_cnn(model)
    present = [b["image"][b["image_mask"]].contiguous() for b in batches]
    eager, _ = timed_rate(plain, present, n_views)
    cnn_onnx = bare_onnx_rate(plain, present, work / "recommended_cnn.onnx", threads, n_views)
    base = [str(MMDX), "predict", "--model", str(model_dir), "--records", str(ham / "records_val.csv"),
            "--image-root", str(ham), "--quiet"]
    e2e = _timed(base + ["--out", str(work / "rec_eager.csv")], threads)[0]
    e2e_onnx = _timed(base + ["--out", str(work / "rec_onnx.csv"), "--onnx", str(onnx_path)], threads)[0]
    return {"networks": len(member_plan(model.config)), "cnn_passes_per_view": passes, "n_views": n_views,
            "eager_forward_seconds": passes * n_views / eager, "onnx_forward_seconds": passes * n_views / cnn_onnx,
            "cli_eager_seconds": e2e, "cli_onnx_seconds": e2e_onnx}
