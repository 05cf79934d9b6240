"""Thresholds -> pass/fail checks."""
from __future__ import annotations

from dataclasses import dataclass

from sqexport.contracts.tasks import get_task, task_names

__all__ = ["Gates", "evaluate_gates", "finite_checks", "accuracy_limit", "DEFAULT_DROP", "slower_note"]

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
    """The drop and its unit, as the metric reported them (contracts/units.py); None without a metric."""
    if accuracy.get("drop_unit") in DEFAULT_DROP and accuracy.get("drop") is not None:
        return accuracy["drop"], accuracy["drop_unit"]
    return None


def finite_checks(accuracy: dict) -> list[dict]:
    """`finite_outputs`: every output value of every model compared is a number (NaN or inf
    anywhere fails, whatever the metric says: all-NaN logits "agree" 100% with each other)."""
    shares = accuracy.get("nonfinite_outputs")
    if not isinstance(shares, dict) or not shares:
        return []
    worst = max(shares.values())
    bad = [f"{name} {100 * share:.2f}%" for name, share in shares.items() if share > 0]
    check = {"name": "finite_outputs", "passed": worst == 0.0, "value": worst, "limit": 0.0, "unit": "share"}
    if bad:
        check["note"] = f"NaN or infinite output values: {', '.join(bad)} of the values"
    return [check]


def evaluate_gates(gates: Gates, accuracy: dict, latency: dict) -> list[dict]:
    checks = []
    drop = _drop_in_unit(accuracy)
    if drop is not None:
        value, unit = drop
        limit = gates.max_accuracy_drop if gates.max_accuracy_drop is not None else DEFAULT_DROP[unit]
        checks.append({"name": "accuracy_drop", "passed": value <= limit + 1e-9, "value": value,
                       "limit": limit, "unit": unit})
    checks += finite_checks(accuracy)
    if gates.min_speedup is not None:
        checks.append({"name": "speedup", "passed": latency["speedup"] >= gates.min_speedup,
                       "value": latency["speedup"], "limit": gates.min_speedup, "unit": "x"})
    if gates.max_latency_ms is not None:
        p50 = latency["model"]["p50"]
        checks.append({"name": "latency_p50_ms", "passed": p50 <= gates.max_latency_ms,
                       "value": p50, "limit": gates.max_latency_ms, "unit": "ms"})
    return checks


def slower_note(latency: dict) -> str | None:
    """Said whenever the model is slower than FP32 at a measured thread count: int8 (or a removed
    structure) that does not pay on this CPU must not pass as a speed-up."""
    slow = [e for e in [latency] + ([latency["at_1_thread"]] if "at_1_thread" in latency else [])
            if e.get("speedup") is not None and e["speedup"] < 1.0]
    if not slow:
        return None
    where = ", ".join(f"{e['speedup']:.2f}x at {e['threads']} thread(s)" for e in slow)
    return (f"model.onnx is SLOWER than baseline.onnx on this CPU ({where}): here its int8 kernels and "
            "the float work between them (e.g. unfused activations between DequantizeLinear and "
            "QuantizeLinear) cost more than they save; ship baseline.onnx for speed, model.onnx for size, "
            "or gate with --min-speedup")
