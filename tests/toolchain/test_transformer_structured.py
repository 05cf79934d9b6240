"""Head and FFN-neuron removal on a tiny BERT: shapes and config, kept units unchanged without
repair, the least-squares refit, export through optimum and reload with transformers."""
import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import BertConfig, BertModel

from sqexport.toolchain.pruning import transformer_structured as T
from sqexport.toolchain.pruning.structured_stage import StructuredPruneConfig, prune_structured
from sqexport.toolchain.stages import PruneContext


def _bert():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    return BertModel(cfg).eval()


def _batches():
    rng = np.random.default_rng(0)
    out = []
    for _ in range(3):
        ids = rng.integers(5, 100, (4, 12)).astype(np.int64)
        mask = np.ones_like(ids)
        mask[0, 9:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _run(model, batch):
    with torch.no_grad():
        return [model(**{k: torch.from_numpy(v) for k, v in batch.items()}).last_hidden_state.numpy()]


def _ctx():
    b = _batches()
    return PruneContext({}, b, _run, example_inputs={k: v[:1] for k, v in b[0].items()},
                        export=lambda m, p: None, threads=1)


def test_heads_and_neurons_are_removed_and_config_updated():
    model = _bert()
    result = prune_structured(model, StructuredPruneConfig(sparsity=0.5, round_to=8, allocation="uniform"), _ctx())
    removed = result.extra["structure"]["removed"]
    assert removed["heads_total"] == 4 and removed["neurons_total"] == 64
    for i, lay in enumerate(model.encoder.layer):
        assert lay.attention.self.num_attention_heads == 2
        assert lay.attention.self.query.weight.shape == (16, 32)
        assert lay.attention.output.dense.weight.shape == (32, 16)
        assert lay.intermediate.dense.weight.shape == (32, 32) and lay.output.dense.weight.shape == (32, 32)
    assert model.config.intermediate_size == 32
    assert {int(k): sorted(v) for k, v in model.config.pruned_heads.items()} == \
        {int(k[len("layer."):]): v for k, v in removed["heads"].items()}
    assert _run(model, _batches()[0])[0].shape == (4, 12, 32)


def test_kept_units_compute_what_they_did_before_without_repair():
    dense, model = _bert(), _bert()
    prune_structured(model, StructuredPruneConfig(sparsity=0.5, repair=False, allocation="uniform"), _ctx())
    x = torch.from_numpy(_batches()[0]["input_ids"])
    with torch.no_grad():
        h = dense.embeddings(x)  # layer 0 sees the same input in both models
        full = dense.encoder.layer[0].attention.self(h)[0]
        slim = model.encoder.layer[0].attention.self(h)[0]
    dropped = set(model.config.pruned_heads[0])
    kept_cols = [c for hd in range(4) if hd not in dropped for c in range(hd * 8, hd * 8 + 8)]
    torch.testing.assert_close(slim, full[..., kept_cols])


def test_refit_recovers_a_removed_column_that_others_explain():
    torch.manual_seed(0)
    x = torch.randn(200, 3)
    x[:, 2] = x[:, 0] - 2 * x[:, 1] + 0.5  # the third input is a function of the others
    lin = torch.nn.Linear(3, 2)
    xa = torch.cat([x, torch.ones(200, 1)], 1).double()
    target = lin(x).double()
    G, B = xa.T @ xa, target.T @ xa
    w, b = T.refit_columns(G, B, [0, 1], damp=1e-9)
    torch.testing.assert_close(x[:, :2] @ w.T + b, lin(x).detach(), atol=1e-4, rtol=1e-4)
    # the hand-computed answer: w_k + w_2 * [1, -2], bias + 0.5 * w_2
    w0 = lin.weight.detach()
    torch.testing.assert_close(w, w0[:, :2] + w0[:, 2:] * torch.tensor([1.0, -2.0]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b, lin.bias.detach() + 0.5 * w0[:, 2], atol=1e-4, rtol=1e-4)


def test_repair_brings_outputs_closer_to_the_dense_model():
    dense = _bert()
    errs = {}
    for repair in (False, True):
        model = _bert()
        prune_structured(model, StructuredPruneConfig(sparsity=0.5, repair=repair, allocation="uniform"), _ctx())
        errs[repair] = float(np.mean([np.abs(_run(model, b)[0] - _run(dense, b)[0]).mean() for b in _batches()]))
    assert errs[True] < errs[False]


def test_slim_model_reloads_and_exports_through_optimum(tmp_path):
    from types import SimpleNamespace

    from sqexport.exporters.hf_export import export_hf
    from transformers import AutoModel

    model = _bert()
    prune_structured(model, StructuredPruneConfig(sparsity=0.5), _ctx())
    model.save_pretrained(tmp_path / "slim")
    again = AutoModel.from_pretrained(tmp_path / "slim", local_files_only=True).eval()
    b = _batches()[0]
    np.testing.assert_allclose(_run(again, b)[0], _run(model, b)[0], atol=1e-5)
    export_hf(SimpleNamespace(task="feature-extraction"), model, tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    feed = {i.name: (b[i.name] if i.name in b else np.zeros_like(b["input_ids"])) for i in sess.get_inputs()}
    np.testing.assert_allclose(sess.run(None, feed)[0], _run(model, b)[0], atol=1e-4)


def test_unsupported_architecture_is_a_config_error():
    from sqexport.contracts.errors import ConfigError

    with pytest.raises(ConfigError, match="BERT-style"):
        T.encoder_layers(torch.nn.Linear(2, 2))


def test_sparsity_is_measured_on_the_replaced_modules():
    from sqexport.toolchain.pruning import overall_sparsity, prunable_layers

    model = _bert()
    dense = {n: m.weight.numel() for n, m in prunable_layers(model, "encoder.").items()}
    prune_structured(model, StructuredPruneConfig(sparsity=0.5, allocation="uniform"), _ctx())
    # half the heads and half the FFN neurons: half of every encoder Linear's weights
    assert overall_sparsity(prunable_layers(model, "encoder."), dense) == pytest.approx(0.5)
