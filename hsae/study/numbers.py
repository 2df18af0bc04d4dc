"""How the study's report prints and averages numbers (shared by its text and figures)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def fmt(value: Any) -> str:
    """How the report prints a number (3 significant digits; integers as integers)."""
    if value is None:
        return "n/a"
    value = float(value)
    if not math.isfinite(value):
        return "n/a"
    if value == int(value) and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.3g}"


def ci_text(effect: dict[str, Any] | None) -> str:
    if effect is None:
        return "n/a"
    return f"[{fmt(effect['ci_low'])}, {fmt(effect['ci_high'])}]"


def mean_finite(values: list[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan
