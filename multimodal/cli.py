"""`mmdx` command line: train, cv, predict, export, evaluate, explain, compare, baselines, synth, demo. User mistakes exit 2 with one line."""
from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import logging
import os
import sys
from pathlib import Path

from multimodal.errors import UserError
from multimodal.command_inputs import command_inputs as _inputs  # what each command reads, for the output guard
from multimodal.runtime import tune_malloc


def _train(a) -> None:
    from multimodal import distributed
    from multimodal.api import DiagnosisModel
    from multimodal.config import load_config, parse_overrides
    from multimodal.evaluation.metrics import format_table
    from multimodal.output import claim, guard

    cfg = load_config(a.config, parse_overrides(a.overrides))
    if a.image_root:
        cfg.data.image_root = a.image_root
    inputs = _inputs(a, cfg)
    main = distributed.is_main()  # under torchrun: rank 0 checks, saves and reports; every rank trains
    if main:
        guard(a.out, "model", inputs, a.overwrite)  # before hours of training, not after
    with claim(a.out) if main else contextlib.nullcontext():
        model = DiagnosisModel(cfg).fit(a.records, a.val, progress=not a.quiet)
        if main:
            model.save(a.out, overwrite=a.overwrite, inputs=inputs)
    distributed.barrier()  # the other ranks wait for the model directory
    if not main:
        return
    t = model.metrics["training"]
    on = f"{t['device']}" + (f" x {t['processes']} processes" if t.get("processes", 1) > 1 else "")
    print(f"trained {cfg.name} ({'+'.join(cfg.modalities)}, {cfg.fusion.type} fusion) on {t['n_train']} records "
          f"in {t['train_seconds']:.0f}s on {on}; best epoch " +
          ("/".join(str(r["best_epoch"]) for r in t["members"]) + f" ({len(t['members'])} ensemble members)"
           if "members" in t else str(t["best_epoch"])))
    print("validation:\n" + format_table(model.metrics["validation"]))
    print(f"model saved to {a.out}")


def _cv(a) -> None:
    from multimodal.config import load_config, parse_overrides
    from multimodal.api import DiagnosisModel
    from multimodal.evaluation.cv import cross_validate, format_cv
    from multimodal.output import guard

    cfg = load_config(a.config, parse_overrides(a.overrides))
    if a.image_root:
        cfg.data.image_root = a.image_root
    guard(a.out, "cv", _inputs(a, cfg))  # before the first fold, not after the last
    result = cross_validate(DiagnosisModel(cfg), a.records, folds=a.folds, out=a.out, progress=not a.quiet, n_boot=a.n_boot)
    print(format_cv(result))
    print(f"out-of-fold predictions (one row per record) and metrics written to {a.out}")


def _config(a) -> None:
    if a.doc:
        from multimodal.configdoc import config_reference

        sys.stdout.write(config_reference())
        return
    if not a.config:
        raise UserError("give --doc (the config reference) or --config FILE (check it and print it resolved)")
    from multimodal.config import load_config, parse_overrides

    print(json.dumps(load_config(a.config, parse_overrides(a.overrides)).model_dump(mode="json"), indent=2))


def _load(a, defer_network: bool = False):
    from multimodal.api import DiagnosisModel

    model = DiagnosisModel.load(a.model, device=a.device, onnx=getattr(a, "onnx", None), defer_network=defer_network)
    if a.image_root:
        model.config.data.image_root = a.image_root
    return model


def _predict(a) -> None:
    from multimodal import distributed
    from multimodal.output import guard

    guard(a.out, "file", _inputs(a))  # before the model loads
    shard = distributed.state()
    if shard.world > 1 and a.device is None and not a.onnx:
        a.device = f"cuda:{shard.local_rank}"  # falls back to cpu where there is no GPU
    model = _load(a, defer_network=True)  # built while the first images decode
    s = model.predict_file(a.records, a.out, chunk_rows=a.chunk_rows, resume=a.resume, batch_size=a.batch_size,
                     workers=a.workers, progress=not a.quiet, shard=shard)
    if shard.rank == 0:
        again = f", {s['reused_chunks']} of {s['chunks']} chunks kept from the interrupted run" if s["reused_chunks"] else ""
        print(f"wrote {s['rows']} rows to {a.out} ({s['ok']} ok, {s['errors']} errors){again}")


def _export(a) -> None:
    from multimodal.output import guard

    if not str(a.out).endswith(".onnx"):
        raise UserError(f"--out {a.out}: an export is written as a .onnx file")
    guard(a.out, "file", _inputs(a))
    model = _load(a)
    r = model.export_onnx(a.out, a.records)
    print(f"wrote {r['path']} (inputs {', '.join(r['inputs'])}; ONNX Runtime within {r['max_abs_diff']:.1e} "
          f"of PyTorch on an example batch); use it with mmdx predict --onnx")


