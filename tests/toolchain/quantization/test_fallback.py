"""Accuracy-aware fallback: local SNR per layer computed by hand, and the worst-first loop."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from sqexport.contracts.quant import ActQuant, Anchor, QuantParams, WeightQuant
from sqexport.toolchain.quantization import calibrate, quantize_weights
from sqexport.toolchain.quantization.fallback import MAX_PASSES, fallback_until, local_snr_db


def _run(model, batch):
    return model(torch.from_numpy(batch["x"]))


def _fake_quant_by_hand(x: np.ndarray, p: ActQuant) -> np.ndarray:
    q = np.clip(np.rint(x.astype(np.float64) / p.scale) + p.zero_point, 0, 255)
    return (q - p.zero_point) * p.scale


def _one_linear():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3)).eval().requires_grad_(False)
    rng = np.random.default_rng(0)
    batches = [{"x": rng.normal(size=(4, 5)).astype(np.float32) * [1, 1, 1, 1, 20]} for _ in range(3)]
    return model, [{"x": b["x"].astype(np.float32)} for b in batches]


def _params(model, batches, anchors):
    ins, outs, _ = calibrate(model, anchors, batches, _run, "minmax")
    params = quantize_weights(model, anchors, ins)
    params.outputs = outs
    return params


# ---------------------------------------------------------------- local SNR by hand

@pytest.mark.parametrize("rectified", [False, True], ids=["linear", "linear-relu"])
def test_local_snr_of_one_linear_by_hand(rectified):
    model, batches = _one_linear()
    params = _params(model, batches, [Anchor("0", quantize_output=rectified, quantize_bias=True)])
    fc = model[0]
    w = fc.weight.numpy().astype(np.float64)
    b = fc.bias.numpy().astype(np.float64)
    wq, (bq, bscale) = params.weights["0"], params.biases["0"]
    w_dq = wq.q.astype(np.float64) * wq.scale.astype(np.float64)[:, None]  # dequantized int8 weight
    b_dq = bq.astype(np.float64) * bscale.astype(np.float64)  # dequantized int32 bias
    signal = noise = 0.0
    for batch in batches:
        x = batch["x"].astype(np.float64)
        ref = x @ w.T + b  # FP32 output on the FP32 input
        y = _fake_quant_by_hand(x, params.inputs["0"]) @ w_dq.T + b_dq
        if rectified:
            ref, y = np.maximum(ref, 0), _fake_quant_by_hand(np.maximum(y, 0), params.outputs["0"])
        signal += (ref ** 2).sum()
        noise += ((ref - y) ** 2).sum()
    expected = 10 * math.log10(signal / noise)

    snr = local_snr_db(model, params, batches, _run)

    assert set(snr) == {"0"}
    assert snr["0"] == pytest.approx(expected, abs=1e-3)
    assert 20 < snr["0"] < 60  # int8: tens of dB
    assert not model[0]._forward_hooks  # hooks removed


def test_local_snr_is_infinite_when_quantization_is_exact():
    model = nn.Sequential(nn.Linear(2, 2, bias=False)).requires_grad_(False)
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[127.0, -64.0], [2.0, 127.0]]) / 127)  # on the int8 grid
    batches = [{"x": np.array([[0.0, 255.0], [3.0, 7.0]], np.float32)}]  # on the uint8 grid (scale 1)
    params = _params(model, batches, [Anchor("0")])
    assert params.inputs["0"] == ActQuant(1.0, 0)
    assert local_snr_db(model, params, batches, _run) == {"0": math.inf}


def test_local_snr_is_local_to_each_layer():
    """Layer 2 is judged on its FP32 input, whatever error layer 1 makes."""
    torch.manual_seed(1)
    chain = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3)).eval().requires_grad_(False)
    rng = np.random.default_rng(1)
    batches = [{"x": rng.normal(size=(6, 5)).astype(np.float32)} for _ in range(2)]
    params = _params(chain, batches, [Anchor("0", quantize_bias=True), Anchor("1", quantize_bias=True)])
    snr = local_snr_db(chain, params, batches, _run)

    second = nn.Sequential(chain[1])
    with torch.no_grad():
        mid = [{"x": chain[0](torch.from_numpy(b["x"])).numpy()} for b in batches]
    alone = QuantParams(inputs={"0": params.inputs["1"]}, weights={"0": params.weights["1"]},
                        biases={"0": params.biases["1"]}, anchors=[Anchor("0", quantize_bias=True)])
    assert snr["1"] == pytest.approx(local_snr_db(second, alone, mid, _run)["0"], rel=1e-9)
    # the model itself still ran in FP32 (the hooks only observe)
    with torch.no_grad():
        np.testing.assert_array_equal(chain(torch.from_numpy(batches[0]["x"])).numpy(),
                                      chain[1](chain[0](torch.from_numpy(batches[0]["x"]))).numpy())


def test_local_snr_on_a_share_of_the_rows_is_that_share_scored_by_hand():
    """row_fraction 0.5: the SNR of exactly the rows drawn (by hand with the same seeded
    generator), the same on a second run, and close to the SNR of every row."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 4)).eval().requires_grad_(False)
    rng = np.random.default_rng(2)
    batches = [{"x": rng.normal(size=(8, 10, 6)).astype(np.float32)} for _ in range(3)]
    params = _params(model, batches, [Anchor("0")])
    half = local_snr_db(model, params, batches, _run, row_fraction=0.5, seed=7)
    assert half == local_snr_db(model, params, batches, _run, row_fraction=0.5, seed=7)
    g = torch.Generator().manual_seed(7)
    w = torch.from_numpy(params.weights["0"].dequantized())
    signal = noise = 0.0
    for batch in batches:
        x = torch.from_numpy(batch["x"]).reshape(-1, 6)
        rows = torch.randperm(80, generator=g)[:40].sort().values
        x = x[rows]
        ref = model(x)
        y = nn.functional.linear(torch.from_numpy(_fake_quant_by_hand(x.numpy(), params.inputs["0"]).astype(np.float32)),
                                 w, model[0].bias)
        signal += float((ref.double() ** 2).sum())
        noise += float(((ref - y).double() ** 2).sum())
    assert half["0"] == pytest.approx(10 * math.log10(signal / noise), abs=1e-3)
    assert half["0"] == pytest.approx(local_snr_db(model, params, batches, _run)["0"], abs=1.0)


