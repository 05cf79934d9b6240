"""int8 embedding tables: vocabulary-sized tables only, stored uint8 with zero point 128, a Q/DQ
pair with the table's own params after the Gather, onnxruntime output equal to the torch model
with the dequantized table."""
from types import SimpleNamespace

from sqexport.toolchain.stages import QuantContext
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from sqexport.exporters.onnx_export import export_torch
from sqexport.exporters.qdq import find_embedding_sites, find_sites, insert_qdq
from sqexport.toolchain.pruning import prunable_layers
from sqexport.contracts.quant import Anchor, QuantParams
from sqexport.toolchain.quantization import fake_quant_model
from sqexport.toolchain.quantization.int8 import Int8StaticConfig
from sqexport.toolchain.quantization.static import MIN_EMBEDDING_ROWS, quantize_embeddings
from sqexport.toolchain.builtin_methods import lookup

OPT_LEVELS = [ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL]
VOCAB, SEGMENTS, DIM = 2048, 64, 16


class TinyEncoder(nn.Module):
    """token table (2048 rows) + segment table (64 rows) -> Linear on (batch, seq, 16)."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, DIM)
        self.seg = nn.Embedding(SEGMENTS, DIM)
        self.fc = nn.Linear(DIM, 4)

    def forward(self, ids, seg):
        return self.fc(self.tok(ids) + self.seg(seg))


def _feed(rng, batch, seq):
    return {"ids": rng.integers(0, VOCAB, size=(batch, seq)).astype(np.int64),
            "seg": rng.integers(0, SEGMENTS, size=(batch, seq)).astype(np.int64)}


def _torch(model, feed):
    with torch.no_grad():
        return model(torch.from_numpy(feed["ids"]), torch.from_numpy(feed["seg"])).numpy()


@pytest.fixture(scope="module")
def enc(tmp_path_factory):
    torch.manual_seed(0)
    model = TinyEncoder().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    rng = np.random.default_rng(0)
    axes = {"ids": {0: "batch", 1: "seq"}, "seg": {0: "batch", 1: "seq"}, "y": {0: "batch", 1: "seq"}}
    fp32 = export_torch(model, _feed(rng, 2, 5), ["ids", "seg"], ["y"], axes,
                        tmp_path_factory.mktemp("emb") / "m.onnx")
    tables = {n: m.weight.numpy() for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    emb_sites = find_embedding_sites(fp32, tables)
    # embeddings only
    only = QuantParams(embeddings=quantize_embeddings(model))
    qdq_only = insert_qdq(fp32, {}, only, emb_sites)
    onnx.checker.check_model(qdq_only)
    # the int8 handler: static Linear + embeddings
    sites = find_sites(fp32, {n: m.weight.numpy() for n, m in prunable_layers(model).items()})
    anchors = [Anchor(n, s.rectified_output is not None, s.bias is not None, True) for n, s in sites.items()]
    calib = [_feed(rng, 4, 7) for _ in range(4)]
    ctx = QuantContext(anchors=anchors, calib_batches=calib,
                          run=lambda m, b: m(torch.from_numpy(b["ids"]), torch.from_numpy(b["seg"])))
    full = lookup("quantize", "int8").handler(model, Int8StaticConfig(), ctx)
    qdq_full = insert_qdq(fp32, sites, full, emb_sites)
    onnx.checker.check_model(qdq_full)
    return SimpleNamespace(model=model, fp32=fp32, emb_sites=emb_sites, only=only, qdq_only=qdq_only,
                           full=full, qdq_full=qdq_full, feed=_feed(rng, 3, 9))


def _inits(model):
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _session(model, level):
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def test_only_vocabulary_sized_tables_are_quantized():
    assert MIN_EMBEDDING_ROWS == 1024
    model = nn.Module()
    model.small = nn.Embedding(MIN_EMBEDDING_ROWS - 1, 8)
    model.edge = nn.Embedding(MIN_EMBEDDING_ROWS, 8)
    model.big = nn.Embedding(4096, 8)
    model.fc = nn.Linear(8, 8)
    assert set(quantize_embeddings(model)) == {"edge", "big"}


def test_per_tensor_symmetric_table_params(enc):
    assert set(enc.only.embeddings) == {"tok"}  # the 64-row segment table stays FP32
    q, scale = enc.only.embeddings["tok"]
    w = enc.model.tok.weight.numpy()
    assert q.dtype == np.int8 and q.shape == w.shape
    assert scale == pytest.approx(float(np.abs(w).max()) / 127, rel=1e-6)
    assert np.abs(q).max() == 127 and q.min() >= -127
    np.testing.assert_array_equal(q, np.clip(np.rint(w / np.float32(scale)), -127, 127))
    assert np.abs(q * np.float32(scale) - w).max() <= scale / 2 + 1e-7


def test_find_embedding_sites_by_content(enc):
    assert set(enc.emb_sites) == {"tok", "seg"}
    nodes = {n.name: n for n in enc.fp32.graph.node}
    for module, (node_name, table) in enc.emb_sites.items():
        node = nodes[node_name]
        assert node.op_type == "Gather" and node.input[0] == table
        np.testing.assert_array_equal(_inits(enc.fp32)[table], getattr(enc.model, module).weight.numpy())


@pytest.mark.parametrize("which", ["qdq_only", "qdq_full"])
def test_table_is_uint8_with_zero_point_128(enc, which):
    model = getattr(enc, which)
    inits = _inits(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    consumers = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    tok_node, tok_table = enc.emb_sites["tok"]
    gather = next(n for n in model.graph.node if n.name == tok_node)
    dq = producers[gather.input[0]]
    assert dq.op_type == "DequantizeLinear" and dq.input[0] in inits
    stored, scale, zp = inits[dq.input[0]], inits[dq.input[1]], inits[dq.input[2]]
    q, q_scale = enc.only.embeddings["tok"]
    assert stored.dtype == np.uint8 and stored.shape == (VOCAB, DIM)
    assert zp.dtype == np.uint8 and zp.shape == () and int(zp) == 128
    assert float(scale) == np.float32(q_scale)
    np.testing.assert_array_equal(stored.astype(np.int16) - 128, q)  # same values as int8, zero point 0
    assert tok_table not in inits  # the FP32 table is gone
    # a Q/DQ pair with the same scale / zero point follows the Gather, and only it reads the rows
    (qnode,) = consumers[gather.output[0]]
    assert qnode.op_type == "QuantizeLinear" and list(qnode.input[1:]) == list(dq.input[1:])
    (dq2,) = consumers[qnode.output[0]]
    assert dq2.op_type == "DequantizeLinear" and list(dq2.input[1:]) == list(dq.input[1:])
    # the segment table is untouched
    seg_node, seg_table = enc.emb_sites["seg"]
    assert inits[seg_table].dtype == np.float32
    assert next(n for n in model.graph.node if n.name == seg_node).input[0] == seg_table


@pytest.mark.parametrize("level", OPT_LEVELS, ids=["disable_all", "enable_all"])
def test_onnxruntime_matches_dequantized_table(enc, level):
    out = _session(enc.qdq_only, level).run(None, enc.feed)[0]
    ref = _torch(fake_quant_model(enc.model, enc.only), enc.feed)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    # by hand: the torch model with the table replaced by q * scale
    q, scale = enc.only.embeddings["tok"]
    by_hand = TinyEncoder().eval()
    by_hand.load_state_dict(enc.model.state_dict())
    with torch.no_grad():
        by_hand.tok.weight.copy_(torch.from_numpy(q.astype(np.float32) * np.float32(scale)))
    np.testing.assert_allclose(ref, _torch(by_hand, enc.feed), atol=0, rtol=0)
    assert not np.array_equal(out, _torch(enc.model, enc.feed))  # really quantized


@pytest.mark.parametrize("level", OPT_LEVELS, ids=["disable_all", "enable_all"])
def test_onnxruntime_matches_fake_quant_with_int8_linear(enc, level):
    assert set(enc.full.embeddings) == {"tok"} and set(enc.full.weights) == {"fc"}
    out = _session(enc.qdq_full, level).run(None, enc.feed)[0]
    np.testing.assert_allclose(out, _torch(fake_quant_model(enc.model, enc.full), enc.feed), atol=1e-4, rtol=1e-4)


def test_embeddings_without_matching_site_are_ignored(enc):
    params = QuantParams(embeddings=quantize_embeddings(enc.model))
    out = insert_qdq(enc.fp32, {}, params, {})  # no embedding sites: nothing to rewrite
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in enc.fp32.graph.node]
    params = QuantParams()  # sites but no params: the tables stay FP32
    out = insert_qdq(enc.fp32, {}, params, enc.emb_sites)
    assert all(v.dtype == np.float32 for v in _inits(out).values())


def test_onnxruntime_gathers_uint8_rows(enc, tmp_path):
    """The point of the Q/DQ after Gather: onnxruntime drops the whole-table DequantizeLinear."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(enc.qdq_full.SerializeToString(), so, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    inits = _inits(optimized)
    gathers = [n for n in optimized.graph.node if n.op_type == "Gather"]
    assert sorted(inits[n.input[0]].dtype.name for n in gathers if n.input[0] in inits) == ["float32", "uint8"]
    assert len(gathers) == 2