def _evaluate(a) -> None:
    from multimodal.evaluation.metrics import format_table
    from multimodal.output import guard, write_json

    targets = ([a.out] if a.out else []) + [Path(a.plots) / n for n in ("roc.png", "reliability.png") if a.plots]
    inputs = _inputs(a)
    if targets:
        guard(targets, "file", inputs)
    model = _load(a, defer_network=True)
    m = model.evaluate(a.records, n_boot=a.n_boot, batch_size=a.batch_size, workers=a.workers, progress=not a.quiet,
                       plots_dir=a.plots)
    print(format_table(m))
    if m.get("against_members"):
        from multimodal.evaluation.stacking import format_against

        print(format_against(m["against_members"]))
    if m["n_errors"]:
        print(f"{m['n_errors']} records could not be scored and are not in these metrics")
    if m["n_unlabelled"]:
        print(f"{m['n_unlabelled']} records have no label and are not in these metrics")
    if a.plots:
        print(f"ROC curves and reliability diagram written to {a.plots}")
    if a.out:
        write_json(m, a.out, inputs)
        print(f"metrics written to {a.out}")
    else:
        print(json.dumps(m["overall"]))


def _explain(a) -> None:
    from multimodal.output import guard

    inputs = _inputs(a)
    guard(a.out, "report", inputs)
    model = _load(a)
    rec = model.records(a.records)
    if a.ids:
        wanted = [i.strip() for part in a.ids for i in part.split(",") if i.strip()]
        ids = rec.df[model.config.data.id].astype(str)
        unknown = sorted(set(wanted) - set(ids))
        if unknown:
            raise UserError(f"{rec.source}: no records with id {', '.join(unknown[:5])}")
        rec = rec.subset(ids.isin(wanted).to_numpy().nonzero()[0])
    target = int(a.target) if a.target and a.target.isdigit() and a.target not in model.classes else a.target
    exps = model.explain(rec, target=target, method=a.method, n_steps=a.n_steps,
                         internal_batch_size=a.internal_batch_size, batch_size=a.batch_size, progress=not a.quiet)
    index = exps.to_html(a.out, inputs=inputs)
    n_err = sum(e.error is not None for e in exps)
    print(f"explained {len(exps)} records ({len(exps) - n_err} ok, {n_err} errors) with {a.method}: {index}")


def _compare(a) -> None:
    from multimodal.evaluation.comparison import compare, format_report
    from multimodal.output import guard, write_json

    inputs = [a.labels, *a.predictions]
    if a.out:
        guard(a.out, "file", inputs)
    names = [n.strip() for part in a.names for n in part.split(",") if n.strip()] if a.names else None
    report = compare(a.predictions, a.labels, label_column=a.label_column, id_column=a.id_column, n_boot=a.n_boot,
                     seed=a.seed, group_column=a.group_column, positive=a.positive, names=names,
                     all_pairs=a.all_pairs)
    print(format_report(report))
    if a.out:
        write_json(report, a.out, inputs)
        print(f"comparison written to {a.out}")


def _baselines(a) -> None:
    from multimodal.config import load_config, parse_overrides
    from multimodal.evaluation.baselines import predict_baselines, write_baselines
    from multimodal.output import guard, staged_dir

    cfg = load_config(a.config, parse_overrides(a.overrides))
    inputs = _inputs(a, cfg)
    guard(a.out, "baselines", inputs)  # before the fits, not after
    weights = None if a.image_weights.lower() == "none" else a.image_weights
    tables, info = predict_baselines(cfg, a.records, a.predict, image_weights=weights, seed=a.seed,
                                     image_root=a.image_root)
    with staged_dir(a.out, "baselines", inputs=inputs) as tmp:
        files = write_baselines(tables, info, tmp)
    print(f"baselines fitted on {info['n_train']} labelled records of {a.records} ({info['n_folds']}-fold "
          f"{'grouped ' if info['grouped'] else ''}CV for every choice), {len(next(iter(tables.values())))} "
          f"records of {a.predict} scored:")
    if "records_without_image_features" in info:
        k = info["records_without_image_features"]
        print(f"  no readable image (image features imputed): {k['train']} training, {k['scored']} scored records")
    for name, f in files.items():
        cv = info["cv_auroc"].get(name)
        print(f"  {f:28s} {name}" + (f"; CV AUROC on the training records {cv:.3f}" if cv is not None else ""))
    print(f"written to {a.out}; e.g. mmdx compare PREDICTIONS.csv {Path(a.out) / files['mean of baselines']} "
          f"--labels {a.predict} --label-column {cfg.label_columns()[0]} --id-column {cfg.data.id}")


