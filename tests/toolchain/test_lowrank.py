"""Low-rank factorization (prune.lowrank): rank by energy, SVD error, the H-matrix error bound,
exact separable convs, and the factored model exported to int8 QDQ ONNX and run in onnxruntime."""
import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from sqexport.contracts.errors import ConfigError
from sqexport.contracts.quant import Anchor
from sqexport.exporters.onnx_export import export_torch
from sqexport.exporters.qdq import find_sites, insert_qdq
from sqexport.runtime_check.isa import weight_grid
from sqexport.toolchain.pruning import lowrank_math as L
from sqexport.toolchain.pruning.lowrank import LowRankPruneConfig, plan_layer, prune_lowrank
from sqexport.runtime_check.node_timing import revert_until_faster
from sqexport.toolchain.pruning.lowrank_modules import HMatrixLinear, channel_conv, separable_conv
from sqexport.toolchain.pruning.masks import prunable_layers
from sqexport.toolchain.quantization import fake_quant_model
from sqexport.toolchain.quantization.int8 import Int8StaticConfig, quantize_static
from sqexport.toolchain.stages import PruneContext, QuantContext



def _orthogonal(n: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def test_rank_by_energy_on_a_hand_made_matrix():
    # singular values 3, 2, 1: energies 9, 4, 1 of 14 -> 64%, 93%, 100% kept at ranks 1, 2, 3
    w = _orthogonal(3, 0) @ torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)) @ _orthogonal(3, 1)
    s = torch.linalg.svdvals(w)
    assert [L.energy_rank(s, tau) for tau in (0.5, 9 / 14, 0.9, 13 / 14, 0.95, 1.0)] == [1, 1, 2, 2, 3, 3]
    assert L.relative_tail(s, 1) == pytest.approx((5 / 14) ** 0.5)
    assert L.energy_rank(torch.zeros(3), 0.9) == 0


def test_svd_factors_reproduce_w_within_the_stated_error():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 24, generator=g) @ torch.diag(torch.logspace(0, -2, 24)) @ torch.randn(24, 24, generator=g)
    lin = nn.Linear(24, 40).requires_grad_(False)
    with torch.no_grad():
        lin.weight.copy_(w)
    entry, build = plan_layer(lin, LowRankPruneConfig(rank_energy=0.95, rank_multiple=1))
    s = torch.linalg.svdvals(w.double())
    r = entry["rank"]
    assert r == L.energy_rank(s, 0.95) and L.pays(r, 40, 24)
    x = torch.randn(5, 24, generator=g)
    before = lin(x)
    factored = build(lin)
    assert [type(m) for m in factored] == [nn.Linear, nn.Linear] and factored[1] is lin  # the original object, smaller
    assert lin.weight.shape == (40, r)
    approx = factored[1].weight.double() @ factored[0].weight.double()
    err = float((approx - w.double()).norm() / w.double().norm())
    assert err == pytest.approx(L.relative_tail(s, r), rel=1e-4) == pytest.approx(entry["relative_error"], rel=1e-4)
    assert err <= (1 - 0.95) ** 0.5 + 1e-6  # energy tau bounds the relative error by sqrt(1 - tau)
    torch.testing.assert_close(factored(x) - lin.bias, x @ approx.float().T, rtol=1e-4, atol=1e-4)
    assert before.shape == factored(x).shape


