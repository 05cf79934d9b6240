"""N:M semi-structured masks: groups of M along the input-channel axis, padding of the last group."""
import pytest
import torch
from torch import nn

from sqexport.contracts.errors import ConfigError
from sqexport.toolchain.pruning.nm import NMPruneConfig, nm_mask, parse_nm
from sqexport.toolchain.builtin_methods import lookup
from sqexport.toolchain.stages import PruneContext


def test_linear_2_4_with_padded_last_group():
    w = torch.tensor([[1.0, -5.0, 3.0, 2.0, 0.5, -4.0],
                      [0.1, 0.2, 0.3, 0.4, 9.0, 8.0]])
    # fan_in 6 = one full group [0:4] + a last group [4:6] padded with 2 slots
    # row 0: |1 5 3 2| keep 5, 3 ; |.5 4| keep both (padding never wins)
    # row 1: |.1 .2 .3 .4| keep .3 .4 ; |9 8| keep both
    assert nm_mask(w, 2, 4).tolist() == [[False, True, True, False, True, True],
                                         [False, False, True, True, True, True]]


def test_padding_never_beats_a_real_zero_weight():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0, 0.0]])
    # last group: [0, pad, pad, pad] -> the real zero keeps a slot
    assert nm_mask(w, 2, 4).tolist() == [[False, False, True, True, True]]
    # fan_in smaller than M: one padded group
    assert nm_mask(torch.tensor([[3.0, -1.0, 2.0]]), 2, 4).tolist() == [[True, False, True]]
    assert nm_mask(torch.tensor([[3.0, -1.0, 2.0]]), 1, 4).tolist() == [[True, False, False]]


def test_conv_groups_run_along_input_channels_at_each_kernel_position():
    # (out=2, in=4, kh=1, kw=2)
    w = torch.zeros(2, 4, 1, 2)
    w[0, :, 0, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    w[0, :, 0, 1] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    w[1, :, 0, 0] = torch.tensor([-8.0, 1.0, 7.0, -2.0])
    w[1, :, 0, 1] = torch.tensor([0.1, -0.4, 0.3, 0.2])
    mask = nm_mask(w, 2, 4)
    assert mask.shape == w.shape
    assert mask[0, :, 0, 0].tolist() == [False, False, True, True]
    assert mask[0, :, 0, 1].tolist() == [True, True, False, False]
    assert mask[1, :, 0, 0].tolist() == [True, False, True, False]
    assert mask[1, :, 0, 1].tolist() == [False, True, True, False]


def test_conv_with_padded_input_channels():
    # (out=1, in=6, kh=1, kw=1): groups [0:4] and [4:6]+pad
    w = torch.tensor([0.9, 0.1, 0.8, 0.2, 0.05, 0.01]).reshape(1, 6, 1, 1)
    assert nm_mask(w, 2, 4).flatten().tolist() == [True, False, True, False, True, True]


def test_random_conv_keeps_exactly_the_top_n_of_every_group():
    torch.manual_seed(0)
    w = torch.randn(8, 12, 3, 3)
    mask = nm_mask(w, 2, 4)
    groups_w = w.abs().movedim(1, -1).reshape(8, 3, 3, 3, 4)
    groups_m = mask.movedim(1, -1).reshape(8, 3, 3, 3, 4)
    assert (groups_m.sum(-1) == 2).all()
    kept_min = torch.where(groups_m, groups_w, torch.inf).amin(-1)
    dropped_max = torch.where(~groups_m, groups_w, -torch.inf).amax(-1)
    assert (kept_min >= dropped_max).all()


def test_handler_applies_masks_as_exact_zeros():
    lin = nn.Linear(8, 3, bias=False)
    torch.manual_seed(1)
    nn.init.normal_(lin.weight)
    lookup("prune", "nm").handler(lin, NMPruneConfig(1, 4), PruneContext({"lin": lin}))
    nonzeros = (lin.weight != 0).reshape(3, 2, 4).sum(-1)
    assert (nonzeros == 1).all()


@pytest.mark.parametrize("text, expected", [("2:4", (2, 4)), (" 1 : 8 ", (1, 8)), ("3:4", (3, 4))])
def test_parse_nm_accepts(text, expected):
    assert parse_nm(text) == expected


@pytest.mark.parametrize("text, words", [
    ("4:2", "needs 0 < N < M, got 4:2"), ("2:2", "needs 0 < N < M, got 2:2"), ("0:4", "needs 0 < N < M, got 0:4"),
    ("x", "must look like N:M"), ("2-4", "must look like N:M"), ("2:4:8", "must look like N:M"),
    ("", "must look like N:M"), ("-1:4", "must look like N:M"),
])
def test_parse_nm_rejects(text, words):
    with pytest.raises(ConfigError, match=f"--nm {words}"):
        parse_nm(text)


def test_config_validation():
    assert NMPruneConfig() == NMPruneConfig(2, 4)
    for n, m in [(4, 2), (2, 2), (0, 4)]:
        with pytest.raises(ConfigError, match=f"N:M pruning needs 0 < N < M, got {n}:{m}"):
            NMPruneConfig(n, m)


def test_a_layer_with_at_most_n_input_channels_is_skipped_with_a_reason():
    from sqexport.toolchain.pruning.nm import nm_skip_reason

    stem = torch.nn.Conv2d(1, 8, 3).weight  # grouped along 1 input channel: 1 real weight per group of 4
    assert "1 input channel(s)" in nm_skip_reason(stem, 2, 4)
    assert nm_skip_reason(torch.nn.Conv2d(2, 8, 3).weight, 2, 4) is not None
    assert nm_skip_reason(torch.nn.Conv2d(3, 8, 3).weight, 2, 4) is None  # 3 weights per group: one goes
    assert nm_skip_reason(torch.nn.Linear(16, 4).weight, 2, 4) is None
