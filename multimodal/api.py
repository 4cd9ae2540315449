"""The research API: DiagnosisModel.from_config(...).fit(...).predict(...) / evaluate / save / load."""
from __future__ import annotations

import contextlib
from datetime import datetime, timezone

from pathlib import Path
from typing import Optional, Union

import numpy as np
import pandas as pd
import torch

from multimodal.config import Config, config_from_dict, load_config
from multimodal.data.preprocess import Preprocessing
from multimodal.data.records import Records, load_records
from multimodal.data.splits import labelled, shared_patients
from multimodal.errors import UserError
from multimodal.evaluation.evaluate import scored_metrics
from multimodal.evaluation.metrics import predicted
from multimodal.inference.forward import infer_records, member_logits, resolve_device, scored
from multimodal.model import artifact
from multimodal.model.build import member_plan
from multimodal.model.network import for_inference, state_version, uncalibrated

RecordsLike = Union[str, Path, pd.DataFrame, Records]


class DiagnosisModel:
    def __init__(self, config: Config, prep: Optional[Preprocessing] = None):
        """Stores what it is given, as scikit-learn estimators do: `fit` or `load` make the network.
        `prep`: an already fitted preprocessing, kept by fit(reuse_preprocessing=True)."""
        self._build, self._build_device = None, None  # load(defer_network=True): how to build it later
        self.config, self.prep, self.net, self.metrics = config, prep, None, {}
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
        self._net, self._build, self._fast = value, None, None

    def _predictor(self):
        """The network predict and evaluate run: a copy of `net` made faster for inference (see
        model.network.for_inference), made again whenever `net` has changed since."""
        net = self.net
        version = state_version(net)
        if self._fast is None or self._fast[0] is not net or self._fast[1] != version:
            self._fast = (net, version, for_inference(net))
        return self._fast[2]

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
        model = cls(cfg, prep)
        model.metrics = metrics or {}
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
        """Fit preprocessing (vocabulary, scalers, label names) on `train`, then train from scratch (the
        recipe: multimodal.training.recipe). Without `val`, a patient-grouped hold-out of `train` is
        early stopping's and calibration's.

        `reuse_preprocessing=True` keeps the already fitted preprocessing (vocabulary, scalers), e.g. to
        retrain on other records with the inputs encoded exactly as before."""
        from multimodal.training.recipe import fit

        keep = self.prep if reuse_preprocessing else None
        val_rec = None if val is None else self.records(val, labels=True)
        self.prep, self.net, metrics = fit(self.config, self.records(train, labels=True), val_rec, keep, progress)
        # metrics.json, not the weights: two runs of one config still give byte-identical model.safetensors
        self.metrics = {"trained": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), **metrics}
        return self

    def clone(self) -> "DiagnosisModel":
        """An unfitted model of the same config (what cross-validation fits once per fold)."""
        return type(self)(self.config.model_copy(deep=True))

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
        from multimodal.training.recipe import set_thresholds

        rec, y = labelled(val, self.prep)
        return set_thresholds(self.prep, self.config, y, self._infer(rec, 64, 0, False)["probs"])

    @contextlib.contextmanager
    def uncalibrated(self):
        """Within the block, outputs are the raw network's (temperature 1, no bias), e.g. to measure
        what calibration changed: `with model.uncalibrated(): raw = model.predict(records)`."""
        self._require_trained()
        with uncalibrated(self.net):
            yield self

    # -- inference ------------------------------------------------------------------------------
    def _infer(self, rec: Records, batch_size: int, workers: int, progress: bool, absent=None,
               logits: bool = False, net=None) -> dict:
        """`net`: a module other than the model's own (an ensemble member) on the same inputs."""
        self._require_trained()
        early = self.engine is None and self._build is not None  # decode while the network builds
        return infer_records(lambda: net or self.engine or self._predictor(), rec, self.config, self.prep, self.device,
                             batch_size=batch_size, workers=workers, progress=progress, absent=absent,
                             logits=logits, early=early)

    def predict(self, records: RecordsLike, batch_size: int = 64, workers: int = 0, progress: bool = False,
                absent: Optional[list[str]] = None) -> pd.DataFrame:
        """One row per input record, in input order: id, prob_<class>..., pred, status, error; with
        task.conformal also prediction_set (class names joined by `|`, "" when empty) and set_size.

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
        resumable after a crash (`resume=True`), shardable under torchrun (see multimodal.inference.batch)."""
        from multimodal.inference.batch import predict_file

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
        if self.prep.labels.conformal is not None:
            from multimodal.evaluation.conformal import prediction_sets, set_text

            sets = prediction_sets(out["probs"], self.prep.labels.conformal["cuts"])
            df["prediction_set"] = np.where(ok, set_text(sets, classes), None)
            df["set_size"] = pd.array(np.where(ok, sets.sum(1), 0), dtype="Int64")
            df.loc[~ok, "set_size"] = pd.NA
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
        m = scored_metrics(self.config, self.prep, allrec, rec, y, P, n_boot, plots_dir)
        if getattr(self.net, "weighted", False) and n_boot > 0:
            m["against_members"] = self._against_members(rec, y, P, batch_size, workers, absent, n_boot)
        return m

    def _against_members(self, rec: Records, y, P, batch_size: int, workers: int, absent, n_boot: int) -> dict:
        """fusion.strategy unimodal / auto: the fused output beside its own single-modality networks."""
        from multimodal.evaluation.stacking import against_members

        z, _ = member_logits(self._predictor(), rec, self.config, self.prep, self.device, batch_size=batch_size,
                             workers=workers, absent=absent)
        groups = shared_patients(rec.df, self.config)
        return against_members(y, P, z, member_plan(self.config), self.config.task.type, n_boot,
                               self.config.train.seed, groups)

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
