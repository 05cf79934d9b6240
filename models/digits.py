"""Built-in vision models on scikit-learn's bundled 8x8 digits: a small CNN and an MLP.

The split is fixed (seeded permutation): train / calibration / eval. Weights ship in
models/weights; if a file is missing it is retrained deterministically and cached there.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sqexport.models.spec import ModelSpec

__all__ = ["DigitsCNN", "DigitsMLP", "digits_split", "build_digits_spec", "train_digits_model"]

WEIGHTS_DIR = Path(__file__).parent / "weights"
SPLIT_SEED = 0
N_CALIB = 200
N_EVAL = 450
INPUT_NAME = "pixels"


@dataclass(frozen=True)
class DigitsSplit:
    x_train: np.ndarray
    y_train: np.ndarray
    x_calib: np.ndarray
    y_calib: np.ndarray
    x_eval: np.ndarray
    y_eval: np.ndarray


def digits_split() -> DigitsSplit:
    """Images as float32 (N, 1, 8, 8) in [0, 1]; the same split on every machine."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[:, None, :, :]
    y = data.target.astype(np.int64)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    x, y = x[order], y[order]
    ev, ca = slice(0, N_EVAL), slice(N_EVAL, N_EVAL + N_CALIB)
    tr = slice(N_EVAL + N_CALIB, None)
    return DigitsSplit(x[tr], y[tr], x[ca], y[ca], x[ev], y[ev])


class DigitsCNN(nn.Module):
    """Three conv blocks (conv-BN-ReLU), a max-pool, global average pooling and a linear head."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(2 * width, 10)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(pixels), 1))


class DigitsMLP(nn.Module):
    """64 -> 256 -> 128 -> 10 with ReLU."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10)
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixels)


ARCHITECTURES = {"digits-cnn": DigitsCNN, "digits-mlp": DigitsMLP}


def train_digits_model(name: str, split: DigitsSplit, epochs: int = 40, seed: int = 0) -> nn.Module:
    """Deterministic training (fixed seed, single thread order) with Adam and light augmentation."""
    torch.manual_seed(seed)
    model = ARCHITECTURES[name]()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    x, y = torch.from_numpy(split.x_train), torch.from_numpy(split.y_train)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=gen).split(64):
            xb = x[idx] + 0.05 * torch.randn(x[idx].shape, generator=gen)
            loss = nn.functional.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return model.eval()


def load_digits_model(name: str, split: DigitsSplit) -> nn.Module:
    path = WEIGHTS_DIR / f"{name}.pt"
    if path.exists():
        model = ARCHITECTURES[name]()
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    model = train_digits_model(name, split)
    try:
        WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        tmp.replace(path)
    except OSError:
        pass  # a read-only install still works, it just retrains next time
    return model


def _batches(x: np.ndarray, size: int) -> list[dict]:
    return [{INPUT_NAME: x[i:i + size]} for i in range(0, len(x), size)]


def build_digits_spec(name: str) -> ModelSpec:
    split = digits_split()
    model = load_digits_model(name, split)
    return ModelSpec(
        name=name,
        model=model,
        task="image-classification",
        input_names=[INPUT_NAME],
        output_names=["logits"],
        example_inputs={INPUT_NAME: split.x_eval[:1]},
        calib_batches=_batches(split.x_calib, 50),
        eval_batches=_batches(split.x_eval, 150),
        eval_labels=split.y_eval,
        calib_labels=split.y_calib,
        dynamic_axes={INPUT_NAME: {0: "batch"}, "logits": {0: "batch"}},
        preprocessing={"type": "image", "layout": "NCHW", "channels": "grayscale", "size": [8, 8],
                       "scale": "pixel intensity 0..16 (sklearn digits) divided by 16 -> [0, 1]",
                       "mean": [0.0], "std": [1.0]},
        labels=[str(d) for d in range(10)],
        description=f"{ARCHITECTURES[name].__doc__.splitlines()[0]} (sklearn digits, 8x8)",
        data_info={split: {"source": f"built-in: scikit-learn digits, {split} split (seeded permutation)",
                           "samples": n, "labels": "digit 0-9", "scale": "pixel / 16 -> [0, 1]"}
                   for split, n in (("calib", N_CALIB), ("eval", N_EVAL))},
    )


if __name__ == "__main__":  # retrain and print eval accuracy: python -m sqexport.models.digits
    s = digits_split()
    for model_name in ARCHITECTURES:
        m = train_digits_model(model_name, s)
        with torch.no_grad():
            acc = (m(torch.from_numpy(s.x_eval)).argmax(1).numpy() == s.y_eval).mean()
        print(model_name, f"eval top-1 {acc:.4f}")
        WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
        torch.save(m.state_dict(), WEIGHTS_DIR / f"{model_name}.pt")
