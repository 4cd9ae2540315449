"""The fit recipe: records in, a calibrated network with its operating point and validation metrics out.

Split (a patient-grouped hold-out, crossfit folds, or the user's validation records) → fit the
preprocessing on training patients only → build the network → train it, or each ensemble member or
fusion-strategy network in turn → weigh a strategy's networks on the hold-out → temperature scaling →
the operating point (and task.conformal's prediction-set cuts) → validation metrics. DiagnosisModel.fit
calls `fit` once and stores what it returns; nothing here calls back into the API."""
from __future__ import annotations

import logging
from typing import NamedTuple, Optional

import numpy as np
import pandas as pd
import torch

from multimodal import distributed
from multimodal.config import Config
from multimodal.config.effect import without_effect
from multimodal.data.preprocess import Preprocessing
from multimodal.data.records import Records
from multimodal.data.splits import check_disjoint, holdout_splits, labelled, patients
from multimodal.evaluation.evaluate import scored_metrics
from multimodal.evaluation.operating import thresholds_for
from multimodal.inference.forward import infer_records, member_logits, probabilities, resolve_device, scored
from multimodal.model.build import build_network, fold_members, member_config, member_plan
from multimodal.model.network import for_inference, members, uncalibrated
from multimodal.progress import say
from multimodal.training.loop import fit as train_network
from multimodal.training.loop import seed_everything

log = logging.getLogger("mmdx")
Split = tuple[Records, Records]


class Fitted(NamedTuple):
    prep: Preprocessing
    net: torch.nn.Module
    metrics: dict


def fit(cfg: Config, train: Records, val: Optional[Records] = None, prep: Optional[Preprocessing] = None,
        progress: bool = True) -> Fitted:
    """`prep`: an already fitted preprocessing to keep (inputs encoded exactly as before); None fits it
    on the training patients."""
    tc = cfg.train
    if distributed.is_main():
        for line in without_effect(cfg, val is not None):
            log.warning(line)
    if val is None:
        splits = holdout_splits(train, cfg, tc.ensemble if tc.ensemble_holdout == "crossfit" else 1)
        if len(splits) == 1:  # preprocessing never sees the one hold-out; crossfit's folds cover every record
            train = splits[0][0]
    else:
        splits = [(train, val)]
        check_disjoint(train, val, cfg)
    device = distributed.device_for_rank(resolve_device(tc.device))
    distributed.init(device)
    prep = prep if prep is not None else fitted_preprocessing(cfg, train)
    seed_everything(tc.seed)  # weight init is part of what the seed fixes
    net = build_network(cfg, prep).to(device)  # an ensemble's own buffers (weights, calibration) too
    summary = train_members(net, prep, cfg, splits, progress)
    net.eval()  # fitted: a network to predict and explain with, as a loaded one is (no dropout)
    if not distributed.is_main():  # rank 0 calibrates, scores and saves
        return Fitted(prep, net, {"training": summary})
    if getattr(net, "weighted", False):
        summary["fusion"] = weigh_members(net, prep, cfg, splits)
    val_rec, rec, y, z = holdout_logits(net, prep, cfg, splits)
    if tc.calibrate:
        summary.update(calibrate(net, z, y, cfg))
    P = calibrated(net, z, cfg.task.type)
    summary.update(set_thresholds(prep, cfg, y, P))
    summary.update(set_conformal(prep, cfg, y, P))
    validation = scored_metrics(cfg, prep, val_rec, rec, y, P, n_boot=200)
    return Fitted(prep, net, {"training": summary, "validation": validation})


def fitted_preprocessing(cfg: Config, train: Records) -> Preprocessing:
    """Under torchrun every rank must hold rank 0's vocabulary and statistics, so rank 0 fits and
    sends them."""
    if not distributed.active():
        return Preprocessing.fit(cfg, train)
    prep = Preprocessing.fit(cfg, train) if distributed.is_main() else None
    state = distributed.from_main(
        {"state": prep.state(), "tokenizer": prep.text.to_json() if prep.text else None} if prep else None)
    return prep or Preprocessing.from_state(cfg, state["state"], state["tokenizer"])


