"""SiPP and PFP (Baykal, Liebenwein et al.; Liebenwein et al., ICLR 2020): sensitivities on tiny
nets by hand, the sample size, the bisection against its budget, SiPP's variants (seeded
sampling), PFP's channel removal exported and run in onnxruntime, and the CLI on digits-cnn."""
import json
import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from sqexport.contracts.errors import ConfigError
from sqexport.exporters.onnx_export import export_torch
from sqexport.toolchain.pruning import sensitivity as sens
from sqexport.toolchain.pruning.sensitivity_stage import SensitivityPruneConfig, prune_sensitivity
from sqexport.toolchain.stages import PruneContext


def _two_layer():
    net = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 3.0], [-1.0, 2.0]]))
        net[2].weight.copy_(torch.tensor([[2.0, -1.0]]))
    return net.eval()


def _run(model, batch):
    with torch.no_grad():
        return [model(torch.from_numpy(batch["x"])).numpy()]


def test_edge_sensitivities_of_a_two_layer_net_by_hand():
    net = _two_layer()
    x = np.array([[1.0, 2.0], [2.0, 0.0]], dtype=np.float32)
    layers = {"0": net[0], "2": net[2]}
    s, patches, used = sens.collect_sensitivities(net, [{"x": x}], _run, layers, 10, "edge")
    assert used == 2 and patches == {"0": 1, "2": 1}
    # layer 0, x1 = (1, 2): row 0 contributions (1, 6) -> (1/7, 6/7); row 1 (-1, 4): positive (0, 1),
    # negative (1, 0) -> (1, 1). x2 = (2, 0): row 0 (2, 0) -> (1, 0); row 1 (-2, 0) -> (1, 0).
    torch.testing.assert_close(s["0"], torch.tensor([[1.0, 6 / 7], [1.0, 1.0]]))
    # layer 2 reads relu(layer 0): x1 -> (7, 3), contributions (14, -3) -> (1, 1);
    # x2 -> (2, 0), contributions (4, 0) -> (1, 0). Max over both: (1, 1).
    torch.testing.assert_close(s["2"], torch.tensor([[1.0, 1.0]]))


def test_conv_sensitivities_are_per_patch_and_pfp_sums_a_channel_over_its_kernel():
    conv = nn.Conv2d(2, 1, (1, 2), bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[[1.0, 1.0]], [[2.0, 0.0]]]]))
    # one image, 1x3: channel 0 = (1, 1, 4), channel 1 = (1, 3, 1); two patches (columns 0-1, 1-2)
    x = torch.tensor([[[[1.0, 1.0, 4.0]], [[1.0, 3.0, 1.0]]]])
    # patch 1: channel contributions (1 + 1, 2 * 1) = (2, 2) -> (1/2, 1/2)
    # patch 2: (1 + 4, 2 * 3) = (5, 6) -> (5/11, 6/11); max over patches: (1/2, 6/11)
    torch.testing.assert_close(sens.channel_sensitivity(conv, x), torch.tensor([0.5, 6 / 11]))
    # SiPP, per weight (edges c0k0, c0k1, c1k0, c1k1): patch 1 (1, 1, 2, 0)/4, patch 2 (1, 4, 6, 0)/11
    torch.testing.assert_close(sens.edge_sensitivity(conv, x), torch.tensor([[0.25, 4 / 11, 6 / 11, 0.0]]))


def test_sample_size_and_sample_complexity_formulas():
    eta, eta_star = 100, 10
    delta = 1e-16 / eta
    assert sens.sample_size(eta, eta_star) == math.ceil(3 * math.log(8 * eta_star / delta))
    assert sens.sample_size(eta, eta_star, available=20) == 20
    a = sens.alpha(4, 8, delta)
    assert a == pytest.approx(6 * math.log(8 * 5 * 8 / delta))
    assert sens.samples_needed(0.5, a, 2.0) == math.ceil(3 * (6 + 2 * 0.5) * a * 2.0 / 0.5 ** 2)


def test_bisection_finds_the_smallest_eps_that_meets_the_budget():
    totals = {"a": (3.0, 500), "b": (1.0, 200)}  # (sensitivity sum, weights)

    def kept(eps):
        return sum(min(n, sens.samples_needed(eps, 10.0, s)) for s, n in totals.values())

    eps = sens.bisect_eps(kept, 350)
    assert kept(eps) <= 350 < kept(eps * 0.999)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3)).eval()


