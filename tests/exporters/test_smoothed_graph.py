"""without_weights / with_weights on hand-built graphs: the graph kept without its located
weights, completed with one Mul per smoothed group in front of its MatMul/Gemm nodes and the
current weights in the layout the graph stores them, outputs as numpy computes them; a graph of
any other shape is refused (GraphMismatch) and left as it was. WeightIndex:
weights found by content in both layouts, equal weights told apart where they can be."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sqexport.exporters.qdq import find_sites
from sqexport.exporters.smoothed_graph import (GraphMismatch, SmoothedGroup, unsmooth_float_readers, with_weights,
                                              without_weights)
from sqexport.exporters.weight_index import WeightIndex

RNG = np.random.default_rng(0)
W = {"q": RNG.normal(size=(5, 4)).astype(np.float32), "k": RNG.normal(size=(5, 4)).astype(np.float32),
     "fc": RNG.normal(size=(3, 4)).astype(np.float32)}


def _graph(shared_qk: bool = True) -> onnx.ModelProto:
    """x (2, 6, 4) -> q = x @ Wq^T, k = h @ Wk^T (h: x itself, or x + 1), fc = Gemm(x[0], Wfc, transB=1)."""
    k_in = "x" if shared_qk else "h"
    nodes = [helper.make_node("Add", ["x", "one"], ["h"], name="add"),
             helper.make_node("MatMul", ["x", "wq"], ["q"], name="mm_q"),
             helper.make_node("MatMul", [k_in, "wk"], ["k"], name="mm_k"),
             helper.make_node("Gather", ["x", "zero"], ["x0"], name="first", axis=0),
             helper.make_node("Gemm", ["x0", "wfc", "bfc"], ["fc"], name="gemm", transB=1)]
    inits = [numpy_helper.from_array(W["q"].T.copy(), "wq"), numpy_helper.from_array(W["k"].T.copy(), "wk"),
             numpy_helper.from_array(W["fc"], "wfc"), numpy_helper.from_array(np.zeros(3, np.float32), "bfc"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"), numpy_helper.from_array(np.array(0), "zero")]
    out = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape)
           for n, shape in (("q", [2, 6, 5]), ("k", [2, 6, 5]), ("fc", [6, 3]), ("h", [2, 6, 4]))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6, 4])], out, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["q", "k", "fc"], {"x": x})


def _smooth(weights: dict, names, inv) -> SmoothedGroup:
    """What smoothing does in torch: weight columns times s = 1/inv (in `weights`)."""
    for n in names:
        weights[n] = W[n] * (1.0 / inv)
    return SmoothedGroup(inv, tuple(names))


def test_groups_get_one_mul_each_and_the_graph_computes_the_smoothed_model():
    model = _graph()
    sites = find_sites(model, W)
    assert {s: (sites[s].op_type, sites[s].transposed) for s in sites} == {
        "q": ("MatMul", True), "k": ("MatMul", True), "fc": ("Gemm", False)}
    model, shapes = without_weights(model, sites)
    assert shapes == {"wq": (4, 5), "wk": (4, 5), "wfc": (3, 4)}
    assert {i.name for i in model.graph.initializer} == {"bfc", "one", "zero"}  # nothing else kept
    inv_qk = np.array([0.5, 2.0, 0.25, 4.0], np.float32)
    inv_fc = np.array([2.0, 1.0, 0.5, 1.0], np.float32)
    weights = dict(W)
    groups = [_smooth(weights, ["q", "k"], inv_qk), _smooth(weights, ["fc"], inv_fc)]
    with_weights(model, sites, shapes, weights, groups)
    onnx.checker.check_model(model)
    muls = [n for n in model.graph.node if n.op_type == "Mul"]
    assert len(muls) == 2 and sorted(m.input[0] for m in muls) == ["x", "x0"]
    readers = {n.name: n.input[0] for n in model.graph.node}
    assert readers["mm_q"] == readers["mm_k"] == muls[[m.input[0] for m in muls].index("x")].output[0]
    assert readers["add"] == "x"  # other readers of the shared tensor keep the unsmoothed one
    x = RNG.normal(size=(2, 6, 4)).astype(np.float32)
    q, k, fc = _run(model, x)
    np.testing.assert_allclose(q, (x * inv_qk) @ weights["q"].T, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(k, (x * inv_qk) @ weights["k"].T, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(fc, (x[0] * inv_fc) @ weights["fc"].T, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(q, x @ W["q"].T, rtol=1e-5, atol=1e-5)  # smoothing keeps the function
    # the new weights sit where the old ones were, in the stored layout: found there by content
    assert {n: s.weight for n, s in find_sites(model, weights).items()} == {"q": "wq", "k": "wk", "fc": "wfc"}


def _smoothed_graph() -> tuple[onnx.ModelProto, dict, np.ndarray, np.ndarray]:
    model = _graph()
    sites = find_sites(model, W)
    model, shapes = without_weights(model, sites)
    inv_qk, inv_fc = np.array([0.5, 2.0, 0.25, 4.0], np.float32), np.array([2.0, 1.0, 0.5, 1.0], np.float32)
    weights = dict(W)
    with_weights(model, sites, shapes, weights, [_smooth(weights, ["q", "k"], inv_qk), _smooth(weights, ["fc"], inv_fc)])
    return model, weights, inv_qk, inv_fc


def test_a_group_left_all_fp32_loses_its_mul_and_its_weights_take_the_scale():
    model, *_ = _smoothed_graph()
    # q/k (MatMul, FP32) fold; smoothing never groups a Gemm (2-D input), so the fc group is left as is
    assert unsmooth_float_readers(model.graph) == 1
    onnx.checker.check_model(model)
    muls = [n for n in model.graph.node if n.op_type == "Mul"]
    assert [m.input[0] for m in muls] == ["x0"]
    assert [i.name for i in model.graph.initializer if i.name.endswith(".inv_scale")] == ["fc.inv_scale"]
    readers = {n.name: n.input[0] for n in model.graph.node}
    assert readers["mm_q"] == readers["mm_k"] == "x" and readers["gemm"] == muls[0].output[0]
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    # MatMul stores W^T: input channels on rows, where the scale went back
    np.testing.assert_allclose(inits["wq"], W["q"].T, rtol=1e-6)
    np.testing.assert_allclose(inits["wk"], W["k"].T, rtol=1e-6)
    x = RNG.normal(size=(2, 6, 4)).astype(np.float32)
    q, k, fc = _run(model, x)
    np.testing.assert_allclose(q, x @ W["q"].T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(k, x @ W["k"].T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fc, x[0] @ W["fc"].T, rtol=1e-5, atol=1e-5)


def test_a_group_with_an_int8_reader_keeps_its_mul():
    model, weights, inv_qk, _ = _smoothed_graph()
    mm_k = next(n for n in model.graph.node if n.name == "mm_k")
    # mm_k as an int8 layer reads its weight through a DequantizeLinear: the Mul is what it quantizes
    wk_q = np.round(weights["k"].T * 10).astype(np.int8)
    model.graph.initializer.extend([numpy_helper.from_array(wk_q, "wk_q"),
                                    numpy_helper.from_array(np.array(0.1, np.float32), "wk_s")])
    model.graph.node.insert(0, helper.make_node("DequantizeLinear", ["wk_q", "wk_s"], ["wk_dq"], name="dq_k"))
    mm_k.input[1] = "wk_dq"
    assert unsmooth_float_readers(model.graph) == 0
    muls = {m.input[0]: m for m in model.graph.node if m.op_type == "Mul"}
    assert sorted(muls) == ["x", "x0"]
    assert {n.name: n.input[0] for n in model.graph.node}["mm_q"] == muls["x"].output[0]
    onnx.checker.check_model(model)
    x = RNG.normal(size=(2, 6, 4)).astype(np.float32)
    q, _, fc = _run(model, x)
    np.testing.assert_allclose(q, x @ W["q"].T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fc, x[0] @ W["fc"].T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["missing", "split", "shared_init", "gone", "reshaped"])
def test_a_graph_of_another_shape_is_refused_and_left_as_it_was(case):
    model = _graph(shared_qk=case != "split")
    sites = find_sites(model, W)
    if case == "missing":
        del sites["k"]
    model, shapes = without_weights(model, sites)
    if case == "shared_init":
        model.graph.node.append(helper.make_node("MatMul", ["x", "wk"], ["k2"], name="mm_k2"))
    weights = dict(W)
    inv = np.ones(4, np.float32)
    groups = [_smooth(weights, ["fc"], inv), _smooth(weights, ["q", "k"], inv)]
    if case == "gone":
        del weights["k"]
    if case == "reshaped":
        weights["q"] = weights["q"][:4]
    before = model.SerializeToString()
    with pytest.raises(GraphMismatch, match={"missing": "no weight initializer", "split": "different tensors",
                                             "shared_init": "not the one located", "gone": "not in the model any more",
                                             "reshaped": "changed shape"}[case]):
        with_weights(model, sites, shapes, weights, groups)
    assert model.SerializeToString() == before


def test_weight_index_finds_both_layouts_and_tells_equal_weights_apart():
    zero = np.zeros((5, 4), np.float32)
    sym = RNG.normal(size=(4, 4)).astype(np.float32)
    sym = sym + sym.T
    index = WeightIndex({"a": zero, "b": zero.copy(), "s": sym, "q": W["q"]})
    assert index.matches(W["q"]) == [("q", False)] and index.matches(W["q"].T.copy()) == [("q", True)]
    assert index.matches(zero) == [("a", False), ("b", False)]
    assert index.matches(zero, taken={"a"}) == [("b", False), ("a", False)]  # a second node gets the other one
    assert index.matches(sym) == [("s", False), ("s", True)]  # the caller keeps the layout its node reads
    assert index.matches(W["q"] + 1) == []
    assert index.twins() == {"a", "b"}
    assert WeightIndex({"w": W["fc"], "t": W["fc"].T.copy()}).twins() == {"w", "t"}


def test_equal_weights_go_to_different_nodes_and_a_symmetric_weight_to_matmul():
    sym = np.eye(4, dtype=np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["y1"], name="m1"),
             helper.make_node("MatMul", ["y1", "w2"], ["y"], name="m2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                              [numpy_helper.from_array(sym, "w1"), numpy_helper.from_array(sym.copy(), "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    sites = find_sites(model, {"first": sym, "second": sym.copy()})
    assert {n: (s.node, s.transposed) for n, s in sites.items()} == {"first": ("m1", True), "second": ("m2", True)}
