"""SmoothQuant-style smoothing: the FP32 function is unchanged, shared-input Linears share one scale,
pruned zeros stay zero, and s_j = max|X_j|^a / max|W_:,j|^(1-a) by hand."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from sqexport.toolchain.pruning import prunable_layers
from sqexport.toolchain.pruning.magnitude import magnitude_masks
from sqexport.toolchain.pruning.masks import apply_masks
from sqexport.toolchain.quantization.smoothing import SmoothedLinear, find_shared_input_groups, smooth_model


def _run(model, batch):
    return model(torch.from_numpy(batch["x"]))


class Block(nn.Module):
    """LayerNorm -> q/k/v (one shared input) -> attention -> o, residual, mean -> head (2-D input)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.q, self.k, self.v, self.o = (nn.Linear(8, 8) for _ in range(4))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.norm(x)
        att = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2) / 8 ** 0.5, -1) @ self.v(h)
        return self.head((x + self.o(att)).mean(1))


def _block_and_batches():
    torch.manual_seed(0)
    model = Block().eval().requires_grad_(False)
    with torch.no_grad():  # BERT-like outlier channels: a few LayerNorm gains 10-50x the rest
        model.norm.weight[[1, 5]] = torch.tensor([30.0, -50.0])
    rng = np.random.default_rng(0)
    batches = [{"x": rng.normal(size=(4, 6, 8)).astype(np.float32)} for _ in range(3)]
    return model, batches


def _hooks(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


# ---------------------------------------------------------------- the formula, by hand

@pytest.mark.parametrize("alpha", [0.5, 0.85])
def test_scale_formula_on_one_linear(alpha):
    fc = nn.Linear(3, 2).requires_grad_(False)
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([[1.0, -4.0, 0.5], [-2.0, 1.0, -0.25]]))
        fc.bias.copy_(torch.tensor([0.1, -0.2]))
    model = nn.Sequential(fc)
    batches = [{"x": np.array([[[1.0, -2.0, 8.0], [0.5, 4.0, -1.0]]], np.float32)},
               {"x": np.array([[[-3.0, 1.0, 2.0]]], np.float32)}]
    x_max = np.array([3.0, 4.0, 8.0])  # max |X_j| over both batches and all tokens
    w_max = np.array([2.0, 4.0, 0.5])  # max |W_:,j| over output rows
    s = x_max ** alpha / w_max ** (1 - alpha)
    w0 = fc.weight.detach().clone()

    summary = smooth_model(model, batches, _run, alpha)

    smoothed = model[0]
    assert isinstance(smoothed, SmoothedLinear) and smoothed.linear is fc
    np.testing.assert_allclose(smoothed.inv_scale.numpy(), 1 / s, rtol=1e-6)
    np.testing.assert_allclose(fc.weight.numpy(), w0.numpy() * s[None, :], rtol=1e-6)
    np.testing.assert_array_equal(fc.bias.numpy(), np.float32([0.1, -0.2]))  # the bias is not scaled
    assert summary == [{"linears": ["0"], "max_scale": pytest.approx(s.max(), rel=1e-6),
                        "min_scale": pytest.approx(s.min(), rel=1e-6)}]
    x = torch.from_numpy(batches[0]["x"])
    torch.testing.assert_close(model(x), nn.functional.linear(x, w0, fc.bias), rtol=1e-6, atol=1e-6)
    # with explicit numbers (alpha 0.5): s = sqrt([3/2, 4/4, 8/0.5]) = [1.2247, 1, 4]
    if alpha == 0.5:
        np.testing.assert_allclose(s, [1.5 ** 0.5, 1.0, 4.0])


def test_alpha_zero_and_one_extremes():
    for alpha, expected in ((1.0, [3.0, 4.0]), (0.0, [0.5, 0.25])):
        fc = nn.Linear(2, 1, bias=False).requires_grad_(False)
        with torch.no_grad():
            fc.weight.copy_(torch.tensor([[2.0, -4.0]]))
        model = nn.Sequential(fc)
        smooth_model(model, [{"x": np.array([[[3.0, -4.0]]], np.float32)}], _run, alpha)
        # alpha 1: s = max|X|; alpha 0: s = 1 / max|W|
        np.testing.assert_allclose(1 / model[0].inv_scale.numpy(), expected, rtol=1e-6)


