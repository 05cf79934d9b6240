"""PQ Index and SAP (Diao et al., ICLR 2023): the index against closed forms, SAP's prune count by
hand, scopes and masks, the round loop's stopping rules, and the CLI on digits-cnn."""
import json

import pytest
import torch
from torch import nn

from sqexport.contracts.errors import ConfigError
from sqexport.toolchain.pruning.pqi import SapParams, pq_index, prune_count, retained_lower_bound, sap_round
from sqexport.toolchain.pruning.pqi_stage import PqiPruneConfig, prune_pqi
from sqexport.toolchain.stages import PruneContext


@pytest.mark.parametrize("p,q", [(0.5, 1.0), (1.0, 2.0), (0.3, 0.7)])
@pytest.mark.parametrize("d", [1, 7, 100])
def test_pqi_of_one_hot_is_its_upper_bound_and_of_a_constant_is_zero(p, q, d):
    one_hot = torch.zeros(d)
    one_hot[d // 2] = -3.0  # sign and scale do not matter
    assert pq_index(one_hot, p, q) == pytest.approx(1 - d ** (1 / q - 1 / p), abs=1e-12)
    assert pq_index(torch.full((d,), 0.7), p, q) == pytest.approx(0.0, abs=1e-12)


def test_pqi_grows_as_a_vector_gets_sparser():
    w = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    sparser = torch.tensor([0.01, 0.02, 0.03, 4.0, 5.0, 6.0])
    assert pq_index(sparser) > pq_index(w) > 0


def test_sap_prune_count_by_hand():
    # w = [1, 1, 1, 9], p = 1/2, q = 1: ||w||_p = (1 + 1 + 1 + 3)^2 = 36, ||w||_q = 12,
    # 1 - I = 4^(1 - 2) * 36 / 12 = 0.75; exponents q/(q-p) = 2, qp/(q-p) = 1
    w = torch.tensor([1.0, 1.0, 1.0, 9.0])
    index = pq_index(w)
    assert index == pytest.approx(0.25)
    assert retained_lower_bound(4, index, SapParams()) == 3  # ceil(4 * 0.75)
    assert prune_count(4, index, SapParams()) == 1  # floor(4 * min(1 * (1 - 3/4), 0.9))
    assert prune_count(4, index, SapParams(gamma=2.0)) == 2  # floor(4 * 0.5)
    assert prune_count(4, index, SapParams(gamma=10.0)) == 3  # beta caps it: floor(4 * 0.9)
    # eta_r = 1: r = ceil(4 * 2^-2 * 0.75) = 1, c = floor(4 * 0.75) = 3
    assert retained_lower_bound(4, index, SapParams(eta_r=1.0)) == 1
    assert prune_count(4, index, SapParams(eta_r=1.0)) == 3


def test_sap_round_prunes_the_smallest_unmasked_entries_per_scope():
    w = {"a": torch.tensor([[1.0, 1.0, 1.0, 9.0], [5.0, 5.0, 5.0, 5.0]]), "b": torch.tensor([[0.5, 8.0]])}
    ones = {n: torch.ones_like(t, dtype=torch.bool) for n, t in w.items()}
    masks, stats = sap_round(w, ones, "neuron", SapParams())
    # row a0 is [1,1,1,9] (prune 1: the first 1); row a1 is constant (index 0: prune nothing);
    # row b0 = [0.5, 8]: 1 - I = 2^-1 (sqrt(.5) + sqrt(8))^2 / 8.5 ~ 0.735 -> r = 2, prune 0
    assert [s["prune"] for s in stats] == [1, 0, 0]
    assert masks["a"].tolist() == [[False, True, True, True], [True, True, True, True]]
    assert masks["b"].all()
    # masked entries leave d: the next round sees [1, 1, 9] only
    _, stats = sap_round(w, masks, "neuron", SapParams())
    assert stats[0]["d"] == 3


def test_global_scope_ranks_all_layers_together_and_the_limit_caps_a_round():
    w = {"a": torch.tensor([[0.1, 0.2, 5.0, 6.0]]), "b": torch.tensor([[0.05, 7.0, 8.0, 9.0]])}
    ones = {n: torch.ones_like(t, dtype=torch.bool) for n, t in w.items()}
    masks, stats = sap_round(w, ones, "global", SapParams())
    assert len(stats) == 1 and stats[0]["d"] == 8 and stats[0]["prune"] >= 2
    assert not masks["b"][0, 0] and not masks["a"][0, 0]  # the smallest two, wherever they are
    capped, stats = sap_round(w, ones, "global", SapParams(), limit=1)
    assert stats[0]["prune"] == 1 and int((~capped["a"]).sum() + (~capped["b"]).sum()) == 1
    assert not capped["b"][0, 0]


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _ctx(model, fine_tune=None):
    return PruneContext({"fc1": model.fc1, "fc2": model.fc2}, fine_tune=fine_tune)


def test_rounds_are_recovered_with_masks_and_traced():
    model, calls = _Net(), []

    def fine_tune(m, masks, steps, round_):
        calls.append((set(masks), steps, round_))
        with torch.no_grad():  # a recovery that moves every weight; the masks must hold afterwards
            for layer in (m.fc1, m.fc2):
                layer.weight.add_(0.01)
                layer.weight.mul_(masks["fc1" if layer is m.fc1 else "fc2"])
        return {"metric_before": 90.0, "metric_after": 95.0, "steps": steps, "metric": "top1", "unit": "%",
                "metric_dense": 96.0}

    result = prune_pqi(model, PqiPruneConfig(rounds=3, recover_steps=7), _ctx(model, fine_tune))
    trace = result.extra["pqi"]["trace"]
    assert [c[1:] for c in calls] == [(7, 0), (7, 1), (7, 2)] and calls[0][0] == {"fc1", "fc2"}
    assert [t["round"] for t in trace] == [1, 2, 3]
    assert all(a["sparsity"] < b["sparsity"] for a, b in zip(trace, trace[1:]))  # every round prunes more
    assert trace[0]["metric_after"] == 95.0 and "global" in trace[0]["pqi"]
    for name, layer in (("fc1", model.fc1), ("fc2", model.fc2)):
        assert torch.all(layer.weight[~result.masks[name]] == 0)
    assert "no speed" in result.speed_note


def test_target_sparsity_stops_the_loop_on_the_target():
    model = _Net()
    result = prune_pqi(model, PqiPruneConfig(rounds=50, target_sparsity=0.3, scope="layer", gamma=3.0), _ctx(model))
    section = result.extra["pqi"]
    assert section["stopped"] == "target_sparsity"
    assert section["sparsity"] == pytest.approx(0.3, abs=0.01)


def test_a_round_below_the_accuracy_floor_is_undone():
    model = _Net()
    metrics = iter([95.5, 93.0])  # round 2 falls 3 points below the dense 96

    def fine_tune(m, masks, steps, round_):
        return {"metric_before": 0.0, "metric_after": next(metrics), "steps": steps, "metric": "top1",
                "unit": "%", "metric_dense": 96.0}

    result = prune_pqi(model, PqiPruneConfig(rounds=5, max_drop=1.0), _ctx(model, fine_tune))
    section = result.extra["pqi"]
    assert section["stopped"] == "max_drop" and section["trace"][-1]["undone"]
    assert section["sparsity"] == section["trace"][0]["sparsity"]  # back to round 1's masks
    kept = sum(int((layer.weight != 0).sum()) for layer in (model.fc1, model.fc2))
    assert kept == sum(int(m.sum()) for m in result.masks.values())


@pytest.mark.parametrize("params, words", [
    ({"p": 1.0, "q": 1.0}, "pqi needs 0 < p < q, got p=1.0, q=1.0"),
    ({"beta": 1.0}, "pqi needs eta_r >= 0, gamma > 0 and 0 < beta < 1, got .*beta=1.0"),
    ({"gamma": 0.0}, "pqi needs eta_r >= 0, gamma > 0 and 0 < beta < 1, got .*gamma=0.0"),
    ({"scope": "row"}, "scope must be one of global, layer, neuron, got 'row'"),
    ({"rounds": 0}, "pqi needs rounds >= 1 and recover_steps >= 0, got 0"),
    ({"target_sparsity": 1.0}, r"target_sparsity must be in \(0, 1\), got 1.0"),
    ({"max_drop": -1.0}, "max_drop must be >= 0, got -1.0"),
])
def test_bad_values_are_config_errors(params, words):
    with pytest.raises(ConfigError, match=words):
        PqiPruneConfig(**params)


@pytest.mark.e2e
def test_cli_pqi_on_digits_cnn(tmp_path, run_cli):
    recipe = tmp_path / "pqi.yaml"
    recipe.write_text("stages:\n  - type: prune.pqi\n    params: {rounds: 2, recover_steps: 3, scope: neuron}\n"
                      "  - type: quantize.int8\n")
    out = tmp_path / "out"
    result = run_cli(["export", "digits-cnn", "--recipe", recipe, "-o", out, "--threads", "1"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    section = report["pqi"]
    assert section["scope"] == "neuron" and len(section["trace"]) == 2
    assert section["trace"][0]["metric_after"] is not None and report["sparsity"]["overall"] > 0.1
    assert report["sparsity"]["overall"] == pytest.approx(section["sparsity"], abs=1e-6)  # recovery kept the zeros
    assert (out / "pqi.png").is_file() and "## PQI / SAP rounds" in (out / "report.md").read_text()
    assert any("no speed" in n for n in report["notes"])
