"""Training: AdamW, warmup + cosine, clipping, class weights or focal loss, AMP on CUDA,
early stopping on validation AUROC with the best weights restored. Seeded and reproducible."""
from __future__ import annotations

import copy
import logging
from collections import Counter
import math
import random
import time
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from multimodal import distributed
from multimodal.config import Config
from multimodal.data.batches import RecordDataset, make_loader, to_device
from multimodal.errors import UserError
from multimodal.inference.forward import amp_dtype, autocast, resolve_device, run_inference, scored
from multimodal.evaluation.metrics import onehot, point_metrics, prob_matrix
from multimodal.data.preprocess import Preprocessing
from multimodal.progress import bar as progress_bar
from multimodal.progress import say
from multimodal.training.balance import GradientModulation
from multimodal.data.records import Records
from multimodal.data.splits import labelled

log = logging.getLogger("mmdx")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def class_balance(y: np.ndarray, task: str, k: int) -> np.ndarray:
    """Per-output positive fraction (binary/multilabel) or class frequency (multiclass)."""
    if task == "multiclass":
        return np.bincount(y, minlength=k) / len(y)
    Y = y[:, None] if task == "binary" else np.nan_to_num(y)
    return Y.mean(0)


class Loss:
    """BCE (binary, multilabel) or cross-entropy (multiclass), optionally class-weighted or focal."""

    def __init__(self, task: str, freq: np.ndarray, weighted: bool, focal: bool, gamma: float = 2.0):
        self.task, self.focal, self.gamma = task, focal, gamma
        freq = np.clip(freq, 1e-3, 1 - 1e-3)
        if task == "multiclass":
            w = (1 / freq) / (1 / freq).sum() * len(freq)
        else:
            w = (1 - freq) / freq  # pos_weight: balances positives against negatives
        self.weight = torch.tensor(w, dtype=torch.float32) if weighted else None

    def __call__(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        w = self.weight.to(logits.device) if self.weight is not None else None
        if self.task == "multiclass":
            ce = F.cross_entropy(logits, y, weight=w, reduction="none")
            if self.focal:
                pt = torch.softmax(logits, 1).gather(1, y[:, None])[:, 0].detach()
                ce = ce * (1 - pt) ** self.gamma
            return ce.mean()
        target = y.float().reshape(logits.shape)
        valid = ~torch.isnan(target)
        target = torch.nan_to_num(target)
        bce = F.binary_cross_entropy_with_logits(logits, target, pos_weight=w, reduction="none")
        if self.focal:
            p = torch.sigmoid(logits).detach()
            bce = bce * ((1 - p) * target + p * (1 - target)) ** self.gamma
        return (bce * valid).sum() / valid.sum().clamp(min=1)


def warmup_cosine(total_steps: int, warmup_frac: float):
    warm = max(1, int(total_steps * warmup_frac))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total_steps - warm))))
    return f


def param_groups(net, cfg: Config) -> list[dict]:
    groups, seen = [], set()
    for m, lr in (cfg.train.encoder_lr or {}).items():
        if m in net.encoders:
            params = list(net.encoders[m].parameters())
            seen |= {id(p) for p in params}
            groups.append({"params": params, "lr": lr})
    groups.append({"params": [p for p in net.parameters() if id(p) not in seen], "lr": cfg.train.lr})
    return groups


def check_loadable(failed: dict[int, str], n: int, what: str, cfg: Config) -> None:
    """More than `train.max_skipped` of the records failing means a setting is wrong, not the data."""
    if n and len(failed) / n > cfg.train.max_skipped:
        common, count = Counter(failed.values()).most_common(1)[0]
        raise UserError(f"{len(failed)} of {n} {what} records cannot be loaded (more than train.max_skipped="
                        f"{cfg.train.max_skipped:g}); most common error ({count}x): {common}")


def validation_score(y: np.ndarray, probs: np.ndarray, task: str) -> float:
    ok = scored(probs)
    if ok.sum() < 2:
        return float("nan")
    P = prob_matrix(probs[ok], task)
    return point_metrics(onehot(y[ok], task, P.shape[1]), P, task)["auroc"]


