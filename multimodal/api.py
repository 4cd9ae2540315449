"""The research API: DiagnosisModel.from_config(...).fit(...).predict(...) / evaluate / save / load."""
from __future__ import annotations

import contextlib

from pathlib import Path
from typing import Optional, Union

import numpy as np
import pandas as pd
import torch

from multimodal.model import artifact
from multimodal.engine import distributed
from multimodal.model.build import build_network, member_config, member_plan
from multimodal.config import Config, config_from_dict, load_config
from multimodal.data.batches import RecordDataset
from multimodal.errors import UserError
from multimodal.engine.inference import amp_dtype, probabilities, resolve_device, run_inference, scored, start_early
from multimodal.engine.metrics import compute_metrics, predicted
from multimodal.data.preprocess import Preprocessing
from multimodal.data.preprocess.image import MAX_VIEW_GROUPS
from multimodal.data.records import Records, load_records
from multimodal.engine.train import fit as train_fit
from multimodal.engine.train import check_disjoint, groups_of, holdout_splits, labelled, make_loader, seed_everything

RecordsLike = Union[str, Path, pd.DataFrame, Records]


class DiagnosisModel:
    def __init__(self, config: Config, prep: Optional[Preprocessing] = None, net=None,
                 metrics: Optional[dict] = None):
        self._build, self._build_device = None, None  # load(defer_network=True): how to build it later
        self.config, self.prep, self.net, self.metrics = config, prep, net, metrics or {}
        self.model_dir: Optional[Path] = None
        self.engine = None  # an OnnxNetwork that predict/evaluate run instead of self.net (use_onnx)

    @property
    def net(self):
        """The PyTorch network. After load(defer_network=True) it is built here, on first use."""
        if self._build is not None:
            build, self._build = self._build, None
            self._net = build()
        return self._net

    @net.setter
    def net(self, value) -> None:
        self._net, self._build = value, None

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Union[Config, dict, str, Path], **overrides) -> "DiagnosisModel":
        """`overrides` use dotted keys as on the CLI, e.g. from_config("c.yaml", **{"train.epochs": 3})."""
        if isinstance(config, Config):
            config = config.model_dump(mode="json")
        cfg = config_from_dict(config, overrides) if isinstance(config, dict) else load_config(config, overrides)
        return cls(cfg)

    @classmethod
    def load(cls, model_dir: Union[str, Path], device: Optional[str] = None, onnx=None,
             threads: Optional[int] = None, defer_network: bool = False) -> "DiagnosisModel":
        """Builds the network from the directory alone (no network, no code from it). The training
        image root is not used: relative image paths resolve against each records file's folder, or
        an `image_root` given here and now (`model.config.data.image_root = ...`, CLI --image-root).

        `onnx`: a file `export_onnx` wrote from this directory. predict/evaluate then run in ONNX Runtime
        (CPU) and the PyTorch network is not built at all; use use_onnx() to keep both.
        `defer_network`: the directory is checked now, the network built on first use, so that the first
        predict decodes its first images while the network builds (what `mmdx predict` does). A
        model.safetensors that does not fit then fails there, not here."""
        if onnx is not None and resolve_device(device or "cpu").type != "cpu":
            raise UserError("the ONNX path runs on CPU; load the model with device='cpu'")
        dev = resolve_device(device or "auto")
        cfg, prep, state, metrics = artifact.read(model_dir)
        cfg.data.image_root = None
        model = cls(cfg, prep, None, metrics)
        model.model_dir = Path(model_dir)
        if onnx is not None:
            return model.use_onnx(onnx, threads)
        if defer_network:
            model._build = lambda: artifact.build_stored(model_dir, cfg, prep, state, dev)
            model._build_device = dev
        else:
            model.net = artifact.build_stored(model_dir, cfg, prep, state, dev)
        return model

    def save(self, model_dir: Union[str, Path], overwrite: bool = False, inputs=()) -> Path:
        """Writes a new directory; replaces an earlier model directory only with `overwrite=True`, and
        never a folder that is not one. `inputs`: files of this run the directory must not hold."""
        self._require_trained()
        return artifact.save(model_dir, self.config, self.prep, self.net, self.metrics, overwrite=overwrite,
                             inputs=inputs)

    @property
    def classes(self) -> list[str]:
        """Class names as outputs show them (task.names), in output order."""
        return self.prep.labels.names

    @property
    def device(self) -> torch.device:
        if self._build is not None:
            return self._build_device
        return next(self._net.parameters()).device if self._net is not None else torch.device("cpu")

    def records(self, obj: RecordsLike, labels: bool = False) -> Records:
        return obj if isinstance(obj, Records) else load_records(obj, self.config, labels=labels)

    def _require_trained(self) -> None:
        if self._net is None and self._build is None and self.engine is None:
            raise UserError("model is not trained: call fit() or DiagnosisModel.load()")

    # -- training -------------------------------------------------------------------------------
    def fit(self, train: RecordsLike, val: Optional[RecordsLike] = None, progress: bool = True,
            reuse_preprocessing: bool = False) -> "DiagnosisModel":
        """Fit preprocessing (vocabulary, scalers, label names) on `train`, then train from scratch.

        `reuse_preprocessing=True` keeps the already fitted preprocessing (vocabulary, scalers), e.g. to
        retrain on other records with the inputs encoded exactly as before."""
        tc = self.config.train
        train_rec = self.records(train, labels=True)
        if val is None:
            splits = holdout_splits(train_rec, self.config, tc.ensemble if tc.ensemble_holdout == "crossfit" else 1)
            if len(splits) == 1:  # preprocessing never sees the one hold-out; crossfit's folds cover every record
                train_rec = splits[0][0]
        else:
            splits = [(train_rec, self.records(val, labels=True))]
            check_disjoint(*splits[0], self.config)
        distributed.init(distributed.device_for_rank(resolve_device(tc.device)))
        if not (reuse_preprocessing and self.prep is not None):
            self.prep = self._fitted_preprocessing(train_rec)
        seed_everything(tc.seed)  # weight init is part of what the seed fixes
        self.net = build_network(self.config, self.prep)
        summary = self._train(splits, progress)
        if not distributed.is_main():  # rank 0 calibrates, scores and saves
            self.metrics = {"training": summary}
            return self
        if getattr(self.net, "weighted", False):
            summary["fusion"] = self._weigh_members(splits[0][1])
        val_rec, rec, y, z = self._holdout_logits(splits)
        if tc.calibrate:
            summary.update(self._calibrate(z, y))
        # calibrated as the network does it (float32): one set of probabilities for threshold and metrics
        z = torch.as_tensor(z, dtype=torch.float32) / self.net.temperature + self.net.logit_bias
        P = probabilities(z, self.config.task.type).double().numpy()
        summary.update(self._set_thresholds(y, P))
        self.metrics = {"training": summary, "validation": self._scored_metrics(val_rec, rec, y, P, n_boot=200)}
        return self

    def _train(self, splits: list[tuple[Records, Records]], progress: bool) -> dict:
        """Train the network, or each ensemble member in turn with its own seed, on the one split or
        (crossfit) on its own."""
        from multimodal.model.network import members

        nets = members(self.net)
        if len(nets) == 1:
            return train_fit(self.net, self.prep, self.config, *splits[0], progress=progress)
        runs, plan = [], member_plan(self.config)
        for i, (net, (modalities, offset)) in enumerate(zip(nets, plan)):
            cfg = member_config(self.config, modalities, offset)
            if progress:
                from multimodal.progress import say

                say(f"ensemble member {i + 1}/{len(nets)} ({'+'.join(modalities)}, seed {cfg.train.seed})")
            runs.append(train_fit(net, self.prep, cfg, *splits[i % len(splits)], progress=progress))
        summary = dict(runs[0])
        summary["train_seconds"] = sum(r["train_seconds"] for r in runs)
        summary["members"] = [{"modalities": list(mods), "seed": self.config.train.seed + offset,
                               "best_epoch": r["best_epoch"], "best_val_auroc": r["best_val_auroc"],
                               "epochs": len(r["history"]), "train_seconds": r["train_seconds"]}
                              for (mods, offset), r in zip(plan, runs)]
        return summary

    def set_operating_point(self, records: RecordsLike, rule=None) -> list[float]:
        """Choose the threshold again on labelled `records` (validation patients, never test ones), by
        `rule` (default task.threshold); `save()` then stores it. Returns the threshold(s)."""
        self._require_trained()
        if rule is not None:
            self.config = config_from_dict(self.config.model_dump(mode="json"), {"task.threshold": rule})
            self.prep.labels.task = self.config.task
        return self._choose_thresholds(self.records(records, labels=True)).get("thresholds", [])

    def _choose_thresholds(self, val: Records) -> dict:
        """The operating point (task.threshold) on the calibrated validation probabilities."""
        rec, y = labelled(val, self.prep)
        return self._set_thresholds(y, self._infer(rec, 64, 0, False)["probs"])

    def _set_thresholds(self, y: np.ndarray, P: np.ndarray) -> dict:
        from multimodal.engine.operating import choose

        task, rule = self.config.task.type, self.config.task.threshold
        if task == "multiclass":
            return {}
        if task == "binary":
            ok = scored(P)
            ts = [choose(y[ok], P[ok], rule)]
        else:
            ts = []
            for j in range(P.shape[1]):
                ok = ~np.isnan(P[:, j]) & ~np.isnan(y[:, j])
                ts.append(choose(y[ok, j], P[ok, j], rule))
        self.prep.labels.thresholds = ts
        return {"threshold_rule": rule, "thresholds": ts}

    def _fitted_preprocessing(self, train_rec: Records) -> Preprocessing:
        """Under torchrun every rank must hold rank 0's vocabulary and statistics (the WordPiece
        trainer can break ties differently between processes), so rank 0 fits and sends them."""
        if not distributed.active():
            return Preprocessing.fit(self.config, train_rec)
        prep = Preprocessing.fit(self.config, train_rec) if distributed.is_main() else None
        state = distributed.from_main(
            {"state": prep.state(), "tokenizer": prep.text.to_json() if prep.text else None} if prep else None)
        return prep or Preprocessing.from_state(self.config, state["state"], state["tokenizer"])

    @contextlib.contextmanager
    def uncalibrated(self):
        """Within the block, outputs are the raw network's (temperature 1, no bias), e.g. to measure
        what calibration changed: `with model.uncalibrated(): raw = model.predict(records)`."""
        self._require_trained()
        net = self.net
        saved = net.temperature.clone(), net.logit_bias.clone()
        net.temperature.fill_(1.0)
        net.logit_bias.zero_()
        try:
            yield self
        finally:
            net.temperature.copy_(saved[0])
            net.logit_bias.copy_(saved[1])

    def _holdout_logits(self, splits: list[tuple[Records, Records]]):
        """The hold-out records, the labelled ones, their labels and the uncalibrated logits that
        calibration and the operating point are fitted on: the model's on the one hold-out, or
        (crossfit) each fold's from the member that early-stopped on it, never one that trained on it."""
        from multimodal.model.network import members

        nets = members(self.net) if len(splits) > 1 else [None]
        parts = []
        with self.uncalibrated():
            for (_, val), net in zip(splits, nets):
                rec, y = labelled(val, self.prep)
                parts.append((val, rec, y, self._infer(rec, 64, 0, False, logits=True, net=net)["logits"]))
        if len(parts) == 1:
            return parts[0]

        def joined(rs: list[Records]) -> Records:
            return Records(pd.concat([r.df for r in rs], ignore_index=True), rs[0].root, rs[0].source)

        val, rec = joined([p[0] for p in parts]), joined([p[1] for p in parts])
        y, z = np.concatenate([p[2] for p in parts]), np.concatenate([p[3] for p in parts])
        return val, rec, y, z

    def _weigh_members(self, val: Records) -> dict:
        """fusion.strategy unimodal / auto: each network calibrated on the hold-out, then the weights of
        their mixture chosen there (multimodal.engine.stacking)."""
        from multimodal.engine.stacking import fit_mixture

        rec, y = labelled(val, self.prep)
        cfg = self.config
        with self.uncalibrated():
            z, seen = self._member_logits(rec, 64, 0, None, calibrated=False)
        buffers, report = fit_mixture(cfg.fusion.strategy, member_plan(cfg), z, seen, y, cfg.task.type,
                                      cfg.train.calibrate, cfg.train.calibrate_bias, cfg.train.seed)
        for name, value in buffers.items():
            buf = getattr(self.net, name)
            buf.copy_(torch.as_tensor(value, dtype=buf.dtype))
        return report

    def _member_logits(self, rec: Records, batch_size: int, workers: int, absent, calibrated: bool = True):
        """A fusion strategy's networks side by side: logits [N, M, K] (each calibrated on its own, or
        raw) and whether each saw the patient [N, M]."""
        from multimodal.model.network import MemberOutputs

        net = self.net
        K, M = net.num_outputs, len(net.members)
        out = self._infer(rec, batch_size, workers, False, absent, logits=True,
                          net=MemberOutputs(net, calibrated))["logits"]
        return out[:, :M * K].reshape(len(out), M, K), out[:, M * K:] > 0

    def _calibrate(self, z: np.ndarray, y: np.ndarray) -> dict:
        """Temperature (and bias) scaling on the hold-out logits (the patients early stopping used)."""
        from multimodal.engine.calibration import fit_temperature

        net, bias = self.net, self.config.train.calibrate_bias
        ok = scored(z)
        if ok.sum() < 2:
            return {"temperature": 1.0}
        fitted = fit_temperature(z[ok], y[ok], self.config.task.type, bias=bias)
        t, b = fitted if bias else (fitted, np.zeros(net.num_outputs))
        net.temperature.fill_(t)
        net.logit_bias.copy_(torch.as_tensor(b, dtype=net.logit_bias.dtype))
        return {"temperature": t, "logit_bias": [float(v) for v in b]}

    # -- inference ------------------------------------------------------------------------------
    def _infer(self, rec: Records, batch_size: int, workers: int, progress: bool, absent=None,
               logits: bool = False, net=None) -> dict:
        """`net`: a module other than the model's own (an ensemble member) on the same inputs."""
        self._require_trained()
        if batch_size < 1:
            raise UserError("--batch-size must be at least 1")
        cfg = self.config
        ds = RecordDataset(rec, self.prep, cfg.modalities, cfg)

        def loader(d, w: int, **kw):
            return make_loader(d, cfg, self.prep, False, self.device, batch_size, workers=w, **kw)

        if self.engine is None and self._build is not None:  # decode while the network builds
            sizes = None  # no images: nothing worth decoding ahead
            if "image" in cfg.modalities:
                groups = MAX_VIEW_GROUPS if ds.all_views else 1
                sizes = [self.prep.image.decoded_bytes(cells, groups)
                         for cells in rec.df[cfg.image.columns].itertuples(index=False)]
            batches = start_early(ds, loader, batch_size, workers, sizes)
        else:
            batches = loader(ds, workers)
        return run_inference(net or self.engine or self.net, batches, self.device, cfg.task.type,
                             amp_dtype(self.device, cfg.train.amp), progress=progress, absent=absent,
                             logits=logits, n=len(ds))

    def predict(self, records: RecordsLike, batch_size: int = 64, workers: int = 0, progress: bool = False,
                absent: Optional[list[str]] = None) -> pd.DataFrame:
        """One row per input record, in input order: id, prob_<class>..., pred, status, error.

        `absent` hides modalities for every patient (missing-modality robustness checks)."""
        rec = self.records(records)
        out = self._infer(rec, batch_size, workers, progress, absent)
        return self._frame(rec, out)

    def export_onnx(self, out, records) -> dict:
        """Write the network as ONNX (`out`), traced on a batch of `records`; see multimodal.model.export."""
        from multimodal.model.export import export_onnx

        self._require_trained()
        return export_onnx(self, out, records)

    def use_onnx(self, path, threads: Optional[int] = None) -> "DiagnosisModel":
        """predict/evaluate run the forward pass in ONNX Runtime (CPU) from a file export_onnx wrote."""
        from multimodal.model.export import OnnxNetwork

        if self.device.type != "cpu":
            raise UserError("the ONNX path runs on CPU; load the model with device='cpu'")
        self.engine = OnnxNetwork(path, self, threads)  # refuses a model that is not a saved directory
        return self

    def predict_file(self, records, out, *, chunk_rows: int = 10_000, resume: bool = False, batch_size: int = 64,
                     workers: int = 0, progress: bool = False, shard=None) -> dict:
        """predict() for files of any length, straight to `out` (.csv or .parquet): streamed in chunks,
        resumable after a crash (`resume=True`), shardable under torchrun (see multimodal.engine.batch)."""
        from multimodal.engine.batch import predict_file

        self._require_trained()
        return predict_file(self, records, out, chunk_rows=chunk_rows, resume=resume, batch_size=batch_size,
                            workers=workers, progress=progress, shard=shard)

    def _frame(self, rec: Records, out: dict) -> pd.DataFrame:
        task, classes, P = self.config.task.type, self.classes, out["probs"]
        df = pd.DataFrame({"id": rec.df[self.config.data.id].to_numpy()})
        if task == "binary":
            P = np.stack([1 - P, P], 1)
        for j, c in enumerate(classes):
            df[f"prob_{c}"] = P[:, j]
        ok = scored(P)
        decided = predicted(np.nan_to_num(P, nan=-1), task, self.prep.labels.thresholds)
        if task == "multilabel":
            pred = [";".join(c for c, d in zip(classes, row) if d) for row in decided]
        else:
            pred = [classes[int(i)] for i in decided.argmax(1)]
        df["pred"] = np.where(ok, pred, None)
        df["status"] = np.where(ok, "ok", "error")
        df["error"] = [e if e else (None if k else "prediction failed") for e, k in zip(out["errors"], ok)]
        return df

    def evaluate(self, records: RecordsLike, n_boot: int = 1000, batch_size: int = 64, workers: int = 0,
                 progress: bool = False, absent: Optional[list[str]] = None, plots_dir=None) -> dict:
        """Metrics with 95% bootstrap CIs (incl. ECE); `plots_dir` also gets roc.png and reliability.png.
        Rows without a label are counted in `n_unlabelled`, rows that fail to load in `n_errors`."""
        allrec = self.records(records, labels=True)
        rec, y = labelled(allrec, self.prep)
        P = self._infer(rec, batch_size, workers, progress, absent)["probs"]
        m = self._scored_metrics(allrec, rec, y, P, n_boot, plots_dir)
        if getattr(self.net, "weighted", False) and n_boot > 0:
            m["against_members"] = self._against_members(rec, y, P, batch_size, workers, absent, n_boot)
        return m

    def _against_members(self, rec: Records, y, P, batch_size: int, workers: int, absent, n_boot: int) -> dict:
        """fusion.strategy unimodal / auto: the fused output beside its own single-modality networks."""
        from multimodal.engine.stacking import against_members

        z, _ = self._member_logits(rec, batch_size, workers, absent)
        groups = groups_of(rec, self.config) if self.config.data.group else None
        return against_members(y, P, z, member_plan(self.config), self.config.task.type, n_boot,
                               self.config.train.seed, groups)

    def _scored_metrics(self, allrec: Records, rec: Records, y: np.ndarray, P: np.ndarray, n_boot: int,
                        plots_dir=None) -> dict:
        ok = scored(P)
        if ok.sum() < 2:
            raise UserError(f"{rec.source}: fewer than 2 records could be scored")
        groups = groups_of(rec, self.config)[ok] if self.config.data.group else None
        m = compute_metrics(y[ok], P[ok], self.config.task.type, self.classes, n_boot=n_boot,
                            seed=self.config.train.seed, thresholds=self.prep.labels.thresholds, groups=groups)
        m["n_errors"] = int((~ok).sum())
        m["n_unlabelled"] = len(allrec) - len(rec)
        if plots_dir is not None:
            from multimodal.engine.plots import write_plots

            m["plots"] = [str(p) for p in write_plots(y[ok], P[ok], self.config.task.type, self.classes, plots_dir,
                                                      operating_point=m.get("operating_point"))]
        return m

    # -- explanations ---------------------------------------------------------------------------
    def explain(self, records: RecordsLike, *, target=None, method: str = "ig", n_steps: int = 32,
                internal_batch_size: Optional[int] = None, batch_size: int = 8, ablation: bool = True,
                progress: bool = False):
        """Per-patient attributions for every modality (see explain.patients.explain); the result
        is a list of PatientExplanation with `.to_html(out_dir)`."""
        from explain import Explanations, model_info
        from explain.patients import explain as attribute

        self._require_trained()
        try:
            items = attribute(self, self.records(records), target=target, method=method, n_steps=n_steps,
                              internal_batch_size=internal_batch_size, batch_size=batch_size,
                              ablation=ablation, progress=progress)
        except ValueError as e:  # bad method / target: the caller's mistake
            raise UserError(str(e)) from None
        return Explanations(items, model_info(self, self.model_dir))
