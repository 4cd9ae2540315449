"""Typed, validated config: the YAML a user writes, and the JSON a model directory keeps.

Everything the engine builds is described here; `multimodal.model.build` turns it into objects.
The sections of each input (image, text, tabular) are in inputs.py; this module holds the task, data,
fusion and training sections, the whole Config, and reading it from YAML with key=value overrides.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from multimodal.errors import UserError

from .base import MODALITIES, _Strict, parse_rule  # noqa: F401  (parse_rule: the operating-point rule)
from .inputs import AugmentConfig, DecodeLimits, ImageConfig, TabularConfig, TextConfig

__all__ = ["MODALITIES", "AugmentConfig", "Config", "DataConfig", "DecodeLimits", "FusionConfig", "ImageConfig",
           "TabularConfig", "TaskConfig", "TextConfig", "TrainConfig", "config_from_dict", "load_config",
           "parse_overrides"]


class TaskConfig(_Strict):
    type: Literal["binary", "multiclass", "multilabel"] = "binary"
    """binary, multiclass or multilabel."""
    label: Union[str, list[str]]
    """One column; for multilabel either several 0/1 columns or one column of ';'-joined labels."""
    classes: Optional[list[str]] = None
    """Class order; for binary the second class is the positive one. Inferred from training labels if unset."""
    positive: Optional[list[str]] = None
    """Binary task from a multiclass column: these label values are the positive class, every other value
    the negative one (e.g. [mel, bcc, akiec]); no hand-made 0/1 column needed."""
    names: Optional[dict[str, str]] = None
    """Readable class names for outputs and reports, by label value, e.g. {0: benign, 1: melanoma}."""
    threshold: Union[float, str] = 0.5
    """Binary/multilabel operating point: a probability, `youden`, `sensitivity:0.9` or `specificity:0.95`,
    chosen on the validation records at fit time and saved with the model; `pred` uses it."""
    conformal: Optional[float] = Field(None, gt=0, lt=1)
    """Binary/multiclass: split-conformal prediction sets at this coverage (e.g. 0.9): the classes whose
    calibrated probability reaches a cut fitted on the calibration records (the hold-out, out-of-fold
    under crossfit; the validation records when given), where the operating point is fitted, so that
    the set holds the true class for at least this share of new patients from the same population.
    `predict` writes each record's set (`prediction_set`, class names joined by `|`, "" for an empty set)
    and its `set_size`; `evaluate` reports empirical coverage and mean set size with CIs."""
    conformal_by_class: Union[bool, Literal["auto"]] = "auto"
    """true: one cut per class (Mondrian), so coverage holds within each class, the rare one included;
    false: one cut for all (coverage holds on average, typically below target in a rare class). auto:
    per class when the task is imbalanced (the rarest class under half its even share, 1 / (2 x
    classes), of the calibration records: below 25% in a binary task) and every class has the
    (1 - coverage) / coverage records a finite cut needs (9 at 0.9); else one cut."""

    @field_validator("names", mode="before")
    @classmethod
    def _name_keys(cls, v):
        return {str(k): str(n) for k, n in v.items()} if isinstance(v, dict) else v

    @field_validator("positive", mode="before")
    @classmethod
    def _positive_values(cls, v):
        return [str(x) for x in v] if isinstance(v, (list, tuple)) else v

    @model_validator(mode="after")
    def _values(self):
        labels = [self.label] if isinstance(self.label, str) else self.label
        if not labels or any(not str(c).strip() for c in labels):
            raise ValueError("task.label must name a column")
        parse_rule(self.threshold)
        if self.conformal is not None and self.type == "multilabel":
            raise ValueError("task.conformal makes prediction sets for binary and multiclass tasks (one true class "
                             "per record)")
        if self.type == "multiclass" and self.threshold != 0.5:
            raise ValueError("task.threshold applies to binary and multilabel tasks; multiclass predicts the most "
                             "probable class")
        if self.positive is not None:
            if self.type != "binary" or not self.positive or self.classes is not None:
                raise ValueError("task.positive makes a binary task (type: binary, no task.classes) from the "
                                 "values it lists")
            if len(set(self.positive)) != len(self.positive):
                raise ValueError("task.positive lists a value twice")
        if self.names is not None and len(set(self.names.values())) != len(self.names):
            raise ValueError("task.names gives two classes the same name")
        if self.classes is not None:
            if len(set(self.classes)) != len(self.classes):
                raise ValueError("task.classes lists a class twice")
            if self.type == "binary" and len(self.classes) != 2:
                raise ValueError(f"a binary task has 2 classes, task.classes has {len(self.classes)}")
        return self


class DataConfig(_Strict):
    id: str = "patient_id"
    """One row per record (a study, a lesion): ids must be unique unless `group` is set."""
    group: Optional[str] = None
    """Patient column when a patient has several records: hold-out splits keep a patient's records together."""
    image_root: Optional[str] = None
    """Folder that relative image paths resolve against; default: the records file's folder. At training
    time only: a saved model never redirects reads, predict resolves against the records file or --image-root."""
    confine_images: bool = True
    """Read only images that lie under the image root: a path that resolves outside it (an absolute path
    elsewhere, `..`, a symlinked file or slice pointing out) is that record's error, so a records file
    can neither probe which files exist nor pull any readable image into a model or a report. false
    reads any path the records name (absolute ones as given, relative ones against the image root)."""


