"""One exception hierarchy; the CLI maps each family to an exit code in one place."""

__all__ = [
    "SqexportError", "ConfigError", "ModelLoadError", "DataError", "ExportError",
    "OutputError", "DeviceError", "GateFailed", "Interruption", "first_line",
]


class SqexportError(Exception):
    """Base of every error the tool raises on purpose."""

    exit_code = 2


class ConfigError(SqexportError):
    """A recipe, flag or stage configuration is invalid."""


class ModelLoadError(SqexportError):
    """The model could not be found or loaded."""


class DataError(SqexportError):
    """Calibration or evaluation data is missing, unreadable or of the wrong shape."""


class ExportError(SqexportError):
    """The model could not be exported to ONNX."""

    exit_code = 2


class OutputError(SqexportError):
    """The output folder cannot be written."""


class DeviceError(SqexportError):
    """A device for `sqexport bench` is unreachable, or the runner failed there."""


class GateFailed(SqexportError):
    """A verification gate failed; artifacts and report were still written."""

    exit_code = 1


class Interruption(BaseException):
    """Base of toolchain.signals.Interrupted (a signal turned into an exception): code that contains
    user code (models.user_model) lets it through, as it does KeyboardInterrupt."""


def first_line(exc: BaseException) -> str:
    """The first non-blank line of an exception's message, or its type name when it has none
    (`str(exc).splitlines()[0]` raises IndexError on an empty message)."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__
