"""Cross-layer equalization: the FP32 function is unchanged and the ranges follow the formula."""
import numpy as np
import pytest
import torch
from torch import fx, nn

from sqexport.toolchain.quantization.equalization import ChannelClip, equalize, find_pairs


class _Net(nn.Module):
    """conv -> ReLU6 -> depthwise -> ReLU -> 1x1 conv: two pairs, one through each activation."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.a1 = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6()
        self.dw, self.a2 = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU()
        self.c2 = nn.Conv2d(8, 4, 1)
        with torch.no_grad():  # very different channel ranges: what equalization is for
            self.c1.weight.mul_(torch.logspace(-1.5, 1.5, 8).reshape(-1, 1, 1, 1))
            self.dw.weight.mul_(torch.logspace(1, -1, 8).reshape(-1, 1, 1, 1))

    def forward(self, x):
        return self.c2(self.a2(self.dw(self.a1(self.c1(x)))))


def _ranges(net):
    return (net.c1.weight.abs().amax((1, 2, 3)), net.dw.weight.abs().amax((1, 2, 3)),
            net.c2.weight.abs().amax((0, 2, 3)))


def test_exact_mode_preserves_the_function_with_active_relu6_clips():
    net = fx.symbolic_trace(_Net().eval())
    x = 3.0 * torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = net(x)
        assert (net.c1(x) > 6).any()  # the ReLU6 clip is really in play
    pairs = equalize(net, relu6="exact")
    assert [(p.first, p.second, p.activation) for p in pairs] == [("c1", "dw", "a1"), ("dw", "c2", "a2")]
    assert isinstance(net.a1, ChannelClip)
    with torch.no_grad():
        torch.testing.assert_close(net(x), before, atol=1e-4, rtol=1e-4)


def test_one_pass_equalizes_to_the_geometric_mean():
    net = fx.symbolic_trace(_Net().eval())
    r1, r2_dw, _ = _ranges(net)
    equalize(net, relu6="exact", iterations=1)
    # first pair (c1 out i, dw channel i): both become sqrt(r1_i * r2_i)
    want = torch.sqrt(r1 * r2_dw)
    after_c1 = net.c1.weight.abs().amax((1, 2, 3))
    torch.testing.assert_close(after_c1, want, rtol=1e-5, atol=0)
    # then (dw, c2) is equalized on the updated dw: dw out i and c2 in i meet at their mean
    dw_mid, c2_before = want, _ranges(_Net())[2]
    torch.testing.assert_close(net.dw.weight.abs().amax((1, 2, 3)), torch.sqrt(dw_mid * c2_before), rtol=1e-5, atol=0)
    torch.testing.assert_close(net.c2.weight.abs().amax((0, 2, 3)), torch.sqrt(dw_mid * c2_before), rtol=1e-5, atol=0)
    spread = lambda r: float(r.max() / r.min())  # noqa: E731
    assert spread(after_c1) < spread(r1)


def test_relu_mode_swaps_relu6_for_relu_and_skip_leaves_it():
    net = fx.symbolic_trace(_Net().eval())
    equalize(net, relu6="relu")
    assert type(net.a1) is nn.ReLU
    net = fx.symbolic_trace(_Net().eval())
    pairs = equalize(net, relu6="skip")
    assert [p.first for p in pairs] == ["dw"] and type(net.a1) is nn.ReLU6


def test_no_pair_when_the_activation_feeds_two_layers():
    class Fork(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.r, self.b, self.c = nn.Conv2d(2, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            h = self.r(self.a(x))
            return self.b(h) + self.c(h)

    assert find_pairs(fx.symbolic_trace(Fork())) == []
