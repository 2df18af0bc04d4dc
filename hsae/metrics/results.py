"""A flat dict of metric values that also says why some are undefined.

An undefined metric is NaN, never 0 and never missing: a 0 reads as a measurement, and a
missing key makes runs look as if they were never measured. Each NaN that a metric function
sets on purpose carries its reason in ``skipped`` (``{name: reason}``), which evaluation
writes under ``skipped`` in ``eval.json`` and the step-1 JSON.
"""

from __future__ import annotations

import math
from typing import Any


class Metrics(dict[str, float]):
    """``{name: value}`` plus ``skipped``: ``{name: why it is NaN}``. ``a |= b`` with both
    ``Metrics`` merges the reasons too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.skipped: dict[str, str] = {}

    def undefined(self, name: str, reason: str) -> None:
        self[name] = math.nan
        self.skipped[name] = reason

    def set_or_undefined(self, name: str, value: float, reason: str) -> None:
        """``value``, or NaN with ``reason`` when ``value`` is NaN."""
        if math.isnan(value):
            self.undefined(name, reason)
        else:
            self[name] = value

    def __ior__(self, other: Any) -> Metrics:  # type: ignore[override,misc]
        super().__ior__(other)
        self.skipped |= skipped_of(other)
        return self


def skipped_of(metrics: Any) -> dict[str, str]:
    """The reasons a metric dict carries (none for a plain dict)."""
    return dict(getattr(metrics, "skipped", {}))
