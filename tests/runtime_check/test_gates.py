"""Gate evaluation: points for top-1, 1-cosine for embeddings, default limits."""
import pytest

from sqexport.runtime_check.gates import DEFAULT_DROP, Gates, evaluate_gates

TOP1 = {"metric": "top1", "unit": "%", "baseline": 99.0, "model": 98.5, "drop": 0.5, "drop_unit": "points"}
LAT = {"threads": 1, "baseline": {"p50": 4.0}, "model": {"p50": 2.0}, "speedup": 2.0}


def test_default_top1_limit_is_one_point():
    assert DEFAULT_DROP == {"points": 1.0, "1-cosine": 0.01}
    (c,) = evaluate_gates(Gates(), TOP1, LAT)
    assert c == {"name": "accuracy_drop", "passed": True, "value": 0.5, "limit": 1.0, "unit": "points"}


@pytest.mark.parametrize("points, passed", [(0.99, True), (1.0, True), (1.01, False), (25.0, False), (-3.0, True)])
def test_top1_drop_is_compared_in_points(points, passed):
    (c,) = evaluate_gates(Gates(), {**TOP1, "drop": points}, LAT)
    assert c["value"] == points and c["passed"] is passed


def test_explicit_top1_limit():
    (c,) = evaluate_gates(Gates(max_accuracy_drop=0.25), TOP1, LAT)
    assert c["limit"] == 0.25 and not c["passed"]


@pytest.mark.parametrize("drop, limit, passed", [(0.004, None, True), (0.01, None, True), (0.02, None, False),
                                                 (0.004, 0.001, False), (0.02, 0.05, True)])
def test_cosine_drop_is_one_minus_cosine(drop, limit, passed):
    acc = {"metric": "cosine", "unit": "cosine", "baseline": 1.0, "model": 1 - drop, "drop": drop,
           "drop_unit": "1-cosine"}
    (c,) = evaluate_gates(Gates(max_accuracy_drop=limit), acc, LAT)
    assert c["unit"] == "1-cosine" and c["value"] == drop
    assert c["limit"] == (0.01 if limit is None else limit)
    assert c["passed"] is passed


def test_latency_gates():
    checks = {c["name"]: c for c in evaluate_gates(Gates(min_speedup=2.5, max_latency_ms=3.0), TOP1, LAT)}
    assert set(checks) == {"accuracy_drop", "speedup", "latency_p50_ms"}
    assert checks["speedup"] == {"name": "speedup", "passed": False, "value": 2.0, "limit": 2.5, "unit": "x"}
    assert checks["latency_p50_ms"] == {"name": "latency_p50_ms", "passed": True, "value": 2.0, "limit": 3.0,
                                        "unit": "ms"}
    checks = {c["name"]: c for c in evaluate_gates(Gates(min_speedup=2.0, max_latency_ms=1.0), TOP1, LAT)}
    assert checks["speedup"]["passed"] and not checks["latency_p50_ms"]["passed"]


def test_no_metric_no_accuracy_check():
    assert evaluate_gates(Gates(), {"metric": "none", "baseline": None, "model": None, "drop": 0.0}, LAT) == []
