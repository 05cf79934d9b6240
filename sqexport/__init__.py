"""sqexport: prune, quantize (int8 QDQ), export to ONNX, verify and package neural networks.

The repository keeps its layers in top-level folders (contracts, models, exporters, runtime_check,
toolchain); the install maps them under this package, so only `sqexport` lands in site-packages.
"""
from pathlib import Path as _Path

__version__ = "0.1.0"

# Run from a source checkout (PYTHONPATH=<checkout>, a git worktree), the layer folders sit next
# to this package rather than inside it: let `sqexport.toolchain` resolve to <checkout>/toolchain
# so one checkout never mixes with another's installed copy.
_checkout = _Path(__file__).resolve().parent.parent
if (_checkout / "setup.cfg").is_file() and (_checkout / "toolchain" / "__init__.py").is_file():
    __path__.append(str(_checkout))  # type: ignore[name-defined]
