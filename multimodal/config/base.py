"""What every config section shares: unknown keys are errors, and attribute docstrings are field docs."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict

MODALITIES = ("image", "text", "tabular")


class _Strict(BaseModel):
    # Attribute docstrings become field descriptions: the config reference (docs/config.md) is built from them.
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), use_attribute_docstrings=True)
