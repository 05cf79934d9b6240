"""A model held in float16 or bfloat16 (a half-precision checkpoint) is converted exactly to
float32, the precision sqexport calibrates and quantizes in, and the report says so."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from sqexport.models.user_model import load_module_model


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).eval()


@pytest.mark.parametrize("dtype, name", [(torch.float16, "float16"), (torch.bfloat16, "bfloat16")])
def test_half_precision_modules_run_in_float32_with_their_own_weights(dtype, name):
    module = _net().to(dtype)
    spec = load_module_model(module, input_shapes={None: (1, 3, 8, 8)})
    assert spec.source["precision"]["from"] == [name] and spec.source["precision"]["to"] == "float32"
    assert all(p.dtype == torch.float32 for p in spec.model.parameters())
    conv = next(m for m in spec.model.modules() if isinstance(m, nn.Conv2d))
    torch.testing.assert_close(conv.weight, module[0].weight.float(), rtol=0, atol=0)  # exact
    assert next(module.parameters()).dtype == dtype  # the caller's module is left as it was


def test_a_float16_example_goes_with_a_float16_module():
    module = _net().half()
    spec = load_module_model(module, example_inputs=torch.rand(2, 3, 8, 8).half())
    assert [v.dtype for v in spec.example_inputs.values()] == [np.float32]


def test_float32_models_have_no_precision_record():
    assert "precision" not in load_module_model(_net(), input_shapes={None: (1, 3, 8, 8)}).source