# ---------------------------------------------------------------- the fallback loop

SNR = {"a": 30.0, "b": 10.0, "c": 20.0, "d": 40.0}
CONTRIB = {"a": 0.1, "b": 0.5, "c": 0.3, "d": 0.05}  # each quantized layer's share of the drop


def _fake_params():
    names = list(SNR)
    return QuantParams(
        inputs={n: ActQuant(0.1, 128) for n in names}, outputs={n: ActQuant(0.1, 0) for n in names},
        weights={n: WeightQuant(np.ones((2, 2), np.int8), np.ones(2, np.float32)) for n in names},
        biases={n: (np.zeros(2, np.int32), np.ones(2, np.float32)) for n in names},
        anchors=[Anchor(n, True, True) for n in names])


class FakeDrop:
    """predicted_drop: the sum of the shares of the layers still quantized; records every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, params):
        self.calls.append(sorted(a.module for a in params.anchors))
        return sum(CONTRIB[a.module] for a in params.anchors)


def test_fallback_drops_worst_snr_first_until_the_limit_holds():
    params, drop = _fake_params(), FakeDrop()
    final, fallen, trace = fallback_until(params, SNR, drop, limit=0.2, max_layers=4)
    assert [f["layer"] for f in fallen] == ["b", "c"]  # worst SNR first; then 0.15 <= 0.2: stop
    assert [f["snr_db"] for f in fallen] == [10.0, 20.0]
    assert trace == pytest.approx([0.95, 0.45, 0.15])
    assert len(trace) == len(fallen) + 1
    assert drop.calls == [["a", "b", "c", "d"], ["a", "c", "d"], ["a", "d"]]
    assert [a.module for a in final.anchors] == ["a", "d"]
    for field in ("inputs", "outputs", "weights", "biases"):
        assert set(getattr(final, field)) == {"a", "d"}
        assert set(getattr(params, field)) == set(SNR)  # the input params are not modified
    assert len(params.anchors) == 4


def test_fallback_respects_max_layers():
    final, fallen, trace = fallback_until(_fake_params(), SNR, FakeDrop(), limit=0.2, max_layers=1)
    assert [f["layer"] for f in fallen] == ["b"]
    assert trace == pytest.approx([0.95, 0.45]) and len(trace) == len(fallen) + 1
    assert trace[-1] > 0.2  # the limit still fails: the caller's gate reports it
    assert [a.module for a in final.anchors] == ["a", "c", "d"]


def test_no_fallback_when_the_limit_already_holds():
    params, drop = _fake_params(), FakeDrop()
    final, fallen, trace = fallback_until(params, SNR, drop, limit=1.0, max_layers=4)
    assert fallen == [] and trace == pytest.approx([0.95]) and len(drop.calls) == 1
    assert [a.module for a in final.anchors] == list(SNR)


def test_max_layers_zero_never_falls_back():
    final, fallen, trace = fallback_until(_fake_params(), SNR, FakeDrop(), limit=0.0, max_layers=0)
    assert fallen == [] and len(trace) == 1 and len(final.anchors) == 4


def test_fallback_can_return_every_layer():
    drop = FakeDrop()
    final, fallen, trace = fallback_until(_fake_params(), SNR, drop, limit=0.0, max_layers=10)
    assert [f["layer"] for f in fallen] == ["b", "c", "a", "d"]
    assert trace[-1] == pytest.approx(0.0) and final.anchors == []
    # all int8; the ladder 1, 2, 4; then 3 (bisecting between 2 and 4) fails: 4 it is
    assert [len(c) for c in drop.calls] == [4, 3, 2, 0, 1]


def test_fallback_converges_in_at_most_eight_passes_on_a_large_model():
    """200 layers whose shares of the drop add up: the smallest k that holds, bisected."""
    n = 200
    snr = {f"l{i}": float(i) for i in range(n)}  # l0 is the worst
    share = {f"l{i}": 1.0 / (i + 1) for i in range(n)}  # the worst layers carry most of the drop
    calls = []

    def drop(params):
        calls.append(len(params.anchors))
        return sum(share[a.module] for a in params.anchors)
    params = QuantParams(anchors=[Anchor(name, False, False) for name in snr],
                         weights={name: WeightQuant(np.ones((1, 1), np.int8), np.ones(1, np.float32)) for name in snr})
    total = sum(share.values())
    limit = total - sum(1.0 / (i + 1) for i in range(13)) + 1e-9  # exactly the 13 worst must go
    final, fallen, trace = fallback_until(params, snr, drop, limit=limit, max_layers=50, hard_max_layers=100)
    assert len(calls) <= MAX_PASSES
    assert [f["layer"] for f in fallen] == [f"l{i}" for i in range(13)]
    assert trace[-1] <= limit < trace[0] and len(final.anchors) == n - 13


def test_snr_is_rounded_in_the_record():
    snr = {"a": 12.3456, "b": 99.0}
    _, fallen, _ = fallback_until(_fake_params(), snr, lambda p: 1.0, limit=0.5, max_layers=1)
    assert fallen == [{"layer": "a", "snr_db": 12.35}]


# ---------------------------------------------------------------- ranking by output error

def test_a_ranking_orders_the_fallback_and_is_read_only_when_needed():
    calls = []

    def rank():
        calls.append(1)
        return {"a": 5.0, "b": 50.0, "c": 40.0, "d": 30.0}  # by output: a worst, then d
    _, fallen, _ = fallback_until(_fake_params(), SNR, FakeDrop(), limit=0.5, max_layers=4, rank=rank)
    assert [f["layer"] for f in fallen] == ["a", "d", "c"] and len(calls) == 1  # 0.95, 0.85, 0.8, 0, then 0.5
    assert [(f["snr_db"], f["output_snr_db"]) for f in fallen] == [(30.0, 5.0), (40.0, 30.0), (20.0, 40.0)]
    _, fallen, _ = fallback_until(_fake_params(), SNR, FakeDrop(), limit=1.0, max_layers=4, rank=rank)
    assert fallen == [] and len(calls) == 1  # the gate held with every layer int8: no ranking pass
    # a ranking that declined (over its time budget) leaves the SNR order
    _, fallen, _ = fallback_until(_fake_params(), SNR, FakeDrop(), limit=0.2, max_layers=4, rank=lambda: None)
    assert [f["layer"] for f in fallen] == ["b", "c"] and "output_snr_db" not in fallen[0]


def _two_linears():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).eval().requires_grad_(False)
    batches = [{"x": np.random.default_rng(0).normal(size=(16, 6)).astype(np.float32)}]
    params = _params(model, batches, [Anchor("0", quantize_output=True), Anchor("2")])
    return model, batches, params


def test_output_snr_is_each_layer_alone_in_int8_against_fp32():
    from sqexport.toolchain.quantization import fake_quant_model
    from sqexport.toolchain.quantization.fallback import output_snr_db, without
    from sqexport.toolchain.quantization.range_choice import output_error

    model, batches, params = _two_linears()
    params.inputs["2"] = ActQuant(params.inputs["2"].scale * 40, 0)  # a coarse grid for the second layer's input

    def outputs(m):
        return np.concatenate([_run(m, b).numpy() for b in batches])
    scores, macs = output_snr_db(model, params, outputs, budget_macs=1e9)
    assert macs == 16 * (6 * 8 + 8 * 4)  # one pass: 16 samples through Linear(6, 8) and Linear(8, 4)
    fp32 = outputs(model)
    for name, other in (("0", "2"), ("2", "0")):
        alone = fake_quant_model(model, without(params, {other}))
        assert scores[name] == pytest.approx(-10 * math.log10(output_error(fp32, outputs(alone))), rel=1e-6)
    assert scores["2"] < scores["0"]  # the coarse grid ranks worst
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), _two_linears()[0].state_dict().values()))


def test_output_snr_declines_beyond_its_budget_of_multiply_accumulates():
    from sqexport.toolchain.quantization.fallback import output_snr_db

    model, batches, params = _two_linears()
    outputs = lambda m: _run(m, batches[0]).numpy()  # noqa: E731
    per_pass = 16 * (6 * 8 + 8 * 4)
    assert output_snr_db(model, params, outputs, budget_macs=2 * per_pass - 1) == (None, per_pass)  # 2 layers
    scores, _ = output_snr_db(model, params, outputs, budget_macs=2 * per_pass)
    assert set(scores) == {"0", "2"}


def test_multiply_accumulates_of_convolutions_by_hand():
    from sqexport.toolchain.quantization.fallback import _mac_hooks

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, groups=8, padding=1),
                          nn.ConvTranspose2d(8, 4, 2, stride=2)).eval()
    total, handles = _mac_hooks(model)
    with torch.no_grad():
        model(torch.zeros(2, 3, 5, 5))
    for h in handles:
        h.remove()
    # conv: 2x8x5x5 outputs x 27 weights; depthwise: 2x8x5x5 x 9; transposed: 2x4x10x10 x (8 x 2 x 2)
    assert total[0] == 2 * 8 * 25 * 27 + 2 * 8 * 25 * 9 + 2 * 4 * 100 * 32


# ---------------------------------------------------------------- confirmation on the evaluation split

def _measured(calls):
    """measured_drop: FakeDrop's sum of the shares still quantized, recording the FP32 count."""
    def measure(params):
        calls.append(len(SNR) - len(params.anchors))
        return sum(CONTRIB[a.module] for a in params.anchors)
    return measure


