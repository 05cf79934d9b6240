"""Bias correction (Nagel et al. 2019, section 4.2): quantized weights shift each output channel's
mean by E[(W_q - W) x]; subtracting that from the bias removes the shift.

E is taken over calibration data, streamed: per layer we keep only the running sum of its input
over the batch (one input-sized map, not the activations), then one convolution of the mean input
with dW = W_q - W gives the expected error at every output position (zero padding included), whose
spatial mean per channel is the correction. Linear layers use the mean input vector. Inputs come
from the FP32 model, as in the paper's data-driven variant.
"""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from sqexport.toolchain.hooks import run_with_hooks
from sqexport.contracts.quant import WeightQuant

__all__ = ["bias_corrections"]


class _MeanInput:
    def __init__(self):
        self.sum: torch.Tensor | None = None
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double()
        # token / batch dims of a Linear input fold into the sample count
        flat = x.reshape(-1, x.shape[-1]) if x.dim() != 4 else x
        s = flat.sum(0)
        self.sum = s if self.sum is None else self.sum + s
        self.count += flat.shape[0]

    def mean(self) -> torch.Tensor:
        return self.sum / self.count


@torch.no_grad()
def bias_corrections(model: nn.Module, weights: dict[str, WeightQuant], batches: Iterable,
                     run: Callable) -> dict[str, np.ndarray]:
    """module name -> corrected float bias, for the Conv2d / Linear modules in `weights` that have
    a bias. `model` is not modified."""
    modules = dict(model.named_modules())
    names = [n for n in weights if isinstance(modules.get(n), (nn.Conv2d, nn.Linear)) and modules[n].bias is not None]
    stats = {n: _MeanInput() for n in names}
    handles = [modules[n].register_forward_pre_hook(lambda m, args, s=stats[n]: s.update(args[0])) for n in names]
    run_with_hooks(model, handles, batches, run)
    out = {}
    for n in names:
        mod, st = modules[n], stats[n]
        if st.sum is None:
            continue
        dw = torch.from_numpy(weights[n].dequantized()).double() - mod.weight.detach().double()
        mean_in = st.mean()
        if isinstance(mod, nn.Conv2d):
            err = nn.functional.conv2d(mean_in[None], dw, None, mod.stride, mod.padding, mod.dilation, mod.groups)
            err = err[0].mean(dim=(1, 2))
        else:
            err = dw @ mean_in
        out[n] = (mod.bias.detach().double() - err).float().numpy()
    return out
