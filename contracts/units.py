"""One unit per metric, and one way to print a number with its unit.

The console, report.md and report.json all take their units from here, so they cannot disagree:

    metric           values (baseline, model)   drop, --max-accuracy-drop, checks[].unit
    top1             %  (99.56 = 99.56 %)       points   (percentage points: 0.22 = 0.22 % of samples)
    top1_expected    %  (top-1 FP32's softmax expects)  points
    top1_agreement   %  (share of FP32 argmax)  points   (reports before schema 1.0)
    cosine           cosine (mean, FP32 = 1)    1-cosine (1 - mean cosine)

Latency is in ms, speedup in x (baseline p50 / model p50), sizes in bytes.
"""
from __future__ import annotations

import math

__all__ = ["METRIC_UNITS", "metric_units", "format_value"]

METRIC_UNITS: dict[str, tuple[str, str]] = {  # metric -> (unit of its values, unit of its drop)
    "top1": ("%", "points"),
    "top1_expected": ("%", "points"),
    "top1_agreement": ("%", "points"),
    "cosine": ("cosine", "1-cosine"),
}

_DIGITS = {"%": 2, "points": 2, "cosine": 4, "1-cosine": 4, "ms": 3, "x": 2}


def metric_units(metric: str) -> tuple[str, str]:
    """(value unit, drop unit) of a metric; an unknown metric has no unit ("", "")."""
    return METRIC_UNITS.get(metric, ("", ""))


def format_value(value: float | None, unit: str, digits: int | None = None) -> str:
    """`0.22 points`, `99.56 %`, `0.9920 cosine`, `0.0080 1-cosine`, `0.075 ms`, `1.14x`."""
    if value is None:
        return "n/a"
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value} {unit}".strip()
    text = f"{value:.{_DIGITS.get(unit, 4) if digits is None else digits}f}"
    if unit == "x":
        return f"{text}x"
    return f"{text} {unit}" if unit else text