def test_a_choice_the_evaluation_split_confirms_is_kept_without_ranking():
    from sqexport.toolchain.quantization.fallback import extend_until

    calls, ranked = [], []
    names, trace = extend_until(_fake_params(), ["b", "c"], lambda: ranked.append(1) or list(SNR),
                                _measured(calls), limit=0.2, cap=4)
    assert names == ["b", "c"] and trace == [(2, pytest.approx(0.15))] and calls == [2] and not ranked


def test_a_failing_choice_is_extended_in_ranking_order_by_ladder_then_bisection():
    from sqexport.toolchain.quantization.fallback import extend_until

    calls = []
    # the prediction kept b in FP32; the ranking (b listed again: not taken twice) continues with c, a, d.
    # drops: 1 layer 0.45, 2 layers 0.15, 3 layers 0.05, 4 layers 0: limit 0.1 holds from 3 layers
    names, trace = extend_until(_fake_params(), ["b"], lambda: ["b", "c", "a", "d"], _measured(calls),
                                limit=0.1, cap=4)
    assert names == ["b", "c", "a"]
    assert calls == [1, 2, 3]  # start, start + 1, start + 2 (holds); nothing left to bisect
    assert [d for _, d in trace] == pytest.approx([0.45, 0.15, 0.05])
    calls.clear()
    names, _ = extend_until(_fake_params(), [], lambda: ["b", "c", "a", "d"], _measured(calls), limit=0.01, cap=4)
    # the ladder +1, +2, +4 (capped at 4) holds at 4; bisection measures 3 (0.05 fails)
    assert names == ["b", "c", "a", "d"] and calls == [0, 1, 2, 4, 3]
    calls.clear()
    names, _ = extend_until(_fake_params(), [], lambda: ["b", "c", "a", "d"], _measured(calls), limit=0.1, cap=4)
    assert names == ["b", "c", "a"] and calls == [0, 1, 2, 4, 3]  # 4 holds, 2 fails: bisection tries 3