class FusionConfig(_Strict):
    type: str = "attention"
    """attention | concat | additive (one logit per modality, summed: no interactions), or any registered
    fusion head."""
    dim: int = Field(64, ge=1)
    """Token width inside the fusion head."""
    layers: int = Field(2, ge=1)
    """Transformer blocks (attention) or hidden layers (concat)."""
    heads: int = Field(4, ge=1)
    """Attention heads; `dim` must divide by it."""
    dropout: float = Field(0.1, ge=0, lt=1)
    """Dropout inside the fusion head."""
    modality_dropout: float = Field(0.15, ge=0, lt=1)
    """Per patient and modality, the chance a modality is hidden during training."""
    token_positions: bool = True
    """Attention fusion: each image token also carries where it comes from, as learned embeddings of its
    view (its image's place among the record's images, in the order image.columns and each cell's
    ';'-joined paths list them) and of its cell in the token_grid. Without them the head sees a
    patient's image tokens as one unordered bag. Keep a fixed order (e.g. clinical photograph, then
    dermoscopic) so that a view's place means the same for every patient; a missing first image moves
    the next one into its place. Places are counted among the images shown together, so views are
    told apart only when image.max_images lets them be seen together (2 for a clinical and a
    dermoscopic photograph); with max_images 1 every image is view 0."""
    strategy: Literal["joint", "unimodal", "auto"] = "joint"
    """joint: one network over every modality (the head above). unimodal: one network per modality,
    each trained alone to its own best epoch, then calibrated on the hold-out; the output is a weighted
    mean of their probabilities, the weights (equal, or fitted) chosen by cross-validation inside the
    hold-out. Joint training tends to settle on the easiest modality and under-learn the others, which
    this avoids. auto: the joint network and the per-modality ones, mixed alike, so the hold-out decides
    how much of each. The choice and every candidate's hold-out score are kept in metrics.json.
    With train.ensemble_holdout crossfit, each fold's hold-out is scored by the networks that held it
    out, and the weights are fitted on all folds pooled."""
    aux_weight: float = Field(0.0, ge=0)
    """Weight of auxiliary per-modality losses: each encoder also predicts the label from its own pooled
    tokens, so a slow learner (a CNN from scratch) still learns when other modalities already explain
    the training cases and early stopping would otherwise freeze fusion before it matters."""
    teacher_weight: float = Field(0.0, ge=0)
    """Uni-modal teachers (Du et al. 2021), for strategy auto: its per-modality networks train first, and
    the joint network then trains with each modality's auxiliary head pulled towards that modality's
    network (mean squared difference of logits, times this weight), so every encoder learns what it
    would learn alone. 0: the joint network trains by itself."""
    balance: Literal["none", "ogm_ge"] = "none"
    """ogm_ge: on-the-fly gradient modulation (Peng et al. 2022) while the joint network trains: on each
    batch, the encoders of modalities whose auxiliary head predicts the label better than the
    modalities' mean are slowed, by 1 - tanh(balance_alpha x (their score / the mean - 1)), and
    Gaussian noise of each weight gradient's own spread is added (generalisation enhancement). Needs
    aux_weight > 0 (the heads that score each modality); a network of one modality trains without it, and
    a fully frozen encoder has no gradients to slow."""
    balance_alpha: float = Field(0.5, gt=0)
    """How hard ogm_ge slows a modality that is ahead."""

    @model_validator(mode="after")
    def _heads(self):
        if self.dim % self.heads:
            raise ValueError(f"fusion.dim ({self.dim}) must be divisible by fusion.heads ({self.heads})")
        return self


