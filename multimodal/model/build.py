"""Config + fitted preprocessing → DiagnosisNet. The only place config becomes modules."""
from __future__ import annotations

from typing import Optional

import encoders  # noqa: F401  (registers encoders)
import fusion  # noqa: F401  (registers fusion heads)
from encoders.base import ENCODERS
from fusion.base import FUSION_HEADS

from multimodal.config import Config
from multimodal.errors import UserError
from multimodal.model.network import DiagnosisNet, Ensemble
from multimodal.data.preprocess import Preprocessing


def encoder_name(cfg: Config, modality: str) -> str:
    """The registered encoder a config asks for: text.encoder names one; image.encoder is a timm
    architecture, which the 'timm' encoder runs; tabular data has one encoder."""
    return cfg.text.encoder if modality == "text" else {"image": "timm", "tabular": "tabular"}[modality]


def build_encoder(cfg: Config, modality: str, prep: Preprocessing, text_config: Optional[dict] = None,
                  offline: bool = False):
    """The encoder `cfg` names for `modality`, built from its config section and fitted preprocessing.
    `text_config`: the text encoder's architecture as a saved model recorded it. `offline`: the weights
    come from a model directory next, so build the bare architecture from the stored config alone: no
    hub ids, folders, checkpoints or remote code are looked at."""
    stored = text_config if modality == "text" else None
    return ENCODERS.get(encoder_name(cfg, modality)).from_config(
        getattr(cfg, modality), getattr(prep, modality), stored=stored, offline=offline)


def member_plan(cfg: Config) -> list[tuple[tuple[str, ...], int]]:
    """The networks `cfg` asks for, in order: (the modalities one sees, its seed offset). joint: every
    modality in each of train.ensemble seeds; unimodal: each modality alone, in each seed; auto: both."""
    seeds = range(cfg.train.ensemble)
    joint = [(tuple(cfg.modalities), i) for i in seeds]
    alone = [((m,), i) for m in cfg.modalities for i in seeds]
    if len(cfg.modalities) == 1:  # one modality: every strategy is the one network
        return joint
    return {"joint": joint, "unimodal": alone, "auto": joint + alone}[cfg.fusion.strategy]


def fold_members(cfg: Config, n_splits: int) -> list[list[int]]:
    """For each hold-out split, the networks (indices into member_plan) that never trained on it: all
    of them on one shared hold-out; with train.ensemble_holdout crossfit, those of seed offset j on
    fold j, since member i trains on the split of its seed offset."""
    plan = member_plan(cfg)
    if n_splits == 1:
        return [list(range(len(plan)))]
    return [[i for i, (_, offset) in enumerate(plan) if offset == j] for j in range(n_splits)]


def member_config(cfg: Config, modalities: tuple[str, ...], seed_offset: int) -> Config:
    """The config one network trains with: its modalities, its seed, and for a network of one modality
    that modality's train.alone settings."""
    out = cfg.model_copy(deep=True)
    out.modalities, out.train.seed = list(modalities), cfg.train.seed + seed_offset
    alone = cfg.train.alone.get(modalities[0]) if len(modalities) == 1 else None
    for name, value in (alone.model_dump() if alone else {}).items():
        if value is not None:
            setattr(out.train, name, value)
    return out


def build_network(cfg: Config, prep: Preprocessing, text_config: Optional[dict] = None,
                  offline: bool = False):
    """A DiagnosisNet, or an Ensemble of the networks member_plan names. Member i's weights are
    initialised from its own seed, so a member built here is the one `fit` trains with that seed."""
    import torch

    plan = member_plan(cfg)
    if len(plan) == 1:
        return _build_one(cfg, prep, text_config, offline)
    nets, shared = [], {}
    for modalities, offset in plan:
        torch.manual_seed(cfg.train.seed + offset)
        nets.append(_build_one(member_config(cfg, modalities, offset), prep, text_config, offline, shared))
    mixed = any(len(mods) < len(cfg.modalities) for mods, _ in plan)  # networks that see different inputs
    return Ensemble(nets, mixture=cfg.task.type if mixed else None)


def _frozen(module) -> bool:
    return not any(p.requires_grad for p in module.parameters())


def _build_one(cfg: Config, prep: Preprocessing, text_config: Optional[dict], offline: bool,
               shared: Optional[dict] = None) -> DiagnosisNet:
    """`shared`: encoders with nothing to train, filled by the first ensemble member and reused by the
    others (the same weights whatever the seed)."""
    try:
        encs = {}
        for m in cfg.modalities:
            if shared is not None and m in shared:
                encs[m] = shared[m]
                continue
            encs[m] = build_encoder(cfg, m, prep, text_config, offline)
            if shared is not None and _frozen(encs[m]):
                shared[m] = encs[m]
        layouts = {m: e.token_layout for m, e in encs.items() if getattr(e, "token_layout", None)}
        head = FUSION_HEADS.get(cfg.fusion.type).from_config(
            cfg.fusion, {m: e.output_dim for m, e in encs.items()}, prep.labels.num_outputs, layouts)
    except (ValueError, RuntimeError, OSError, KeyError, TypeError, AssertionError) as e:  # torch asserts its arguments
        raise UserError(f"cannot build model: {' '.join(str(e).split())[:250]}") from None
    aux = cfg.fusion.aux_weight > 0 or cfg.fusion.teacher_weight > 0
    return DiagnosisNet(encs, head, prep.labels.num_outputs, aux_heads=aux)