SHAPES = [(64, 64), (96, 48), (50, 130), (128, 256), (37, 91)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("eps", [0.02, 0.1, 0.3, 0.6])
def test_hmatrix_error_never_exceeds_the_bound(shape, eps):
    m, n = shape
    g = torch.Generator().manual_seed(m * n)
    i, j = torch.arange(m, dtype=torch.float64)[:, None], torch.arange(n, dtype=torch.float64)[None]
    matrices = [torch.randn(m, n, generator=g, dtype=torch.float64),  # no structure: mostly dense leaves
                1.0 / (1.0 + (i / m - j / n).abs() * 20),  # smooth off the diagonal: what H-matrices are for
                torch.randn(m, 3, generator=g, dtype=torch.float64) @ torch.randn(3, n, generator=g, dtype=torch.float64)
                + 0.01 * torch.randn(m, n, generator=g, dtype=torch.float64)]
    for w in matrices:
        blocks, err = L.hmatrix(w, eps, min_block=8)
        measured = float((L.hmatrix_dense(blocks, (m, n)) - w).norm() / w.norm())
        assert measured == pytest.approx(err, abs=1e-9)
        assert measured <= eps
        covered = torch.zeros(m, n)
        for b in blocks:
            covered[b.r0:b.r1, b.c0:b.c1] += 1
        assert torch.all(covered == 1)  # the leaves partition W
        assert L.hmatrix_params(blocks) <= m * n


def test_hmatrix_linear_computes_the_leaves_matrix():
    m, n = 96, 64
    i, j = torch.arange(m, dtype=torch.float32)[:, None], torch.arange(n, dtype=torch.float32)[None]
    w = 1.0 / (1.0 + (i / m - j / n).abs() * 20)
    blocks, err = L.hmatrix(w, 0.05, min_block=8)
    assert len(blocks) > 1 and any(b.dense is None for b in blocks)
    bias = torch.randn(m)
    layer = HMatrixLinear(blocks, m, n, bias)
    x = torch.randn(2, 5, n)
    ref = x @ L.hmatrix_dense(blocks, (m, n)).float().T + bias
    torch.testing.assert_close(layer(x), ref, rtol=1e-4, atol=1e-4)
    assert err <= 0.05


@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), ((2, 1), (1, 2), 1), (1, 2, 2)])
def test_separable_conv_equals_the_original_when_the_kernel_is_rank_one(stride, padding, dilation):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 3, generator=g), torch.randn(5, 3, generator=g)  # a[c, i], b[n, j]
    conv = nn.Conv2d(3, 5, 3, stride=stride, padding=padding, dilation=dilation).requires_grad_(False)
    with torch.no_grad():
        conv.weight.copy_(torch.einsum("ci,nj->ncij", a, b))  # rank 1 once unfolded to (c, i) x (n, j)
    x = torch.randn(2, 3, 9, 11, generator=g)
    before = conv(x)
    entry, build = plan_layer(conv, LowRankPruneConfig(rank_energy=0.999, rank_multiple=1))
    assert entry["method"] == "separable" and entry["rank"] == 1 and entry["relative_error"] < 1e-6
    sep = build(conv)
    assert sep[0].kernel_size == (3, 1) and sep[1].kernel_size == (1, 3)
    torch.testing.assert_close(sep(x), before, rtol=1e-5, atol=1e-5)


def test_separable_conv_of_full_rank_is_exact():
    g = torch.Generator().manual_seed(2)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False).requires_grad_(False)
    x = torch.randn(1, 4, 7, 7, generator=g)
    before = conv(x)
    v, h, _ = L.separable_factors(conv.weight.detach(), 12)  # min(C_in*kh, C_out*kw) = 12
    torch.testing.assert_close(separable_conv(conv, v, h)(x), before, rtol=1e-4, atol=1e-5)


