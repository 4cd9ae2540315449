"""Preprocessing keyed by modality, fitted on training records and saved as JSON with the model."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from multimodal.config import Config
from multimodal.data.records import Records
from multimodal.data.splits import patients
from multimodal.pretrained import text_source
from multimodal.data.preprocess.image import ImagePreprocessor
from multimodal.data.preprocess.labels import LabelEncoder
from multimodal.data.preprocess.tabular import TabularPreprocessor
from multimodal.data.preprocess.text import TextPreprocessor


def _image_stats(cfg: Config) -> tuple[list[float], list[float]]:
    ic = cfg.image
    if ic.mean and ic.std:
        return ic.mean, ic.std
    if ic.pretrained:
        from multimodal.pretrained import is_local_spec, pretrained_stats

        tagged = isinstance(ic.pretrained, str) and "." in ic.pretrained and not is_local_spec(ic.pretrained)
        stats = pretrained_stats(ic.pretrained.removeprefix("hf-hub:") if tagged else ic.encoder, ic.in_chans)
        if stats:
            return stats
    return [0.5] * ic.in_chans, [0.5] * ic.in_chans


@dataclass
class Preprocessing:
    labels: LabelEncoder
    image: Optional[ImagePreprocessor] = None
    text: Optional[TextPreprocessor] = None
    tabular: Optional[TabularPreprocessor] = None

    @classmethod
    def fit(cls, cfg: Config, records: Records) -> "Preprocessing":
        df, mods = records.df, cfg.modalities
        who = patients(df, cfg)  # privacy thresholds count patients, not records
        prep = cls(labels=LabelEncoder(cfg.task).fit(df, records.source))
        if "image" in mods:
            prep.image = ImagePreprocessor(cfg.image, *_image_stats(cfg), confine=cfg.data.confine_images)
        if "text" in mods:
            tc = cfg.text
            prep.text = (TextPreprocessor.from_pretrained(text_source(tc.pretrained), tc)
                         if tc.encoder == "hf" and tc.pretrained
                         else TextPreprocessor.train(df[tc.column].tolist(), tc, who))
        if "tabular" in mods:
            prep.tabular = TabularPreprocessor(cfg.tabular).fit(df, who)
        return prep

    def state(self) -> dict:
        """JSON-able state; the tokenizer is kept apart (tokenizer.json)."""
        return {"labels": self.labels.state(),
                "image": self.image.state() if self.image else None,
                "tabular": self.tabular.state() if self.tabular else None}

    @classmethod
    def from_state(cls, cfg: Config, state: dict, tokenizer_json: Optional[str]) -> "Preprocessing":
        prep = cls(labels=LabelEncoder(cfg.task, state["labels"]["classes"], state["labels"].get("thresholds"),
                                       state["labels"].get("conformal")))
        if "image" in cfg.modalities:
            prep.image = ImagePreprocessor(cfg.image, state["image"]["mean"], state["image"]["std"],
                                           confine=cfg.data.confine_images)
        if "text" in cfg.modalities:
            prep.text = TextPreprocessor.from_json(tokenizer_json, cfg.text)
        if "tabular" in cfg.modalities:
            t = state["tabular"]
            prep.tabular = TabularPreprocessor(cfg.tabular, t["mean"], t["std"], t["vocab"])
        return prep
