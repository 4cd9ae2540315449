"""Federated training, framework-neutral: the hooks a federation framework (Flower, NVIDIA FLARE) calls
at each site, around the same training step, loss and data path as `mmdx train`.

A `Site` holds one site's records, split there into training and hold-out patients as `mmdx train`
splits records without --val (data.splits.holdout_splits). The server drives it:
1. `statistics()` → the site's preprocessing counts (training.site_counts); the server merges every
   site's into one preprocessing (site_counts.agreed_preprocessing);
2. `agree(prep)` → the site encodes its records with it and builds the network; it answers with its
   class counts, which the server merges into the loss's class balance;
3. each round: `set_state(global weights)`, `train_steps(n)` (its optimizer and learning-rate schedule
   carry on across rounds: the schedule spans every round, as one `mmdx train` run spans its epochs),
   `get_state()` → the server averages; `evaluate_site()` → hold-out histograms for validation.

Only weights and counts leave a site (site_counts' docstring lists them). One network only: a fusion
strategy's or an ensemble's several networks train one after the other in `mmdx train`, and are not
federated here.
"""
from __future__ import annotations

import itertools
import logging
from typing import Optional

import numpy as np
import torch

from multimodal.config import Config
from multimodal.data.batches import make_loader
from multimodal.data.preprocess import Preprocessing
from multimodal.data.records import Records
from multimodal.data.splits import holdout_splits, labelled
from multimodal.errors import UserError
from multimodal.inference.forward import amp_dtype, resolve_device, run_inference
from multimodal.model.build import build_network, member_config, member_plan
from multimodal.progress import bar
from multimodal.training import site_counts
from multimodal.training.loop import Loss, Stepper, check_loadable, datasets, seed_everything

log = logging.getLogger("mmdx")
CALIBRATION = ("temperature", "logit_bias")  # fitted once, after training: no part of what sites average


def check_federable(cfg: Config) -> None:
    """One line for a config that federated training cannot run."""
    if len(member_plan(cfg)) > 1:
        raise UserError("federated training trains one network: set fusion.strategy=joint and train.ensemble=1 "
                        f"(this config trains {len(member_plan(cfg))})")
    if getattr(cfg.task, "conformal", None):
        raise UserError("task.conformal fits its cuts on hold-out scores, which stay at the sites in federated "
                        "training; leave it unset")


def get_state(net: torch.nn.Module) -> dict[str, np.ndarray]:
    """The weights the sites average: every floating-point parameter and buffer (batch-norm statistics
    included), but not the calibration (fitted after training) or integer counters."""
    return {k: v.detach().cpu().numpy().copy() for k, v in net.state_dict().items()
            if v.is_floating_point() and k not in CALIBRATION}


def set_state(net: torch.nn.Module, state: dict[str, np.ndarray]) -> None:
    """Load `state` (get_state's keys, exactly) into `net`, in place."""
    own = get_state(net)
    if set(state) != set(own):
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        raise ValueError(f"weights do not fit this network (missing {missing[:3]}, unknown {extra[:3]})")
    net.load_state_dict({k: torch.as_tensor(np.array(v)) for k, v in state.items()}, strict=False)


