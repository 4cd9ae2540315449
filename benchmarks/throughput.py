"""Batch-prediction throughput, every figure measured side by side in one run → the `throughput`
section of BENCHMARKS.md (the rest of that file is real_data.py's and is left as it is).

    python benchmarks/throughput.py [--threads 2] [--data ../shared/data] [--rows 10000,100000]

At equal work to the peer (issue #10): ResNet-18 at 128 px, image + tabular, every image of each
lesion (image.max_images 4), HAM10000 validation. The model trains for one epoch the first time
(the figures are about speed; AUROC is only checked to be unchanged between forward passes) and is
kept under benchmarks/results/work/throughput. What is compared:

- the pure forward pass on already collated batches: eager fp32 (what a user writes), channels_last,
  and ONNX Runtime (`mmdx export`);
- decoding + collation alone; in-process `predict`; a naive loop calling predict once per record;
- `mmdx predict` end to end, process start and model load included, with each forward pass and with
  one DataLoader worker; `mmdx --help`;
- max RSS of `mmdx predict` at 10k and 100k records (rows repeated; a tabular-only model so that the
  run measures the job's memory, not decoding time);
- torchrun with 2 processes (1 thread each) and Ray Data with 2 actors against 1 process, at the
  records as they are and 4x over; the shipped HAM10000 config; the fixed start costs
  (benchmarks/throughput_scale.py), and a table of issue #30's bars.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

EQUAL_WORK = {"modalities": "image,tabular", "image.encoder": "resnet18", "image.pretrained": None,
              "image.size": 128, "image.max_images": 4, "image.token_grid": 2, "train.epochs": 1,
              "train.min_epochs": 1, "train.batch_size": 64, "train.ensemble": 1, "fusion.strategy": "joint",
              "image.predict_flips": 1}
MMDX = Path(sys.executable).with_name("mmdx")


def _timed(argv: list[str], threads: int, extra_env=None) -> tuple[float, int]:
    """Wall seconds and the max RSS (MB) of one child process (run through a fresh wrapper so that
    RUSAGE_CHILDREN holds this command alone)."""
    env = os.environ | {"OMP_NUM_THREADS": str(threads)} | (extra_env or {})
    wrapper = ("import resource, subprocess, sys, time\nt = time.perf_counter()\n"
               "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
               "dt = time.perf_counter() - t\n"
               "sys.stderr.write(r.stderr[-3000:])\n"
               "print(dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)")
    out = subprocess.run([sys.executable, "-c", wrapper, *argv], env=env, capture_output=True, text=True)
    dt, rss, rc = out.stdout.split()
    if rc != "0":
        raise RuntimeError(f"{' '.join(argv[:3])} failed: {out.stderr[-1500:]}")
    return float(dt), int(rss) // 1024


def _model(work: Path, records: Path, overrides: dict) -> Path:
    from multimodal import DiagnosisModel

    if not (work / "checksums.json").exists():
        DiagnosisModel.from_config(ROOT / "configs" / "ham10000.yaml", **overrides).fit(
            records, None, progress=False).save(work, overwrite=True)
    return work


def _auroc(pred_csv: Path, labels: pd.DataFrame) -> float:
    from sklearn.metrics import roc_auc_score

    p = pd.read_csv(pred_csv, dtype={"id": str})
    ok = p["status"] == "ok"
    return float(roc_auc_score(labels["label_malignant"].astype(int)[ok], p["prob_1"][ok]))


def collated(model, rec) -> tuple[list, int, float]:
    """The batches predict would build (every view and mirror the config scores), the number of
    images in them, and the seconds decoding and collating took."""
    from multimodal.data.batches import RecordDataset, make_loader

    cfg, t = model.config, time.perf_counter()
    batches = list(make_loader(RecordDataset(rec, model.prep, cfg.modalities, cfg), cfg, model.prep, False,
                               model.device, 64))
    return batches, int(sum(b["image_mask"].sum() for b in batches)), time.perf_counter() - t


def bare_cnn(model):
    """The plain timm CNN of the model's (first) image network, NCHW fp32: what a user would write."""
    import timm

    from multimodal.model.network import members

    cfg, enc = model.config, next(n for n in members(model.net) if "image" in n.encoders).encoders["image"]
    plain = timm.create_model(cfg.image.encoder, pretrained=False, num_classes=0, global_pool="",
                              in_chans=cfg.image.in_chans).eval()
    plain.load_state_dict({k: v.contiguous() for k, v in enc.backbone.state_dict().items()})
    return plain, enc


