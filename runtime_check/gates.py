"""Thresholds -> pass/fail checks."""
from __future__ import annotations

from dataclasses import dataclass

from contracts.tasks import get_task, task_names, unit_of_metric

__all__ = ["Gates", "evaluate_gates", "accuracy_limit", "DEFAULT_DROP"]

# Used when no --max-accuracy-drop is given, so a broken model never passes silently (per unit,
# from the task registry: 1 point of top-1, 0.01 of cosine).
DEFAULT_DROP = {get_task(n).unit: get_task(n).default_max_drop for n in task_names()}


@dataclass(frozen=True)
class Gates:
    """`max_accuracy_drop` is in the metric's own unit: percentage points for top-1 metrics
    (1.0 = one point), 1 - mean cosine for embeddings. None = the default in DEFAULT_DROP."""

    max_accuracy_drop: float | None = None
    min_speedup: float | None = None
    max_latency_ms: float | None = None


def accuracy_limit(gates: Gates, task: str) -> float:
    """The accuracy-drop limit in the unit of `task`'s metric (explicit or default)."""
    if gates.max_accuracy_drop is not None:
        return gates.max_accuracy_drop
    return get_task(task).default_max_drop


def _drop_in_unit(accuracy: dict) -> tuple[float, str] | None:
    unit = unit_of_metric(accuracy.get("metric", ""))
    if unit is None:
        return None
    return (accuracy["drop_points"] if unit == "points" else accuracy["drop"]), unit


def evaluate_gates(gates: Gates, accuracy: dict, latency: dict) -> list[dict]:
    checks = []
    drop = _drop_in_unit(accuracy)
    if drop is not None:
        value, unit = drop
        limit = gates.max_accuracy_drop if gates.max_accuracy_drop is not None else DEFAULT_DROP[unit]
        checks.append({"name": "accuracy_drop", "passed": value <= limit + 1e-9, "value": value,
                       "limit": limit, "unit": unit})
    if gates.min_speedup is not None:
        checks.append({"name": "speedup", "passed": latency["speedup"] >= gates.min_speedup,
                       "value": latency["speedup"], "limit": gates.min_speedup, "unit": "x"})
    if gates.max_latency_ms is not None:
        p50 = latency["model"]["p50"]
        checks.append({"name": "latency_p50_ms", "passed": p50 <= gates.max_latency_ms,
                       "value": p50, "limit": gates.max_latency_ms, "unit": "ms"})
    return checks
