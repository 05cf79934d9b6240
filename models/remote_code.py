"""Does a Hugging Face folder ask to run its own Python? (`auto_map` in config.json or
tokenizer_config.json names classes in the folder's .py files.) transformers runs that code when
trust_remote_code is True, and prompts on stdin when it is None; sqexport checks first, so it can
refuse with one line before transformers is ever asked."""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["remote_code_files", "REMOTE_CODE_KEYS"]

REMOTE_CODE_KEYS = ("auto_map",)
_CONFIGS = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json")
_MAX_BYTES = 16 << 20


def _asks(path: Path, data: dict | None = None) -> bool:
    if data is None:
        try:
            if not path.is_file() or path.stat().st_size > _MAX_BYTES:
                return False  # absent (or special: contracts.files.first_special_file refuses those)
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            return False  # unreadable: transformers fails on it without running anything
    return isinstance(data, dict) and any(data.get(k) for k in REMOTE_CODE_KEYS)


def remote_code_files(folder: Path, config: dict | None = None) -> list[str]:
    """The folder's config files that ask for remote code (empty: none does)."""
    folder = Path(folder)
    return [name for name in _CONFIGS
            if _asks(folder / name, config if name == "config.json" and config is not None else None)]
