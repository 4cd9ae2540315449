"""mmdx: a multimodal diagnosis engine (medical images + clinical text + tabular features).

Data flow, one package per stage, each importing only from those below it (the import-linter contract
in pyproject.toml, checked by `make test`):

    api.py, cli.py, demo.py       the front doors (commands.py: what each command does; command_inputs.py:
                                  what each command reads; federation.py: training across sites, with Flower)
    explain/ (top level)          attributions, per-patient explanations, HTML reports
    training/    recipe (split → preprocessing → network → members → calibration → operating point), loop
    evaluation/  bootstrap (the one resampler), metrics, operating points, calibration, comparison,
                 stacking (a fusion strategy's weights), baselines (scikit-learn), cv
    inference/   forward (batched forward pass over records), batch + journal (streamed, resumable predict)
    model/       build (config → modules) → network → artifact (the model directory), export (ONNX)
    fusion/, encoders/ (top level)
    data/        records → splits (who is a patient, folds, hold-outs) → decode (imageio, image_guard,
                 series) → preprocess → batches (+ cached features)
    config/      what to build, validated
    ground       pretrained.py (weight catalogue), output.py (every file written), formats.py (strict
                 JSON, formula-safe tables), distributed.py (process state), inputs.py, progress.py,
                 runtime.py, errors.py

The public names load on first use (PEP 562), so `mmdx --help` and `import multimodal.cli` do not pull
in torch, transformers or scikit-learn.
"""
from importlib import import_module

from multimodal.runtime import contain

contain()  # before anything below can import a library that reads its telemetry switch once, at load

__version__ = "0.1.0"
_EXPORTS = {"DiagnosisModel": "api", "federate": "federation", "compare": "evaluation.comparison",
            "predict_baselines": "evaluation.baselines", "Config": "config", "load_config": "config",
            "load_records": "data.records", "Records": "data.records", "UserError": "errors", "RecordError": "errors"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'multimodal' has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
