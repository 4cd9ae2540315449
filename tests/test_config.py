import pytest

from multimodal.config import config_from_dict, load_config, parse_overrides
from multimodal.errors import UserError

from conftest import SYNTH_CONFIG


def test_synthetic_config_loads_with_all_modalities():
    cfg = load_config(SYNTH_CONFIG)
    assert cfg.modalities == ["image", "text", "tabular"]
    assert "crp" in cfg.columns() and cfg.label_columns() == ["label"]


def test_modalities_override_selects_subset():
    cfg = load_config(SYNTH_CONFIG, parse_overrides(["modalities=image,text", "train.epochs=3"]))
    assert cfg.modalities == ["image", "text"] and cfg.train.epochs == 3
    assert "crp" not in cfg.columns()


@pytest.mark.parametrize("raw, needle", [
    ({"task": {"type": "regression", "label": "y"}}, "task.type"),
    ({"task": {"label": "y"}, "modalities": ["image"]}, "no 'image:' section"),
    ({"task": {"label": "y"}, "trian": {}}, "trian"),
    ({"task": {"label": "y"}, "modalities": ["text"], "text": {"max_length": 1}}, "text.max_length"),
    ({"task": {"label": "y"}, "train": {"encoder_lr": {"imgae": 0.1}}}, "train.encoder_lr.imgae"),
])
def test_bad_config_is_one_line_naming_the_problem(raw, needle):
    with pytest.raises(UserError) as e:
        config_from_dict(raw)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_bad_override_syntax():
    with pytest.raises(UserError, match="not key=value"):
        parse_overrides(["epochs"])


def test_config_reference_is_current():
    """docs/config.md is generated (`mmdx config --doc > docs/config.md`); regenerate it when a field changes."""
    from pathlib import Path

    from multimodal.configdoc import config_reference

    doc = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    assert doc.read_text() == config_reference(), "docs/config.md is stale: run mmdx config --doc > docs/config.md"
    assert "| `threshold` |" in doc.read_text() and "sensitivity:0.9" in doc.read_text()


def test_an_image_size_beyond_any_scan_is_refused():
    """An edited config.json drives the memory of every resized image: 100000 px would take gigabytes."""
    from multimodal import load_config
    from multimodal.errors import UserError

    with pytest.raises((UserError, ValueError)):
        load_config(SYNTH_CONFIG, {"image.size": 100_000})


def test_settings_without_effect_in_the_run_are_named_one_line_each():
    from multimodal.config.effect import without_effect

    cfg = load_config(SYNTH_CONFIG)
    assert without_effect(cfg, val_given=True) == []  # the demo's own config uses all it says
    crossfit = load_config(SYNTH_CONFIG, parse_overrides(["train.ensemble=2", "train.ensemble_holdout=crossfit",
                                                          "train.val_fraction=0.34"]))
    assert without_effect(crossfit, val_given=False) == []
    lines = without_effect(crossfit, val_given=True)
    assert len(lines) == 2 and lines[0].startswith("train.ensemble_holdout: crossfit has no effect")
    assert lines[1] == "train.val_fraction has no effect: validation records were given"
    bias = load_config(SYNTH_CONFIG, parse_overrides(["train.calibrate=false", "train.calibrate_bias=true"]))
    assert without_effect(bias, val_given=False) == ["train.calibrate_bias has no effect: train.calibrate is false"]
    assert all("\n" not in line for line in lines)


def test_training_warns_of_a_crossfit_that_validation_records_override(cohort, caplog):
    from conftest import TINY
    from multimodal import DiagnosisModel

    over = {**TINY, "text.encoder": "bow", "train.epochs": 1, "train.min_epochs": 1, "train.ensemble": 2,
            "train.ensemble_holdout": "crossfit", "train.val_fraction": 0.34}
    with caplog.at_level("WARNING", logger="mmdx"):
        DiagnosisModel.from_config(SYNTH_CONFIG, **over).fit(cohort["train"], cohort["val"], progress=False)
    said = [r.getMessage() for r in caplog.records if "has no effect" in r.getMessage()]
    assert len(said) == 2 and said[0].startswith("train.ensemble_holdout: crossfit has no effect")