class LowRankNet(nn.Module):
    """A conv stem, a separable-friendly 3x3 conv, a 1x1 conv and a Linear head, all with weights of
    low rank plus a little noise, so every layer pays at tau = 0.99."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.stem = nn.Conv2d(1, 32, 3, padding=1)
        self.conv = nn.Conv2d(32, 32, 3, padding=1)
        self.pw = nn.Conv2d(32, 32, 1)
        self.fc = nn.Linear(32, 32)
        self.head = nn.Linear(32, 4)
        with torch.no_grad():
            self.conv.weight.copy_(torch.einsum("rci,rnj->ncij", torch.randn(4, 32, 3, generator=g),
                                                torch.randn(4, 32, 3, generator=g)) / 20)
            self.pw.weight.copy_((torch.randn(32, 3, generator=g) @ torch.randn(3, 32, generator=g))[..., None, None] / 8)
            self.fc.weight.copy_(torch.randn(32, 4, generator=g) @ torch.randn(4, 32, generator=g) / 8)
        self.requires_grad_(False)

    def forward(self, x):
        x = torch.relu(self.pw(torch.relu(self.conv(torch.relu(self.stem(x))))))
        return self.head(torch.relu(self.fc(x.mean((2, 3)))))


def _run(model, batch):
    with torch.no_grad():
        return [model(torch.from_numpy(batch["x"])).numpy()]


BATCHES = [{"x": np.random.default_rng(i).random((4, 1, 8, 8), dtype=np.float32)} for i in range(2)]


def test_factored_model_exports_to_int8_and_matches_torch(tmp_path):
    model = LowRankNet().eval()
    dense_out = _run(model, BATCHES[0])[0]
    ctx = PruneContext(prunable_layers(model), BATCHES, _run, example_inputs={"x": BATCHES[0]["x"][:1]})
    result = prune_lowrank(model, LowRankPruneConfig(rank_energy=0.99, decide="params", rank_multiple=1), ctx)
    info = result.extra["lowrank"]
    assert set(info["factored"]) == {"conv", "pw", "fc"}  # stem (1 input channel) and head (rank 4 of 4) do not pay
    assert info["layers"]["conv"]["method"] == "separable" and info["layers"]["conv"]["rank"] == 4
    assert info["layers"]["pw"]["method"] == "svd" and info["params"]["after"] < info["params"]["before"]
    assert "do not pay" not in info["layers"]["conv"].get("reason", "")
    np.testing.assert_allclose(_run(model, BATCHES[0])[0], dense_out, rtol=1e-3, atol=1e-3)

    graph = export_torch(model, BATCHES[0], ["x"], ["y"], {"x": {0: "b"}, "y": {0: "b"}}, tmp_path / "fp32.onnx")
    layers = prunable_layers(model)
    assert {"conv.0", "conv.1", "pw.0", "pw.1", "fc.0", "fc.1"} <= set(layers)
    sites = find_sites(graph, {n: m.weight.detach().numpy() for n, m in layers.items()})
    assert set(sites) == set(layers)  # every factor is a plain Conv / MatMul node of its own
    anchors = [Anchor(n, s.output is not None, s.bias is not None, s.op_type in ("MatMul", "Gemm"),
                      s.output_range)
               for n, s in sites.items()]
    params = quantize_static(model, Int8StaticConfig(), QuantContext(anchors, BATCHES, _run, weight_grid=weight_grid("cpu")))
    path = tmp_path / "int8.onnx"
    onnx.save(insert_qdq(graph, sites, params), str(path))
    ref = _run(fake_quant_model(model, params), BATCHES[1])[0]
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = level
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        out = sess.run(None, BATCHES[1])[0]
        np.testing.assert_allclose(out, ref, rtol=0, atol=0.02 * np.abs(ref).max())


def test_layers_that_do_not_pay_stay_dense_and_say_why():
    lin = nn.Linear(8, 8).requires_grad_(False)  # random 8 x 8: rank >= 4 needed, 4 * 16 >= 64
    entry, build = plan_layer(lin, LowRankPruneConfig(rank_energy=0.9))
    assert build is None and "does not pay" in entry["reason"] and entry["params_after"] == 64
    grouped = nn.Conv2d(4, 4, 3, groups=4)
    model = nn.Sequential(grouped)
    ctx = PruneContext({"0": grouped}, [], _run, example_inputs={})
    result = prune_lowrank(model, LowRankPruneConfig(decide="params"), ctx)
    assert "grouped" in result.skipped["0"]


def test_config_rejects_bad_values():
    for bad, words in (({"rank_energy": 0.0}, r"rank_energy must be in \(0, 1\], got 0.0"),
                       ({"rank_energy": 1.5}, r"rank_energy must be in \(0, 1\], got 1.5"),
                       ({"eps": 1.0}, r"eps must be in \(0, 1\), got 1.0"),
                       ({"eps": 0.0}, r"eps must be in \(0, 1\), got 0.0"),
                       ({"decide": "fast"}, "decide must be one of latency, params, got 'fast'"),
                       ({"min_block": 0}, "min_block must be >= 1, got 0"),
                       ({"min_gain": 1.0}, r"min_gain must be in \[0, 1\), got 1.0"),
                       ({"conv_scheme": "tucker"}, "conv_scheme must be one of auto, separable, channel, got 'tucker'"),
                       ({"rank_multiple": 0}, "rank_multiple must be >= 1, got 0"),
                       ({"max_checks": 1}, "max_checks must be >= 2, got 1")):
        with pytest.raises(ConfigError, match=words):
            LowRankPruneConfig(**bad)


def test_overrides_wire_the_flags_and_recovery_by_default():
    from sqexport.toolchain.overrides import Overrides, apply_overrides

    recipe = apply_overrides(None, Overrides(prune="lowrank"))
    assert recipe.stage("recover").name == "distill" and recipe.stage("recover").config.steps == 300
    assert apply_overrides(None, Overrides(prune="lowrank", recover=False)).stage("recover") is None
    minutes = apply_overrides(None, Overrides(prune="lowrank", recover_minutes=0.5)).stage("recover").config
    assert (minutes.steps, minutes.minutes) == (300, 0.5)
    implied = apply_overrides(None, Overrides(rank_energy=0.8, lowrank_eps=0.1)).stage("prune")
    assert implied.name == "lowrank" and (implied.config.rank_energy, implied.config.eps) == (0.8, 0.1)
    assert apply_overrides(None, Overrides(prune="magnitude")).stage("recover") is None
    with pytest.raises(ConfigError, match="--lowrank-eps does not apply"):
        apply_overrides(None, Overrides(prune="magnitude", lowrank_eps=0.1))


def test_recipe_file_runs_exactly_its_stages(tmp_path):
    from sqexport.toolchain.overrides import Overrides, apply_overrides
    from sqexport.toolchain.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("stages:\n  - type: prune.lowrank\n    params: {rank_energy: 0.8, eps: 0.2}\n  - type: quantize.int8\n")
    recipe = apply_overrides(load_recipe(path), Overrides())
    assert recipe.stage("recover") is None and recipe.stage("prune").config.eps == 0.2


@pytest.mark.parametrize("args", [["--rank-energy", "1.5"], ["--rank-energy", "0"], ["--lowrank-eps", "1"],
                                  ["--prune", "nm", "--rank-energy", "0.8"]])
def test_cli_bad_values_are_one_line_exit_2(args, tmp_path):
    from click.testing import CliRunner

    from sqexport.toolchain.cli import cli

    result = CliRunner().invoke(cli, ["digits-cnn", *args, "-o", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert len([line for line in result.output.splitlines() if line.startswith("Error")]) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.e2e
def test_hf_bert_factored_exports_through_optimum_and_quantizes(run_cli, tiny_bert, text_files, tmp_path):
    """A tiny BERT's Linears become Sequential(Linear, Linear); optimum exports them, QDQ finds every
    factor, and onnxruntime matches the torch fake-quant model (the pipeline's fidelity check)."""
    rep = _lowrank_bert_report(run_cli, tiny_bert, text_files, tmp_path, rank_energy=0.5, steps=2)
    factored = rep["lowrank"]["factored"]
    assert any(n.endswith("intermediate.dense") for n in factored)
    assert any(n.endswith("attention.self.query") for n in factored)
    # every factor is an int8 layer of its own in model.onnx
    assert rep["stages"][[s["name"] for s in rep["stages"]].index("quantize.int8")]["params"]["quantized_layers"] >= \
        12 + len(factored)
    assert rep["fidelity"]["max_abs_deviation"] <= 0.05 * max(1.0, rep["fidelity"]["reference_max_abs"])
    assert rep["recovery"]["steps"] == 2


def test_latency_decision_times_each_candidate_and_follows_the_measurement():
    """Without an exporter (or with several inputs) each layer is timed alone as an int8 graph."""
    model = LowRankNet().eval()
    ctx = PruneContext(prunable_layers(model), BATCHES, _run, example_inputs={"x": BATCHES[0]["x"][:1]})
    info = prune_lowrank(model, LowRankPruneConfig(rank_energy=0.99, min_gain=0.05), ctx).extra["lowrank"]
    assert info["whole_model"] is None  # no exporter: no whole-model check
    for name in ("conv", "pw", "fc"):  # the layers whose factors are smaller get timed
        e = info["layers"][name]
        times = e["latency_ms"]
        assert times["dense"] > 0 and all(t > 0 for t in times.values()) and len(times) >= 2
        assert e["timing"].startswith("the layer alone")
        best = min(t for k, t in times.items() if k != "dense")
        assert e["speedup"] == pytest.approx(times["dense"] / best, rel=1e-2)
        assert (e["decision"] == "factored") == (e["speedup"] >= 1 / 0.95)
        if e["decision"] == "dense":
            assert "not faster" in e["reason"] and e["relative_error"] == 0.0 and e["params_after"] == e["params_before"]
        else:  # the fastest candidate was the one applied
            assert times[e["method"]] == best
    assert set(info["layers"]["conv"]["latency_ms"]) == {"dense", "separable", "channel"}
    assert "latency_ms" not in info["layers"]["stem"]


# ---- channel low rank for k x k convs, rank rounding, the whole-model check ----------------------

def test_round_rank_rounds_up_to_the_multiple_and_keeps_at_least_the_energy():
    assert [L.round_rank(r, 8, 72) for r in (1, 8, 9, 16, 17, 70)] == [8, 8, 16, 16, 24, 72]
    assert L.round_rank(5, 1, 72) == 5 and L.round_rank(30, 8, 24) == 24
    g = torch.Generator().manual_seed(3)
    s = torch.linalg.svdvals(torch.randn(48, 100, generator=g, dtype=torch.float64))
    for tau in (0.3, 0.6, 0.9):
        r = L.round_rank(L.energy_rank(s, tau), 8, 48)
        assert 1 - L.relative_tail(s, r) ** 2 >= tau - 1e-12


@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 1, 1), (1, 2, 2)])
def test_channel_conv_is_exact_at_full_rank_and_within_the_tail_below(stride, padding, dilation):
    """k x k conv C_in -> r then 1 x 1 r -> C_out from the SVD of W as C_out x (C_in k k): exact at
    r = min(C_out, C_in k k); at lower rank the kernel error is the SVD tail, <= sqrt(1 - tau)."""
    g = torch.Generator().manual_seed(4)
    conv = nn.Conv2d(8, 12, 3, stride=stride, padding=padding, dilation=dilation).requires_grad_(False)
    x = torch.randn(2, 8, 11, 9, generator=g)
    before = conv(x)
    full, build = plan_layer(copy.deepcopy(conv), LowRankPruneConfig(rank_energy=1.0, rank_multiple=1), "channel")
    assert full["method"] == "channel" and full["rank"] == 12 and build is None  # full rank does not pay ...
    b, a, _ = L.svd_factors(conv.weight.reshape(12, -1), 12)  # ... but is exact
    exact = channel_conv(copy.deepcopy(conv), b, a)
    assert exact[0].kernel_size == (3, 3) and exact[1].kernel_size == (1, 1) and exact[0].out_channels == 12
    torch.testing.assert_close(exact(x), before, rtol=1e-4, atol=1e-4)
    entry, build = plan_layer(conv, LowRankPruneConfig(rank_energy=0.7, rank_multiple=1), "channel")
    s = torch.linalg.svdvals(conv.weight.reshape(12, -1).double())
    assert entry["rank"] == L.energy_rank(s, 0.7) and build is not None
    assert entry["relative_error"] == pytest.approx(L.relative_tail(s, entry["rank"]), rel=1e-4)
    assert entry["relative_error"] <= (1 - 0.7) ** 0.5 + 1e-6
    factored = build(conv)
    approx = torch.einsum("nr,rcij->ncij", factored[1].weight[:, :, 0, 0], factored[0].weight)
    ref = torch.nn.functional.conv2d(x, approx, None, stride, padding, dilation)
    torch.testing.assert_close(factored(x) - factored[1].bias[:, None, None], ref, rtol=1e-4, atol=1e-4)