def test_when_no_count_holds_the_lowest_measured_drop_is_kept():
    from sqexport.toolchain.quantization.fallback import extend_until

    calls = []
    names, trace = extend_until(_fake_params(), [], lambda: ["b", "c", "a", "d"], _measured(calls), limit=-1.0,
                                cap=2)
    assert calls == [0, 1, 2] and names == ["b", "c"]  # the cap: 0.15, the lowest of 0.95, 0.45, 0.15
    calls.clear()
    measured = {0: 0.3, 1: 0.2, 2: 0.2}  # equal drops: the fewer FP32 layers
    names, _ = extend_until(_fake_params(), [], lambda: ["b", "c", "a", "d"],
                            lambda p: measured[len(SNR) - len(p.anchors)], limit=0.0, cap=2)
    assert names == ["b"]


def test_confirm_is_a_policy_switch():
    from sqexport.contracts.errors import ConfigError
    from sqexport.toolchain.quantization.fallback import FallbackPolicy

    assert FallbackPolicy().confirm is True
    assert FallbackPolicy.coerce({"confirm": False}).confirm is False
    with pytest.raises(ConfigError, match="fallback.confirm must be true or false"):
        FallbackPolicy.coerce({"confirm": "no"})
    with pytest.raises(ConfigError, match="known: enabled, max_fraction, hard_max_fraction, confirm, min_cosine"):
        FallbackPolicy.coerce({"confirmed": True})


