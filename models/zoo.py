"""The built-in models and the MODEL argument resolver."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from models.spec import ModelSpec
from toolchain.errors import ModelLoadError

__all__ = ["BUILTIN_MODELS", "builtin_names", "load_model", "DEFAULT_MODEL"]

DEFAULT_MODEL = "digits-cnn"


def _digits(name: str) -> Callable[[], ModelSpec]:
    def build() -> ModelSpec:
        from models.digits import build_digits_spec

        return build_digits_spec(name)

    return build


BUILTIN_MODELS: dict[str, tuple[str, Callable[[], ModelSpec]]] = {
    "digits-cnn": ("CNN (conv-BN-ReLU x3, linear head) on sklearn digits; image classification", _digits("digits-cnn")),
    "digits-mlp": ("MLP 64-256-128-10 on sklearn digits; image classification", _digits("digits-mlp")),
}


def builtin_names() -> list[str]:
    return sorted(BUILTIN_MODELS)


def load_model(ref: str) -> ModelSpec:
    """Resolve MODEL: a built-in name, or a path the loaders know."""
    if ref in BUILTIN_MODELS:
        return BUILTIN_MODELS[ref][1]()
    path = Path(ref)
    if path.exists():
        raise ModelLoadError(f"cannot load '{ref}': this kind of model file is not supported yet; "
                             f"built-in models: {', '.join(builtin_names())}")
    raise ModelLoadError(f"unknown model '{ref}'; built-in models: {', '.join(builtin_names())} "
                         "(or a path to a model)")


def with_data(spec: ModelSpec, **changes) -> ModelSpec:
    return dataclasses.replace(spec, **changes)
