"""Recovery: distillation fine-tuning of the pruned student from the dense teacher.

- classifiers: KL(student || teacher) on temperature-softened logits (T^2-scaled, Hinton et al.),
  plus cross-entropy where labels exist;
- encoders (Hugging Face feature extraction): MSE between every hidden state of student and
  teacher (head/FFN pruning keeps the hidden size, so layers line up one to one) plus
  1 - cosine of the mean-pooled embeddings, the metric the report gates on.

Augmentation keeps a small calibration set from being memorized: random shifts (crop of a padded
image) for images, plus horizontal flips when there are no labels (a flipped digit is not the same
digit, but matching the teacher on it is still information); token dropout, sentence mixing
(two texts joined into one) and token replacement for text. Embedding lookup tables stay
frozen. Bounded by steps and minutes; seeded; on CUDA only when torch sees a GPU.

The report also gives the metric on training samples: held-out low with training high is a
generalization gap (more data or augmentation helps), both low an optimization one (more steps
help). The MiniLM case that motivated it is in benchmarks/results/structured-runs.md.
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

from sqexport.contracts.errors import ConfigError
from sqexport.toolchain.recovery_data import Pool, TextPool, make_pool
from sqexport.toolchain.recovery_threads import ThreadPicker
from sqexport.toolchain.recovery_encoder import EncoderOutputs, LossWeights, attention_modules, encoder_forward, encoder_loss

__all__ = ["RecoveryConfig", "recover", "distill_loss", "lr_factor", "LOSS_WEIGHTS"]

LOSS_WEIGHTS = LossWeights()  # encoders: see recovery_encoder.py


@dataclass(frozen=True)
class RecoveryConfig:
    """`steps`: optimizer steps (None = as many as `minutes` allows); `minutes`: wall-clock budget;
    `lr`: AdamW peak learning rate, warm-up then cosine decay (None: 1e-3 for CNNs and tensors,
    1e-4 for transformers on text; with the layer-wise loss, 100 steps on MiniLM at 50% heads + FFN
    gave 0.830 held-out mean cosine at 1e-4, 0.829 at 3e-4, 0.826 at 5e-5 with the old loss; at
    1e-3 without warm-up two steps took it from 0.82 to 0.71); `batch_size`: samples per step (None: 64 images or
    tensors, 16 texts: a text step costs far more on CPU); `temperature`:
    KL temperature for classifiers; `label_weight`: weight of the task loss when labels exist;
    `threads`: torch threads on CPU (None: measured, recovery_threads.py); `warmup`: share of the
    budget with a linear warm-up; `freeze_embeddings`: keep token/position embedding tables
    (nn.Embedding) fixed, see `_freeze_embeddings`."""

    steps: int | None = None
    minutes: float = 10.0
    lr: float | None = None
    batch_size: int | None = None
    temperature: float = 2.0
    label_weight: float = 0.5
    threads: int | None = None  # torch threads on CPU; None: all cores or 1, whichever measures faster
    warmup: float = 0.05  # share of the budget (steps, or minutes when steps are open) with linear warm-up
    data: str | None = None  # extra unlabeled/labeled data file (same formats as --calib-data)
    freeze_embeddings: bool = True
    VERSION: ClassVar[int] = 3  # 3: embedding tables frozen, token replacement; 2: layer-wise encoder loss, warm-up
    kind: ClassVar[str] = "recover"
    requires_calibration: ClassVar[bool] = True  # the calibration split is its training data

    def __post_init__(self):
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"recovery steps must be >= 1, got {self.steps}")
        if not self.minutes > 0:
            raise ConfigError(f"recovery minutes must be > 0, got {self.minutes}")
        if self.data is not None and not str(self.data).strip():
            raise ConfigError("recovery data path is empty")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"recovery threads must be >= 1, got {self.threads}")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"recovery warmup must be in [0, 1), got {self.warmup}")
        bad_lr = self.lr is not None and not self.lr > 0
        if bad_lr or (self.batch_size is not None and self.batch_size < 1) or not self.temperature > 0:
            raise ConfigError("recovery needs lr > 0, batch_size >= 1 and temperature > 0")


def _forward(model: nn.Module, batch: dict, encoder: bool, attention: list[nn.Module] | None = None):
    if encoder:
        return encoder_forward(model, batch, attention)
    out = model(**batch)
    if isinstance(out, torch.Tensor):
        return out
    return out["logits"] if hasattr(out, "keys") else out[0]


def distill_loss(student_out, teacher_out, batch: dict, labels: torch.Tensor | None, config: RecoveryConfig,
                 encoder: bool) -> torch.Tensor:
    if encoder:  # EncoderOutputs, or a tuple of hidden states
        wrap = (lambda o: o if isinstance(o, EncoderOutputs) else EncoderOutputs(tuple(o), []))
        return encoder_loss(wrap(student_out), wrap(teacher_out), batch["attention_mask"], LOSS_WEIGHTS)
    t = config.temperature
    kl = F.kl_div(F.log_softmax(student_out / t, -1), F.log_softmax(teacher_out / t, -1),
                  log_target=True, reduction="batchmean") * t * t
    if labels is None:
        return kl
    return (1 - config.label_weight) * kl + config.label_weight * F.cross_entropy(student_out, labels)


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _set_train(model: nn.Module, train: bool, dropout: bool = True) -> None:
    """`dropout=False` keeps the modules in eval mode while the weights train: an encoder matching
    its teacher token by token gains nothing from dropout noise in a few hundred steps."""
    model.train(train and dropout)
    for p in model.parameters():
        p.requires_grad_(train)


def _freeze_embeddings(model: nn.Module) -> int:
    """Stops training of the lookup tables (nn.Embedding); returns how many parameters that holds
    fixed. A table only learns the rows the recovery data uses (MiniLM: 30k-token vocabulary, half
    of its parameters, a few thousand tokens in the recovery texts): trained, those rows drift while
    the rest stay, and held-out texts use both. Pruning heads, FFN neurons or channels never
    changes these tables, so the teacher's are right as they are."""
    frozen = 0
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            for p in module.parameters(recurse=False):
                if p.requires_grad:
                    p.requires_grad_(False)
                    frozen += p.numel()
    return frozen


