"""Structural re-parameterization (toolchain/reparam.py): sums of parallel conv / BatchNorm /
identity branches over one input become one conv computing the same function, only where that is
exact; through the CLI a RepVGG-style model ships one int8 conv per block."""
from __future__ import annotations

import copy
import json

import onnx
import pytest
import torch
from torch import nn

from sqexport.toolchain.folding import fold_batchnorm
from sqexport.toolchain.reparam import merge_parallel_branches


def _bn(c: int, seed: int) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c)
    bn.running_mean.copy_(torch.randn(c, generator=g))
    bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    bn.weight.data.copy_(torch.randn(c, generator=g))
    bn.bias.data.copy_(torch.randn(c, generator=g))
    return bn


class RepBlock(nn.Module):
    """RepVGG's training form: 3x3 + BN, 1x1 + BN, BN on the input (stride 1, same channels)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 1, seed: int = 0):
        super().__init__()
        self.kxk = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=False), _bn(cout, seed))
        self.pw = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, 0, groups=groups, bias=False), _bn(cout, seed + 1))
        self.identity = _bn(cout, seed + 2) if stride == 1 and cin == cout else None

    def forward(self, x):
        y = self.kxk(x) + self.pw(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return torch.relu(y)


class AsymBlock(nn.Module):
    """ACNet's form: 3x3 + 1x3 + 3x1 convs, and the input itself."""

    def __init__(self, c: int):
        super().__init__()
        self.square = nn.Conv2d(c, c, 3, padding=1)
        self.hor = nn.Conv2d(c, c, (1, 3), padding=(0, 1))
        self.ver = nn.Conv2d(c, c, (3, 1), padding=(1, 0))

    def forward(self, x):
        return self.square(x) + self.hor(x) + self.ver(x) + x


def rep_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(RepBlock(3, 8, stride=2, seed=0), RepBlock(8, 8, seed=3), RepBlock(8, 8, groups=2, seed=6),
                         AsymBlock(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()


def _folded(model):
    return fold_batchnorm(copy.deepcopy(model))[0]


def _convs(model) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in model.modules())


def test_branch_sums_become_one_conv_with_the_same_outputs():
    model = rep_net()
    x = torch.randn(4, 3, 16, 16)
    folded = _folded(model)
    assert _convs(folded) == 9
    merged, count = merge_parallel_branches(folded)
    assert count == 4 and _convs(merged) == 4
    assert not any(isinstance(m, nn.BatchNorm2d) for m in merged.modules())
    torch.testing.assert_close(merged(x), model(x), atol=1e-5, rtol=1e-5)
    # the merged conv takes the largest kernel's size, centred
    kernels = sorted(tuple(m.kernel_size) for m in merged.modules() if isinstance(m, nn.Conv2d))
    assert kernels == [(3, 3)] * 4


def test_identity_branch_is_a_centre_one_per_channel():
    block = AsymBlock(2).eval()
    for conv in (block.square, block.hor, block.ver):
        nn.init.zeros_(conv.weight), nn.init.zeros_(conv.bias)
    merged, count = merge_parallel_branches(torch.fx.symbolic_trace(block))
    conv = next(m for m in merged.modules() if isinstance(m, nn.Conv2d))
    expected = torch.zeros(2, 2, 3, 3)
    expected[0, 0, 1, 1] = expected[1, 1, 1, 1] = 1.0
    assert count == 1 and torch.equal(conv.weight.detach(), expected) and torch.equal(conv.bias.detach(), torch.zeros(2))


class Shared(nn.Module):
    """A branch read elsewhere too: merging would lose that reader's value."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        a = self.a(x)
        return a + self.b(x), a


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x, y):
        return self.a(x) + self.b(y)


class Dilated(nn.Module):
    """A dilated branch: its taps are not a sub-kernel of the other's."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=2, dilation=2)

    def forward(self, x):
        return self.a(x) + self.b(x)


@pytest.mark.parametrize("module", [Shared, TwoInputs, Dilated])
def test_only_exact_merges(module):
    gm = torch.fx.symbolic_trace(module().eval())
    merged, count = merge_parallel_branches(gm)
    assert count == 0 and _convs(merged) == 2


def test_models_fx_cannot_hold_are_left_alone():
    model = nn.Conv2d(3, 3, 1)
    assert merge_parallel_branches(model) == (model, 0)


@pytest.mark.e2e
def test_cli_ships_one_int8_conv_per_block(user_project, run_cli):
    (user_project / "repnet.py").write_text(
        "import sys\nsys.path.insert(0, %r)\nfrom test_reparam import rep_net\n" % str(__import__("pathlib").Path(__file__).parent))
    out = user_project / "out"
    r = run_cli(["repnet:rep_net", "--input-shape", "1x3x16x16", "--prune", "none", "--max-accuracy-drop", "100",
                 "--quiet", "-o", out])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "report.json").read_text())
    fold = next(s for s in rep["stages"] if s["name"] == "fold_batchnorm")["params"]
    assert fold["merged_branches"] == 4
    cov = rep["quantization"]["coverage"]
    assert cov["weight_layers"] == 5 and cov["int8"] + len(cov["fp32"]) == 5
    ops = [n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node]
    assert ops.count("Conv") == 4 and "BatchNormalization" not in ops
    fid = rep["fidelity"]
    assert fid["max_abs_deviation"] <= 0.02 * fid["reference_max_abs"]