class AloneConfig(_Strict):
    """What a network that reads one modality only trains with, in place of the train section's values
    (null: the train section's)."""

    epochs: Optional[int] = Field(None, ge=1)
    min_epochs: Optional[int] = Field(None, ge=1)
    patience: Optional[int] = Field(None, ge=1)
    lr: Optional[float] = Field(None, gt=0)


class TrainConfig(_Strict):
    epochs: int = Field(20, ge=1)
    """Maximum epochs (early stopping may end sooner)."""
    batch_size: int = Field(32, ge=1)
    """Records per step (the global batch under torchrun)."""
    lr: float = Field(1e-3, gt=0)
    """AdamW learning rate (warmup then cosine decay)."""
    encoder_lr: Optional[dict[Literal["image", "text", "tabular"], float]] = None
    """Per-modality encoder learning rates, e.g. {image: 3e-4}; entries for disabled modalities are
    ignored, so `modalities=text` baselines need no config change."""
    weight_decay: float = Field(0.01, ge=0)
    """AdamW weight decay."""
    warmup: float = Field(0.05, ge=0, lt=1)
    """Fraction of all steps spent in linear warmup, before cosine decay."""
    grad_clip: float = Field(1.0, gt=0)
    """Gradient norm clipping."""
    loss: Literal["bce", "focal"] = "bce"
    """bce means cross-entropy for multiclass."""
    class_weights: bool = True
    """Weight the loss by inverse class frequency."""
    patience: int = Field(5, ge=1)
    """Epochs without validation AUROC gain before stopping."""
    min_epochs: int = Field(1, ge=1)
    """Epochs before a checkpoint can be chosen or training stop: a from-scratch CNN can need many
    epochs while text/lab tokens already saturate a small validation set's AUROC."""
    val_fraction: float = Field(0.15, gt=0, lt=1)
    """Used when no validation records are given: a stratified, seeded split of the training records."""
    calibrate: bool = True
    """Fit temperature scaling on the validation records after training; predict applies it."""
    calibrate_bias: bool = True
    """Fit one bias per output along with the temperature: class-weighted training shifts the logits,
    which a temperature alone cannot undo (measured on the demo: held-out ECE rose with T alone)."""
    max_skipped: float = Field(0.05, ge=0, le=1)
    """Stop with an error when more than this fraction of training or validation records cannot be
    loaded: a wrong window, frame index or image root must not yield a model trained on a few rows."""
    seed: int = 0
    """Seeds splits, initialisation and shuffling."""
    ensemble: int = Field(1, ge=1, le=16)
    """Members trained with seeds seed, seed+1, ...: each early-stopped on the same hold-out (or on its
    own: ensemble_holdout), saved in one model directory; the model's output is the mean of their
    logits, calibrated once. On a few thousand patients one seed's AUROC moves by about 0.01; the mean
    of several moves less and is usually higher.
    Costs N times the training and predict time. Fully frozen encoders (freeze: all) are shared, not
    copied."""
    ensemble_holdout: Literal["shared", "crossfit"] = "shared"
    """Which patients the members early-stop on when no validation records are given. shared: all on
    the one val_fraction hold-out, fitted on the rest. crossfit: member i holds out the i-th of
    round(1 / val_fraction) patient-grouped folds, so together the members learn from every training
    patient; calibration and the operating point are then fitted on each record's out-of-fold logits
    (those of the one member that did not train on it), and preprocessing (vocabulary, scaler
    statistics; no labels) on every training record. Needs ensemble <= round(1 / val_fraction)."""
    alone: dict[Literal["image", "text", "tabular"], AloneConfig] = {
        "tabular": AloneConfig(epochs=40, min_epochs=1, patience=8)}
    """Settings for a network that reads one modality only (a `modalities=` run of one, or a fusion
    strategy's per-modality network), by modality, in place of epochs, min_epochs, patience and lr
    above. A recipe's epochs suit its slowest learner: three epochs of a fine-tuned CNN left HAM10000's
    tabular network at 0.810 hold-out AUROC, against 0.825 when it stopped early by itself (epoch 25
    of 40). {} trains every network with the values above."""
    device: str = "auto"
    """auto (CUDA when available), cpu, cuda or cuda:N."""
    amp: bool = True
    """Mixed precision on CUDA (bf16 where supported, else fp16); ignored on CPU."""
    num_workers: int = Field(0, ge=0)
    """DataLoader worker processes for training."""

    @field_validator("encoder_lr")
    @classmethod
    def _positive_lr(cls, v):
        if v and min(v.values()) <= 0:
            raise ValueError("encoder learning rates must be > 0")
        return v

    @model_validator(mode="after")
    def _folds(self):
        k = holdout_folds(self.val_fraction)
        if self.ensemble_holdout == "crossfit" and self.ensemble > k:
            raise ValueError(f"ensemble_holdout: crossfit holds out one of round(1 / val_fraction) = {k} folds "
                             f"per member, fewer than ensemble = {self.ensemble}; lower val_fraction or ensemble")
        return self


