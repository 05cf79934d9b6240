"""Int8 only where it pays (speed_check.py): each layer's kernel time is read under the names
onnxruntime gives fused nodes, the candidate rule is the documented margin, the whole model picks
the fastest measured set (or none below the required gain), and a real export reads every layer
of the real profile and names what it kept FP32 in the coverage."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from sqexport.contracts.quant import Anchor, QuantParams
from sqexport.toolchain.quantization import speed_check as sc


def _graph() -> onnx.GraphProto:
    """stem: Conv -> HardSwish; body: Conv -> Relu; head: Conv (graph output)."""
    w = numpy_helper.from_array(np.ones((4, 4, 1, 1), np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c0"], name="stem"),
             helper.make_node("HardSwish", ["c0"], ["a0"], name="stem_act"),
             helper.make_node("Conv", ["a0", "w"], ["c1"], name="body"),
             helper.make_node("Relu", ["c1"], ["a1"], name="body_act"),
             helper.make_node("Conv", ["a1", "w"], ["y"], name="head")]
    vi = lambda n: helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1, 4, 8, 8])  # noqa: E731
    return helper.make_graph(nodes, "g", [vi("x")], [vi("y")], [w])


SITES = {"stem": "stem", "body": "body", "head": "head"}


def test_layer_times_follow_fused_names():
    g = _graph()
    # FP32 NCHWc: a fused conv is named by the last tensor it writes; int8: `<node>_token_N`, and the
    # HardSwish runs as its own int8 node under its own name
    fp32 = {"c0_nchwc": 100.0, "a1_nchwc": 20.0, "y_nchwc": 7.0}
    int8 = {"stem_token_3": 240.0, "stem_act": 30.0, "body_token_9": 11.0, "head": 5.0}
    assert sc.layer_kernel_times(g, SITES, fp32) == {"stem": 100.0, "body": 20.0, "head": 7.0}
    assert sc.layer_kernel_times(g, SITES, int8) == {"stem": 270.0, "body": 11.0, "head": 5.0}
    assert sc.layer_kernel_times(g, SITES, {}) == {"stem": None, "body": None, "head": None}


def test_candidates_need_both_margins():
    int8 = {"a": 24.0, "b": 13.0, "c": 30.0, "d": 5.0, "e": None}
    fp32 = {"a": 10.0, "b": 2.0, "c": 26.0, "d": 1.0, "e": 1.0}
    # a: 2.4x and 14 us -> yes; b: 6.5x but 11 us -> yes; c: 1.15x -> no; d: 4 us -> no; e: unknown
    rows = sc.slower_in_int8(int8, fp32)
    assert [r["layer"] for r in rows] == ["b", "a"]  # least loss first
    assert rows[1] == {"layer": "a", "int8_us": 24.0, "fp32_us": 10.0}


def test_ladder():
    assert sc.ladder(1) == [1]
    assert sc.ladder(6) == [1, 3, 6]
    assert sc.ladder(20) == [1, 5, 10, 20]


def _params(names) -> QuantParams:
    return QuantParams(anchors=[Anchor(module=n) for n in names])


@pytest.fixture
def fake_timing(monkeypatch, tmp_path):
    """Profiles from a table; each mixed model's time = all-int8 time minus a per-layer saving,
    plus a boundary cost per FP32 layer (what the whole model sees and kernel times do not)."""
    state = {"fp32": {"c0_nchwc": 100.0, "a1_nchwc": 20.0, "y_nchwc": 7.0},
             "int8": {"stem_token_3": 240.0, "body_token_9": 50.0, "head": 5.0},
             "saving_ms": {"stem": 0.14, "body": 0.03}, "boundary_ms": 0.025, "int8_ms": 1.0, "written": {}}

    def profile(paths, feed, threads=1, budget_s=2.0, scratch=None):
        assert scratch is not None and scratch.parent == tmp_path  # inside the run's folder
        assert threads == 1 and set(paths) == {"fp32", "int8"}
        return {"fp32": state["fp32"], "int8": state["int8"]}

    def pair(paths, feed, threads=1):
        fp32_layers = state["written"][paths["factored"].name]
        mixed = state["int8_ms"] - sum(state["saving_ms"][n] - state["boundary_ms"] for n in fp32_layers)
        return {"dense_ms": state["int8_ms"], "factored_ms": mixed, "speedup": state["int8_ms"] / mixed, "rounds": 40}

    def write(params, path):
        state["written"][path.name] = sorted({"stem", "body", "head"} - {a.module for a in params.anchors})
        path.write_bytes(b"")
    monkeypatch.setattr(sc, "profile_node_times", profile)
    monkeypatch.setattr(sc, "time_pair", pair)
    state["check"] = sc.SpeedCheck(write, {"x": np.zeros((1, 4, 8, 8), np.float32)}, tmp_path)
    return state


def _model() -> onnx.ModelProto:
    return helper.make_model(_graph())


def test_whole_model_keeps_the_fastest_set(fake_timing):
    fake_timing["saving_ms"]["body"] = 0.08
    params, info = sc.keep_fp32_where_faster(_model(), SITES, _params(SITES), fake_timing["check"])
    assert [c["layer"] for c in info["candidates"]] == ["body", "stem"]
    # stem alone saves 0.115 ms (1.130x); stem + body 0.17 ms (1.205x): both measured, the faster kept
    assert [r["fp32_layers"] for r in info["whole_model"]] == [1, 2]
    assert info["kept_fp32"] == ["stem", "body"] and info["gain"] == pytest.approx(1 / 0.83)
    assert [a.module for a in params.anchors] == ["head"]
    fake_timing["saving_ms"]["body"] = 0.01  # now body's boundaries cost more than its kernel saves
    params, info = sc.keep_fp32_where_faster(_model(), SITES, _params(SITES), fake_timing["check"])
    assert info["kept_fp32"] == ["stem"] and [a.module for a in params.anchors] == ["body", "head"]
    assert info["why"].startswith("the fastest measured (the fewest layers within 2%): 1 layer(s) in FP32")


def test_near_ties_keep_the_fewer_fp32_layers(fake_timing):
    fake_timing["saving_ms"]["body"] = 0.03  # stem + body: 1.136x, within 2% of stem alone (1.130x)
    params, info = sc.keep_fp32_where_faster(_model(), SITES, _params(SITES), fake_timing["check"])
    assert info["whole_model"][1]["speedup"] > info["whole_model"][0]["speedup"]
    assert info["kept_fp32"] == ["stem"]


def test_small_gains_keep_all_int8(fake_timing):
    fake_timing["saving_ms"] = {"stem": 0.06, "body": 0.0}  # 1.036x at best: below MIN_GAIN
    params, info = sc.keep_fp32_where_faster(_model(), SITES, _params(SITES), fake_timing["check"])
    assert info["kept_fp32"] == [] and len(params.anchors) == 3
    fake_timing["int8_ms"], fake_timing["saving_ms"] = 0.2, {"stem": 0.04, "body": 0.0}  # 1.08x but 15 us
    params, info = sc.keep_fp32_where_faster(_model(), SITES, _params(SITES), fake_timing["check"])
    assert info["kept_fp32"] == [] and "as fast as all int8" in info["why"]


def test_no_candidate_means_no_whole_model_timing(fake_timing, monkeypatch):
    fake_timing["int8"] = {"stem_token_3": 90.0, "body_token_9": 12.0, "head": 5.0}
    monkeypatch.setattr(sc, "time_pair", lambda *a, **k: pytest.fail("timed without a candidate"))
    params, info = sc.keep_fp32_where_faster(_model(), SITES, _params(SITES), fake_timing["check"])
    assert info["candidates"] == [] and "whole_model" not in info and len(params.anchors) == 3


def test_large_graphs_are_skipped(fake_timing, monkeypatch):
    monkeypatch.setattr(sc, "MAX_WEIGHT_BYTES", 10)
    params, info = sc.keep_fp32_where_faster(_model(), SITES, _params(SITES), fake_timing["check"])
    assert "MB" in info["skipped"] and info["kept_fp32"] == [] and len(params.anchors) == 3


@pytest.mark.e2e
def test_real_export_reads_every_layer_and_names_fp32_ones(run_cli, tmp_path):
    out = tmp_path / "out"
    r = run_cli(["mnist-resnet", "--prune", "none", "--max-accuracy-drop", "100", "--threads", "1", "--quiet", "-o", out])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "report.json").read_text())
    q = rep["quantization"]
    check = q["speed_check"]
    # what it kept is said in the notes (report.md and the console's summary read them)
    assert any(n.startswith("speed check: ") for n in rep["notes"]) == bool(check["kept_fp32"])
    # every weight layer found in both real profiles under onnxruntime's fused names
    assert check["profiled_layers"] == q["coverage"]["weight_layers"] == 16
    speed = [f["layer"] for f in q["coverage"]["fp32"] if "speed check" in f["reason"]]
    assert sorted(speed) == sorted(check["kept_fp32"])
    assert q["coverage"]["int8"] == 16 - len(speed)


@pytest.mark.e2e
def test_mobile_target_is_not_timed_here(run_cli, tmp_path):
    out = tmp_path / "out"
    r = run_cli(["digits-cnn", "--target", "mobile", "--prune", "none", "--quiet", "-o", out])
    assert r.exit_code == 0, r.output
    check = json.loads((out / "report.json").read_text())["quantization"]["speed_check"]
    assert check["kept_fp32"] == [] and "other int8 kernels" in check["skipped"]


def test_recipe_can_turn_it_off():
    from sqexport.contracts.errors import ConfigError
    from sqexport.toolchain.quantization.int8 import Int8StaticConfig
    assert Int8StaticConfig().speed_check is True and Int8StaticConfig(speed_check=False).speed_check is False
    with pytest.raises(ConfigError, match="speed_check must be true or false"):
        Int8StaticConfig(speed_check="no")


def test_a_graph_that_cannot_be_timed_skips_the_check(fake_timing, monkeypatch, tmp_path):
    def broken(*a, **k):
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : some kernel\nsecond line")
    monkeypatch.setattr(sc, "time_pair", broken)
    params, info = sc.keep_fp32_where_faster(_model(), SITES, _params(SITES), fake_timing["check"])
    assert info["skipped"] == "the graphs could not be timed here: [ONNXRuntimeError] : 1 : FAIL : some kernel"
    assert info["kept_fp32"] == [] and len(params.anchors) == 3
    assert list(tmp_path.iterdir()) == []  # its graphs went with it, inside the run's folder
