"""The assembled model: one encoder per modality → fusion head → logits (calibrated: z / T + b)."""
from __future__ import annotations

import contextlib
import copy
import itertools
from typing import Iterable, Iterator, Optional

import torch
import torch.nn as nn

from encoders.base import Tokens


class DiagnosisNet(nn.Module):
    def __init__(self, encoders: dict[str, nn.Module], fusion: nn.Module, num_outputs: int,
                 aux_heads: bool = False):
        super().__init__()
        self.num_outputs = num_outputs
        self.encoders = nn.ModuleDict(encoders)
        self.fusion = fusion
        # Training-only: each modality predicts the label from its own pooled tokens (see fusion.aux_weight).
        self.aux_heads = nn.ModuleDict({m: nn.Linear(e.output_dim, num_outputs) for m, e in encoders.items()}) \
            if aux_heads else None
        # Calibration (temperature scaling) is part of the model, so predict applies it everywhere.
        self.register_buffer("temperature", torch.ones(1))
        self.register_buffer("logit_bias", torch.zeros(num_outputs))

    @property
    def modalities(self) -> list[str]:
        return list(self.encoders)

    def encode(self, batch: dict, done: Optional[dict[int, Tokens]] = None) -> dict[str, Tokens]:
        """`done`: tokens of encoders already run on this batch, by id (an ensemble's shared encoder)."""
        done = {} if done is None else done
        for enc in self.encoders.values():
            if id(enc) not in done:
                done[id(enc)] = enc(**{k: batch[k] for k in enc.input_keys if k in batch})
        return {m: done[id(enc)] for m, enc in self.encoders.items()}

    def forward(self, batch: dict, absent: Optional[Iterable[str]] = None, return_attention: bool = False,
                return_aux: bool = False):
        """`absent`: modalities to treat as missing for every patient (ablation), via the mask path.
        `return_aux`: also return {modality: (logits from that modality alone, present mask)}."""
        if "image_group" in batch:
            return over_view_groups(batch, lambda b: self.forward(b, absent), return_attention or return_aux)
        return self.fuse(self.encode(batch), absent, return_attention, return_aux)

    def fuse(self, tokens: dict[str, Tokens], absent: Optional[Iterable[str]] = None,
             return_attention: bool = False, return_aux: bool = False):
        """Tokens → calibrated logits: the part of forward after the encoders."""
        tokens = dict(tokens)
        for m in set(absent or ()) & set(tokens):
            t = tokens[m]
            tokens[m] = Tokens(t.x, torch.zeros_like(t.mask))
        logits = self.fusion(tokens, return_attention=return_attention) / self.temperature + self.logit_bias
        if not return_aux:
            return logits
        aux = {m: (head(tokens[m].mean()), tokens[m].present) for m, head in (self.aux_heads or {}).items()}
        return logits, aux


