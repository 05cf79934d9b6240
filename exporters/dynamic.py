"""Dynamic int8 for MatMul/Gemm: weights int8 per output channel (params from torch), activations
quantized at run time per tensor by DynamicQuantizeLinear. The node pattern is the one
onnxruntime fuses into DynamicQuantizeMatMul (MatMulInteger -> Cast -> Mul by x_scale * w_scale)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from sqexport.contracts.quant import QuantParams
from sqexport.exporters.graph import ensure_node_names, toposort
from sqexport.exporters.qdq import Site

__all__ = ["insert_dynamic"]


def insert_dynamic(model: onnx.ModelProto, sites: dict[str, Site], params: QuantParams,
                   inplace: bool = False) -> onnx.ModelProto:
    """`inplace` rewrites `model` itself instead of a copy."""
    out = model if inplace else onnx.ModelProto()
    if not inplace:
        out.CopyFrom(model)
    graph = out.graph
    ensure_node_names(graph)
    nodes = {n.name: n for n in graph.node}
    removed, new_nodes, inits, dq_cache = set(), [], [], {}
    for anchor in params.anchors:
        site = sites[anchor.module]
        node = nodes[site.node]
        wq = params.weights[anchor.module]
        tag = f"{anchor.module}.weight"  # exporters often name it onnx::MatMul_812
        x = site.activation
        if x not in dq_cache:  # one DynamicQuantizeLinear per activation tensor
            t = f"{x}_dyn{len(dq_cache)}"
            new_nodes.append(helper.make_node("DynamicQuantizeLinear", [x], [f"{t}_q", f"{t}_scale", f"{t}_zp"],
                                              name=f"{t}_DynamicQuantizeLinear"))
            dq_cache[x] = t
        t = dq_cache[x]
        inits += [onnx.numpy_helper.from_array(wq.q.T.copy(), f"{tag}_quantized"),  # (in, out) for MatMul
                  onnx.numpy_helper.from_array(np.zeros(wq.q.shape[0], np.int8), f"{tag}_zero_point"),
                  onnx.numpy_helper.from_array(wq.scale.astype(np.float32), f"{tag}_scale")]
        y = node.output[0]
        new_nodes += [
            helper.make_node("MatMulInteger", [f"{t}_q", f"{tag}_quantized", f"{t}_zp", f"{tag}_zero_point"],
                             [f"{tag}_int32"], name=f"{tag}_MatMulInteger"),
            helper.make_node("Cast", [f"{tag}_int32"], [f"{tag}_float"], to=TensorProto.FLOAT, name=f"{tag}_Cast"),
            helper.make_node("Mul", [f"{t}_scale", f"{tag}_scale"], [f"{tag}_scales"], name=f"{tag}_ScaleMul"),
        ]
        if site.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
            new_nodes += [helper.make_node("Mul", [f"{tag}_float", f"{tag}_scales"], [f"{tag}_nobias"], name=f"{tag}_Mul"),
                          helper.make_node("Add", [f"{tag}_nobias", node.input[2]], [y], name=f"{tag}_BiasAdd")]
        else:
            new_nodes.append(helper.make_node("Mul", [f"{tag}_float", f"{tag}_scales"], [y], name=f"{tag}_Mul"))
        removed.add(node.name)
    kept_inits = [i for i in graph.initializer if i.name not in {sites[a.module].weight for a in params.anchors}]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits + inits)
    all_nodes = [n for n in graph.node if n.name not in removed] + new_nodes
    del graph.node[:]
    graph.node.extend(toposort(all_nodes, graph))
    return out