ROUNDS = 3  # each rate is the median of this many passes: one pass on 2 shared cores varies by ±20%


def timed_rate(fn, xs: list, n_img: int, rounds: int = ROUNDS) -> tuple[float, list]:
    """images/s of fn over xs, the median of `rounds` passes after one warm-up call, and its outputs."""
    import torch

    rates = []
    with torch.inference_mode():
        fn(xs[0])
        for _ in range(rounds):
            t = time.perf_counter()
            ys = [fn(x) for x in xs]
            rates.append(n_img / (time.perf_counter() - t))
    return float(np.median(rates)), ys


def forward_rates(model, records: Path, threads: int, onnx_path: Path) -> dict:
    import torch

    from multimodal.model.export import OnnxNetwork
    from multimodal.model.network import for_inference

    torch.set_num_threads(threads)
    rec = model.records(records)
    batches, n_img, decode_s = collated(model, rec)
    net = for_inference(model.net)  # what predict runs
    out = {"n_records": len(rec), "n_images": n_img, "decode_images_per_s": n_img / decode_s}

    def rate(fn, xs):
        return timed_rate(fn, xs, n_img)

    def run(fn, name):  # a network over the collated batches → P(positive) per record
        out[f"{name}_images_per_s"], probs = rate(lambda b: torch.sigmoid(fn(b).float()[:, 0]), batches)
        return torch.cat(probs).numpy()

    # the reference: what a user writes, the bare timm CNN (NCHW, fp32) over the same batches' present images
    plain, enc = bare_cnn(model)
    present = [b["image"][b["image_mask"]].contiguous() for b in batches]
    out["forward_eager_images_per_s"], ref = rate(plain, present)
    cl = plain.to(memory_format=torch.channels_last)
    out["forward_channels_last_images_per_s"], _ = rate(
        lambda x: cl(x.contiguous(memory_format=torch.channels_last)), present)
    with torch.inference_mode():
        mine = [enc.backbone.forward_features(x.contiguous(memory_format=torch.channels_last)) for x in present]
    out["max_abs_diff_channels_last"] = float(max((a - b).abs().max() for a, b in zip(ref, mine)))
    out["forward_onnxruntime_cnn_images_per_s"] = bare_onnx_rate(plain, present, onnx_path.with_name("cnn.onnx"),
                                                                 threads, n_img)
    net_probs = run(net, "forward_network")
    ort = run(OnnxNetwork(onnx_path, model, threads), "forward_onnxruntime")
    out["max_abs_diff_onnxruntime"] = float(np.abs(ort - net_probs).max())
    t = time.perf_counter()
    model.predict(rec)
    out["api_predict_images_per_s"] = n_img / (time.perf_counter() - t)
    model.use_onnx(onnx_path, threads)
    t = time.perf_counter()
    model.predict(rec)
    out["api_predict_onnx_images_per_s"] = n_img / (time.perf_counter() - t)
    model.engine = None
    sub = rec.subset(np.arange(100))
    n_sub = int(sum(len([p for p in str(c).split(";") if p]) for c in sub.df["image_path"]))
    t = time.perf_counter()
    for i in range(len(sub)):
        model.predict(sub.subset([i]))
    out["naive_loop_images_per_s"] = n_sub / (time.perf_counter() - t)
    return out


def bare_onnx_rate(cnn, present: list, path: Path, threads: int, n_img: int) -> float:
    """images/s of ONNX Runtime running the bare CNN (exported here, batch axis free) over the same
    present images: the reference for `predict --onnx`, as the eager CNN is for `predict`."""
    import onnxruntime as ort
    import torch

    torch.onnx.export(cnn, (present[0],), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, opset_version=17)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return timed_rate(lambda x: session.run(None, {"x": x}), [x.numpy() for x in present], n_img)[0]