def _synth(a) -> None:
    from multimodal.synth import make_cohort

    paths = make_cohort(a.out, n=a.n, seed=a.seed)
    print(f"synthetic cohort of {a.n} patients in {paths['dir']}: " +
          ", ".join(f"{k}={Path(v).name}" for k, v in paths.items() if k in ("train", "val", "test", "truth")))


def _demo(a) -> None:
    from multimodal.demo import run_demo

    run_demo(a.out, n=a.n, epochs=a.epochs, seed=a.seed)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmdx", description="Multimodal diagnosis: images + clinical text + tabular.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="debug logging (before the command)")
    sub = p.add_subparsers(dest="cmd", required=True)

    cv = sub.add_parser("cv", help="grouped, stratified k-fold cross-validation with out-of-fold predictions")
    cv.add_argument("--config", required=True)
    cv.add_argument("--records", required=True)
    cv.add_argument("--folds", type=int, default=5)
    cv.add_argument("--out", required=True, help="folder for predictions.csv (out-of-fold) and metrics.json")
    cv.add_argument("--image-root", default=None)
    cv.add_argument("--n-boot", type=int, default=1000)
    cv.add_argument("--quiet", action="store_true")
    cv.add_argument("overrides", nargs="*", help="key=value config overrides")
    cv.set_defaults(fn=_cv)

    cf = sub.add_parser("config", help="the config reference (--doc), or check a config and print it resolved")
    cf.add_argument("--doc", action="store_true", help="print docs/config.md, generated from the validated models")
    cf.add_argument("--config", default=None)
    cf.add_argument("overrides", nargs="*", help="key=value config overrides")
    cf.set_defaults(fn=_config)

    def common(sp, model=True):
        if model:
            sp.add_argument("--model", required=True, help="model directory written by `mmdx train`")
            sp.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
        sp.add_argument("--records", required=True, help="CSV or Parquet, one row per patient")
        sp.add_argument("--image-root", default=None, help="folder relative image paths resolve against")
        sp.add_argument("--batch-size", type=int, default=64)
        sp.add_argument("--workers", type=int, default=None,
                        help="DataLoader processes decoding records (default: none on 2 cores, else up to 4 "
                             "while 2 cores stay for the model)")
        sp.add_argument("--quiet", action="store_true", help="no progress: only warnings, errors and the summary")

    t = sub.add_parser("train", help="train a model and write its directory")
    t.add_argument("--config", required=True)
    t.add_argument("--records", required=True)
    t.add_argument("--val", default=None, help="validation records (default: a stratified hold-out)")
    t.add_argument("--out", required=True, help="model directory to write (a new or empty folder)")
    t.add_argument("--overwrite", action="store_true", help="replace an earlier model directory at --out")
    t.add_argument("--image-root", default=None)
    t.add_argument("--quiet", action="store_true")
    t.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.epochs=5 modalities=image,text")
    t.set_defaults(fn=_train)

    pr = sub.add_parser("predict", help="batch predictions, one output row per input row")
    common(pr)
    pr.add_argument("--out", required=True, help="predictions .csv or .parquet")
    pr.add_argument("--onnx", default=None, help="run the forward pass in ONNX Runtime from a file mmdx export wrote")
    pr.add_argument("--resume", action="store_true",
                    help="continue an interrupted run on the same records, model and --out")
    pr.add_argument("--chunk-rows", type=int, default=10_000,
                    help="records read, predicted and saved per step (memory and resume granularity)")
    pr.set_defaults(fn=_predict)

    xp = sub.add_parser("export", help="write the network as ONNX, for a faster CPU forward pass (predict --onnx)")
    common(xp)
    xp.add_argument("--out", required=True, help="the .onnx file to write (beside the model directory, not in it)")
    xp.set_defaults(fn=_export)

    ev = sub.add_parser("evaluate", help="AUROC/AUPRC/accuracy/F1/ECE with 95%% bootstrap CIs, and plots")
    common(ev)
    ev.add_argument("--out", default=None, help="write metrics JSON here")
    ev.add_argument("--n-boot", type=int, default=1000)
    ev.add_argument("--plots", default=None, help="folder for roc.png and reliability.png")
    ev.set_defaults(fn=_evaluate)

    ex = sub.add_parser("explain", help="per-patient attributions as self-contained HTML reports")
    common(ex)
    ex.set_defaults(batch_size=8)
    ex.add_argument("--out", required=True, help="report folder (index.html, one page per patient, JSON)")
    ex.add_argument("--ids", nargs="*", default=None, help="only these patient ids (space or comma separated)")
    ex.add_argument("--method", choices=["ig", "gradcam"], default="ig",
                    help="ig: joint Integrated Gradients; gradcam: fast Grad-CAM image maps")
    ex.add_argument("--target", default=None, help="class to explain (default: positive / predicted class)")
    ex.add_argument("--n-steps", type=int, default=32, help="Integrated Gradients steps")
    ex.add_argument("--internal-batch-size", type=int, default=None,
                    help="cap on (step x patient) rows per forward/backward pass, to bound memory")
    ex.set_defaults(fn=_explain)

    co = sub.add_parser("compare", help="AUROCs of prediction files with paired bootstrap differences")
    co.add_argument("predictions", nargs="+", help="files written by `mmdx predict`; the first is the reference")
    co.add_argument("--labels", required=True, help="records file with the true labels")
    co.add_argument("--label-column", default="label")
    co.add_argument("--id-column", default="patient_id")
    co.add_argument("--group-column", default=None, help="resample these groups (patients) instead of rows")
    co.add_argument("--positive", default=None,
                    help="class scored one-vs-rest (default: the last class if binary, else macro over classes)")
    co.add_argument("--names", nargs="+", default=None, help="one name per prediction file (after the files)")
    co.add_argument("--n-boot", type=int, default=2000)
    co.add_argument("--seed", type=int, default=0)
    co.add_argument("--all-pairs", action="store_true", help="every pair, not only each file vs the first")
    co.add_argument("--out", default=None, help="write the comparison as JSON here")
    co.set_defaults(fn=_compare)

    bl = sub.add_parser("baselines", help="what a researcher fits instead (scikit-learn per modality, their mean, "
                                          "an LR stack), as prediction files for `mmdx compare`")
    bl.add_argument("--config", required=True, help="the config whose label, modalities and columns they use")
    bl.add_argument("--records", required=True, help="training records (labelled)")
    bl.add_argument("--predict", required=True, help="records to score, e.g. the test set the model is scored on")
    bl.add_argument("--out", required=True, help="folder for one predictions CSV per baseline and baselines.json")
    bl.add_argument("--image-root", default=None)
    bl.add_argument("--image-weights", default="efficientnet_lite0",
                    help="frozen EfficientNet-Lite0 weights for the image baseline: packaged name or local file; "
                         "none: no image baseline")
    bl.add_argument("--seed", type=int, default=0)
    bl.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. modalities=text,tabular")
    bl.set_defaults(fn=_baselines)

    sy = sub.add_parser("synth", help="write the synthetic demo cohort")
    sy.add_argument("--out", required=True)
    sy.add_argument("--n", type=int, default=600)
    sy.add_argument("--seed", type=int, default=0)
    sy.set_defaults(fn=_synth)

    de = sub.add_parser("demo", help="synth → train fusion + single-modality models → evaluate → predict")
    de.add_argument("--out", default="mmdx-demo")
    de.add_argument("--n", type=int, default=600)
    de.add_argument("--epochs", type=int, default=None, help="override the config's epochs")
    de.add_argument("--seed", type=int, default=0)
    de.set_defaults(fn=_demo)
    return p