def holdout_folds(val_fraction: float) -> int:
    """Folds the inner hold-out is one of: the hold-out is fold 0 of a patient-grouped K-fold split."""
    return max(2, round(1 / val_fraction))


class Config(_Strict):
    name: str = "model"
    """Shown in summaries and reports."""
    task: TaskConfig
    """What to predict."""
    data: DataConfig = DataConfig()
    """Ids, patients and where files are."""
    modalities: list[Literal["image", "text", "tabular"]] = list(MODALITIES)
    """Which inputs the model uses; each needs its section below (a list, or "image,text" on the CLI)."""
    image: Optional[ImageConfig] = None
    """Image modality."""
    text: Optional[TextConfig] = None
    """Text modality."""
    tabular: Optional[TabularConfig] = None
    """Tabular modality."""
    fusion: FusionConfig = FusionConfig()
    """How modality tokens are combined."""
    train: TrainConfig = TrainConfig()
    """Optimisation and early stopping."""

    @field_validator("modalities", mode="before")
    @classmethod
    def _split(cls, v):
        return [m.strip() for m in v.split(",") if m.strip()] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _consistent(self):
        if not self.modalities:
            raise ValueError("modalities is empty")
        if len(set(self.modalities)) != len(self.modalities):
            raise ValueError("modalities lists a modality twice")
        for m in self.modalities:
            if getattr(self, m) is None:
                raise ValueError(f"modality '{m}' is enabled but the config has no '{m}:' section")
        if self.fusion.teacher_weight > 0 and (self.fusion.strategy != "auto" or len(self.modalities) < 2):
            raise ValueError("fusion.teacher_weight needs fusion.strategy: auto and two or more modalities (the "
                             "per-modality networks it trains are the teachers)")
        if self.fusion.balance != "none" and self.fusion.aux_weight <= 0:
            raise ValueError("fusion.balance: ogm_ge needs fusion.aux_weight > 0: each modality's own head is what "
                             "scores it")
        keys = {self.data.id, self.data.group} - {None}
        clash = sorted(keys & set(self.columns()) | keys & set(self.label_columns()))
        if clash:
            raise ValueError(f"column {clash[0]!r} is an id/group column and cannot also be an input or label")
        return self

    def columns(self) -> list[str]:
        """Every input column the enabled modalities read."""
        cols = []
        if "image" in self.modalities:
            cols += self.image.columns
        if "text" in self.modalities:
            cols.append(self.text.column)
        if "tabular" in self.modalities:
            cols += self.tabular.numeric + self.tabular.categorical
        return cols

    def label_columns(self) -> list[str]:
        return [self.task.label] if isinstance(self.task.label, str) else list(self.task.label)


def _set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise UserError(f"override '{key}': '{p}' is not a section")
    d[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`key.sub=value` strings; values are parsed as YAML so numbers, lists and booleans work."""
    out = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"override '{item}' is not key=value")
        key, raw = item.split("=", 1)
        out[key.strip()] = raw if key.strip() == "modalities" else yaml.safe_load(raw)
    return out


def _format_validation(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{source}: {where}: {first['msg']}{more}"


def config_from_dict(raw: dict, overrides: Optional[dict[str, Any]] = None, source: str = "config") -> Config:
    raw = dict(raw or {})
    for k, v in (overrides or {}).items():
        _set_dotted(raw, k, v)
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise UserError(_format_validation(e, source)) from None


def load_config(path: Union[str, Path], overrides: Optional[dict[str, Any]] = None) -> Config:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping at the top level")
    return config_from_dict(raw, overrides, source=str(path))
