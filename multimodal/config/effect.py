"""Settings a user wrote that the run at hand will not use. Each is one warning line before training:
a researcher who copies a recipe and changes how it is run (passes --val) should not believe a setting
shapes their model when it does not. Not warned: a modality's section when `modalities=` leaves it
out (the documented way to train one modality with the same recipe), and patience when min_epochs
reaches epochs (a short run of a long recipe, as every quick check is)."""
from __future__ import annotations

from multimodal.config import Config


def _set(section, name: str) -> bool:
    """Written in the config or an override, not a default."""
    return name in section.model_fields_set


def without_effect(cfg: Config, val_given: bool) -> list[str]:
    """One line per written setting this training run ignores. `val_given`: validation records were
    passed, so they are the hold-out."""
    out, tc = [], cfg.train
    if val_given and tc.ensemble_holdout == "crossfit":
        out.append("train.ensemble_holdout: crossfit has no effect with validation records: every network "
                   "early-stops, and calibration and the operating point are fitted, on them; evaluate on "
                   "other records, or leave them out to hold out folds of the training records")
    if val_given and _set(tc, "val_fraction"):
        out.append("train.val_fraction has no effect: validation records were given")
    if _set(tc, "calibrate_bias") and tc.calibrate_bias and not tc.calibrate:
        out.append("train.calibrate_bias has no effect: train.calibrate is false")
    return out