class Ensemble(nn.Module):
    """Several DiagnosisNets in one model. Seed members (train.ensemble) share one architecture: on a
    few thousand patients the seed alone moves validation AUROC by about 0.01, and the mean of the
    members' raw logits moves less. Members of a fusion strategy (fusion.strategy unimodal / auto) see
    different modalities and form a `mixture` (the task type): each member's logits are calibrated on
    their own (member_temperature, member_bias), and the output is the weighted mean of the members'
    probabilities, returned as logits. A member whose inputs a patient lacks still counts if it learnt
    what that absence says (member_answers_absent: the hold-out had such patients to calibrate it on),
    and is left out otherwise (a text-only member that never met a patient without a report).
    Calibrating each member first keeps one over-confident member from outvoting the rest, which
    averaging raw logits allows. The ensemble's
    own calibration is fitted once, on the combination, so those buffers live here and the members'
    own stay at temperature 1, bias 0. An encoder with nothing to train is one module shared by every
    member (safetensors stores it once)."""

    def __init__(self, members: list[DiagnosisNet], mixture: Optional[str] = None):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.num_outputs = members[0].num_outputs
        self.mixture = mixture
        self.register_buffer("temperature", torch.ones(1))
        self.register_buffer("logit_bias", torch.zeros(self.num_outputs))
        if mixture:
            M = len(members)
            self.register_buffer("member_weights", torch.full((M,), 1.0 / M))
            self.register_buffer("member_temperature", torch.ones(M))
            self.register_buffer("member_bias", torch.zeros(M, self.num_outputs))
            self.register_buffer("member_answers_absent", torch.zeros(M, dtype=torch.bool))

    @property
    def weighted(self) -> bool:
        return self.mixture is not None

    def subset(self, idx: list[int]) -> "Ensemble":
        """Members `idx` as an ensemble of their own: the same modules, not copies, each with its own
        mixture buffers and the ensemble's calibration left out (what a crossfit fold's hold-out is
        scored with: only the networks that never trained on it)."""
        sub = Ensemble([self.members[i] for i in idx], self.mixture).to(self.temperature.device)
        for name, buf in sub.named_buffers(recurse=False):
            if name.startswith("member_"):
                buf.copy_(getattr(self, name)[idx])
        return sub

    @property
    def modalities(self) -> list[str]:
        return list(dict.fromkeys(m for net in self.members for m in net.modalities))

    def encode(self, batch: dict, done: Optional[dict[int, Tokens]] = None) -> dict[str, Tokens]:
        """Every modality's tokens, each encoder run once (which inputs are present is the same for all)."""
        done = {} if done is None else done
        tokens: dict[str, Tokens] = {}
        for net in self.members:
            tokens.update(net.encode(batch, done))
        return tokens

    def member_logits(self, batch: dict, absent: Optional[Iterable[str]] = None, return_attention: bool = False,
                      calibrated: bool = False):
        """Every member's logits [M, B, K] and whether it speaks for the patient [M, B]: raw, with
        `seen` = the member sees some of the patient's inputs; or (`calibrated`, a mixture) each member
        calibrated, and `seen` also true where the member answers for an absence."""
        done: dict[int, Tokens] = {}  # a shared encoder runs once per batch, not once per member
        z, seen = [], []
        hidden = set(absent or ())
        for net in self.members:
            tokens = net.encode(batch, done)
            z.append(net.fuse(tokens, absent, return_attention))
            shown = [t.present for m, t in tokens.items() if m not in hidden]
            seen.append(torch.stack(shown).any(0) if shown else torch.zeros_like(z[-1][:, 0], dtype=torch.bool))
        z, seen = torch.stack(z), torch.stack(seen)
        if calibrated and self.mixture is not None:
            z = z / self.member_temperature[:, None, None] + self.member_bias[:, None, :]
            seen = seen | self.member_answers_absent[:, None]
        return z, seen

    def forward(self, batch: dict, absent: Optional[Iterable[str]] = None, return_attention: bool = False,
                return_aux: bool = False):
        if return_aux:
            raise ValueError("an ensemble is trained one member at a time; train a member for aux outputs")
        if "image_group" in batch:
            return over_view_groups(batch, lambda b: self.forward(b, absent), return_attention)
        z, seen = self.member_logits(batch, absent, return_attention, calibrated=True)
        fused = z.mean(0) if self.mixture is None else mix(z, seen, self.member_weights, self.mixture)
        return fused / self.temperature + self.logit_bias


def mix(z: torch.Tensor, seen: torch.Tensor, weights: torch.Tensor, task: str) -> torch.Tensor:
    """Members' calibrated logits [M, B, K] → the logits [B, K] of their `weights`-weighted mean
    probability over the members that see the patient (over all members where none does)."""
    w = weights.to(z.dtype)[:, None] * seen.to(z.dtype)  # [M, B]
    total = w.sum(0, keepdim=True)
    w = torch.where(total > 0, w / total.clamp(min=1e-12), (weights / weights.sum()).to(z.dtype)[:, None])
    if task == "multiclass":
        p = (w[..., None] * torch.softmax(z.float(), -1)).sum(0)
        return p.clamp(min=1e-7).log().to(z.dtype)
    p = (w[..., None] * torch.sigmoid(z.float())).sum(0).clamp(1e-7, 1 - 1e-7)
    return (p.log() - (-p).log1p()).to(z.dtype)


