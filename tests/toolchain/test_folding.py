"""BN folding keeps outputs and pruned zeros."""
import torch
from torch import nn

from sqexport.toolchain.folding import copy_for_compression, fold_batchnorm


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU())
    with torch.no_grad():
        net[0].weight[net[0].weight.abs() < 0.1] = 0.0
        net[1].running_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
        net[1].running_var.copy_(torch.tensor([0.5, 2.0, 1.0, 4.0]))
        net[1].weight.copy_(torch.tensor([1.5, -0.5, 2.0, 0.0]))
    return net.eval()


def test_fold_keeps_outputs_and_zeros():
    net = _net()
    zeros = net[0].weight == 0
    assert zeros.any()
    fused, folded = fold_batchnorm(net)
    assert folded == 1
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    x = torch.randn(3, 2, 6, 6)
    torch.testing.assert_close(fused(x), net(x), atol=1e-5, rtol=1e-5)
    conv = next(m for m in fused.modules() if isinstance(m, nn.Conv2d))
    assert (conv.weight[zeros] == 0).all()


def test_no_bn_is_a_no_op():
    lin = nn.Linear(2, 2)
    assert fold_batchnorm(lin) == (lin, 0)


def test_copy_for_compression_is_independent_and_frozen():
    net = _net()
    work = copy_for_compression(net)
    with torch.no_grad():
        work[0].weight.zero_()
    assert net[0].weight.abs().sum() > 0
    assert not any(p.requires_grad for p in work.parameters())
