"""An activation site (a SiLU's gate, a residual sum) keeps its Q/DQ only while a weight layer next
to it is int8: around FP32 layers it would round for no int8 kernel."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from sqexport.contracts.quant import ActQuant, Anchor, QuantParams
from sqexport.toolchain.quantization.fallback import without
from sqexport.toolchain.quantization.site_neighbors import site_neighbors, without_orphan_sites


def _graph():
    """x -> conv a -> SiLU (Sigmoid, Mul) -> + x -> conv b -> Relu -> conv c -> y"""
    w = numpy_helper.from_array(np.ones((4, 4, 1, 1), np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["a_out"], name="conv_a"),
             helper.make_node("Sigmoid", ["a_out"], ["gate"], name="sig"),
             helper.make_node("Mul", ["a_out", "gate"], ["silu"], name="mul"),
             helper.make_node("Add", ["silu", "x"], ["sum"], name="add"),
             helper.make_node("Conv", ["sum", "w"], ["b_out"], name="conv_b"),
             helper.make_node("Relu", ["b_out"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w"], ["y"], name="conv_c")]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4, 2, 2]) for n in ("x", "y")]
    return helper.make_graph(nodes, "g", io[:1], io[1:], [w])


LAYERS = {"conv_a": "a", "conv_b": "b", "conv_c": "c"}


def test_each_site_finds_the_first_weight_layers_on_both_sides():
    near = site_neighbors(_graph(), {"act": "silu", "act.gate": "gate", "sum": "sum", "relu": "r"}, LAYERS)
    # backward from the sum: the SiLU's conv, and the graph input on the skip path (no layer)
    assert near == {"act": {"a", "b"}, "act.gate": {"a", "b"}, "sum": {"a", "b"}, "relu": {"b", "c"}}


def test_sites_whose_layers_are_all_fp32_lose_their_params():
    p = ActQuant(0.1, 0)
    near = {"act": frozenset({"a", "b"}), "relu": frozenset({"b", "c"}), "lonely": frozenset()}
    tensors, gates = without_orphan_sites({"act": p, "relu": p, "lonely": p}, {"act": p}, near, {"c"})
    assert set(tensors) == {"relu", "lonely"} and gates == {}  # no known neighbor: kept as it was
    params = QuantParams(inputs={m: p for m in "abc"}, anchors=[Anchor(m) for m in "abc"],
                         tensors={"act": p, "relu": p}, gates={"act": p}, site_layers=near)
    assert set(without(params, {"a"}).tensors) == {"act", "relu"}  # b is still int8
    fp32_ab = without(params, {"a", "b"})
    assert set(fp32_ab.tensors) == {"relu"} and fp32_ab.gates == {}
    assert without(params, {"a", "b", "c"}).tensors == {}
