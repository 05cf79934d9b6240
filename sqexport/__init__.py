"""sqexport: prune, quantize (int8 QDQ), export to ONNX, verify and package neural networks.

The repository keeps its layers in top-level folders (contracts, models, exporters, runtime_check,
toolchain); the install maps them under this package, so only `sqexport` lands in site-packages.

Python API (docs/python-api.md)::

    import sqexport
    report = sqexport.export("digits-cnn", output="out")
    print(report.accuracy.drop, report.latency_ms.speedup)

`export`, `check` and `package` are loaded on first use: `import sqexport` stays quick, and torch
is imported only when a run needs it.
"""
from pathlib import Path as _Path

__version__ = "0.1.0"

# Run from a source checkout (PYTHONPATH=<checkout>, a git worktree), the layer folders sit next
# to this package rather than inside it: let `sqexport.toolchain` resolve to <checkout>/toolchain
# so one checkout never mixes with another's installed copy.
_checkout = _Path(__file__).resolve().parent.parent
if (_checkout / "setup.cfg").is_file() and (_checkout / "toolchain" / "__init__.py").is_file():
    __path__.append(str(_checkout))  # type: ignore[name-defined]

from sqexport.contracts.errors import (ConfigError, DataError, DeviceError, ExportError, GateFailed,  # noqa: E402
                                       InputError, ModelLoadError, OutputError, SqexportError)

# public name -> the module that defines it, imported when the name is first used
_LAZY = {
    "export": "sqexport.toolchain.api",
    "check": "sqexport.toolchain.api",
    "package": "sqexport.toolchain.api",
    "Report": "sqexport.toolchain.report_view",
    "CheckReport": "sqexport.toolchain.report_view",
    "Bundle": "sqexport.toolchain.report_view",
}

__all__ = ["export", "check", "package", "Report", "CheckReport", "Bundle", "SqexportError", "InputError",
           "ConfigError", "ModelLoadError", "DataError", "ExportError", "OutputError", "DeviceError",
           "GateFailed", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # looked up once
        return value
    raise AttributeError(f"module 'sqexport' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
