"""Sentence pooling: how token states become one embedding, as a sentence-transformers folder says.

A sentence-transformers folder lists its modules in `modules.json`; the Pooling module's
`config.json` (usually `1_Pooling/config.json`) sets the modes (CLS token, mean, max, mean / sqrt
of the length, last token; several true = their concatenation, in sentence-transformers' order),
and a `Normalize` module divides the result by its L2 norm. Without that config an encoder is
judged on mask-weighted mean pooling, and the report says so.

Plain data plus numpy (the metric's side); exporters.pooling writes the same arithmetic into the
ONNX graph as a `sentence_embedding` output.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sqexport.contracts.errors import ModelLoadError

__all__ = ["Pooling", "MODES", "DEFAULT_POOLING", "read_pooling", "pool"]

# sentence-transformers' config keys, in the order it concatenates the modes
MODES = {"cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens", "mean": "pooling_mode_mean_tokens",
         "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens", "lasttoken": "pooling_mode_lasttoken"}
UNSUPPORTED = ("pooling_mode_weightedmean_tokens",)


@dataclass(frozen=True)
class Pooling:
    modes: tuple[str, ...] = ("mean",)
    normalize: bool = False
    source: str = "default (no sentence-transformers pooling config)"

    @property
    def from_config(self) -> bool:
        return not self.source.startswith("default")

    def to_dict(self) -> dict:
        return {"modes": list(self.modes), "normalize": self.normalize, "source": self.source}

    def __call__(self, outputs: list[np.ndarray], batch: dict) -> np.ndarray:
        """ModelSpec.postprocess: token states (outputs[0]) -> pooled embeddings."""
        return pool(outputs[0], batch.get("attention_mask"), self.modes, self.normalize)


DEFAULT_POOLING = Pooling()


def _last_index(mask: np.ndarray) -> np.ndarray:
    """Index of the last attended token per row (right or left padding alike)."""
    return mask.shape[1] - 1 - np.argmax(mask[:, ::-1] > 0, axis=1)


def pool(hidden: np.ndarray, mask: np.ndarray | None, modes: tuple[str, ...], normalize: bool) -> np.ndarray:
    hidden = hidden.astype(np.float32)
    mask = np.ones(hidden.shape[:2], np.float32) if mask is None else mask.astype(np.float32)
    m = mask[..., None]
    count = np.maximum(m.sum(1), 1e-9)
    parts = []
    for mode in modes:
        if mode == "cls":
            parts.append(hidden[:, 0])
        elif mode == "max":
            parts.append(np.where(m > 0, hidden, np.float32(-1e9)).max(1))
        elif mode == "mean":
            parts.append((hidden * m).sum(1) / count)
        elif mode == "mean_sqrt_len":
            parts.append((hidden * m).sum(1) / np.sqrt(count))
        elif mode == "lasttoken":
            parts.append(hidden[np.arange(len(hidden)), _last_index(mask)])
        else:
            raise ValueError(f"unknown pooling mode {mode!r}")
    out = np.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
    if normalize:
        out = out / np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
    return out.astype(np.float32)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path} is unreadable: {exc}") from None


def read_pooling(folder: Path) -> Pooling:
    """The folder's sentence-transformers pooling, or DEFAULT_POOLING (mean) when it has none."""
    folder = Path(folder)
    modules = folder / "modules.json"
    if not modules.is_file():
        return DEFAULT_POOLING
    entries = _read_json(modules)
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ModelLoadError(f"{modules}: expected a list of modules")
    kinds = [str(e.get("type", "")).rsplit(".", 1)[-1] for e in entries]
    pooling_entry = next((e for e, k in zip(entries, kinds) if k == "Pooling"), None)
    if pooling_entry is None:
        return DEFAULT_POOLING
    config_path = folder / str(pooling_entry.get("path", "")) / "config.json"
    config = _read_json(config_path)
    if not isinstance(config, dict):
        raise ModelLoadError(f"{config_path}: expected a JSON object")
    unsupported = [k for k in UNSUPPORTED if config.get(k)]
    if unsupported:
        raise ModelLoadError(f"{config_path}: {', '.join(unsupported)} is not supported; "
                             f"supported pooling: {', '.join(MODES)}")
    modes = tuple(mode for mode, key in MODES.items() if config.get(key))
    if not modes:
        raise ModelLoadError(f"{config_path}: no pooling mode is true ({', '.join(MODES.values())})")
    rel = config_path.relative_to(folder).as_posix()
    normalize = "Normalize" in kinds
    return Pooling(modes, normalize, f"sentence-transformers {rel}" + (" + Normalize" if normalize else ""))