class MemberOutputs(nn.Module):
    """A weighted ensemble's members side by side, [B, M * (K + 1)]: each member's K logits, then
    whether it speaks for the patient (Ensemble.member_logits). What the hold-out weights are fitted on
    and evaluate compares with (inference's `logits` path)."""

    def __init__(self, ensemble: Ensemble, calibrated: bool = True):
        super().__init__()
        self.ensemble, self.calibrated = ensemble, calibrated
        self.num_outputs = len(ensemble.members) * (ensemble.num_outputs + 1)

    def forward(self, batch: dict, absent: Optional[Iterable[str]] = None):
        if "image_group" in batch:
            return over_view_groups(batch, lambda b: self.forward(b, absent))
        z, seen = self.ensemble.member_logits(batch, absent, calibrated=self.calibrated)
        return torch.cat([z.permute(1, 0, 2).flatten(1), seen.T.to(z.dtype)], 1)


def members(net: nn.Module) -> list[DiagnosisNet]:
    """The DiagnosisNets inside `net`: its ensemble members, or `net` itself."""
    return list(net.members) if isinstance(net, Ensemble) else [net]


def for_inference(net: nn.Module) -> nn.Module:
    """A copy of `net` to predict with: its CNNs' BatchNorms folded into their convolutions
    (encoders/fold.py; 1.12x the images/s of ResNet-18 on 2 CPU cores, outputs within 1e-6). A copy,
    because the folded network cannot be trained or saved as the model directory's weights."""
    fast = copy.deepcopy(net).eval()
    for m in fast.modules():
        if hasattr(m, "fold_batchnorm_"):
            m.fold_batchnorm_()
    return fast


def state_version(net: nn.Module) -> tuple:
    """Changes whenever a weight or buffer of `net` is replaced or changed in place (calibration
    refitted, `uncalibrated`, a user's fine-tuning): when a copy made by for_inference is stale."""
    return tuple((t.data_ptr(), t._version) for t in itertools.chain(net.parameters(), net.buffers()))


def over_view_groups(batch: dict, forward, extra_outputs: bool = False) -> torch.Tensor:
    """image.predict_views: all. Each record's images come in groups of at most max_images
    (batch["image_group"], [B, V]); every (record, group) is scored as a record of its own, with that
    group's images and the record's other inputs, and the record's logits are the mean over its
    groups. Index operations only: differentiable, and the same in the ONNX runner."""
    if extra_outputs:
        raise ValueError("attention and auxiliary outputs are per group of images; score the first group "
                         "(views='first') for them")
    group, mask, image = batch["image_group"], batch["image_mask"], batch["image"]
    B, V = mask.shape
    n = int(group.max()) + 1
    member = torch.nn.functional.one_hot(group, n).bool() & mask[..., None]  # [B, V, groups]
    present = member.any(1)
    present[:, 0] = True  # a record without images is still scored, once
    rows, groups = present.nonzero(as_tuple=True)
    pair = torch.full((B, n), -1, dtype=torch.long, device=group.device)
    pair[rows, groups] = torch.arange(len(rows), device=group.device)
    pos = (member.cumsum(1) - 1).gather(2, group[..., None])[..., 0]  # place within its group
    b, v = mask.nonzero(as_tuple=True)
    r, k = pair[b, group[b, v]], pos[b, v]
    size = int(member.sum(1).max()) if len(b) else 1
    sub = {key: val[rows] if isinstance(val, torch.Tensor) and val.dim() and len(val) == B
           else [val[i] for i in rows.tolist()] if isinstance(val, list) and len(val) == B else val
           for key, val in batch.items() if key not in ("image", "image_mask", "image_group")}
    sub["image"] = image.new_zeros(len(rows), size, *image.shape[2:]).index_put((r, k), image[b, v])
    sub["image_mask"] = torch.zeros(len(rows), size, dtype=torch.bool, device=mask.device).index_put(
        (r, k), torch.ones_like(r, dtype=torch.bool))
    z = forward(sub)
    total = z.new_zeros(B, *z.shape[1:]).index_add(0, rows, z)
    return total / torch.bincount(rows, minlength=B).to(z.dtype).view(B, *[1] * (z.dim() - 1))


@contextlib.contextmanager
def uncalibrated(net: nn.Module) -> Iterator[nn.Module]:
    """Within the block `net` gives raw outputs (temperature 1, no bias): what calibration is fitted on,
    or what it changed."""
    saved = net.temperature.clone(), net.logit_bias.clone()
    net.temperature.fill_(1.0)
    net.logit_bias.zero_()
    try:
        yield net
    finally:
        net.temperature.copy_(saved[0])
        net.logit_bias.copy_(saved[1])
