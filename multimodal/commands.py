"""What each `mmdx` command does, given its parsed arguments (multimodal.cli builds the parser and
runs one of these). Every command states what it reads to the output guard before any work.
"""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from multimodal.command_inputs import command_inputs as _inputs  # what each command reads, for the output guard
from multimodal.errors import UserError


def train(a) -> None:
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
    n = (f"{t['n_records']} records (each network on {t['n_train']}, early-stopped on its own fold of the rest)"
         if "n_records" in t else f"{t['n_train']} records")
    print(f"trained {cfg.name} ({'+'.join(cfg.modalities)}, {cfg.fusion.type} fusion) on {n} "
          f"in {t['train_seconds']:.0f}s on {on}; best epoch " +
          ("/".join(str(r["best_epoch"]) for r in t["members"]) + f" ({len(t['members'])} ensemble members)"
           if "members" in t else str(t["best_epoch"])))
    held = " (out of fold: each record scored by the networks that did not train on it)" if "n_records" in t else ""
    print(f"validation{held}:\n" + format_table(model.metrics["validation"]))
    print(f"model saved to {a.out}")


def cv(a) -> None:
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


def federate(a) -> None:
    """mmdx federate (multimodal.federation): one model directory from several sites' records."""
    from multimodal.command_inputs import record_images
    from multimodal.config import load_config, parse_overrides
    from multimodal.federation import federate as run_federation
    from multimodal.output import claim, guard

    sites = {}
    for spec in a.site:
        name, sep, path = spec.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise UserError(f"--site {spec}: give NAME=RECORDS")
        if name.strip() in sites:
            raise UserError(f"--site {name.strip()} is given twice")
        sites[name.strip()] = path.strip()
    cfg = load_config(a.config, parse_overrides(a.overrides))
    inputs = [a.config, *sites.values()] + [record_images(p, cfg) for p in sites.values()]
    guard(a.out, "model", inputs, a.overwrite)
    with claim(a.out):
        model = run_federation(cfg, sites, a.rounds, local_epochs=a.local_epochs, strategy=a.strategy,
                               proximal_mu=a.proximal_mu, dp_clip=a.dp_clip, dp_noise=a.dp_noise,
                               progress=not a.quiet)
        model.save(a.out, overwrite=a.overwrite, inputs=inputs)
    t, v = model.metrics["training"], model.metrics["validation"]["federated"]
    counts = ", ".join(f"{s['name']}: {s['n_train']}" for s in t["sites"])
    print(f"federated {cfg.name} ({'+'.join(cfg.modalities)}) over {len(sites)} sites "
          f"({counts} training records), {a.rounds} round{'s' * (a.rounds != 1)} "
          f"in {t['train_seconds']:.0f}s; validation AUROC {v['auroc']:.3f} on the sites' {v['n']} hold-out "
          f"patients (from binned counts)")
    print(f"model saved to {a.out}")


def config(a) -> None:
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


def predict(a) -> None:
    from multimodal import distributed
    from multimodal.output import guard

    guard(a.out, "file", _inputs(a))  # before the model loads
    if a.engine == "ray":
        return _predict_ray(a)
    shard = distributed.state()
    if shard.world > 1 and a.device is None and not a.onnx:
        a.device = f"cuda:{shard.local_rank}"  # falls back to cpu where there is no GPU
    model = _load(a, defer_network=True)  # built while the first images decode
    s = model.predict_file(a.records, a.out, chunk_rows=a.chunk_rows, resume=a.resume, batch_size=a.batch_size,
                     workers=a.workers, progress=not a.quiet, shard=shard)
    if shard.rank == 0:
        again = f", {s['reused_chunks']} of {s['chunks']} chunks kept from the interrupted run" if s["reused_chunks"] else ""
        print(f"wrote {s['rows']} rows to {a.out} ({s['ok']} ok, {s['errors']} errors){again}")


def _predict_ray(a) -> None:
    """predict --engine ray (multimodal.raydata): the same file, scored by Ray Data actors."""
    from multimodal.raydata import predict_ray

    if a.resume:
        raise UserError("--resume goes with --engine local; a Ray job recomputes the batches it lost by itself")
    if a.device not in (None, "cpu"):
        raise UserError(f"--device {a.device}: --engine ray scores on the CPUs of its actors")
    s = predict_ray(a.model, a.records, a.out, address=a.ray_address, num_workers=a.ray_workers,
                    batch_size=a.batch_size, onnx=a.onnx, image_root=a.image_root, progress=not a.quiet)
    workers = f"{s['workers']} Ray worker" + ("s" if s["workers"] != 1 else "")
    print(f"wrote {s['rows']} rows to {a.out} ({s['ok']} ok, {s['errors']} errors) with {workers}")


