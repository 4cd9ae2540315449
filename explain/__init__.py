"""Per-patient explanations across image, text and tabular inputs, and self-contained HTML reports.

    exps = model.explain("records.csv")        # Captum: joint Integrated Gradients (or Grad-CAM)
    exps[0].image_maps, exps[0].word_scores, exps[0].feature_scores, exps[0].modality_share
    exps.to_html("reports/")                   # one page per patient + index.html + JSON
"""
from __future__ import annotations

from pathlib import Path

from .types import PatientExplanation


class Explanations(list):
    """A list of PatientExplanation (one per record, in order) that knows the model it came from."""

    def __init__(self, items, model_info: dict):
        super().__init__(items)
        self.model_info = model_info

    def to_html(self, out_dir, inputs=()) -> Path:
        """Write the reports into a fresh folder that replaces `out_dir` only if it is empty or an earlier
        report folder (no stale pages survive; nothing else is ever deleted); returns index.html's path.
        `inputs`: files of this run (records, model) the folder must not hold."""
        from multimodal.output import staged_dir

        from .report import write_reports

        with staged_dir(out_dir, "report", inputs=inputs) as tmp:
            write_reports(list(self), tmp, model_info=self.model_info)
        return Path(out_dir) / "index.html"


def model_info(model, model_dir=None) -> dict:
    """What a report says about the model: never anything from the patients' DICOM headers. "created" is
    when the model was trained (its metrics.json), not when the report was written (the page footer)."""
    from multimodal.model.artifact import library_versions

    info = {"name": model.config.name, "model_dir": str(model_dir) if model_dir else None,
            "classes": list(model.classes), "modalities": list(model.config.modalities),
            "fusion": model.config.fusion.type, "versions": library_versions(),
            "created": (getattr(model, "metrics", None) or {}).get("trained")}
    if getattr(model.net, "weighted", False):
        from multimodal.model.build import member_plan

        info["fusion strategy"] = model.config.fusion.strategy
        info["network weights (fitted on the hold-out)"] = " · ".join(
            f"{'+'.join(mods)} {float(w):.2f}" for (mods, _), w in zip(member_plan(model.config),
                                                                       model.net.member_weights.tolist()))
    return info


__all__ = ["Explanations", "PatientExplanation", "model_info"]