def lr_factor(frac: float, warmup: float) -> float:
    """Linear warm-up over the first `warmup` of the budget, then cosine decay to 0 (frac in [0, 1]):
    the usual fine-tuning schedule; the warm-up keeps AdamW's first, poorly scaled steps small."""
    frac = min(max(frac, 0.0), 1.0)
    if frac < warmup:
        return (frac + 1e-3) / warmup
    return 0.5 * (1 + math.cos(math.pi * (frac - warmup) / max(1e-9, 1 - warmup)))


def _mask_keeper(student: nn.Module, masks: dict[str, torch.Tensor] | None) -> Callable[[], None]:
    """Re-applies pruning masks (module name -> 1 = kept) after each optimizer step, so pruned
    weights stay exact zeros; masks whose layer changed shape (removed channels) are skipped."""
    modules = dict(student.named_modules())
    pairs = [(modules[n].weight, m.bool()) for n, m in (masks or {}).items()
             if n in modules and getattr(modules[n], "weight", None) is not None and modules[n].weight.shape == m.shape]

    @torch.no_grad()
    def reapply():
        for weight, mask in pairs:
            weight.mul_(mask.to(weight.device, weight.dtype))

    return reapply


def recover(student: nn.Module, teacher: nn.Module, pool: Pool, config: RecoveryConfig, seed: int = 0,
            evaluate: Callable[[nn.Module], float] | None = None, progress: Callable | None = None,
            masks: dict[str, torch.Tensor] | None = None,
            evaluate_train: Callable[[nn.Module], float] | None = None) -> dict:
    """Fine-tune `student` in place; returns the report's `recovery` section. `masks` (module name
    -> 1 = kept) are re-applied after every optimizer step. `evaluate_train` measures the same
    metric on (unaugmented) training samples: with `evaluate` (held out) it tells an optimization
    gap (both low) from a generalization gap (training high, held-out low)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    device = _device()
    before = evaluate(student) if evaluate else None
    train_before = evaluate_train(student) if evaluate_train else None
    student.to(device)
    keep_masks = _mask_keeper(student, masks)
    teacher.to(device).eval()
    _set_train(student, True, dropout=not pool.encoder)
    frozen = _freeze_embeddings(student) if config.freeze_embeddings else 0
    taps = (attention_modules(student), attention_modules(teacher)) if pool.encoder else (None, None)
    for p in teacher.parameters():
        p.requires_grad_(False)
    text = isinstance(pool, TextPool)
    batch_size = config.batch_size or (16 if text else 64)
    lr = config.lr or (1e-4 if text else 1e-3)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    max_steps = config.steps or 10 ** 9
    budget = config.minutes * 60.0
    curve, t0, step = [], time.perf_counter(), 0
    picker = ThreadPicker(config.threads if device.type == "cpu" else 1)
    try:
        while step < max_steps and time.perf_counter() - t0 < budget:
            picker.before(step)
            t_step = time.perf_counter()
            # cosine decay over the step budget (or over the time budget when steps are open-ended)
            frac = step / max_steps if config.steps else (time.perf_counter() - t0) / budget
            for group in opt.param_groups:
                group["lr"] = lr * lr_factor(frac, config.warmup)
            batch, labels = pool.sample(batch_size, gen)
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = labels.to(device) if labels is not None else None
            with torch.no_grad():
                t_out = _forward(teacher, batch, pool.encoder, taps[1])
            loss = distill_loss(_forward(student, batch, pool.encoder, taps[0]), t_out, batch, labels, config,
                                pool.encoder)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            keep_masks()
            picker.after(step, time.perf_counter() - t_step, _work(batch))
            step += 1
            curve.append(float(loss.detach()))
            if progress:
                progress(step, config.steps, time.perf_counter() - t0, budget, curve[-1])
    finally:
        picker.restore()
        _set_train(student, False)
        student.to("cpu")
        teacher.to("cpu")
    after = evaluate(student) if evaluate else None
    train_after = evaluate_train(student) if evaluate_train else None
    return {"steps": step, "seconds": round(time.perf_counter() - t0, 2), "device": device.type,
            "samples": pool.size, "frozen_params": frozen, **picker.record(), "metric_before": before, "metric_after": after,
            "train_metric_before": train_before, "train_metric_after": train_after,
            "loss_curve": _thin(curve), "loss_first": curve[0] if curve else None,
            "loss_last": float(np.mean(curve[-10:])) if curve else None}


def _work(batch: dict) -> int:
    """A step's amount of work: its (padded) tokens for text, its samples otherwise."""
    if "input_ids" in batch:
        return int(batch["input_ids"].numel())
    return len(next(iter(batch.values())))


def _thin(curve: list[float], points: int = 100) -> list[list[float]]:
    """[step, loss] pairs, at most `points` of them (moving mean over each stretch)."""
    if not curve:
        return []
    stride = max(1, len(curve) // points)
    return [[i + stride, round(float(np.mean(curve[i:i + stride])), 6)] for i in range(0, len(curve), stride)]


__all__ += ["make_pool", "Pool"]