def test_group_scale_uses_the_largest_weight_column_of_the_group():
    model, batches = _block_and_batches()
    alpha = 0.85
    with torch.no_grad():
        h = torch.cat([model.norm(torch.from_numpy(b["x"])).reshape(-1, 8) for b in batches])
    x_max = h.abs().amax(0).double().numpy()
    w_max = torch.stack([getattr(model, n).weight.abs().amax(0) for n in "qkv"]).amax(0).double().numpy()
    s = x_max ** alpha / w_max ** (1 - alpha)
    smooth_model(model, batches, _run, alpha)
    for n in "qkv":
        np.testing.assert_allclose(getattr(model, n).inv_scale.numpy(), 1 / s, rtol=1e-5)


# ---------------------------------------------------------------- a tiny attention block

def test_shared_input_groups():
    model, batches = _block_and_batches()
    groups = find_shared_input_groups(model, batches[0], _run)
    assert sorted(groups) == [["k", "q", "v"], ["o"]]  # head reads a 2-D tensor: not smoothed
    assert _hooks(model) == 0


def test_block_outputs_unchanged_and_qkv_share_one_scale():
    model, batches = _block_and_batches()
    ref = copy.deepcopy(model)
    summary = smooth_model(model, batches, _run, 0.85)
    assert sorted(g["linears"] for g in summary) == [["k", "q", "v"], ["o"]]
    for n in "qkvo":
        assert isinstance(getattr(model, n), SmoothedLinear)
    assert type(model.head) is nn.Linear
    torch.testing.assert_close(model.q.inv_scale, model.k.inv_scale, rtol=0, atol=0)
    torch.testing.assert_close(model.q.inv_scale, model.v.inv_scale, rtol=0, atol=0)
    assert not torch.allclose(model.q.inv_scale, model.o.inv_scale)
    assert float(model.q.inv_scale.max() / model.q.inv_scale.min()) > 3  # the outliers got smoothed
    assert _hooks(model) == 0
    x = torch.from_numpy(np.random.default_rng(1).normal(size=(5, 7, 8)).astype(np.float32))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-6)


def test_pruned_zeros_stay_exactly_zero():
    model, batches = _block_and_batches()
    layers = prunable_layers(model)
    apply_masks(layers, magnitude_masks({n: m.weight for n, m in layers.items()}, 0.5, "layer"))
    zeros = {n: (m.weight == 0).clone() for n, m in layers.items()}
    smooth_model(model, batches, _run, 0.85)
    for n, z in zeros.items():
        w = getattr(model, n).linear.weight if n != "head" else model.head.weight
        assert z.float().mean() >= 0.5
        assert torch.equal(w == 0, z), n  # zeros stay zeros, nonzeros stay nonzero


def test_no_batches_is_a_no_op():
    model, _ = _block_and_batches()
    state = copy.deepcopy(model.state_dict())
    assert smooth_model(model, [], _run, 0.85) == []
    assert all(type(getattr(model, n)) is nn.Linear for n in "qkvo")
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


# ---------------------------------------------------------------- the tiny BERT

@pytest.fixture(scope="module")
def smoothed_bert(tiny_bert_spec):
    spec = tiny_bert_spec
    work = copy.deepcopy(spec.model)
    layers = prunable_layers(work, spec.prune_prefix)
    apply_masks(layers, magnitude_masks({n: m.weight for n, m in layers.items()}, 0.5, "layer"))
    zeros = {n: (m.weight == 0).clone() for n, m in layers.items()}
    ref = copy.deepcopy(work)
    summary = smooth_model(work, spec.calib_batches[:3], spec.torch_outputs, 0.85)
    return work, ref, summary, zeros


