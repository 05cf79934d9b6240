"""Text data for Hugging Face models: .txt (one text per line) or .jsonl ({"text", "label"})."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from contracts.errors import DataError

__all__ = ["read_texts", "tokenize_batches", "MAX_LENGTH", "BATCH_SIZE"]

MAX_LENGTH = 128
BATCH_SIZE = 16


def read_texts(path: Path, label2id: dict | None = None) -> tuple[list[str], np.ndarray | None]:
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    if path.suffix == ".txt":
        texts = [line.strip() for line in raw.splitlines() if line.strip()]
        labels = None
    elif path.suffix == ".jsonl":
        texts, labels = [], []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"{path}:{n}: not valid JSON") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise DataError(f'{path}:{n}: each line needs a "text" string')
            texts.append(row["text"])
            labels.append(row.get("label"))
        if all(lab is None for lab in labels):
            labels = None
        elif any(lab is None for lab in labels):
            raise DataError(f'{path}: "label" must be on every line or on none')
        else:
            labels = np.array([_label_id(lab, label2id, path) for lab in labels], np.int64)
    else:
        raise DataError(f"{path}: text data must be .txt or .jsonl, got '{path.suffix or 'no suffix'}'")
    if not texts:
        raise DataError(f"{path}: no texts found")
    return texts, labels


def _label_id(label, label2id: dict | None, path: Path) -> int:
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        raise DataError(f"{path}: labels must be integers or label names, got {label!r}")
    if isinstance(label, int):
        return label
    if label2id and label in label2id:
        return int(label2id[label])
    raise DataError(f"{path}: unknown label '{label}'; the model knows {', '.join(map(str, label2id or {}))}")


def tokenize_batches(tokenizer, texts: list[str], input_names: list[str], batch_size: int = BATCH_SIZE,
                     max_length: int = MAX_LENGTH, pad_to_max: bool = False) -> list[dict]:
    batches = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], padding="max_length" if pad_to_max else True,
                        truncation=True, max_length=max_length, return_tensors="np")
        batches.append({k: np.asarray(enc[k], np.int64) for k in input_names if k in enc})
    return batches
