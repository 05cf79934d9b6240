"""Recovery: distillation fine-tuning of the pruned student from the dense teacher.

- classifiers: KL(student || teacher) on temperature-softened logits (T^2-scaled, Hinton et al.),
  plus cross-entropy where labels exist;
- encoders (Hugging Face feature extraction): MSE between every hidden state of student and
  teacher (head/FFN pruning keeps the hidden size, so layers line up one to one) plus
  1 - cosine of the mean-pooled embeddings, the metric the report gates on.

Augmentation keeps a small calibration set from being memorized: random shifts (crop of a padded
image) for images, plus horizontal flips when there are no labels (a flipped digit is not the same
digit, but matching the teacher on it is still information); token dropout and sentence mixing
(two texts joined into one) for text. Bounded by steps and minutes; seeded; on CUDA only when
torch sees a GPU.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from contracts.errors import ConfigError
from toolchain.recovery_data import Pool, make_pool

__all__ = ["RecoveryConfig", "recover", "distill_loss"]


@dataclass(frozen=True)
class RecoveryConfig:
    """`steps`: optimizer steps (None = as many as `minutes` allows); `minutes`: wall-clock budget;
    `lr`: AdamW learning rate (cosine-decayed); `batch_size`: samples per step; `temperature`:
    KL temperature for classifiers; `label_weight`: weight of the task loss when labels exist."""

    steps: int | None = None
    minutes: float = 10.0
    lr: float = 1e-3
    batch_size: int = 64
    temperature: float = 2.0
    label_weight: float = 0.5
    data: str | None = None  # extra unlabeled/labeled data file (same formats as --calib-data)
    VERSION: ClassVar[int] = 1
    kind: ClassVar[str] = "recover"
    requires_calibration: ClassVar[bool] = True  # the calibration split is its training data

    def __post_init__(self):
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"recovery steps must be >= 1, got {self.steps}")
        if not self.minutes > 0:
            raise ConfigError(f"recovery minutes must be > 0, got {self.minutes}")
        if self.data is not None and not str(self.data).strip():
            raise ConfigError("recovery data path is empty")
        if not self.lr > 0 or self.batch_size < 1 or not self.temperature > 0:
            raise ConfigError("recovery needs lr > 0, batch_size >= 1 and temperature > 0")


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def _forward(model: nn.Module, batch: dict, encoder: bool):
    if encoder:
        out = model(**batch, output_hidden_states=True)
        return out.hidden_states
    out = model(**batch)
    if isinstance(out, torch.Tensor):
        return out
    return out["logits"] if hasattr(out, "keys") else out[0]


def distill_loss(student_out, teacher_out, batch: dict, labels: torch.Tensor | None, config: RecoveryConfig,
                 encoder: bool) -> torch.Tensor:
    if encoder:
        mask = batch["attention_mask"]
        mse = sum(F.mse_loss(s, t) for s, t in zip(student_out, teacher_out)) / len(student_out)
        cos = F.cosine_similarity(_mean_pool(student_out[-1], mask), _mean_pool(teacher_out[-1], mask), dim=-1)
        return mse + (1.0 - cos).mean()
    t = config.temperature
    kl = F.kl_div(F.log_softmax(student_out / t, -1), F.log_softmax(teacher_out / t, -1),
                  log_target=True, reduction="batchmean") * t * t
    if labels is None:
        return kl
    return (1 - config.label_weight) * kl + config.label_weight * F.cross_entropy(student_out, labels)


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _set_train(model: nn.Module, train: bool) -> None:
    model.train(train)
    for p in model.parameters():
        p.requires_grad_(train)


def recover(student: nn.Module, teacher: nn.Module, pool: Pool, config: RecoveryConfig, seed: int = 0,
            evaluate: Callable[[nn.Module], float] | None = None, progress: Callable | None = None) -> dict:
    """Fine-tune `student` in place; returns the report's `recovery` section."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    device = _device()
    before = evaluate(student) if evaluate else None
    student.to(device)
    teacher.to(device).eval()
    _set_train(student, True)
    for p in teacher.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=config.lr, weight_decay=0.0)
    max_steps = config.steps or 10 ** 9
    budget = config.minutes * 60.0
    curve, t0, step = [], time.perf_counter(), 0
    try:
        while step < max_steps and time.perf_counter() - t0 < budget:
            # cosine decay over the step budget (or over the time budget when steps are open-ended)
            frac = step / max_steps if config.steps else (time.perf_counter() - t0) / budget
            for group in opt.param_groups:
                group["lr"] = config.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
            batch, labels = pool.sample(config.batch_size, gen)
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = labels.to(device) if labels is not None else None
            with torch.no_grad():
                t_out = _forward(teacher, batch, pool.encoder)
            loss = distill_loss(_forward(student, batch, pool.encoder), t_out, batch, labels, config, pool.encoder)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            curve.append(float(loss.detach()))
            if progress:
                progress(step, config.steps, time.perf_counter() - t0, budget, curve[-1])
    finally:
        _set_train(student, False)
        student.to("cpu")
        teacher.to("cpu")
    after = evaluate(student) if evaluate else None
    return {"steps": step, "seconds": round(time.perf_counter() - t0, 2), "device": device.type,
            "samples": pool.size, "metric_before": before, "metric_after": after,
            "loss_curve": _thin(curve), "loss_first": curve[0] if curve else None,
            "loss_last": float(np.mean(curve[-10:])) if curve else None}


def _thin(curve: list[float], points: int = 100) -> list[list[float]]:
    """[step, loss] pairs, at most `points` of them (moving mean over each stretch)."""
    if not curve:
        return []
    stride = max(1, len(curve) // points)
    return [[i + stride, round(float(np.mean(curve[i:i + stride])), 6)] for i in range(0, len(curve), stride)]


__all__ += ["make_pool", "Pool"]