def test_bert_groups(smoothed_bert):
    work, _, summary, _ = smoothed_bert
    expected = []
    for i in range(2):
        p = f"encoder.layer.{i}."
        expected += [[p + "attention.self.key", p + "attention.self.query", p + "attention.self.value"],
                     [p + "attention.output.dense"], [p + "intermediate.dense"], [p + "output.dense"]]
    assert sorted(g["linears"] for g in summary) == sorted(expected)
    modules = dict(work.named_modules())
    for group in expected:
        for name in group:
            assert isinstance(modules[name], SmoothedLinear)
            torch.testing.assert_close(modules[name].inv_scale, modules[group[0]].inv_scale, rtol=0, atol=0)
    assert type(work.pooler.dense) is nn.Linear  # reads the [CLS] vector (2-D): left alone
    assert _hooks(work) == 0


def test_bert_outputs_unchanged(smoothed_bert, tiny_bert_spec):
    work, ref, _, _ = smoothed_bert
    for batch in tiny_bert_spec.eval_batches[:2]:
        out = tiny_bert_spec.torch_outputs(work, batch)[0]
        expected = tiny_bert_spec.torch_outputs(ref, batch)[0]
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=2e-5)


def test_bert_pruned_zeros_stay_zero(smoothed_bert):
    work, _, _, zeros = smoothed_bert
    modules = dict(work.named_modules())
    for name, z in zeros.items():
        assert torch.equal(modules[name].linear.weight == 0, z), name


# ---------------------------------------------------------------- one pass: smoothing + min-max ranges

def _anchors(model, outputs=()):
    from sqexport.contracts.quant import Anchor
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return [Anchor(n, quantize_output=n in outputs) for n in names]


def test_ranges_from_the_smoothing_pass_equal_a_separate_calibration_pass():
    from sqexport.contracts.quant import ObservedRanges
    from sqexport.toolchain.quantization.static import calibrate

    model, batches = _block_and_batches()
    ranges = ObservedRanges()
    smooth_model(model, batches, _run, 0.85, ranges=ranges)
    anchors = _anchors(model, outputs={"o.linear"})  # one rectified output (ReLU bounds) too
    assert {a.module for a in anchors} == {"q.linear", "k.linear", "v.linear", "o.linear", "head"}
    assert ranges.samples == 12 and ranges.source == "transform.smoothquant" and not ranges.used

    def no_pass(model, batch):
        raise AssertionError("the model must not run again")
    reused = calibrate(model, anchors, batches, no_pass, observed=ranges)
    assert ranges.used
    separate = calibrate(model, anchors, batches, _run)  # the old way: a pass over the smoothed model
    for got, want in zip(reused[:2], separate[:2]):
        assert got.keys() == want.keys()
        for name in want:
            assert got[name].zero_point == want[name].zero_point, name
            assert got[name].scale == pytest.approx(want[name].scale, rel=1e-6), name
    # q/k/v read the LayerNorm output directly: the range of x * inv_s is exactly the per-channel one
    for n in ("q.linear", "k.linear", "v.linear"):
        assert reused[0][n] == separate[0][n]


def test_other_observers_still_run_their_own_pass():
    from sqexport.contracts.quant import ObservedRanges
    from sqexport.toolchain.quantization.static import calibrate

    model, batches = _block_and_batches()
    ranges = ObservedRanges()
    smooth_model(model, batches, _run, 0.85, ranges=ranges)
    calls = []

    def run(model, batch):
        calls.append(1)
        return _run(model, batch)
    calibrate(model, _anchors(model), batches, run, observer="percentile", observed=ranges)
    assert len(calls) == len(batches) and not ranges.used
    # a range the smoothing pass did not see also means a pass of its own
    del ranges.inputs["head"]
    calibrate(model, _anchors(model), batches, run, observed=ranges)
    assert len(calls) == 2 * len(batches) and not ranges.used


def test_nothing_smoothed_leaves_the_ranges_empty():
    from sqexport.contracts.quant import ObservedRanges

    ranges = ObservedRanges()
    model = nn.Sequential(nn.Linear(4, 2))
    assert smooth_model(model, [{"x": np.ones((3, 4), np.float32)}], _run, 0.85, ranges=ranges) == []
    assert ranges.inputs == {} and ranges.outputs == {}
