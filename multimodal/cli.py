"""`mmdx` command line: train, cv, federate, predict, export, evaluate, explain, compare, baselines, synth,
demo. User mistakes exit 2 with one line.

The parser, logging and the exit path; what each command does is in multimodal.commands."""
from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys

from multimodal import commands
from multimodal.errors import UserError
from multimodal.runtime import tune_malloc


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
    cv.set_defaults(fn=commands.cv)

    cf = sub.add_parser("config", help="the config reference (--doc), or check a config and print it resolved")
    cf.add_argument("--doc", action="store_true", help="print docs/config.md, generated from the validated models")
    cf.add_argument("--config", default=None)
    cf.add_argument("overrides", nargs="*", help="key=value config overrides")
    cf.set_defaults(fn=commands.config)

    def common(sp, source=None, records=("--records",), records_help="CSV or Parquet, one row per patient"):
        """`source`: the group --model belongs to (evaluate: it or --predictions); else it is required."""
        (source or sp).add_argument("--model", required=source is None, help="model directory written by `mmdx train`")
        sp.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
        sp.add_argument(*records, dest="records", required=True, help=records_help)
        sp.add_argument("--image-root", default=None,
                        help="folder relative image paths resolve against (itself relative to the current folder)")
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
    t.set_defaults(fn=commands.train)

    fe = sub.add_parser("federate", help="train one model across sites whose records stay apart (Flower, "
                                         "simulated on this machine; pip install 'mmdx[federated]')")
    fe.add_argument("--config", required=True)
    fe.add_argument("--site", action="append", required=True, metavar="NAME=RECORDS",
                    help="one site and its records file (give --site once per site, at least 2)")
    fe.add_argument("--rounds", type=int, default=3, help="federated rounds")
    fe.add_argument("--local-epochs", type=int, default=1, help="epochs each site trains per round")
    fe.add_argument("--strategy", choices=["fedavg", "fedprox"], default="fedavg")
    fe.add_argument("--proximal-mu", type=float, default=0.01, help="--strategy fedprox: the proximal term's weight")
    fe.add_argument("--dp-clip", type=float, default=None,
                    help="clip each site's update to this L2 norm and add Gaussian noise (server-side DP)")
    fe.add_argument("--dp-noise", type=float, default=0.0, help="--dp-clip: noise multiplier")
    fe.add_argument("--out", required=True, help="model directory to write (a new or empty folder)")
    fe.add_argument("--overwrite", action="store_true", help="replace an earlier model directory at --out")
    fe.add_argument("--quiet", action="store_true")
    fe.add_argument("overrides", nargs="*", help="key=value config overrides")
    fe.set_defaults(fn=commands.federate)

    pr = sub.add_parser("predict", help="batch predictions, one output row per input row")
    common(pr)
    pr.add_argument("--out", required=True, help="predictions .csv or .parquet")
    pr.add_argument("--onnx", default=None, help="run the forward pass in ONNX Runtime from a file mmdx export wrote")
    pr.add_argument("--resume", action="store_true",
                    help="continue an interrupted run on the same records, model and --out")
    pr.add_argument("--chunk-rows", type=int, default=10_000,
                    help="records read, predicted and saved per step (memory and resume granularity)")
    pr.add_argument("--engine", choices=["local", "ray"], default="local",
                    help="local: this process (or each torchrun rank); ray: Ray Data actors, on a local Ray "
                         "(127.0.0.1 only) or --ray-address's cluster, into a .parquet --out "
                         "(pip install 'mmdx[ray]')")
    pr.add_argument("--ray-address", default=None,
                    help="--engine ray: an existing cluster, as ray.init takes it (default: start a local one)")
    pr.add_argument("--ray-workers", type=int, default=2,
                    help="--engine ray: actors, each loading the model once and using one core")
    pr.set_defaults(fn=commands.predict)

    xp = sub.add_parser("export", help="write the network as ONNX, for a faster CPU forward pass (predict --onnx)")
    common(xp)
    xp.add_argument("--out", required=True, help="the .onnx file to write (beside the model directory, not in it)")
    xp.set_defaults(fn=commands.export)

    ev = sub.add_parser("evaluate", help="AUROC/AUPRC/accuracy/F1/ECE with 95%% bootstrap CIs, and plots, of a "
                                         "model or of a predictions file")
    scored = ev.add_mutually_exclusive_group(required=True)
    scored.add_argument("--predictions", default=None, metavar="FILE",
                        help="score this predictions file instead of a model: written by mmdx predict, mmdx cv "
                             "(predictions.csv) or mmdx baselines (columns id, prob_<class>...), joined with "
                             "--records on the id; the same metrics, bootstrap and resamples as --model")
    common(ev, scored, ("--records", "--labels"), "records with the true labels (CSV or Parquet)")
    ev.add_argument("--out", default=None, help="write metrics JSON here")
    ev.add_argument("--n-boot", type=int, default=1000)
    ev.add_argument("--plots", default=None, help="folder for roc.png and reliability.png")
    ev.add_argument("--threshold", type=float, default=None,
                    help="--predictions, binary: the operating point (default: the file's threshold column, "
                         "else the cut its pred column was decided at, else 0.5; printed with the metrics)")
    join_options(ev, "--predictions: ")
    ev.set_defaults(fn=commands.evaluate)

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
    ex.set_defaults(fn=commands.explain)

    co = sub.add_parser("compare", help="AUROCs of prediction files with paired bootstrap differences: how much "
                                        "the first file (the reference) beats each other one")
    co.add_argument("predictions", nargs="+", help="files written by `mmdx predict`; the first is the reference, "
                                                   "and each difference is reference minus other (positive: the "
                                                   "reference is better)")
    co.add_argument("--labels", required=True, help="records file with the true labels")
    join_options(co)
    co.add_argument("--names", nargs="+", default=None, help="one name per prediction file (after the files)")
    co.add_argument("--n-boot", type=int, default=1000, help="resamples (default 1000, as evaluate)")
    co.add_argument("--seed", type=int, default=None,
                    help="of the resamples (default: the config's train.seed, as evaluate, else 0)")
    co.add_argument("--all-pairs", action="store_true", help="every pair, not only each file vs the first")
    co.add_argument("--test", nargs="+", default=None, metavar="TEST",
                    help="beside the paired bootstrap: delong (DeLong's test of each AUROC difference), mcnemar "
                         "(McNemar's exact test of the decisions at each file's operating point); e.g. delong,mcnemar")
    co.add_argument("--margin", type=float, default=None, metavar="M",
                    help="non-inferiority (reference - other > -M) and superiority (> +M) at this AUROC margin, "
                         "one-sided at 2.5%%")
    co.add_argument("--by", nargs="+", default=None, metavar="COLUMN",
                    help="subgroup tables by these columns of the labels file, e.g. sex,location: n, AUROC, "
                         "sensitivity and specificity with CIs per group")
    co.add_argument("--out", default=None, help="write the comparison as JSON here")
    co.set_defaults(fn=commands.compare)

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
    bl.set_defaults(fn=commands.baselines)

    sy = sub.add_parser("synth", help="write the synthetic demo cohort")
    sy.add_argument("--out", required=True)
    sy.add_argument("--n", type=int, default=600)
    sy.add_argument("--seed", type=int, default=0)
    sy.set_defaults(fn=commands.synth)

    de = sub.add_parser("demo", help="synth → train fusion + single-modality models → evaluate → predict")
    de.add_argument("--out", default="mmdx-demo")
    de.add_argument("--n", type=int, default=600)
    de.add_argument("--epochs", type=int, default=None, help="override the config's epochs")
    de.add_argument("--seed", type=int, default=0)
    de.set_defaults(fn=commands.demo)
    return p


def join_options(sp, prefix: str = "") -> None:
    """How a predictions file meets its labels (compare, evaluate --predictions): one set of options, one meaning."""
    sp.add_argument("--config", default=None, help=prefix + "the model's config: label, id and group columns, "
                    "task.names to read label values as class names, and train.seed for the resamples")
    sp.add_argument("--label-column", default=None, help=prefix + "default: the config's task.label, else label")
    sp.add_argument("--id-column", default=None, help=prefix + "default: the config's data.id, else patient_id")
    sp.add_argument("--group-column", default=None, help=prefix + "resample these groups (patients) instead of "
                    "rows (default: the config's data.group)")
    sp.add_argument("--positive", default=None, help=prefix + "class scored against the rest (default: the last "
                    "class if binary, else macro over classes)")


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
    if getattr(args, "image_root", None):  # a path on the command line means the shell's folder, as everywhere
        args.image_root = os.path.abspath(args.image_root)
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
