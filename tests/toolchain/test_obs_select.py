"""Reconstruction importance (group OBS): the saliency is the refit's leftover error, duplicated
units are the cheap ones, and the global allocation removes the requested share of a tiny BERT."""
import numpy as np
import torch
from transformers import BertConfig, BertModel

from sqexport.toolchain.pruning.obs_select import damped_inverse, greedy_drop, obs_saliency
from sqexport.toolchain.pruning.structured_stage import StructuredPruneConfig, prune_structured
from sqexport.toolchain.stages import PruneContext


def _layer(n=400, d=6, out=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    W = torch.randn(out, d, generator=g, dtype=torch.float64)
    xa = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)
    return x, W, xa.T @ xa


def test_saliency_is_the_error_left_after_the_best_refit_of_the_other_columns():
    _x, W, G = _layer()
    H = G + 0.01 * torch.diagonal(G).mean() * torch.eye(len(G), dtype=G.dtype)
    Wa = torch.cat([W, torch.zeros(3, 1, dtype=W.dtype)], 1)  # bias column: kept, refit too
    for unit, u in ((1, 4), (2, 1)):  # a single column; a "head" of two columns
        S = list(range(u * unit, (u + 1) * unit))
        K = [c for c in range(7) if c not in S]
        # argmin over V of tr((Wa - V) H (Wa - V)^T) with V zero on S: V_K = (Wa H)[:, K] H_KK^-1
        V = torch.zeros_like(Wa)
        V[:, K] = (Wa @ H)[:, K] @ torch.linalg.inv(H[K][:, K])
        direct = torch.trace((Wa - V) @ H @ (Wa - V).T)
        got = obs_saliency(W, damped_inverse(G, 0.01)[:-1, :-1], unit, [u])[0]
        torch.testing.assert_close(got, direct, rtol=1e-8, atol=1e-8)


def test_a_duplicated_unit_is_removed_before_a_large_unique_one():
    x, W, _ = _layer()
    x[:, 1] = x[:, 0]  # unit 1 repeats unit 0: the refit moves its weight onto unit 0 at no cost
    x[:, 5] *= 10  # unit 5 is large and unique
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    G = xa.T @ xa
    dropped = greedy_drop(W, G, 1, 1, damp=1e-6)
    assert dropped in ([0], [1])
    # both copies are not removed together: after the first goes, the other carries them both
    assert len(set(greedy_drop(W, G, 1, 2, damp=1e-6, chunks=2)) & {0, 1}) == 1
    assert 5 not in greedy_drop(W, G, 1, 4, damp=1e-6, chunks=4)


def _bert(layers=3, heads=4):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=64, max_position_embeddings=64)
    return BertModel(cfg).eval()


def _ctx():
    rng = np.random.default_rng(0)
    b = [{"input_ids": rng.integers(5, 100, (8, 12)).astype(np.int64), "attention_mask": np.ones((8, 12), np.int64)}
         for _ in range(3)]

    def run(model, batch):
        with torch.no_grad():
            return [model(**{k: torch.from_numpy(v) for k, v in batch.items()}).last_hidden_state.numpy()]

    return PruneContext({}, b, run, example_inputs={k: v[:1] for k, v in b[0].items()}), run, b


def test_global_reconstruction_pruning_removes_the_requested_share_and_reloads(tmp_path):
    from transformers import AutoModel

    model = _bert()
    params = sum(p.numel() for p in model.encoder.parameters())
    ctx, run, batches = _ctx()
    result = prune_structured(model, StructuredPruneConfig(sparsity=0.5), ctx)  # auto -> reconstruction
    removed = result.extra["structure"]["removed"]
    assert removed["importance"] == "reconstruction"
    assert removed["heads_total"] == 6  # half of 3 x 4 heads, wherever they cost least
    assert all(lay.attention.self.num_attention_heads >= 1 for lay in model.encoder.layer)
    assert removed["neurons_total"] == 3 * 32 and model.config.intermediate_size == 32
    # every encoder Linear reading or producing a removed unit lost half its weights: 4 of the
    # 6 Linears per layer are cut in half (attention.output.dense and the FFN: in or out side;
    # q/k/v: out side), so the encoder keeps half its Linear weights plus biases and LayerNorms
    kept = sum(p.numel() for p in model.encoder.parameters())
    linear = sum(m.weight.numel() for m in _bert().encoder.modules() if isinstance(m, torch.nn.Linear))
    assert kept <= params - linear // 2 + 3 * (3 * 16 + 32)  # + the q/k/v/intermediate biases kept
    model.save_pretrained(tmp_path / "slim")
    again = AutoModel.from_pretrained(tmp_path / "slim", local_files_only=True).eval()
    np.testing.assert_allclose(run(again, batches[0])[0], run(model, batches[0])[0], atol=1e-5)


def test_reconstruction_importance_is_for_transformers_only():
    import pytest

    from sqexport.contracts.errors import ConfigError

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
    ctx = PruneContext({}, [{"x": np.zeros((1, 1, 8, 8), np.float32)}], lambda m, b: None,
                       example_inputs={"x": np.zeros((1, 1, 8, 8), np.float32)})
    with pytest.raises(ConfigError, match="transformers"):
        prune_structured(net, StructuredPruneConfig(importance="reconstruction"), ctx)


def test_the_refit_also_reads_the_extra_unlabeled_batches():
    ctx, run, batches = _ctx()
    calls = []

    def more():
        calls.append(1)
        rng = np.random.default_rng(1)
        return [{"input_ids": rng.integers(5, 100, (8, 12)).astype(np.int64),
                 "attention_mask": np.ones((8, 12), np.int64)}]

    ctx.more_batches = more
    seen = []
    inner = ctx.run
    ctx.run = lambda m, b: (seen.append(len(b["input_ids"])), inner(m, b))[1]
    prune_structured(_bert(), StructuredPruneConfig(sparsity=0.5), ctx)
    assert calls == [1] and len(seen) == len(batches) + 1  # the embeddings ran on every batch once
