"""Train the built-in `mnist-resnet` on the MNIST training split (50k) and save its weights.

    python -m sqexport.models.train_mnist_resnet [--epochs 1] [--threads 1]

Deterministic: fixed seeds, torch.use_deterministic_algorithms, a fixed thread count (the same
thread count gives the same weights; reductions are summed in a thread-dependent order).
Prints validation and test top-1 after training.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from sqexport.models.mnist_resnet import WEIGHTS, MnistResNet, load_mnist

__all__ = ["train", "evaluate"]


def _shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translation by up to `max_shift` pixels (pad, then crop), one offset per image."""
    n = x.shape[0]
    padded = F.pad(x, (max_shift,) * 4)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(28)[None, :])  # (n, 28)
    cols = (dx[:, None] + torch.arange(28)[None, :])
    idx = torch.arange(n)[:, None, None]
    return padded[:, 0][idx, rows[:, :, None], cols[:, None, :]][:, None]


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, batch: int = 1000) -> float:
    model.eval()
    pred = np.concatenate([model(torch.from_numpy(x[i:i + batch])).argmax(1).numpy()
                           for i in range(0, len(x), batch)])
    return float((pred == y).mean())


def train(epochs: int = 2, seed: int = 0, batch: int = 128, lr: float = 0.2, log=print) -> MnistResNet:
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    data = load_mnist()
    model = MnistResNet()
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    steps = epochs * ((len(x) + batch - 1) // batch)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.25)
    gen = torch.Generator().manual_seed(seed)
    step, t0 = 0, time.perf_counter()
    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            loss = F.cross_entropy(model(_shift(x[idx], gen)), y[idx], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 20 == 0:
                log(f"epoch {epoch} step {step}/{steps} loss {loss.item():.4f} {time.perf_counter() - t0:.0f}s")
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = train(args.epochs, args.seed)
    data = load_mnist()
    print(f"validation top-1 {evaluate(model, data.x_val, data.y_val):.4f}  "
          f"test top-1 {evaluate(model, data.x_test, data.y_test):.4f}")
    WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = WEIGHTS.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(WEIGHTS)
    print(f"saved {WEIGHTS}")


if __name__ == "__main__":
    main()