def test_the_measured_graph_runs_in_onnxruntime_and_leaves_nothing_behind(tmp_path):
    import onnx
    from onnx import helper, TensorProto

    from sqexport.models.spec import ModelSpec
    from sqexport.toolchain.fallback_confirm import ExportedGraphs

    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    spec = ModelSpec(name="double", model=nn.Identity(), task="image-classification", input_names=["x"],
                     output_names=["y"], example_inputs={"x": x[:1]}, calib_batches=[], eval_batches=[{"x": x}])

    def write(params, path):  # a graph that doubles its input, standing in for the QDQ export
        graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    graphs = ExportedGraphs(write, spec, tmp_path, tmp_path / "baseline.onnx")
    assert graphs.baseline() is None  # no baseline.onnx there yet
    np.testing.assert_array_equal(graphs.outputs(_fake_params()), 2 * x)
    assert list(tmp_path.iterdir()) == []
    write(None, tmp_path / "baseline.onnx")
    np.testing.assert_array_equal(graphs.baseline(), 2 * x)
    (tmp_path / "baseline.onnx").unlink()

    def broken(params, path):
        path.write_bytes(b"half a graph")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError, match="disk full"):
        ExportedGraphs(broken, spec, tmp_path).outputs(_fake_params())
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- the fidelity floor

# each quantized layer's share of 1 - cosine, and its multiply-accumulates
COS_LOSS = {"a": 0.002, "b": 0.02, "c": 0.005, "d": 0.001}
MACS = {"a": 100, "b": 100, "c": 300, "d": 500}  # 1000 in all


class FakeFidelity:
    """(predicted drop, cosine) from the layers still quantized; records the counts measured."""

    def __init__(self):
        self.calls = []

    def __call__(self, params):
        self.calls.append(len(params.anchors))
        kept = [a.module for a in params.anchors]
        return sum(CONTRIB[m] for m in kept), 1.0 - sum(COS_LOSS[m] for m in kept)