def fit(net, prep: Preprocessing, cfg: Config, train: Records, val: Records, progress: bool = True,
        teachers: Optional[dict] = None, networks: int = 0) -> dict:
    """Train `net` on `train`, early-stopped on `val`'s AUROC, and restore its best epoch's weights.
    `teachers`: {modality: a trained network of that modality alone}; each modality's auxiliary head of
    `net` is then pulled towards its teacher's logits (fusion.teacher_weight, uni-modal teachers).
    `networks`: how many networks the whole run trains, this one first: its first batches then say
    what the run will cost (0: say nothing)."""
    tc, task = cfg.train, cfg.task.type
    seed_everything(tc.seed)
    device = distributed.device_for_rank(resolve_device(tc.device))
    distributed.init(device)
    main = distributed.is_main()
    progress = progress and main
    amp = amp_dtype(device, tc.amp)
    train, y_tr = labelled(train, prep)
    val, y_va = labelled(val, prep)
    net.to(device)
    train_ds, val_ds = datasets(net, prep, cfg, (train, y_tr), (val, y_va), main, progress)
    sampler = None
    if distributed.active():  # each rank a disjoint, equally long share; the global batch stays batch_size
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(train_ds, shuffle=True, seed=tc.seed)
    per_rank = -(-tc.batch_size // distributed.world_size())
    train_dl = make_loader(train_ds, cfg, prep, True, device, per_rank, tc.seed, tc.num_workers, sampler=sampler)
    val_dl = make_loader(val_ds, cfg, prep, False, device, tc.batch_size * 2, workers=tc.num_workers)
    loss_fn = Loss(task, class_balance(y_tr, task, prep.labels.num_outputs), tc.class_weights, tc.loss == "focal")
    stepper = Stepper(net, cfg, device, amp, loss_fn, tc.epochs * len(train_dl), teachers)

    best = {"score": -math.inf, "epoch": -1, "state": None}
    history, bad_rows, stale, val_failed = [], {}, 0, 0
    t_start = time.perf_counter()
    for epoch in range(tc.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        bar = progress_bar(train_dl, desc=f"epoch {epoch + 1}/{tc.epochs}", unit="batch", enabled=progress)
        if epoch == 0 and progress and networks:
            bar = CostEstimate(bar, len(train_dl), len(val_dl), tc.epochs, networks)
        seen, loss_sum = stepper.epoch(bar, bad_rows)
        if main:
            out = run_inference(net, val_dl, device, task, amp)
            if epoch == 0:
                check_loadable(bad_rows, len(train) // distributed.world_size(), "training", cfg)
                check_loadable({i: e for i, e in enumerate(out["errors"]) if e}, len(val), "validation", cfg)
                val_failed = sum(e is not None for e in out["errors"])
            score = validation_score(y_va, out["probs"], task)
        score = distributed.from_main(score if main else None)  # rank 0's verdict steers every rank
        rec = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "val_auroc": score,
               "patients_per_s": seen / (time.perf_counter() - t0)}
        history.append(rec)
        if progress:
            say(f"epoch {epoch + 1}/{tc.epochs}  loss {rec['train_loss']:.4f}  val AUROC {score:.4f}  "
                f"({rec['patients_per_s']:.0f} patients/s)")
        if epoch + 1 < min(tc.min_epochs, tc.epochs):  # the last epoch is always a candidate
            continue
        if not math.isfinite(score) or score > best["score"]:
            best = {"score": score, "epoch": epoch + 1, "state": copy.deepcopy(net.state_dict())}
            stale = 0
        else:
            stale += 1
            if stale >= tc.patience:
                break
    n_bad = distributed.total(len(bad_rows))
    if n_bad and main:
        log.warning("%d training records could not be loaded and were skipped", n_bad)
    net.load_state_dict(best["state"])
    return {"history": history, "best_epoch": best["epoch"], "best_val_auroc": best["score"],
            "train_seconds": time.perf_counter() - t_start, "n_train": len(train) - n_bad,
            "n_val": len(val) - val_failed, "skipped_records": n_bad, "skipped_val_records": val_failed,
            "device": str(device), "processes": distributed.world_size(), "amp": str(amp).replace("torch.", "")}


class CostEstimate:
    """The first epoch's batches, passed through; after the fourth, one line of what training will cost
    at most, from the second to fourth batches (the first pays one-off start-up). A forward-only
    validation batch of twice the size counts as 2/3 of a training batch. An upper bound: early
    stopping ends most networks sooner, and a strategy's single-modality networks are cheaper."""

    PROBE = 4

    def __init__(self, bar, batches: int, val_batches: int, epochs: int, networks: int):
        self.bar, self.batches, self.val_batches, self.epochs, self.networks = bar, batches, val_batches, epochs, networks

    def __iter__(self):
        t1 = None
        for k, batch in enumerate(self.bar):
            if k == 1:
                t1 = time.perf_counter()
            elif k == self.PROBE and t1 is not None:
                self.say((time.perf_counter() - t1) / (self.PROBE - 1))
            yield batch

    def say(self, per_batch: float) -> None:
        epoch = per_batch * (self.batches + 2 / 3 * self.val_batches)
        total = epoch * self.epochs * self.networks
        nets = f" × {self.networks} networks" if self.networks > 1 else ""
        say(f"cost estimate: {per_batch:.2g} s per batch, an epoch about {_duration(epoch)}; at most "
            f"{self.epochs} epochs{nets} ≈ {_duration(total)}")

    def set_postfix(self, **kw) -> None:
        self.bar.set_postfix(**kw)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def datasets(net, prep: Preprocessing, cfg: Config, train: tuple, val: tuple, main: bool, progress: bool):
    """The training and validation RecordDatasets (`train`/`val`: records and labels), with frozen
    encoders' outputs cached where the config asks: rank 0 fills a shared image cache, the others read it."""
    cache = "image" in cfg.modalities and cfg.image.cache
    feats = [None, None]
    if "image" in cfg.modalities and cfg.image.cache_features:
        from multimodal.data.features import FeatureCache

        enc = net.encoders["image"]
        feats = [FeatureCache(cfg, prep, enc, enc.weights_digest) for _ in range(2)]
        t0 = time.perf_counter()
        for turn in ("main", "others") if distributed.active() else ("main",):
            if (turn == "main") == main:
                for f, (r, _) in zip(feats, (train, val)):
                    f.fill(r, progress=progress)
            distributed.barrier()
        log.info("frozen image features: %d cached, %d computed in %.0fs", sum(f.hits for f in feats),
                 sum(f.misses for f in feats), time.perf_counter() - t0)
    tfeats = [None, None]
    if "text" in cfg.modalities and cfg.text.cache_features:
        from multimodal.data.features import known_text_features, text_features

        enc = net.encoders["text"]
        known = known_text_features(enc, prep)
        tfeats = [text_features(r, cfg, prep, enc, known=known) for r, _ in (train, val)]
    return (RecordDataset(train[0], prep, cfg.modalities, cfg, train[1], train=True, cache=cache, features=feats[0],
                          text_features=tfeats[0]),
            RecordDataset(val[0], prep, cfg.modalities, cfg, val[1], cache=cache, features=feats[1],
                          text_features=tfeats[1]))


class Stepper:
    """One optimisation step at a time: AdamW over the parameter groups, warmup + cosine, gradient
    clipping, AMP loss scaling, the auxiliary and uni-modal teacher terms, gradient modulation."""

    def __init__(self, net, cfg: Config, device: torch.device, amp, loss_fn: Loss, total_steps: int,
                 teachers: Optional[dict] = None):
        tc = cfg.train
        self.net, self.cfg, self.device, self.amp, self.loss_fn = net, cfg, device, amp, loss_fn
        self.teachers = {m: t.eval() for m, t in (teachers or {}).items()}
        # fused: one kernel for every tensor's update, 4-5x less optimizer time per step on CPU, where the
        # default is a Python loop over tensors (a visible share of a cached, small-tail training step)
        self.opt = torch.optim.AdamW(param_groups(net, cfg), weight_decay=tc.weight_decay,
                                     fused=device.type in ("cpu", "cuda"))
        self.trainable = [p for p in net.parameters() if p.requires_grad]
        self.step_net = distributed.wrap(net, device)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, warmup_cosine(total_steps, tc.warmup))
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
        self.balance = None
        if cfg.fusion.balance == "ogm_ge" and len(getattr(net, "encoders", {})) > 1:
            self.balance = GradientModulation(net, cfg.fusion.balance_alpha, cfg.task.type, tc.seed)

    def epoch(self, batches, bad_rows: dict) -> tuple[int, float]:
        """One pass over `batches`; failed rows go to `bad_rows`. → (patients seen, summed loss)."""
        self.net.train()
        seen, loss_sum, t0 = 0, 0.0, time.perf_counter()
        for batch in batches:
            ok = batch["ok"]
            bad_rows.update({int(i): e for i, e in zip(batch["index"].tolist(), batch["error"]) if e})
            idle = ok.sum() < 1
            if idle and not distributed.active():
                continue
            if idle:
                ok = torch.ones_like(ok)  # every rank must step together: this batch counts for nothing
            b = to_device({k: (v[ok] if isinstance(v, torch.Tensor) and len(v) == len(ok) else v)
                           for k, v in batch.items()}, self.device)
            loss = self.step(b, 0.0 if idle else 1.0)
            n = int(ok.sum())
            seen += n
            loss_sum += loss * n
            batches.set_postfix(loss=f"{loss_sum / seen:.4f}", pat_per_s=f"{seen / (time.perf_counter() - t0):.0f}")
        return seen, loss_sum

    def step(self, b: dict, weight: float = 1.0) -> float:
        """`weight` 0: a batch every rank must step on together, that counts for nothing."""
        cfg = self.cfg
        with autocast(self.device, self.amp):
            logits, aux = self.step_net(b, return_aux=True)
            targets = self.teacher_logits(b)
        loss = self.loss_fn(logits, b["y"])
        if cfg.fusion.aux_weight > 0:
            parts = [self.loss_fn(z[p], b["y"][p]) for z, p in aux.values() if p.any()]
            loss = loss + cfg.fusion.aux_weight * sum(parts) / max(len(parts), 1)
        if targets:
            parts = [F.mse_loss(aux[m][0][p].float(), t[p].float()) for m, t in targets.items()
                     for p in [aux[m][1]] if p.any()]
            loss = loss + cfg.fusion.teacher_weight * sum(parts) / max(len(parts), 1)
        loss = loss * weight
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        if self.balance is not None:
            self.balance.scale(aux, b["y"])
        torch.nn.utils.clip_grad_norm_(self.trainable, cfg.train.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        return loss.item()

    @torch.no_grad()
    def teacher_logits(self, b: dict) -> dict:
        """Each teacher's raw logits on this batch (it reads only its own modality's inputs)."""
        return {m: t(b) for m, t in self.teachers.items()}
