"""mmdx: a multimodal diagnosis engine (medical images + clinical text + tabular features).

Data flow, one folder per stage:

    data/    records → decode (imageio, image_guard, series) → preprocess → batches (+ cached features)
    model/   build (config → modules) → network → artifact (the model directory), export (ONNX)
    engine/  train (+ distributed) → calibrate → infer, batch (streamed predict) → evaluate (metrics,
             operating points, plots), cv, comparison, baselines (scikit-learn)
    api.py and cli.py are the front doors; config/ says what to build; output.py is how anything is written.

The public names load on first use (PEP 562), so `mmdx --help` and `import multimodal.cli` do not pull
in torch, transformers or scikit-learn.
"""
from importlib import import_module

from multimodal.runtime import contain

contain()  # before anything below can import a library that reads its telemetry switch once, at load

__version__ = "0.1.0"
_EXPORTS = {"DiagnosisModel": "api", "compare": "engine.comparison", "predict_baselines": "engine.baselines",
            "Config": "config", "load_config": "config",
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