def export(a) -> None:
    from multimodal.output import guard

    if not str(a.out).endswith(".onnx"):
        raise UserError(f"--out {a.out}: an export is written as a .onnx file")
    guard(a.out, "file", _inputs(a))
    model = _load(a)
    r = model.export_onnx(a.out, a.records)
    print(f"wrote {r['path']} (inputs {', '.join(r['inputs'])}; ONNX Runtime within {r['max_abs_diff']:.1e} "
          f"of PyTorch on an example batch); use it with mmdx predict --onnx")


PREDICTIONS_ONLY = ("config", "threshold", "positive", "label_column", "id_column", "group_column")


def evaluate(a) -> None:
    from multimodal.output import guard

    given = [f"--{k.replace('_', '-')}" for k in PREDICTIONS_ONLY if getattr(a, k) is not None]
    if a.predictions is None and given:
        raise UserError(f"{', '.join(given)} only go{'es' if len(given) == 1 else ''} with evaluate --predictions "
                        f"(a model directory brings its own columns, classes and threshold)")
    targets = ([a.out] if a.out else []) + [Path(a.plots) / n for n in ("roc.png", "reliability.png") if a.plots]
    inputs = _inputs(a)
    if targets:
        guard(targets, "file", inputs)
    if a.predictions is not None:
        m = _evaluate_file(a)
    else:
        model = _load(a, defer_network=True)
        m = model.evaluate(a.records, n_boot=a.n_boot, batch_size=a.batch_size, workers=a.workers,
                           progress=not a.quiet, plots_dir=a.plots)
    _report(a, m, inputs)


def _evaluate_file(a) -> dict:
    """evaluate --predictions: the file scored as evaluate --model scores a model's outputs."""
    from multimodal.evaluation.scorefile import evaluate_predictions

    join, task = _join_columns(a)
    if task == "multilabel":
        raise UserError(f"--config {a.config}: a multilabel task; evaluate --predictions scores binary and "
                        f"multiclass predictions (use evaluate --model)")
    return evaluate_predictions(a.predictions, a.records, positive=a.positive, threshold=a.threshold,
                                n_boot=a.n_boot, plots_dir=a.plots, **join)


def _join_columns(a) -> tuple[dict, str | None]:
    """How a predictions file is joined with the labels and resampled (compare, evaluate --predictions):
    the columns given, else the config's task.label, data.id, data.group, task.names and train.seed
    (what evaluate --model uses), else label, patient_id, no groups and seed 0; and the config's task."""
    label, ident, group, names, seed, task = "label", "patient_id", None, None, 0, None
    if a.config:
        from multimodal.config import load_config

        cfg = load_config(a.config)
        label, ident, group, names = cfg.label_columns()[0], cfg.data.id, cfg.data.group, cfg.task.names
        seed, task = cfg.train.seed, cfg.task.type
    given_seed = getattr(a, "seed", None)
    return {"label_column": a.label_column or label, "id_column": a.id_column or ident,
            "group_column": a.group_column or group, "class_names": names,
            "seed": seed if given_seed is None else given_seed}, task


def _report(a, m: dict, inputs) -> None:
    """What evaluate prints and writes, from a model or a predictions file alike."""
    from multimodal.evaluation.metrics import format_table
    from multimodal.output import write_json

    print(format_table(m))
    if m.get("conformal"):
        from multimodal.evaluation.conformal import format_sets

        print(format_sets(m["conformal"]))
    if m.get("threshold_from"):
        print(f"operating point from {m['threshold_from']}")
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


def explain(a) -> None:
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


def compare(a) -> None:
    from multimodal.evaluation.comparison import compare as compare_predictions, format_report
    from multimodal.output import guard, write_json

    inputs = [a.labels, *a.predictions, *([a.config] if a.config else [])]
    if a.out:
        guard(a.out, "file", inputs)
    names, tests, by = (_listed(x) for x in (a.names, a.test, a.by))
    join, _ = _join_columns(a)
    report = compare_predictions(a.predictions, a.labels, n_boot=a.n_boot, positive=a.positive, names=names,
                                 all_pairs=a.all_pairs, tests=tests or (), margin=a.margin, by=by or (), **join)
    print(format_report(report))
    if a.out:
        write_json(report, a.out, inputs)
        print(f"comparison written to {a.out}")


def _listed(values) -> list[str] | None:
    """Values given space or comma separated (--names a,b or --names a b), as one list."""
    return [v.strip() for part in values for v in part.split(",") if v.strip()] if values else None


def baselines(a) -> None:
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
          f"--labels {a.predict} --config {a.config}" + "".join(f" --{k}-column {v}" for k, v in (
              ("label", cfg.label_columns()[0]), ("id", cfg.data.id)) if a.overrides))


def synth(a) -> None:
    from multimodal.synth import make_cohort

    paths = make_cohort(a.out, n=a.n, seed=a.seed)
    print(f"synthetic cohort of {a.n} patients in {paths['dir']}: " +
          ", ".join(f"{k}={Path(v).name}" for k, v in paths.items() if k in ("train", "val", "test", "truth")))


def demo(a) -> None:
    from multimodal.demo import run_demo

    run_demo(a.out, n=a.n, epochs=a.epochs, seed=a.seed)
