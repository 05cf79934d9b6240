"""Latency percentiles and interleaved measurement."""
import numpy as np
import pytest
from torch import nn

from sqexport.exporters.onnx_export import export_torch
from sqexport.runtime_check.latency import measure_interleaved, measure_pair, percentiles, ratio_settled


def test_percentiles_hand_values():
    p = percentiles([0.001, 0.002, 0.003, 0.004])  # seconds
    assert p["p50"] == pytest.approx(2.5) and p["p90"] == pytest.approx(3.7)  # linear interpolation, in ms
    assert p["mean"] == pytest.approx(2.5) and p["n"] == 4


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("lat") / "tiny.onnx"
    export_torch(nn.Linear(4, 2), {"x": np.zeros((1, 4), np.float32)}, ["x"], ["y"], {}, path)
    return path


def test_measure_pair_is_bounded_and_reports_speedup(tiny_onnx):
    feed = {"x": np.ones((1, 4), np.float32)}
    res = measure_pair(tiny_onnx, tiny_onnx, feed, 1, warmup=2, max_iters=25, budget_s=0.5, ratio_tolerance=None)
    assert res["threads"] == 1
    assert res["baseline"]["n"] == res["model"]["n"] == 25
    assert res["speedup"] == pytest.approx(res["baseline"]["p50"] / res["model"]["p50"])
    assert 0 < res["model"]["p50"] <= res["model"]["p90"]


def test_time_budget_stops_after_21_rounds(tiny_onnx):
    res = measure_interleaved({"a": tiny_onnx}, {"x": np.ones((1, 4), np.float32)}, 1,
                              warmup=1, max_iters=10_000, budget_s=0.0)
    assert res["a"]["n"] == 21  # rounds 0..20: the budget is first checked after round 20 (i >= 20)


def test_ratio_settled_hand_values():
    # n = 30: the 95% interval of the median is order statistics floor(15 - 5.37) = 9 and ceil(20.37) = 21
    base = [2.0] * 30
    steady = [1.0] * 30  # every round the same ratio: settled
    assert ratio_settled(base, steady, 0.02)
    wobbly = [1.0, 1.1] * 15  # log ratios ln2 and ln(2/1.1): half-width (ln 1.1) / 2 = 4.8%
    assert not ratio_settled(base, wobbly, 0.02) and ratio_settled(base, wobbly, 0.05)
    assert not ratio_settled([2.0] * 3, [1.0] * 3, 0.5)  # too few rounds for an interval at all


def test_pair_without_early_stop_runs_to_max_iters(tiny_onnx):
    feed = {"x": np.ones((1, 4), np.float32)}
    res = measure_pair(tiny_onnx, tiny_onnx, feed, 1, warmup=1, max_iters=40, budget_s=60.0, ratio_tolerance=None)
    assert res["stopped_by"] == "max_iters" and res["model"]["n"] == 40


def test_ready_sessions_are_measured_and_handed_over(tiny_onnx):
    """verify makes the pair once (latency_sessions) for accuracy and latency; latency_of empties
    the dict it is handed, so nothing else keeps the pair alive."""
    from types import SimpleNamespace

    from sqexport.runtime_check.verify import latency_of, latency_sessions
    sessions = latency_sessions(tiny_onnx, tiny_onnx, 1)
    spec = SimpleNamespace(example_inputs={"x": np.ones((1, 4), np.float32)})
    lat = latency_of(spec, tiny_onnx, tiny_onnx, 1, sessions=sessions)
    assert sessions == {} and lat["threads"] == 1 and lat["model"]["n"] >= 20 and "at_1_thread" not in lat


@pytest.mark.parametrize("warmup_s, warmup_runs", [(0.0, 2), (60.0, 10)])
def test_warmup_ends_after_its_rounds_or_its_time(tiny_onnx, monkeypatch, warmup_s, warmup_runs):
    """Warm-up runs `warmup` rounds unless WARMUP_S passes first, and always MIN_WARMUP_ROUNDS."""
    import sqexport.runtime_check.latency as latency

    runs = []
    real = latency.make_session

    class Counting:
        def __init__(self, session):
            self.session = session

        def get_inputs(self):
            return self.session.get_inputs()

        def run(self, *args):
            runs.append(1)
            return self.session.run(*args)
    monkeypatch.setattr(latency, "make_session", lambda *a, **k: Counting(real(*a, **k)))
    monkeypatch.setattr(latency, "WARMUP_S", warmup_s)
    res = latency.measure_interleaved({"a": tiny_onnx}, {"x": np.ones((1, 4), np.float32)}, 1,
                                      warmup=10, max_iters=25, budget_s=60.0)
    assert res["a"]["n"] == 25 and len(runs) == warmup_runs + 25
    assert latency.MIN_WARMUP_ROUNDS == 2
