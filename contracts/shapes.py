"""`--input-shape` values: `1x3x224x224` (the only input) or `NAME=1x128` (repeatable, or several
joined by commas: `image=1x3x32x32,meta=1x4`). A user model's example input and a mobile model's
fixed shapes both come from them."""
from __future__ import annotations

from sqexport.contracts.errors import ConfigError

__all__ = ["Shapes", "parse_input_shapes", "format_shape", "MAX_ELEMENTS"]

Shapes = dict  # input name (None = the only input) -> shape tuple
# elements of one example input: 2^28 float32 values are 1 GiB, far beyond any model sqexport
# exports; more is a typo (1x1x999999x999999 ended in a MemoryError), refused before allocating
MAX_ELEMENTS = 1 << 28


def parse_input_shapes(values) -> Shapes:
    """{input name: dims}; the key None stands for the model's only input (no NAME= given)."""
    shapes: Shapes = {}
    # "a=1x3,b=1x4" is what users write for several inputs: commas never occur inside one shape
    pieces = (piece.strip() for given in values or () for piece in str(given).split(","))
    for value in (piece for piece in pieces if piece):  # a trailing comma adds nothing
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
        dims = tuple(int(p) for p in parts)
        elements = 1
        for d in dims:
            elements *= d
        if elements > MAX_ELEMENTS:
            raise ConfigError(f"--input-shape '{value}': {elements:,} values in one input; the limit is "
                              f"{MAX_ELEMENTS:,} (check the dimensions)")
        shapes[name] = dims
    return shapes


def format_shape(dims) -> str:
    return "x".join(str(d) for d in dims)
