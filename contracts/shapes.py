"""`--input-shape` values: `1x3x224x224` (the only input) or `NAME=1x128` (repeatable). A user
model's example input and a mobile model's fixed shapes both come from them."""
from __future__ import annotations

from contracts.errors import ConfigError

__all__ = ["Shapes", "parse_input_shapes", "format_shape"]

Shapes = dict  # input name (None = the only input) -> shape tuple


def parse_input_shapes(values) -> Shapes:
    """{input name: dims}; the key None stands for the model's only input (no NAME= given)."""
    shapes: Shapes = {}
    for value in values or ():
        name, sep, dims = value.rpartition("=")
        if sep and not name.strip():
            raise ConfigError(f"--input-shape '{value}': the input name before '=' is empty")
        name = name.strip() or None
        parts = dims.lower().split("x")
        if not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            raise ConfigError(f"--input-shape '{value}': dimensions must be positive integers joined by 'x' "
                              "(e.g. 1x3x224x224 or image=1x3x224x224)")
        if name in shapes or (shapes and (name is None or None in shapes)):
            raise ConfigError(f"--input-shape '{value}': give one unnamed shape, or one NAME=shape per input "
                              "(each name once)")
        shapes[name] = tuple(int(p) for p in parts)
    return shapes


def format_shape(dims) -> str:
    return "x".join(str(d) for d in dims)
