"""Structured (channel) pruning on tiny CNNs: coupled groups, kept outputs unchanged, allocation
numbers, export and reload in onnxruntime."""
import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from sqexport.contracts.errors import ConfigError
from sqexport.exporters.onnx_export import export_torch
from sqexport.toolchain.pruning import structured as S
from sqexport.toolchain.pruning.structured_stage import StructuredPruneConfig, prune_structured
from sqexport.toolchain.stages import PruneContext


class TinyRes(nn.Module):
    """conv-BN-ReLU stem, one residual block (the add couples stem and block output), a depthwise
    separable block, pooling and a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.c1 = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.c2 = nn.Sequential(nn.Conv2d(32, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.pw = nn.Sequential(nn.Conv2d(16, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU())
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.c2(self.c1(x)))
        x = self.pw(self.dw(x))
        return self.head(x.mean((2, 3)))


def _model():
    torch.manual_seed(0)
    m = TinyRes()
    with torch.no_grad():  # non-trivial BN so that pruning a wrong channel would show
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.5)
    return m.eval()


EXAMPLE = {"x": np.random.default_rng(0).random((1, 3, 8, 8), dtype=np.float32)}
BATCHES = [{"x": np.random.default_rng(i).random((4, 3, 8, 8), dtype=np.float32)} for i in range(2)]


def _run(model, batch):
    with torch.no_grad():
        return [model(**{k: torch.from_numpy(v) for k, v in batch.items()}).numpy()]


def test_groups_follow_residual_and_depthwise_coupling():
    _, groups = S.channel_groups(_model(), EXAMPLE)
    by_root = {g.name: g.size for g in groups}
    # stem, c2 and the depthwise conv share one 16-channel group (residual add + depthwise);
    # c1 and pw stand alone; the head's outputs are never prunable
    assert sorted(by_root.values()) == [16, 24, 32]
    assert "head" not in by_root


def test_pruning_keeps_the_outputs_of_kept_channels():
    dense, model = _model(), _model()
    graph, groups = S.channel_groups(model, EXAMPLE)
    S.group_importance(groups, "magnitude")
    c1 = next(i for i, g in enumerate(groups) if g.name == "c1.0")
    keep = {i: (g.size // 2 if i == c1 else g.size) for i, g in enumerate(groups)}
    dropped = S.prune_groups(graph, groups, keep)["c1.0"]
    kept = [i for i in range(32) if i not in dropped]
    assert model.c1[0].weight.shape == (16, 16, 3, 3) and model.c2[0].weight.shape == (16, 16, 3, 3)
    x = torch.from_numpy(BATCHES[0]["x"])
    with torch.no_grad():
        full, slim = dense.c1(dense.stem(x)), model.c1(model.stem(x))
    torch.testing.assert_close(slim, full[:, kept])


def test_allocation_numbers():
    g = [S.ChannelGroup("a", None, None, 16, torch.arange(1.0, 17.0)),
         S.ChannelGroup("b", None, None, 32, torch.full((32,), 10.0))]
    # uniform: half of each, rounded to multiples of 8
    assert S.allocate(g, 0.5, "uniform", 8) == {0: 8, 1: 16}
    # global on group-normalized scores: b is flat (all 1.0 after normalization); a spans
    # 1/8.5 .. 16/8.5, so a's 8 weakest (< 1.0) go first, then 16 of b's ties
    assert S.allocate(g, 0.5, "global", 1) == {0: 8, 1: 16}
    # latency: b's channels cost 4x more per channel, so b gives up more
    g[1].cost, g[0].cost = 4.0, 1.0
    keep = S.allocate(g, 0.5, "latency", 1)
    assert keep[1] < 16 and keep[0] + keep[1] == 24
    with pytest.raises(ConfigError, match="allocation must be one of global, latency, uniform"):
        S.allocate(g, 0.5, "nope")


def test_round_to_multiple_of_eight_and_floor():
    assert S._round_keep(13, 32, 8) == 16
    assert S._round_keep(1, 32, 8) == 8  # never below one block / 10% of the group
    assert S._round_keep(5, 12, 8) == 5  # widths that are not multiples of 8 are left alone


def test_stage_exports_and_reloads_in_onnxruntime(tmp_path):
    model = _model()
    ctx = PruneContext({}, BATCHES, _run, example_inputs=EXAMPLE, export=lambda m, p: None, threads=1)
    result = prune_structured(model, StructuredPruneConfig(sparsity=0.5, round_to=8), ctx)
    st = result.extra["structure"]
    assert st["macs"]["after"] < 0.5 * st["macs"]["before"]
    assert st["params"]["after"] < st["params"]["before"]
    assert all(sum(v["after"][:1]) % 8 == 0 for k, v in st["layers"].items() if k != "head")
    export_torch(model, EXAMPLE, ["x"], ["y"], {"x": {0: "b"}}, tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, BATCHES[0])[0], _run(model, BATCHES[0])[0], rtol=1e-4, atol=1e-5)


def test_the_stage_says_whether_it_removed_anything():
    ctx = PruneContext({}, BATCHES, _run, example_inputs=EXAMPLE, export=lambda m, p: None, threads=1)
    assert prune_structured(_model(), StructuredPruneConfig(sparsity=0.5, round_to=8), ctx).changed
    # nothing removed: the pipeline then re-estimates no BatchNorm statistics and recovers nothing
    assert not prune_structured(_model(), StructuredPruneConfig(sparsity=0.0, round_to=8), ctx).changed


def test_activation_importance_uses_data():
    model = _model()
    graph, groups = S.channel_groups(model, EXAMPLE)
    consumers = [m for g in groups for m, _, _ in S._consumers(g.group)]
    act = S.activation_rms(model, BATCHES, _run, consumers)
    S.group_importance(groups, "activation", act)
    c1 = next(g for g in groups if g.name == "c1.0")
    # c1's channels are read by c2 only: score = RMS(input of c2) * column norm of c2
    expected = act[model.c2[0]] * model.c2[0].weight.transpose(0, 1).flatten(1).norm(dim=1)
    torch.testing.assert_close(c1.scores, expected)


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match=r"sparsity must be in \[0, 1\), got 1.0"):
        StructuredPruneConfig(sparsity=1.0)
    with pytest.raises(ConfigError, match="importance must be one of auto, activation, magnitude, reconstruction"):
        StructuredPruneConfig(importance="random")


def test_latency_table_measures_every_group(tmp_path):
    from sqexport.toolchain.pruning.latency_table import measure_group_costs
    from sqexport.toolchain.pruning.structured_stage import _half_pruner

    model = _model()
    _, groups = S.channel_groups(model, EXAMPLE)

    def export(m, path):
        export_torch(m, EXAMPLE, ["x"], ["y"], {}, path)

    costs = measure_group_costs(model, EXAMPLE, len(groups), _half_pruner(EXAMPLE), export, threads=1, budget_s=0.5)
    assert len(costs) == len(groups) and all(c > 0 for c in costs)
    assert model.c1[0].weight.shape[0] == 32  # the model itself is untouched
