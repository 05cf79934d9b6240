"""Low-rank factorization (prune.lowrank): rank by energy, SVD error, the H-matrix error bound,
exact separable convs, and the factored model exported to int8 QDQ ONNX and run in onnxruntime."""
import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from contracts.errors import ConfigError
from contracts.quant import Anchor
from exporters.onnx_export import export_torch
from exporters.qdq import find_sites, insert_qdq
from runtime_check.isa import weight_qmax
from toolchain.pruning import lowrank_math as L
from toolchain.pruning.lowrank import LowRankPruneConfig, plan_layer, prune_lowrank
from toolchain.pruning.lowrank_modules import HMatrixLinear, separable_conv
from toolchain.pruning.masks import prunable_layers
from toolchain.quantization import fake_quant_model
from toolchain.quantization.int8 import Int8StaticConfig, quantize_static
from toolchain.stages import PruneContext, QuantContext

QMAX = weight_qmax("cpu")  # 63 on x86 without VNNI, where full-range int8 would saturate


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
    entry, build = plan_layer(lin, LowRankPruneConfig(rank_energy=0.95))
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
    entry, build = plan_layer(conv, LowRankPruneConfig(rank_energy=0.999))
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
    result = prune_lowrank(model, LowRankPruneConfig(rank_energy=0.99, decide="params"), ctx)
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
    params = quantize_static(model, Int8StaticConfig(), QuantContext(anchors, BATCHES, _run, reduce_range=QMAX < 127))
    path = tmp_path / "int8.onnx"
    import onnx

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
    for bad in ({"rank_energy": 0.0}, {"rank_energy": 1.5}, {"eps": 1.0}, {"eps": 0.0}, {"decide": "fast"},
                {"min_block": 0}, {"min_gain": 1.0}):
        with pytest.raises(ConfigError):
            LowRankPruneConfig(**bad)


def test_overrides_wire_the_flags_and_recovery_by_default():
    from toolchain.overrides import Overrides, apply_overrides

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
    from toolchain.overrides import Overrides, apply_overrides
    from toolchain.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("stages:\n  - type: prune.lowrank\n    params: {rank_energy: 0.8, eps: 0.2}\n  - type: quantize.int8\n")
    recipe = apply_overrides(load_recipe(path), Overrides())
    assert recipe.stage("recover") is None and recipe.stage("prune").config.eps == 0.2


@pytest.mark.parametrize("args", [["--rank-energy", "1.5"], ["--rank-energy", "0"], ["--lowrank-eps", "1"],
                                  ["--prune", "nm", "--rank-energy", "0.8"]])
def test_cli_bad_values_are_one_line_exit_2(args, tmp_path):
    from click.testing import CliRunner

    from toolchain.cli import cli

    result = CliRunner().invoke(cli, ["digits-cnn", *args, "-o", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert len([line for line in result.output.splitlines() if line.startswith("Error")]) == 1
    assert not (tmp_path / "o").exists()


def test_hf_bert_factored_exports_through_optimum_and_quantizes(run_cli, tiny_bert, text_files, tmp_path):
    """A tiny BERT's Linears become Sequential(Linear, Linear); optimum exports them, QDQ finds every
    factor, and onnxruntime matches the torch fake-quant model (the pipeline's fidelity check)."""
    import json

    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - type: prune.lowrank\n    params: {rank_energy: 0.5, decide: params}\n"
                      "  - type: recover.distill\n    params: {steps: 2}\n  - type: quantize.int8\n")
    out = tmp_path / "out"
    result = run_cli(["export", tiny_bert, "--recipe", recipe, "--calib-data", text_files.calib_txt,
                      "--eval-data", text_files.eval_txt, "--threads", 1, "-o", out])
    assert result.exit_code in (0, 1), result.output  # a random tiny BERT may miss the cosine gate
    rep = json.loads((out / "report.json").read_text())
    factored = rep["lowrank"]["factored"]
    assert any(n.endswith("intermediate.dense") for n in factored)
    assert any(n.endswith("attention.self.query") for n in factored)
    # every factor is an int8 layer of its own in model.onnx
    assert rep["stages"][[s["name"] for s in rep["stages"]].index("quantize.int8")]["params"]["quantized_layers"] >= \
        12 + len(factored)
    assert rep["fidelity"]["max_abs_deviation"] <= 0.05 * max(1.0, rep["fidelity"]["reference_max_abs"])
    assert rep["recovery"]["steps"] == 2


def test_latency_decision_times_each_candidate_and_follows_the_measurement():
    model = LowRankNet().eval()
    ctx = PruneContext(prunable_layers(model), BATCHES, _run, example_inputs={"x": BATCHES[0]["x"][:1]})
    info = prune_lowrank(model, LowRankPruneConfig(rank_energy=0.99, min_gain=0.05), ctx).extra["lowrank"]
    for name in ("conv", "pw", "fc"):  # the layers whose factors are smaller get timed
        e = info["layers"][name]
        assert e["latency_ms"]["dense"] > 0 and e["latency_ms"]["factored"] > 0
        assert (e["decision"] == "factored") == (e["speedup"] >= 1 / 0.95)
        if e["decision"] == "dense":
            assert "not faster" in e["reason"] and e["relative_error"] == 0.0 and e["params_after"] == e["params_before"]
    assert "latency_ms" not in info["layers"]["stem"]
