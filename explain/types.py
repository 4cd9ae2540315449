"""What an explanation of one patient holds: the contract between attribution methods and reports."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np


@dataclass
class PatientExplanation:
    id: str
    target: str
    """Class the attributions explain (binary: the positive class unless asked otherwise)."""
    probs: dict[str, float] = field(default_factory=dict)
    pred: Optional[str] = None
    """The class(es) called at the model's operating point (what `predict` writes)."""
    threshold: Optional[float] = None
    """The operating point as a cut-off on P(target) (binary, multilabel); None for multiclass (argmax)."""
    label: Optional[str] = None
    """The true label, where the records have one."""
    method: str = "ig"
    images: list[np.ndarray] = field(default_factory=list)
    """Model-input images in display space, [H, W] or [H, W, 3] in [0, 1]."""
    image_labels: list[str] = field(default_factory=list)
    """Caption per image: the records column it came from (never a file name: names can carry PHI)."""
    image_maps: list[np.ndarray] = field(default_factory=list)
    """One signed attribution map [H, W] per image (positive = pushes towards `target`)."""
    words: list[str] = field(default_factory=list)
    word_scores: list[float] = field(default_factory=list)
    """Per word of the report (tokens merged back to words), signed."""
    features: list[str] = field(default_factory=list)
    feature_values: list[str] = field(default_factory=list)
    feature_scores: list[float] = field(default_factory=list)
    modality_share: dict[str, float] = field(default_factory=dict)
    """Share of total absolute attribution per modality (sums to 1 over present modalities)."""
    modality_ablation: dict[str, float] = field(default_factory=dict)
    """Target probability drop when the modality is removed through the fusion's missing-modality path."""
    attention: dict[str, float] = field(default_factory=dict)
    """Fusion CLS-token attention mass per modality (last block), a cheaper second view."""
    members: list[dict] = field(default_factory=list)
    """A fusion strategy's networks: {"network": its modalities, "weight": its share of the mixture,
    "probability": its own calibrated P(target), or None where it does not speak for the patient}, and
    its part of the attributions above (what reached the prediction through its inputs; the members'
    parts add up to them): "image_maps", "word_scores", "feature_scores" for the modalities it reads
    and the patient has, aligned with `images`, `words`, `features`, and "attribution": their signed
    sum per modality (logit units; Integrated Gradients only)."""
    convergence_delta: Optional[float] = None
    error: Optional[str] = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["images"] = [list(np.shape(a)) for a in self.images]  # shapes only; pixels live in the report
        d["image_maps"] = _maps(self.image_maps)
        for n in d["members"]:
            if "image_maps" in n:
                n["image_maps"] = _maps(n["image_maps"])
        return d


def _maps(maps: list) -> list:
    return [np.asarray(m, dtype=np.float32).round(6).tolist() for m in maps]
