"""Layer-wise distillation for encoders (TinyBERT / CoFi / MiniLM-style intermediate targets).

Head and FFN-neuron removal keeps the hidden size, so student and teacher line up layer by layer.
The student is matched on
- every layer's output hidden state and every attention sublayer's output (what the pruned heads
  fed into the residual stream), on the real tokens only: padding positions carry no meaning and
  would take capacity away from the tokens the metric pools;
- the mean-pooled sentence embedding, by 1 - cosine (the metric the report gates on) plus MSE.

Each term is a relative MSE, sum ||s - t||^2 / sum ||t||^2: the residual stream of a BERT grows
from layer to layer (MiniLM: from ~1 to ~10 in RMS, with a few outlier dimensions), and a plain
MSE would weight the deep layers by that growth alone.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sqexport.contracts.errors import ConfigError

__all__ = ["EncoderOutputs", "LossWeights", "encoder_forward", "encoder_loss", "attention_modules"]


@dataclass(frozen=True)
class LossWeights:
    hidden: float = 1.0  # every layer's output hidden state
    attention: float = 1.0  # every attention sublayer's output
    cosine: float = 1.0  # 1 - cosine of the pooled embedding
    pooled_mse: float = 1.0  # relative MSE of the pooled embedding


@dataclass
class EncoderOutputs:
    hidden: tuple[torch.Tensor, ...]  # embeddings, then each layer's output
    attention: list[torch.Tensor]  # each attention sublayer's output (may be empty)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention sublayers of a BERT-style encoder ([] for other architectures: the loss then
    uses hidden states only)."""
    from sqexport.toolchain.pruning.transformer_structured import encoder_layers

    try:
        return [lay.attention for lay in encoder_layers(model)]
    except ConfigError:
        return []


@contextmanager
def _tap(modules: list[nn.Module]):
    got: list[torch.Tensor] = []

    def hook(_mod, _args, out):
        got.append(out[0] if isinstance(out, (tuple, list)) else out)

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        yield got
    finally:
        for h in handles:
            h.remove()


def encoder_forward(model: nn.Module, batch: dict, attention: list[nn.Module] | None = None) -> EncoderOutputs:
    with _tap(attention or []) as got:
        out = model(**batch, output_hidden_states=True)
    return EncoderOutputs(tuple(out.hidden_states), list(got))


def _relative_mse(s: torch.Tensor, t: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """sum over real tokens ||s - t||^2 / sum ||t||^2 (m: [batch, tokens, 1] of 0/1)."""
    return ((s - t).pow(2) * m).sum() / (t.pow(2) * m).sum().clamp_min(1e-12)


def _mean_pool(hidden: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def encoder_loss(student: EncoderOutputs, teacher: EncoderOutputs, attention_mask: torch.Tensor,
                 weights: LossWeights = LossWeights()) -> torch.Tensor:
    m = attention_mask.unsqueeze(-1).to(teacher.hidden[-1].dtype)
    # hidden[0] (the embeddings) is not touched by head/neuron removal; it still counts so that a
    # model whose embeddings were changed (e.g. low-rank) is pulled back there too
    pairs = list(zip(student.hidden, teacher.hidden))
    loss = weights.hidden * sum(_relative_mse(s, t, m) for s, t in pairs) / len(pairs)
    if weights.attention and student.attention and len(student.attention) == len(teacher.attention):
        att = sum(_relative_mse(s, t, m) for s, t in zip(student.attention, teacher.attention))
        loss = loss + weights.attention * att / len(student.attention)
    ps, pt = _mean_pool(student.hidden[-1], m), _mean_pool(teacher.hidden[-1], m)
    cos = F.cosine_similarity(ps, pt, dim=-1).mean()
    pooled = (ps - pt).pow(2).sum() / pt.pow(2).sum().clamp_min(1e-12)
    return loss + weights.cosine * (1.0 - cos) + weights.pooled_mse * pooled
