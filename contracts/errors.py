"""One exception hierarchy; the CLI maps each family to an exit code in one place."""

__all__ = [
    "SqexportError", "InputError", "ConfigError", "ModelLoadError", "DataError", "ExportError",
    "OutputError", "DeviceError", "GateFailed", "Interruption", "first_line",
]


class SqexportError(Exception):
    """Base of every error the tool raises on purpose."""

    exit_code = 2


class InputError(SqexportError):
    """Bad input (CLI exit 2): the model, data, options, output folder or device cannot be used as
    given. Every bad-input family below derives from it, so one `except InputError` catches them."""

    exit_code = 2


class ConfigError(InputError):
    """A recipe, flag or stage configuration is invalid."""


class ModelLoadError(InputError):
    """The model could not be found or loaded."""


class DataError(InputError):
    """Calibration or evaluation data is missing, unreadable or of the wrong shape."""


class ExportError(InputError):
    """The model could not be exported to ONNX."""


class OutputError(InputError):
    """The output folder cannot be written."""


class DeviceError(InputError):
    """A device for `sqexport bench` is unreachable, or the runner failed there."""


class GateFailed(SqexportError):
    """A verification gate failed; artifacts and report were still written (CLI exit 1).

    `report` is the run's report object (the Python API's Report or CheckReport; None where no
    report exists), so a caller can see which check failed and by how much."""

    exit_code = 1

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


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
