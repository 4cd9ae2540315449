"""What every config section shares: unknown keys are errors, and attribute docstrings are field docs."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict

MODALITIES = ("image", "text", "tabular")


class _Strict(BaseModel):
    # Attribute docstrings become field descriptions: the config reference (docs/config.md) is built from them.
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), use_attribute_docstrings=True)


def parse_rule(rule) -> tuple[str, float]:
    """→ ("fixed", t) | ("youden", 0) | ("sensitivity", x) | ("specificity", x); ValueError if malformed."""
    if isinstance(rule, (int, float)) and not isinstance(rule, bool):
        if not 0 < float(rule) < 1:
            raise ValueError(f"threshold {rule} must lie strictly between 0 and 1")
        return "fixed", float(rule)
    text = str(rule).strip().lower()
    if text == "youden":
        return "youden", 0.0
    name, _, value = text.partition(":")
    if name in ("sensitivity", "specificity"):
        try:
            x = float(value)
        except ValueError:
            x = float("nan")
        if not 0 < x < 1:
            raise ValueError(f"threshold {rule!r}: the target {name} must lie strictly between 0 and 1")
        return name, x
    raise ValueError(f"threshold {rule!r}: use a number, 'youden', 'sensitivity:0.9' or 'specificity:0.95'")