MLP_BATCHES = [{"x": np.random.default_rng(i).normal(size=(16, 12)).astype(np.float32)} for i in range(2)]


def _sipp(variant, seed=0, sparsity=0.6):
    model = _mlp()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    ctx = PruneContext(layers, MLP_BATCHES, _run, seed=seed)
    result = prune_sensitivity(model, SensitivityPruneConfig(sparsity=sparsity, variant=variant), ctx)
    return model, layers, result


@pytest.mark.parametrize("variant", ["sipp-deterministic", "sipp-sampling", "sipp-hybrid"])
def test_sipp_meets_the_budget_and_masks_are_zeros(variant):
    model, layers, result = _sipp(variant)
    total = sum(m.weight.numel() for m in layers.values())
    kept = sum(int((m.weight != 0).sum()) for m in layers.values())
    assert kept <= 0.4 * total + 0.05 * total  # sampling meets the budget in expectation
    assert kept >= 0.3 * total
    for name, mask in result.masks.items():
        assert torch.all(layers[name].weight[~mask] == 0)
    assert result.extra["sensitivity"]["variant"] == variant and "no speed" in result.speed_note


def test_sipp_sampling_is_seeded():
    a, b, c = (_sipp("sipp-sampling", seed=s)[0] for s in (0, 0, 1))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


class _Cnn(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.c1 = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.c2 = nn.Sequential(nn.Conv2d(32, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.c2(self.c1(x)))
        return self.head(x.mean((2, 3)))


EXAMPLE = {"x": np.random.default_rng(0).random((1, 3, 8, 8), dtype=np.float32)}
CNN_BATCHES = [{"x": np.random.default_rng(i).random((8, 3, 8, 8), dtype=np.float32)} for i in range(2)]


def test_pfp_removes_channels_and_the_export_matches_torch_in_onnxruntime(tmp_path):
    model = _Cnn().eval()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    dense = sum(m.weight.numel() for m in layers.values())
    ctx = PruneContext(layers, CNN_BATCHES, _run, example_inputs=EXAMPLE)
    result = prune_sensitivity(model, SensitivityPruneConfig(sparsity=0.5, round_to=1), ctx)
    assert result.masks == {} and "real CPU speed" in result.speed_note
    kept = sum(m.weight.numel() for m in layers.values())
    assert kept <= 0.5 * dense  # the bisection's budget holds on the real, slimmed model
    assert model.c1[0].weight.shape[0] < 32  # the hidden channels of the block were removed
    structure = result.extra["structure"]
    assert structure["params"]["after"] < structure["params"]["before"]
    details = result.extra["sensitivity"]
    assert details["variant"] == "pfp" and details["samples"] == 16  # |S| capped by the data given
    path = tmp_path / "pfp.onnx"
    export_torch(model, EXAMPLE, ["x"], ["y"], {"x": {0: "b"}}, path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, CNN_BATCHES[0])[0], _run(model, CNN_BATCHES[0])[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("params, words", [
    ({"variant": "sipp"}, "variant must be one of pfp, sipp-deterministic, sipp-sampling, sipp-hybrid, got 'sipp'"),
    ({"sparsity": 1.0}, r"sparsity must be in \[0, 1\), got 1.0"),
    ({"round_to": 0}, "round_to must be >= 1, got 0"),
    ({"recover_steps": -1}, "recover_steps must be >= 0, got -1"),
])
def test_bad_values_are_config_errors(params, words):
    with pytest.raises(ConfigError, match=words):
        SensitivityPruneConfig(**params)


@pytest.mark.e2e
def test_cli_sensitivity_on_digits_cnn(tmp_path, run_cli):
    recipe = tmp_path / "pfp.yaml"
    recipe.write_text("stages:\n  - type: prune.sensitivity\n    params: {sparsity: 0.4, recover_steps: 3}\n"
                      "  - type: quantize.int8\n")
    out = tmp_path / "out"
    result = run_cli(["export", "digits-cnn", "--recipe", recipe, "-o", out, "--threads", "1"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["sensitivity"]["variant"] == "pfp" and report["sensitivity"]["recovery"]["steps"] == 3
    assert report["structure"]["params"]["ratio"] < 0.65
    assert any("real CPU speed" in n for n in report["notes"])