class _Format(logging.Formatter):
    """`mmdx: message` for progress and summaries, `mmdx: warning: message` for what needs a look."""

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        return f"mmdx: {level}{record.getMessage()}"


def _logging(quiet: bool, verbose: int) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(_Format())
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logging.getLogger("mmdx").setLevel(level)


def default_workers() -> int:
    """Decoding workers only where cores are to spare: on 2 cores a worker competes with the forward
    pass for the same cores (measured in BENCHMARKS.md, throughput)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if cores <= 2 else min(4, cores - 2)


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tune_malloc()
    args = build_parser().parse_args(argv)
    if getattr(args, "workers", 0) is None:
        args.workers = default_workers()
    _logging(getattr(args, "quiet", False), args.verbose)
    try:
        args.fn(args)
    except UserError as e:
        print(f"mmdx: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mmdx: interrupted", file=sys.stderr)
        return 130
    return 0


def entry() -> None:
    """The `mmdx` command: main(), then an exit without the interpreter's teardown of every module,
    which costs seconds once torch._dynamo is loaded (timm imports torchvision, which imports it:
    2.2 s of a 30 s predict, measured on 2 cores). The atexit handlers still run (logging,
    multiprocessing, temporary files), and the streams are flushed; only that teardown is skipped.
    An exception still ends the process the usual way, with its traceback."""
    code = main()
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    if run_exit_handlers is None:  # not CPython: the usual exit
        sys.exit(code)
    run_exit_handlers()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