def cli_rates(model_dir: Path, onnx_path: Path, records: Path, labels: pd.DataFrame, n_img: int, work: Path,
              threads: int) -> dict:
    """Each variant run ROUNDS times, the variants interleaved, so that a slow spell of the machine
    falls on all of them; the median run of each counts."""
    out, seconds = {}, {}
    base = [str(MMDX), "predict", "--model", str(model_dir), "--records", str(records), "--quiet"]
    variants = (("eager", [], None), ("eager_1_worker", ["--workers", "1"], None),
                ("eager_default_malloc", [], {"MMDX_MALLOC": "default"}),
                ("onnx", ["--onnx", str(onnx_path)], None),
                ("onnx_1_worker", ["--onnx", str(onnx_path), "--workers", "1"], None))
    for _ in range(ROUNDS):
        for name, extra, env in variants:
            seconds.setdefault(name, []).append(_timed(base + ["--out", str(work / f"pred_{name}.csv")] + extra,
                                                       threads, env)[0])
    for name, _, _ in variants:
        dt = float(np.median(seconds[name]))
        out[f"cli_{name}_images_per_s"] = n_img / dt
        out[f"cli_{name}_seconds"] = dt
        out[f"cli_{name}_seconds_all"] = seconds[name]
        out[f"cli_{name}_auroc"] = _auroc(work / f"pred_{name}.csv", labels)
    dt, _ = _timed([str(MMDX), "--help"], threads)
    out["help_seconds"] = dt
    return out