def test_fidelity_floor_adds_the_fewest_ranked_layers_that_reach_it():
    from sqexport.toolchain.quantization.fallback import fidelity_until

    measure, asked = FakeFidelity(), []
    names, record = fidelity_until(_fake_params(), ["b"], lambda: asked.append(1) or ["b", "c", "a", "d"], measure,
                                   limit=1.0, floor=0.995, macs=MACS, max_mac_share=0.5)
    # b in FP32: cosine 1 - 0.008 = 0.992; + c: 0.997 >= 0.995 (b + c = 400 of 1000 MACs <= 500)
    assert names == ["b", "c"] and asked == [1]
    assert measure.calls == [3, 1, 2]  # the chosen one, the budget's most (b, c, a), then b + c
    assert record["cosine_before"] == pytest.approx(0.992) and record["cosine"] == pytest.approx(0.997)
    assert record["reached"] and record["added_layers"] == 1 and record["fp32_mac_share"] == pytest.approx(0.4)
    assert [m["fallback_layers"] for m in record["measured"]] == [1, 2, 3] and "why" in record


def test_fidelity_floor_is_not_paid_for_when_out_of_reach():
    from sqexport.toolchain.quantization.fallback import fidelity_until

    # 0.999 needs b, c and a (cosine 0.999) = 500 MACs: over a 0.45 share, so nothing is added
    names, record = fidelity_until(_fake_params(), [], lambda: ["b", "c", "a", "d"], FakeFidelity(),
                                   limit=1.0, floor=0.999, macs=MACS, max_mac_share=0.45)
    assert names == [] and not record["reached"] and record["added_layers"] == 0
    assert record["cosine"] == pytest.approx(1 - 0.028) and "none added" in record["why"]
    assert [m["fallback_layers"] for m in record["measured"]] == [0, 2]  # b, c: the most within budget
    # with a 0.5 share the same floor is reached with exactly those three
    names, record = fidelity_until(_fake_params(), [], lambda: ["b", "c", "a", "d"], FakeFidelity(),
                                   limit=1.0, floor=0.999, macs=MACS, max_mac_share=0.5)
    assert names == ["b", "c", "a"] and record["reached"] and record["fp32_mac_share"] == pytest.approx(0.5)


def test_fidelity_floor_holds_already_or_must_keep_the_gate():
    from sqexport.toolchain.quantization.fallback import fidelity_until

    asked = []
    measure = FakeFidelity()
    names, record = fidelity_until(_fake_params(), ["b", "c"], lambda: asked.append(1) or [], measure,
                                   limit=1.0, floor=0.99, macs=MACS, max_mac_share=0.5)
    assert names == ["b", "c"] and asked == [] and measure.calls == [2] and "why" not in record  # 0.997 holds
    # a count whose cosine reaches the floor but whose predicted drop breaks the gate does not hold
    names, record = fidelity_until(_fake_params(), [], lambda: ["b", "c", "a", "d"], FakeFidelity(),
                                   limit=0.1, floor=0.99, macs=MACS, max_mac_share=1.0)
    # b: cosine 0.992 but drop 0.45 > 0.1; b, c: 0.15 > 0.1; all four hold; bisected: b, c, a (drop 0.05)
    assert names == ["b", "c", "a"] and record["reached"]
    assert [m["fallback_layers"] for m in record["measured"]] == [0, 1, 2, 3, 4]


def test_fidelity_floor_policy_values():
    from sqexport.contracts.errors import ConfigError
    from sqexport.toolchain.quantization.fallback import FallbackPolicy

    assert FallbackPolicy().min_cosine == 0.99 and FallbackPolicy().fidelity_mac_share == pytest.approx(1 / 3)
    assert FallbackPolicy.coerce({"min_cosine": 0}).min_cosine == 0
    for bad in ({"min_cosine": 1.5}, {"min_cosine": "high"}, {"fidelity_mac_share": -0.1}, {"min_cosine": True}):
        with pytest.raises(ConfigError, match="must be a number in \\[0, 1\\]"):
            FallbackPolicy.coerce(bad)


def test_layer_macs_by_hand():
    from sqexport.toolchain.quantization.fallback import layer_macs

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Flatten(),
                          nn.Linear(8 * 5 * 5, 10)).eval()
    macs = layer_macs(model, lambda m: m(torch.zeros(2, 3, 5, 5)))
    # batch 2: conv 2*8*25 outputs x 27 weights; depthwise x 9; Linear 2*10 outputs x 200 inputs
    assert macs == {"0": 2 * 8 * 25 * 27, "1": 2 * 8 * 25 * 9, "3": 2 * 10 * 200}
    assert not model[0]._forward_hooks  # hooks removed
