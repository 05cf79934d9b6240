"""`--input-shape` values: `1x3x224x224` (the only input) or `NAME=1x128` (repeatable)."""
from __future__ import annotations

from contracts.errors import ConfigError

__all__ = ["parse_input_shapes", "format_shape"]


def _dims(text: str, given: str) -> list[int]:
    try:
        dims = [int(d) for d in text.lower().split("x")]
    except ValueError:
        raise ConfigError(f"--input-shape {given}: dimensions must be integers joined by 'x', "
                          "e.g. 1x3x224x224") from None
    if not dims or any(d < 1 for d in dims):
        raise ConfigError(f"--input-shape {given}: every dimension must be >= 1")
    return dims


def parse_input_shapes(values) -> dict[str | None, list[int]]:
    """{input name: dims}; the key None stands for the model's only input (no NAME= given)."""
    shapes: dict[str | None, list[int]] = {}
    for given in values or ():
        name, sep, dims = given.rpartition("=")
        key = name.strip() if sep else None
        if sep and not key:
            raise ConfigError(f"--input-shape {given}: the input name before '=' is empty")
        if key in shapes:
            raise ConfigError(f"--input-shape given twice for {key or 'the input'}")
        shapes[key] = _dims(dims.strip(), given)
    if None in shapes and len(shapes) > 1:
        raise ConfigError("--input-shape: name every input (NAME=DxD) when giving more than one")
    return shapes


def format_shape(dims) -> str:
    return "x".join(str(d) for d in dims)