def memory(records: Path, work: Path, rows: list[int], threads: int) -> dict:
    """Max RSS of `mmdx predict` over n repeated rows, with a tabular-only model (no decoding)."""
    model_dir = _model(work / "tabular_model", records, {"modalities": "tabular", "train.epochs": 1})
    df = pd.read_csv(records, dtype=str)
    out = {}
    for n in rows:
        big = pd.concat([df] * (n // len(df) + 1), ignore_index=True).iloc[:n]
        big["patient_id"] = [f"r{i}" for i in range(n)]
        src = work / f"rows_{n}.csv"
        big.to_csv(src, index=False)
        dt, rss = _timed([str(MMDX), "predict", "--model", str(model_dir), "--records", str(src), "--out",
                          str(work / f"rows_{n}_pred.csv"), "--quiet"], threads)
        assert len(pd.read_csv(work / f"rows_{n}_pred.csv")) == n
        out[str(n)] = {"max_rss_mb": rss, "seconds": dt}
        src.unlink()
    return out


def markdown(r: dict) -> str:
    f, c, m = r["forward"], r["cli"], r["memory"]
    eager = f["forward_eager_images_per_s"]
    rows = [("pure forward, plain timm CNN, eager fp32 NCHW (what a user writes; the reference)",
             f["forward_eager_images_per_s"]),
            ("pure forward, the same CNN channels_last", f["forward_channels_last_images_per_s"]),
            ("pure forward, the mmdx network (CNN channels_last + fusion), as predict runs it",
             f["forward_network_images_per_s"]),
            ("pure forward, ONNX Runtime, the bare CNN (the reference for `--onnx`)",
             f["forward_onnxruntime_cnn_images_per_s"]),
            ("pure forward, ONNX Runtime, the mmdx network (`mmdx export`)", f["forward_onnxruntime_images_per_s"]),
            ("decode + collate only", f["decode_images_per_s"]),
            ("in-process `predict`", f["api_predict_images_per_s"]),
            ("in-process `predict`, ONNX Runtime", f["api_predict_onnx_images_per_s"]),
            ("naive loop: `predict` once per record (100 records)", f["naive_loop_images_per_s"]),
            ("`mmdx predict` end to end", c["cli_eager_images_per_s"]),
            ("`mmdx predict --workers 1` end to end", c["cli_eager_1_worker_images_per_s"]),
            ("`mmdx predict` end to end, glibc's default malloc settings (`MMDX_MALLOC=default`)",
             c["cli_eager_default_malloc_images_per_s"]),
            ("`mmdx predict --onnx` end to end", c["cli_onnx_images_per_s"]),
            ("`mmdx predict --onnx --workers 1` end to end", c["cli_onnx_1_worker_images_per_s"])]
    lines = ["## Batch prediction throughput", "",
             f"Generated by `benchmarks/throughput.py` on {r['date']} ({r['seconds'] / 60:.1f} min), "
             f"{r['threads']} torch threads, {r['cores']} cores. ResNet-18, 128 px, image + tabular, every image of "
             f"each lesion: HAM10000 validation, {f['n_records']} lesions, {f['n_images']} images. *End to end* "
             f"includes process start, model load, decoding and writing the file. Each rate is the median of "
             f"{r.get('rounds', 1)} runs (the end-to-end variants interleaved). `mmdx` keeps freed memory for "
             "reuse (`multimodal/runtime.py`); the pure-forward and in-process rows run in this script's own "
             "process, with glibc's default settings, as a user's script would. `mmdx predict` builds the "
             "network while one worker decodes the first batches (`inference.start_early`), runs a copy of it "
             "with BatchNorm folded into the convolutions (`encoders/fold.py`), and exits without "
             "the interpreter's teardown of every module (`cli.entry`).", "",
             "| path | images/s | × eager forward |", "|---|---|---|"]
    lines += [f"| {name} | {v:.0f} | {v / eager:.2f} |" for name, v in rows]
    lines += ["", f"- Outputs: the network's channels_last CNN features within {f['max_abs_diff_channels_last']:.1e} "
              f"of the plain NCHW CNN's; ONNX Runtime probabilities within {f['max_abs_diff_onnxruntime']:.1e} of "
              "the network's. AUROC end to end: eager "
              f"{c['cli_eager_auroc']:.4f}, ONNX {c['cli_onnx_auroc']:.4f} (difference "
              f"{c['cli_onnx_auroc'] - c['cli_eager_auroc']:+.4f}).",
              f"- `mmdx --help`: {c['help_seconds']:.2f} s (process start included).",
              *[f"- torchrun, 2 processes × 1 thread, `--onnx`, {v['rows']:,} rows: {v['two_process_seconds']:.1f} s "
                f"against {v['one_process_1_thread_seconds']:.1f} s for 1 process × 1 thread and "
                f"{v['one_process_seconds']:.1f} s for 1 process × 2 threads; output byte-identical to the "
                f"1-thread process's: {'yes' if v['sharded_identical'] else 'NO'}." for v in r["sharding"].values()],
              "- Max RSS of `mmdx predict` (tabular-only model, rows repeated): " +
              ", ".join(f"{int(n):,} rows {v['max_rss_mb']} MB ({v['seconds']:.0f} s)" for n, v in m.items()) +
              (f"; growth {list(m.values())[-1]['max_rss_mb'] - list(m.values())[0]['max_rss_mb']} MB." if len(m) > 1
               else "."), ""]
    return "\n".join(lines + bars(r))


def bars(r: dict) -> list[str]:
    """Issue #30's ratios, each against its bar, and the fixed costs that bound them on a short job."""
    f, c, st, rc = r["forward"], r["cli"], r["startup"], r["recommended"]
    onnx_ratio = c["cli_onnx_images_per_s"] / f["forward_onnxruntime_cnn_images_per_s"]
    rows = [("`mmdx predict` ÷ eager forward (ResNet-18)", c["cli_eager_images_per_s"] / f["forward_eager_images_per_s"],
             "≥ 0.8"),
            ("`mmdx predict --onnx` ÷ ONNX Runtime forward of the bare CNN (ResNet-18)", onnx_ratio, "≥ 0.8"),
            *[(f"the same, {v['rows']:,} rows (the records {k}× over, 64-row chunks)",
               int(k) * f["n_images"] / f["forward_onnxruntime_cnn_images_per_s"] / v["one_process_seconds"], "")
              for k, v in r["sharding"].items() if k != "1"],
            ("`mmdx predict --onnx` ÷ `mmdx predict` (ResNet-18)",
             c["cli_onnx_images_per_s"] / c["cli_eager_images_per_s"], "> 1"),
            ("recommended config: `mmdx predict` ÷ eager forward", rc["eager_forward_seconds"] / rc["cli_eager_seconds"],
             "≥ 0.8"),
            ("recommended config: `mmdx predict --onnx` ÷ ONNX Runtime forward",
             rc["onnx_forward_seconds"] / rc["cli_onnx_seconds"], "≥ 0.8"),
            *[(f"torchrun 2 × 1 thread ÷ 1 process × 1 thread (wall time), {v['rows']:,} rows",
               v["two_process_seconds"] / v["one_process_1_thread_seconds"], "≤ 0.6") for v in r["sharding"].values()],
            *[(f"Ray Data 2 actors × 1 thread ÷ 1 process × 1 thread (wall time), {v['rows']:,} rows; same ids and "
               f"order: {'yes' if v['ray_same_ids'] else 'NO'}, probabilities within {v['ray_max_abs_diff']:.1e}",
               v["ray_2_workers_seconds"] / v["one_process_1_thread_seconds"], "") for v in r["sharding"].values()]]
    n = f["n_images"]
    return ["### Against issue #30's bars", "", "| ratio | measured | bar |", "|---|---|---|",
            *[f"| {name} | {v:.2f} | {bar} |" for name, v, bar in rows], "",
            f"- The recommended config (`configs/ham10000.yaml`: {rc['networks']} networks, "
            f"measured {rc.get('date', r['date'])} while another job shared the cores: the ratios only; "
            f"{rc['cnn_passes_per_view']} of them "
            f"CNNs, {rc['n_views']} views with the mirrors): the bare EfficientNet-Lite0 doing the same "
            f"{rc['cnn_passes_per_view'] * rc['n_views']:,} passes takes {rc['eager_forward_seconds']:.0f} s eager and "
            f"{rc['onnx_forward_seconds']:.0f} s in ONNX Runtime; `mmdx predict` {rc['cli_eager_seconds']:.0f} s, "
            f"`--onnx` {rc['cli_onnx_seconds']:.0f} s, end to end.",
            f"- Fixed costs on this machine: `python -c 'import torch'` {st['import_torch_seconds']:.1f} s; torchrun's "
            f"launcher with two ranks that only import torch and join a gloo group {st['torchrun_noop_seconds']:.1f} s. "
            f"ONNX Runtime's forward of the {n:,} images takes {n / f['forward_onnxruntime_cnn_images_per_s']:.1f} s "
            f"on both cores, and decoding them costs {n / f['decode_images_per_s']:.1f} core-seconds more.", ""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rows", default="10000,100000")
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / "results" / "work" / "throughput"))
    ap.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"))
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite the section from benchmarks/results/throughput.json, measuring nothing")
    ap.add_argument("--keep-recommended", action="store_true",
                    help="reuse the saved run's recommended-config rows (they take 15-30 min) instead of measuring")
    a = ap.parse_args(argv)
    saved = ROOT / "benchmarks" / "results" / "throughput.json"
    if a.report_only:
        from bench_report import write_section

        write_section(Path(a.markdown), "throughput", markdown(json.loads(saved.read_text())))
        return 0
    ham = Path(a.data) / "ham10000"
    if not (ham / "records_val.csv").exists():
        print(f"HAM10000 not found under {a.data}", file=sys.stderr)
        return 2
    import torch

    from bench_report import write_section
    from multimodal import DiagnosisModel
    from throughput_scale import recommended, sharding, startup

    torch.set_num_threads(a.threads)
    t0, work = time.perf_counter(), Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = _model(work / "model", ham / "records_train.csv", EQUAL_WORK)
    model = DiagnosisModel.load(model_dir)
    onnx_path = work / "model.onnx"
    model.export_onnx(onnx_path, ham / "records_val.csv")  # seconds; never a stale graph from older code
    val = ham / "records_val.csv"
    forward = forward_rates(model, val, a.threads, onnx_path)
    labels = pd.read_csv(val, dtype=str)
    report = {"date": time.strftime("%Y-%m-%d"), "threads": a.threads, "cores": os.cpu_count(), "rounds": ROUNDS,
              "forward": forward,
              "cli": cli_rates(model_dir, onnx_path, val, labels, forward["n_images"], work, a.threads),
              "memory": memory(ham / "records_train.csv", work, [int(n) for n in a.rows.split(",")], a.threads),
              "startup": startup(a.threads), "recommended": (json.loads(saved.read_text())["recommended"] if a.keep_recommended
                              else recommended(ham, work, a.threads)),
              "sharding": {str(k): sharding(model_dir, onnx_path, val, work, a.threads, k) for k in (1, 4)}}
    report["seconds"] = time.perf_counter() - t0
    saved.write_text(json.dumps(report, indent=1))
    write_section(Path(a.markdown), "throughput", markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