class Site:
    """One site's side of federated training (module docstring): its own records, never sent."""

    def __init__(self, cfg: Config, records: Records, seed_offset: int = 0):
        check_federable(cfg)
        self.cfg = member_config(cfg, tuple(cfg.modalities), 0)  # what train_members gives one network
        self.seed = cfg.train.seed + seed_offset  # its own shuffling and augmentation
        self.train, self.holdout = holdout_splits(records, self.cfg)[0]
        self.prep: Optional[Preprocessing] = None
        self.stepper: Optional[Stepper] = None

    def statistics(self) -> dict:
        return site_counts.site_statistics(self.cfg, self.train)

    def agree(self, prep: Preprocessing, total_epochs: int) -> dict:
        """Encode the records with the agreed `prep` and build the network. `total_epochs`: local epochs
        over every round, what the learning-rate schedule spans. → the site's class counts."""
        cfg, tc = self.cfg, self.cfg.train
        self.prep = prep
        self.device = resolve_device(tc.device)
        self.amp = amp_dtype(self.device, tc.amp)
        seed_everything(tc.seed)
        self.net = build_network(cfg, prep).to(self.device)
        train, self.y_train = labelled(self.train, prep)
        val, self.y_val = labelled(self.holdout, prep)
        train_ds, val_ds = datasets(self.net, prep, cfg, (train, self.y_train), (val, self.y_val), True, False)
        self.train_dl = make_loader(train_ds, cfg, prep, True, self.device, tc.batch_size, self.seed, tc.num_workers)
        self.val_dl = make_loader(val_ds, cfg, prep, False, self.device, tc.batch_size * 2, workers=tc.num_workers)
        self.total_steps = max(1, total_epochs * len(self.train_dl))
        self.batches = itertools.chain.from_iterable(itertools.repeat(self.train_dl))  # epoch after epoch
        self.bad_rows: dict = {}
        return site_counts.class_balance_counts(self.y_train, cfg.task.type, prep.labels.num_outputs)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_dl)

    def get_state(self) -> dict[str, np.ndarray]:
        return get_state(self.net)

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        set_state(self.net, state)

    def train_steps(self, steps: int, class_balance: list[float], proximal_mu: float = 0.0) -> dict:
        """`steps` optimisation steps on this site's training records, from the weights set last.
        `class_balance`: the merged one (site_counts.merged_class_balance), so every site weighs
        classes as pooled training would. `proximal_mu` > 0: FedProx's term mu/2 ‖w − w_global‖².
        → {"num-examples": patients seen, "train-loss": their mean loss}."""
        tc = self.cfg.train
        if self.stepper is None:
            loss = Loss(self.cfg.task.type, np.asarray(class_balance), tc.class_weights, tc.loss == "focal")
            self.stepper = Stepper(self.net, self.cfg, self.device, self.amp, loss, self.total_steps)
        hooks = self._proximal(proximal_mu) if proximal_mu > 0 else []
        try:
            seen, loss_sum = self.stepper.epoch(bar(itertools.islice(self.batches, steps), enabled=False),
                                                self.bad_rows)
        finally:
            for h in hooks:
                h.remove()
        check_loadable(self.bad_rows, len(self.train), "training", self.cfg)
        return {"num-examples": int(seen), "train-loss": loss_sum / max(seen, 1)}

    def _proximal(self, mu: float) -> list:
        """FedProx: each parameter's gradient gains mu (w − w_global), the gradient of mu/2 ‖w − w_global‖²,
        scaled as the loss is where fp16 scales it."""
        scaler = self.stepper.scaler

        def pull(p: torch.Tensor, start: torch.Tensor):
            def hook(g):
                scale = scaler.get_scale() if scaler.is_enabled() else 1.0
                return g + mu * scale * (p.detach() - start)
            return hook

        return [p.register_hook(pull(p, p.detach().clone())) for p in self.stepper.trainable]

    @torch.no_grad()
    def evaluate_site(self) -> dict:
        """The current weights on this site's hold-out patients: how many were scored, and the histogram
        of their probabilities by label (site_counts.histogram) that validation metrics and the operating
        point are computed from on the server."""
        out = run_inference(self.net, self.val_dl, self.device, self.cfg.task.type, self.amp)
        k = self.prep.labels.num_outputs
        task, n = self.cfg.task.type, len(self.y_val)
        probs = out["probs"] if out["probs"] is not None else np.full((n,) if task == "binary" else (n, k), np.nan)
        scored = np.isfinite(np.asarray(probs, np.float64).reshape(n, -1)).all(1)
        return {"num-examples": int(scored.sum()), "histogram": site_counts.histogram(self.y_val, probs, task, k)}
