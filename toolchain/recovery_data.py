"""Sample pools for recovery: batches drawn with augmentation from the available data."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from sqexport.models.text_data import MAX_LENGTH

__all__ = ["Pool", "ImagePool", "TensorPool", "TextPool", "make_pool"]

MIX_PROB = 0.3  # share of text samples that are two texts joined into one (sentence mixing)
TOKEN_DROP = 0.1  # probability that a (non-special) token is dropped
# probability that a kept token is replaced by one drawn from the pool's own tokens (unigram):
# new contexts for every token the student sees, so it matches the teacher's function around
# the training texts instead of memorizing their few hundred sequences
TOKEN_REPLACE = 0.1


class Pool:
    encoder: bool = False
    size: int = 0

    def sample(self, n: int, gen: torch.Generator) -> tuple[dict, torch.Tensor | None]:
        raise NotImplementedError


@dataclass
class TensorPool(Pool):
    """Any tensors (one array per input name), sampled without augmentation."""

    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None = None

    def __post_init__(self):
        self.size = len(next(iter(self.arrays.values())))

    def _pick(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.size, (min(n, self.size),), generator=gen)

    def sample(self, n, gen):
        idx = self._pick(n, gen).numpy()
        batch = {k: torch.from_numpy(np.ascontiguousarray(v[idx])) for k, v in self.arrays.items()}
        return batch, (torch.from_numpy(self.labels[idx]) if self.labels is not None else None)


@dataclass
class ImagePool(TensorPool):
    """One NCHW float input: random shifts (pad by `shift`, crop back), flips when unlabeled."""

    shift: int = 2

    def sample(self, n, gen):
        batch, labels = super().sample(n, gen)
        (name, x), = batch.items()
        h, w = x.shape[-2:]
        s = self.shift
        padded = torch.nn.functional.pad(x, (s, s, s, s))
        dy = torch.randint(0, 2 * s + 1, (len(x),), generator=gen)
        dx = torch.randint(0, 2 * s + 1, (len(x),), generator=gen)
        out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(len(x))])
        if labels is None:  # a flipped image may not keep its label; without labels it is fair game
            flip = torch.rand(len(x), generator=gen) < 0.5
            out[flip] = out[flip].flip(-1)
        return {name: out}, labels


@dataclass
class TextPool(Pool):
    """Token sequences (padding stripped); each sample may be mixed with another and loses tokens."""

    sequences: list[list[int]]
    input_names: list[str]
    max_length: int = 128
    pad_id: int = 0
    labels: np.ndarray | None = None
    encoder: bool = True
    size: int = field(init=False, default=0)

    def __post_init__(self):
        self.size = len(self.sequences)
        # every non-special token of the pool, with repeats: drawing uniformly from it draws by frequency
        self._tokens = torch.tensor([t for s in self.sequences for t in s[1:-1]] or [self.pad_id], dtype=torch.int64)

    def _augment(self, seq: list[int], other: list[int] | None, gen: torch.Generator,
                 replace_prob: float = TOKEN_REPLACE) -> list[int]:
        if other is not None:  # [CLS] a ... [SEP] + b ... [SEP] -> one longer text
            seq = seq[:-1] + other[1:]
        body = seq[1:-1]
        keep = (torch.rand(len(body), generator=gen) >= TOKEN_DROP).tolist()
        body = [t for t, k in zip(body, keep) if k] or body[:1]
        replace = (torch.rand(len(body), generator=gen) < replace_prob).tolist()
        if any(replace):
            new = self._tokens[torch.randint(0, len(self._tokens), (len(body),), generator=gen)].tolist()
            body = [n if r else t for t, n, r in zip(body, new, replace)]
        seq = [seq[0]] + body[:self.max_length - 2] + [seq[-1]]
        return seq

    def sample(self, n, gen):
        idx = torch.randint(0, self.size, (min(n, self.size),), generator=gen).tolist()
        mix = (torch.rand(len(idx), generator=gen) < MIX_PROB).tolist()
        partners = torch.randint(0, self.size, (len(idx),), generator=gen).tolist()
        # mixing and replacement only without labels: either could change what a label says
        unlabeled = self.labels is None
        seqs = [self._augment(self.sequences[i], self.sequences[p] if m and unlabeled else None, gen,
                              TOKEN_REPLACE if unlabeled else 0.0)
                for i, m, p in zip(idx, mix, partners)]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.int64)
        mask = torch.zeros((len(seqs), width), dtype=torch.int64)
        for r, s in enumerate(seqs):
            ids[r, :len(s)] = torch.tensor(s)
            mask[r, :len(s)] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.input_names:
            batch["token_type_ids"] = torch.zeros_like(ids)
        batch = {k: v for k, v in batch.items() if k in self.input_names}
        return batch, (torch.from_numpy(self.labels[idx]) if self.labels is not None else None)


def _sequences(batches: list[dict]) -> tuple[list[list[int]], int]:
    seqs, pad = [], 0
    for b in batches:
        ids, mask = b["input_ids"], b["attention_mask"]
        if (mask == 0).any():
            pad = int(ids[mask == 0][0])
        seqs += [row[m.astype(bool)].tolist() for row, m in zip(ids, mask)]
    return seqs, pad


def make_pool(batches: list[dict], labels: np.ndarray | None, text: bool, encoder: bool) -> Pool:
    """Pool over a spec's batches: text (token ids), an image (one NCHW float input) or tensors."""
    if text:
        seqs, pad = _sequences(batches)
        names = list(batches[0])
        # no longer than the data: a model with fewer positions than MAX_LENGTH had its texts cut to them
        return TextPool(seqs, names, min(MAX_LENGTH, max(map(len, seqs), default=2)), pad, labels, encoder)
    arrays = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    if len(arrays) == 1:
        x = next(iter(arrays.values()))
        if x.ndim == 4 and x.dtype == np.float32:
            return ImagePool(arrays, labels, shift=max(1, x.shape[-1] // 14))
    return TensorPool(arrays, labels)
