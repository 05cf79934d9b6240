"""One exception hierarchy; the CLI maps each family to an exit code in one place."""

__all__ = [
    "SqexportError", "ConfigError", "ModelLoadError", "DataError", "ExportError",
    "OutputError", "DeviceError", "GateFailed",
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