def train_members(net, prep: Preprocessing, cfg: Config, splits: list[Split], progress: bool) -> dict:
    """Train the network, or each ensemble member in turn with its own seed and modalities, on the one
    split or (crossfit) on the split of its seed offset."""
    nets = members(net)
    if len(nets) == 1:
        return train_network(net, prep, member_config(cfg, tuple(cfg.modalities), 0), *splits[0], progress=progress,
                             networks=1)
    plan = member_plan(cfg)
    teach = cfg.fusion.teacher_weight > 0
    order = sorted(range(len(nets)), key=lambda i: teach and len(plan[i][0]) > 1)  # teachers first
    runs = [None] * len(nets)
    for i in order:
        (modalities, offset), member = plan[i], nets[i]
        mcfg = member_config(cfg, modalities, offset)
        if progress:
            say(f"ensemble member {i + 1}/{len(nets)} ({'+'.join(modalities)}, seed {mcfg.train.seed})")
        teachers = {mods[0]: nets[j] for j, (mods, off) in enumerate(plan)
                    if len(mods) == 1 and off == offset} if teach and len(modalities) > 1 else None
        runs[i] = train_network(member, prep, mcfg, *splits[offset % len(splits)], progress=progress,
                                teachers=teachers, networks=len(nets) if i == order[0] else 0)
    summary = dict(runs[0])
    summary["train_seconds"] = sum(r["train_seconds"] for r in runs)
    if len(splits) > 1:  # crossfit: the folds' hold-outs partition the records, and every one trains some network
        summary["n_records"] = len(splits[0][0]) + len(splits[0][1])
    summary["members"] = [{"modalities": list(mods), "seed": cfg.train.seed + offset,
                           "best_epoch": r["best_epoch"], "best_val_auroc": r["best_val_auroc"],
                           "epochs": len(r["history"]), "train_seconds": r["train_seconds"]}
                          for (mods, offset), r in zip(plan, runs)]
    return summary


def _device(net) -> torch.device:
    return next(net.parameters()).device


def fold_network(net, cfg: Config, n_splits: int) -> list[torch.nn.Module]:
    """The network that scores each hold-out split: the whole one on a shared hold-out; with crossfit,
    fold j's own networks (fold_members), so no hold-out record is scored by a network trained on it.
    Each as predict will run it (for_inference), so the operating point and calibration fitted on these
    logits are those of the probabilities predict returns, to the last bit."""
    if n_splits == 1:
        return [for_inference(net)]
    return [for_inference(members(net)[idx[0]] if len(idx) == 1 else net.subset(idx))
            for idx in fold_members(cfg, n_splits)]


def holdout_logits(net, prep: Preprocessing, cfg: Config, splits: list[Split]):
    """The hold-out records, the labelled ones, their labels and the uncalibrated logits that calibration
    and the operating point are fitted on: the network's on the one hold-out, or (crossfit) each fold's
    from the networks that early-stopped on it, never one that trained on it."""
    parts = []
    with uncalibrated(net):
        for (_, val), scorer in zip(splits, fold_network(net, cfg, len(splits))):
            rec, y = labelled(val, prep)
            z = infer_records(lambda: scorer, rec, cfg, prep, _device(net), logits=True)["logits"]
            parts.append((val, rec, y, z))
    if len(parts) == 1:
        return parts[0]

    def joined(rs: list[Records]) -> Records:
        return Records(pd.concat([r.df for r in rs], ignore_index=True), rs[0].root, rs[0].source)

    val, rec = joined([p[0] for p in parts]), joined([p[1] for p in parts])
    y, z = np.concatenate([p[2] for p in parts]), np.concatenate([p[3] for p in parts])
    return val, rec, y, z


