"""Which integer grid int8 weights get: the host's unless the recipe says otherwise."""
import numpy as np
import pytest
import torch
from torch import nn

from sqexport.contracts.quant import Anchor
from sqexport.contracts.weight_grid import WeightGrid, pair_violations, reduction_pairs
from sqexport.toolchain.quantization.int8 import Int8DynamicConfig, quantize_dynamic
from sqexport.toolchain.stages import QuantContext

AVX2 = WeightGrid(127, pair_limit=128)
VNNI = WeightGrid(127)


def _quantize(host: WeightGrid, **config):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32)).eval()
    ctx = QuantContext([Anchor("0", dynamic_ok=True)], [], None, weight_grid=host)
    return quantize_dynamic(model, Int8DynamicConfig(**config), ctx)


@pytest.mark.parametrize("host, config, grid", [
    (AVX2, {}, AVX2),
    (VNNI, {}, VNNI),
    (AVX2, {"reduce_range": True}, WeightGrid(63)),
    (AVX2, {"reduce_range": False}, AVX2),  # full range stays exact on that host
    (AVX2, {"pair_limit": False}, VNNI),  # lifted: the user's call
    (VNNI, {"pair_limit": True}, AVX2),  # built here for x86 CPUs without VNNI
    (VNNI, {"reduce_range": True, "pair_limit": True}, WeightGrid(63)),  # 7-bit pairs never reach the limit
])
def test_the_recipe_can_change_the_hosts_grid(host, config, grid):
    params = _quantize(host, **config)
    assert params.weight_grid == grid
    q = params.weights["0"].q
    if grid.pair_limit is None:
        assert np.abs(q).max() == grid.qmax
    else:  # uniform weights: many pairs near the limit, so channels pick a smaller qmax than 127
        assert not pair_violations(reduction_pairs(q)).any() and 64 <= np.abs(q).max() < 127
