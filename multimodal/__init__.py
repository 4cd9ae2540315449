"""mmdx: a multimodal diagnosis engine (medical images + clinical text + tabular features).

Data flow: records → preprocess (image/text/tabular) → encoders → fusion → head → predictions → explanations.

The public names load on first use (PEP 562), so `mmdx --help` and `import multimodal.cli` do not pull
in torch, transformers or scikit-learn.
"""
from importlib import import_module

__version__ = "0.1.0"
_EXPORTS = {"DiagnosisModel": "api", "compare": "comparison", "Config": "config", "load_config": "config",
            "load_records": "records", "Records": "records", "UserError": "errors", "RecordError": "errors"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'multimodal' has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
