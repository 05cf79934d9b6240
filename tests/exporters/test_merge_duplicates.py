"""merge_duplicate_nodes: identical Mul nodes (constants compared by value, Identity aliases
looked through) collapse into one, and the graph computes the same thing."""
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from sqexport.exporters.graph import merge_duplicate_nodes


def _graph():
    s = np.array([1.0, 2.0, 3.0], np.float32)
    nodes = [
        helper.make_node("Identity", ["s_a"], ["s_alias"], name="alias"),
        helper.make_node("Mul", ["x", "s_a"], ["m1"], name="m1"),
        helper.make_node("Mul", ["x", "s_alias"], ["m2"], name="m2"),  # same value via Identity
        helper.make_node("Mul", ["x", "s_b"], ["m3"], name="m3"),  # same value, other initializer
        helper.make_node("Mul", ["x", "s_c"], ["m4"], name="m4"),  # different value: kept
        helper.make_node("Sum", ["m1", "m2", "m3", "m4"], ["y"], name="sum"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(s, "s_a"), numpy_helper.from_array(s.copy(), "s_b"),
         numpy_helper.from_array(s * 2, "s_c")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_identical_muls_merge_and_results_are_unchanged():
    model = _graph()
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    before = _run(model, x)
    assert merge_duplicate_nodes(model) == 2
    onnx.checker.check_model(model)
    muls = [n for n in model.graph.node if n.op_type == "Mul"]
    assert len(muls) == 2
    np.testing.assert_array_equal(_run(model, x), before)
    np.testing.assert_array_equal(before, x * np.array([1, 2, 3]) * 3 + x * np.array([2, 4, 6]))


def test_own_weights_copies_weights_only_weight_layers_share():
    from onnx import TensorProto, helper, numpy_helper

    from sqexport.exporters.graph import own_weights

    w = numpy_helper.from_array(np.zeros((2, 2, 1, 1), np.float32), "w")
    table = numpy_helper.from_array(np.ones((4, 2), np.float32), "table")
    nodes = [helper.make_node("Identity", ["w"], ["w_alias"]),
             helper.make_node("Conv", ["x", "w"], ["a"]),
             helper.make_node("Conv", ["a", "w_alias"], ["b"]),
             helper.make_node("Gather", ["table", "ids"], ["emb"]),  # a tied table: read by Gather too
             helper.make_node("MatMul", ["emb", "table_t"], ["logits"]),
             helper.make_node("Transpose", ["table"], ["table_t"], perm=[1, 0])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 1, 1]),
                                           helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
                              [helper.make_tensor_value_info("b", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], [w, table])
    model = helper.make_model(graph)
    assert own_weights(model) == 1
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert [c.input[1] for c in convs] == ["w", "w_copy1"]
    assert not any(n.op_type == "Identity" for n in model.graph.node)  # the alias nobody reads is gone
    assert {i.name for i in model.graph.initializer} == {"w", "w_copy1", "table"}
