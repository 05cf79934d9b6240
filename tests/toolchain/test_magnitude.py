"""Unstructured magnitude pruning: exact masks on explicit tensors (layer and global scope)."""
import pytest
import torch
from torch import nn

from sqexport.contracts.errors import ConfigError
from sqexport.toolchain.pruning import layer_sparsity, overall_sparsity, prunable_layers
from sqexport.toolchain.pruning.magnitude import MagnitudePruneConfig, magnitude_masks
from sqexport.toolchain.pruning.masks import smallest_k_mask
from sqexport.toolchain.builtin_methods import lookup
from sqexport.toolchain.stages import PruneContext

W_A = torch.tensor([[0.5, -0.1, 0.3], [-0.7, 0.2, 0.05]])  # |w| sorted: .05 .1 .2 .3 .5 .7
W_B = torch.tensor([[4.0, -3.0], [2.0, 1.0]])


def test_layer_scope_prunes_each_layer_to_floor_of_sparsity_times_size():
    masks = magnitude_masks({"a": W_A, "b": W_B}, 0.5, "layer")
    # a: 6 weights -> 3 removed (.05, .1, .2); b: 4 weights -> 2 removed (1, 2)
    assert masks["a"].tolist() == [[True, False, True], [True, False, False]]
    assert masks["b"].tolist() == [[True, True], [False, False]]
    assert masks["a"].dtype == torch.bool and masks["a"].shape == W_A.shape


def test_layer_scope_rounds_down_on_odd_sizes():
    w = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0])
    # 0.5 * 5 = 2.5 -> 2 removed: the values 1 and 2
    assert magnitude_masks({"w": w}, 0.5, "layer")["w"].tolist() == [True, False, True, False, True]


def test_global_scope_ranks_all_layers_together():
    masks = magnitude_masks({"a": W_A, "b": W_B}, 0.5, "global")
    # 10 weights -> 5 removed: .05 .1 .2 .3 .5, all in layer a; b has only large weights
    assert masks["a"].tolist() == [[False, False, False], [True, False, False]]
    assert masks["b"].tolist() == [[True, True], [True, True]]


def test_zero_sparsity_keeps_everything():
    masks = magnitude_masks({"a": W_A, "b": W_B}, 0.0, "global")
    assert all(m.all() for m in masks.values())


def test_ties_are_broken_by_position_deterministically():
    w = torch.tensor([1.0, -1.0, 1.0, 1.0, 2.0, 0.5])
    # k = 3: 0.5 first, then the two earliest of the four |1.0| ties (indices 0 and 1)
    expected = [False, False, True, True, True, False]
    for _ in range(3):
        assert magnitude_masks({"w": w}, 0.5, "layer")["w"].tolist() == expected


def test_global_ties_across_layers_prune_the_earlier_layer_first():
    a, b = torch.tensor([1.0, 3.0]), torch.tensor([1.0, 1.0])
    for _ in range(3):
        masks = magnitude_masks({"a": a, "b": b}, 0.5, "global")
        assert masks["a"].tolist() == [False, True]
        assert masks["b"].tolist() == [False, True]


def test_sparsity_fraction_is_exact_when_the_product_is_an_integer():
    """0.29 of 100 weights is 29 weights (0.29 * 100 == 28.999999999999996 in floating point)."""
    w = torch.arange(1, 101, dtype=torch.float32)
    for sparsity, expected in [(0.29, 29), (0.57, 57), (0.58, 58), (0.3, 30), (0.7, 70)]:
        mask = magnitude_masks({"w": w}, sparsity, "layer")["w"]
        assert int((~mask).sum()) == expected, sparsity
        # and they are the smallest ones
        assert mask.tolist() == [i >= expected for i in range(100)]


def test_smallest_k_mask_shape_and_count():
    scores = torch.tensor([[3.0, 1.0], [2.0, 0.0]])
    assert smallest_k_mask(scores, 2).tolist() == [[True, False], [True, False]]
    assert smallest_k_mask(scores, 0).all()


def test_config_validation():
    assert MagnitudePruneConfig() == MagnitudePruneConfig(0.5, "global")
    for bad in (1.0, 1.5, -0.1):
        with pytest.raises(ConfigError, match=rf"sparsity must be in \[0, 1\), got {bad}"):
            MagnitudePruneConfig(sparsity=bad)
    with pytest.raises(ConfigError, match="scope must be 'layer' or 'global', got 'channel'"):
        MagnitudePruneConfig(scope="channel")


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 2, bias=True)
        self.bn = nn.BatchNorm2d(2)
        self.emb = nn.Embedding(4, 3)
        self.conv1d = nn.Conv1d(2, 2, 1)
        self.head = nn.Linear(3, 2)


def test_prunable_layers_are_conv_and_linear_only():
    net = _Net()
    assert sorted(prunable_layers(net)) == ["conv", "conv1d", "head"]
    assert sorted(prunable_layers(net, prefix="conv")) == ["conv", "conv1d"]


def test_registered_handler_zeroes_weights_and_leaves_bias_alone():
    lin = nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.copy_(W_A)
        lin.bias.copy_(torch.tensor([0.01, -0.02]))
    layers = {"lin": lin}
    result = lookup("prune", "magnitude").handler(lin, MagnitudePruneConfig(0.5, "layer"), PruneContext(layers))
    torch.testing.assert_close(lin.weight, torch.tensor([[0.5, 0.0, 0.3], [-0.7, 0.0, 0.0]]))
    assert (lin.weight == 0).sum() == 3  # exact zeros
    assert lin.bias.tolist() == pytest.approx([0.01, -0.02])
    assert result.masks["lin"].tolist() == [[True, False, True], [True, False, False]]
    assert "speed" in result.speed_note


def test_sparsity_accounting():
    a, b = nn.Linear(3, 2, bias=False), nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        a.weight.copy_(torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 3.0]]))  # 3 / 6 zeros
        b.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 1.0]]))  # 1 / 4 zeros
    layers = {"a": a, "b": b}
    assert layer_sparsity(layers) == {"a": 0.5, "b": 0.25}
    assert overall_sparsity(layers) == pytest.approx(4 / 10)
    assert overall_sparsity({}) == 0.0