def test_channel_conv_exports_to_onnx_and_runs_like_torch(tmp_path):
    conv = nn.Conv2d(16, 24, 3, stride=2, padding=1).requires_grad_(False)
    entry, build = plan_layer(conv, LowRankPruneConfig(rank_energy=0.5), "channel")
    assert entry["rank"] % 8 == 0 and entry["rank"] >= entry["rank_by_energy"]
    model = nn.Sequential(build(conv), nn.ReLU()).eval()
    x = np.random.default_rng(0).random((1, 16, 10, 10), dtype=np.float32)
    export_torch(model, {"x": x}, ["x"], ["y"], {}, tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"x": x})[0]
    np.testing.assert_allclose(out, model(torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-5)
    assert [n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node].count("Conv") == 2


def test_revert_until_faster_drops_the_least_gain_first_with_an_injected_timer():
    order = ["a", "b", "c", "d", "e"]  # least gain first
    seen = []

    def measure(kept):  # the model is faster only once a, b and c are dense again
        seen.append(list(kept))
        return {"speedup": 1.2 if "c" not in kept else 0.9}
    kept, trace = revert_until_faster(order, measure, threshold=1.05, max_checks=8)
    assert kept == ["d", "e"] and seen == [order, order[1:], order[2:], order[3:]]
    assert [t.get("reverted") for t in trace] == [["a"], ["b"], ["c"], None] and trace[-1]["speedup"] == 1.2
    # never faster: everything reverted, in chunks so at most max_checks - 1 measurements are made
    seen.clear()
    kept, trace = revert_until_faster(list("abcdefghij"), lambda k: seen.append(k) or {"speedup": 1.0}, 1.05, 4)
    assert kept == [] and len(seen) == 3 and trace[0]["reverted"] == list("abcd")
    assert revert_until_faster([], lambda k: {"speedup": 2.0}, 1.05) == ([], [])


def _whole_model_ctx(model):
    def export(m, path):
        return export_torch(m, {"x": BATCHES[0]["x"][:1]}, ["x"], ["y"], {}, path)
    return PruneContext(prunable_layers(model), BATCHES, _run, example_inputs={"x": BATCHES[0]["x"][:1]},
                        export=export)


def test_in_model_timing_and_whole_model_revert_with_an_injected_timer(monkeypatch):
    """Single-input model with an exporter: layer times come from the whole int8 model's profile,
    then the whole-model check (timer injected) reverts the least-gain layer until it is faster."""
    import sqexport.toolchain.pruning.lowrank as lowrank_mod

    calls = []

    def fake_time_pair(paths, feed, threads=1, **kw):
        sess = ort.InferenceSession(str(paths["factored"]), providers=["CPUExecutionProvider"])
        out = sess.run(None, feed)[0]  # the variant graph is a real, runnable int8 model
        assert out.shape == (1, 4) and threads == 1
        convs = sum(n.op_type == "Conv" for n in onnx.load(str(paths["factored"])).graph.node)
        calls.append(convs)
        return {"speedup": 1.0 if len(calls) == 1 else 1.3}  # the first (everything factored) is too slow
    monkeypatch.setattr(lowrank_mod, "time_pair", fake_time_pair)
    # every layer measured in context: make all factored candidates "faster" by pretending dense is slow
    real_layer_times = lowrank_mod.layer_times
    dense_calls = []

    def slow_dense(site_nodes, times, names):
        out = real_layer_times(site_nodes, times, names)
        assert all(v is not None for v in out.values())  # every site found in onnxruntime's profile
        if not dense_calls:
            dense_calls.append(1)
            return {n: 1000.0 + i for i, n in enumerate(out)}  # gains grow with the layer's position
        return {n: 1.0 for n in out}
    monkeypatch.setattr(lowrank_mod, "layer_times", slow_dense)
    model = LowRankNet().eval()
    dense_out = _run(model, BATCHES[0])[0]
    result = prune_lowrank(model, LowRankPruneConfig(rank_energy=0.99), _whole_model_ctx(model))
    info = result.extra["lowrank"]
    timed = [n for n, e in info["layers"].items() if "latency_us" in e]
    assert set(timed) == {"conv", "pw", "fc"}
    assert info["layers"]["conv"]["timing"].startswith("in the whole int8 model")
    whole = info["whole_model"]
    assert [c["speedup"] for c in whole["checks"]] == [1.0, 1.3] and whole["speedup"] == 1.3
    assert whole["reverted"] == ["conv"]  # the least gain (first layer, smallest fake dense time)
    assert "whole-model check" in info["layers"]["conv"]["reason"] and info["layers"]["conv"]["decision"] == "dense"
    assert info["factored"] == ["fc", "pw"] and "1.30x" in result.speed_note
    assert calls[0] > calls[1]  # the second graph has the reverted conv back as one Conv
    np.testing.assert_allclose(_run(model, BATCHES[0])[0], dense_out, rtol=1e-2, atol=1e-2)


def test_whole_model_check_on_real_timing_never_keeps_a_slower_set():
    model = LowRankNet().eval()
    info = prune_lowrank(model, LowRankPruneConfig(rank_energy=0.99), _whole_model_ctx(model)).extra["lowrank"]
    whole = info["whole_model"]
    if info["factored"]:  # what stays factored measured faster as a whole
        assert whole["speedup"] >= whole["threshold"] and whole["checks"][-1]["speedup"] == whole["speedup"]
    else:
        assert whole is None or whole["speedup"] is None


@pytest.mark.e2e
def test_recovery_is_skipped_when_nothing_was_factored(run_cli, tiny_bert, text_files, tmp_path, monkeypatch):
    """At rank energy 0.999 no Linear of the tiny BERT pays to factor: the model is unchanged, so
    the recover stage after it has nothing to recover, says so, and runs no step."""
    import sqexport.toolchain.recover_step as recover_step

    calls = []
    monkeypatch.setattr(recover_step, "recover", lambda *a, **k: calls.append("recover"))
    monkeypatch.setattr(recover_step, "make_pool", lambda *a, **k: calls.append("make_pool"))
    rep = _lowrank_bert_report(run_cli, tiny_bert, text_files, tmp_path, rank_energy=0.999, steps=50)
    assert calls == []  # no data pool built, no distillation step run
    assert rep["lowrank"]["factored"] == []
    assert rep["recovery"]["steps"] == 0 and "no prune stage changed the model" in rep["recovery"]["skipped"]
    stage = rep["stages"][[s["name"] for s in rep["stages"]].index("recover.distill")]
    assert stage["params"]["steps_run"] == 0 and "no prune stage changed the model" in stage["params"]["skipped"]
    assert any(n.startswith("recover.distill skipped") for n in rep["notes"])


def _lowrank_bert_report(run_cli, tiny_bert, text_files, tmp_path, rank_energy: float, steps: int) -> dict:
    """report.json of `sqexport export` on the tiny BERT: prune.lowrank (decided by parameter
    count), recover.distill for `steps`, quantize.int8."""
    import json

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"stages:\n  - type: prune.lowrank\n    params: {{rank_energy: {rank_energy}, decide: params}}\n"
                      f"  - type: recover.distill\n    params: {{steps: {steps}}}\n  - type: quantize.int8\n")
    out = tmp_path / "out"
    # a random tiny BERT's cosine may miss the default 0.01 gate; the gate is not under test (1 - cosine <= 2)
    result = run_cli(["export", tiny_bert, "--recipe", recipe, "--calib-data", text_files.calib_txt,
                      "--eval-data", text_files.eval_txt, "--max-accuracy-drop", 2, "--threads", 1, "-o", out])
    assert result.exit_code == 0, result.output
    return json.loads((out / "report.json").read_text())