def weigh_members(net, prep: Preprocessing, cfg: Config, splits: list[Split]) -> dict:
    """fusion.strategy unimodal / auto: each network calibrated on the hold-out, then the weights of their
    mixture chosen there (multimodal.evaluation.stacking); the network's buffers take them. With
    crossfit, fold j's hold-out is scored by fold j's networks alone and the folds are pooled: one
    network of each kind (joint, each modality alone) per record, so the weights are per kind, and
    each kind's weight is shared equally by its seeds."""
    from multimodal.evaluation.stacking import fit_mixture

    folds = fold_members(cfg, len(splits))
    kinds = [member_plan(cfg)[i] for i in folds[0]]
    parts = []
    with uncalibrated(net):
        for (_, val), scorer in zip(splits, fold_network(net, cfg, len(splits))):
            rec, y = labelled(val, prep)
            z, seen = member_logits(scorer, rec, cfg, prep, _device(net), calibrated=False)
            parts.append((y, z, seen, patients(rec.df, cfg)))
    y, z, seen, groups = (np.concatenate(p) for p in zip(*parts))
    buffers, report = fit_mixture(cfg.fusion.strategy, kinds, z, seen, y, cfg.task.type, cfg.train.calibrate,
                                  cfg.train.calibrate_bias, cfg.train.seed, groups=groups)
    buffers["member_weights"] = buffers["member_weights"] / len(folds)
    for name, value in buffers.items():
        buf = getattr(net, name)
        for idx in folds:  # every seed of a kind takes that kind's values
            buf[idx] = torch.as_tensor(value, dtype=buf.dtype, device=buf.device)
    if len(folds) > 1:
        report["networks_per_kind"] = len(folds)
    return report


def calibrate(net, z: np.ndarray, y: np.ndarray, cfg: Config) -> dict:
    """Temperature (and bias) scaling on the hold-out logits (the patients early stopping used)."""
    from multimodal.evaluation.calibration import fit_temperature

    bias = cfg.train.calibrate_bias
    ok = scored(z)
    if ok.sum() < 2:
        return {"temperature": 1.0}
    fitted = fit_temperature(z[ok], y[ok], cfg.task.type, bias=bias)
    t, b = fitted if bias else (fitted, np.zeros(net.num_outputs))
    net.temperature.fill_(t)
    net.logit_bias.copy_(torch.as_tensor(b, dtype=net.logit_bias.dtype))
    return {"temperature": t, "logit_bias": [float(v) for v in b]}


def calibrated(net, z: np.ndarray, task: str) -> np.ndarray:
    """The hold-out logits calibrated as the network does it (float32): one set of probabilities for the
    operating point, the conformal cuts and the validation metrics."""
    z = torch.as_tensor(z, dtype=torch.float32) / net.temperature.cpu() + net.logit_bias.cpu()
    return probabilities(z, task).double().numpy()


def set_thresholds(prep: Preprocessing, cfg: Config, y: np.ndarray, P: np.ndarray) -> dict:
    """The operating point (task.threshold) on calibrated validation probabilities, stored with the labels."""
    if cfg.task.type == "multiclass":
        return {}
    prep.labels.thresholds = thresholds_for(y, P, cfg.task.type, cfg.task.threshold)
    return {"threshold_rule": cfg.task.threshold, "thresholds": prep.labels.thresholds}


def set_conformal(prep: Preprocessing, cfg: Config, y: np.ndarray, P: np.ndarray) -> dict:
    """task.conformal: the prediction-set cuts on the same calibrated hold-out probabilities as the
    operating point (out-of-fold under crossfit), stored with the labels; {} when it is off."""
    from multimodal.evaluation.conformal import check_names, fit_cuts, min_records

    coverage = cfg.task.conformal
    if coverage is None:
        prep.labels.conformal = None
        return {}
    check_names(prep.labels.names)
    state = fit_cuts(y, P, coverage, cfg.task.conformal_by_class)
    counts, least = state["n_calibration"], min_records(coverage)
    few = [n for n, k in zip(prep.labels.names, counts) if k < least] if state["by_class"] else \
        (list(prep.labels.names) if sum(counts) < least else [])
    if few:
        log.warning("task.conformal: fewer than %d calibration records %s; %s always in the prediction set",
                    least, f"of class {', '.join(few)}" if state["by_class"] else "", ", ".join(few))
    prep.labels.conformal = state
    return {"conformal": state}
