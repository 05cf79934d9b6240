"""Typed, read-only views of what `export` and `check` produce, for the Python API.

report.json stays the one record (runtime_check/report.py writes it; other tools read it): these
classes only read it. The sections the API documents are frozen dataclasses whose field names are
the JSON keys; keys they do not name (a method's own section, fields added later) are kept and
reached with `report["key"]` or `report.to_dict()`, which hand out copies, so a view never
changes under its reader.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from sqexport.contracts.errors import ConfigError
from sqexport.contracts.files import read_regular_bytes

__all__ = ["Accuracy", "Timing", "Latency", "Sizes", "Sparsity", "Check", "Report", "CheckReport", "Bundle"]

REPORT_MAX_BYTES = 64 << 20  # a report.json is kilobytes; more is not one sqexport wrote


def _known(cls, data: Mapping | None) -> dict:
    """The keys of `data` that are fields of `cls` (a section may carry more; they stay in the dict)."""
    names = cls.__dataclass_fields__
    return {k: v for k, v in (data or {}).items() if k in names}


@dataclass(frozen=True)
class Accuracy:
    """report["accuracy"]: the task metric of the baseline and of the exported model. `drop` is
    baseline minus model in `drop_unit` (points for top-1, 1-cosine for embeddings); None where
    it was not measured (`sqexport check` without a baseline)."""

    metric: str | None = None
    unit: str | None = None
    baseline: float | None = None
    model: float | None = None
    drop: float | None = None
    drop_unit: str | None = None
    samples: int | None = None
    evidence: str | None = None
    note: str | None = None

    @classmethod
    def from_dict(cls, data: Mapping | None) -> "Accuracy":
        return cls(**_known(cls, data))


@dataclass(frozen=True)
class Timing:
    """One model's latency in milliseconds over `n` interleaved runs."""

    p50: float | None = None
    p90: float | None = None
    mean: float | None = None
    n: int | None = None

    @classmethod
    def from_dict(cls, data: Mapping | None) -> "Timing | None":
        return cls(**_known(cls, data)) if data else None


@dataclass(frozen=True)
class Latency:
    """report["latency_ms"]: baseline and model measured in the same run at `threads`;
    `speedup` is baseline p50 / model p50; `at_1_thread` the same at one thread (when `threads`
    is more)."""

    threads: int | None = None
    model: Timing | None = None
    baseline: Timing | None = None
    speedup: float | None = None
    at_1_thread: "Latency | None" = None

    @classmethod
    def from_dict(cls, data: Mapping | None) -> "Latency":
        data = data or {}
        return cls(threads=data.get("threads"), model=Timing.from_dict(data.get("model")),
                   baseline=Timing.from_dict(data.get("baseline")), speedup=data.get("speedup"),
                   at_1_thread=cls.from_dict(data["at_1_thread"]) if data.get("at_1_thread") else None)


@dataclass(frozen=True)
class Sizes:
    """report["size_bytes"]: file sizes in bytes; `compressed` is model.onnx zipped; `ort` and
    `ort_compressed` are model.ort's (target mobile)."""

    baseline: int | None = None
    model: int | None = None
    compressed: int | None = None
    baseline_compressed: int | None = None
    ratio_compressed: float | None = None
    ort: int | None = None
    ort_compressed: int | None = None

    @classmethod
    def from_dict(cls, data: Mapping | None) -> "Sizes":
        return cls(**_known(cls, data))


@dataclass(frozen=True)
class Sparsity:
    """report["sparsity"]: the share of prunable weights that are zero, overall and per layer."""

    overall: float | None = None
    layers: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def from_dict(cls, data: Mapping | None) -> "Sparsity":
        data = data or {}
        return cls(overall=data.get("overall"), layers=MappingProxyType(dict(data.get("layers") or {})))


@dataclass(frozen=True)
class Check:
    """One gate: `value` against `limit` in `unit`; `note` says more where there is more to say."""

    name: str
    passed: bool
    value: float | None = None
    limit: float | None = None
    unit: str | None = None
    note: str | None = None

    @classmethod
    def from_dict(cls, data: Mapping) -> "Check":
        return cls(**_known(cls, data))


def _checks(data: Mapping) -> tuple[Check, ...]:
    return tuple(Check.from_dict(c) for c in data.get("checks") or ())


class _Sections:
    """Every section of the underlying dict by key, as a copy."""

    _data: Mapping

    def __getitem__(self, key: str) -> Any:
        return copy.deepcopy(self._data[key])

    def get(self, key: str, default: Any = None) -> Any:
        return copy.deepcopy(self._data[key]) if key in self._data else default

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def keys(self):
        return self._data.keys()

    def to_dict(self) -> dict:
        """The whole result as plain JSON data (a copy)."""
        return copy.deepcopy(dict(self._data))

    @property
    def failed_checks(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.passed)


@dataclass(frozen=True)
class Report(_Sections):
    """The report of one export (report.json in `output_dir`).

    Attributes: `model`, `target`, `task`, `passed`, `accuracy` (Accuracy), `latency_ms` (Latency),
    `size_bytes` (Sizes), `sparsity` (Sparsity), `checks` (tuple of Check), `schema_version` (of
    report.json, "MAJOR.MINOR") and `output_dir` (the folder written). Every other section:
    `report["quantization"]`, `report.to_dict()`.
    """

    model: str
    target: str | None
    task: str | None
    passed: bool
    accuracy: Accuracy
    latency_ms: Latency
    size_bytes: Sizes
    sparsity: Sparsity
    checks: tuple[Check, ...]
    schema_version: str | None = None
    output_dir: Path | None = None
    _data: Mapping = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, data: Mapping, output_dir: Path | str | None = None) -> "Report":
        """A view of a report.json dict (copied: later changes to `data` do not show)."""
        data = copy.deepcopy(dict(data))
        return cls(model=data.get("model"), target=data.get("target"), task=data.get("task"),
                   passed=bool(data.get("passed")), accuracy=Accuracy.from_dict(data.get("accuracy")),
                   latency_ms=Latency.from_dict(data.get("latency_ms")),
                   size_bytes=Sizes.from_dict(data.get("size_bytes")), sparsity=Sparsity.from_dict(data.get("sparsity")),
                   checks=_checks(data), schema_version=data.get("schema_version"),
                   output_dir=Path(output_dir) if output_dir is not None else None, _data=data)

    @classmethod
    def load(cls, output_dir: Path | str) -> "Report":
        """The report of an existing output folder (its report.json).

        Raises:
            ConfigError: the folder holds no readable report.json object.
        """
        path = Path(output_dir) / "report.json"
        try:
            data = json.loads(read_regular_bytes(path, "report", limit=REPORT_MAX_BYTES).decode("utf-8"))
        except (ConfigError, ValueError, RecursionError):
            raise ConfigError(f"{output_dir} is not an sqexport output folder (no readable report.json)") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} is not an sqexport report (a JSON object)")
        return cls.from_dict(data, output_dir)


@dataclass(frozen=True)
class CheckReport(_Sections):
    """The result of `check` on an existing .onnx/.ort model (what `sqexport check --json` prints).

    Attributes: `model` and `baseline` (paths; baseline None without one), `data` (the eval data, or
    "synthetic"), `passed`, `accuracy` (Accuracy), `latency_ms` (Latency), `checks` (tuple of
    Check). Every other key (`arm64`, `baseline_from`, `data_info`): `result["arm64"]`, `to_dict()`.
    """

    model: str
    baseline: str | None
    data: str | None
    passed: bool
    accuracy: Accuracy
    latency_ms: Latency
    checks: tuple[Check, ...]
    _data: Mapping = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, data: Mapping) -> "CheckReport":
        data = copy.deepcopy(dict(data))
        return cls(model=data.get("model"), baseline=data.get("baseline"), data=data.get("data"),
                   passed=bool(data.get("passed")), accuracy=Accuracy.from_dict(data.get("accuracy")),
                   latency_ms=Latency.from_dict(data.get("latency_ms")), checks=_checks(data), _data=data)


@dataclass(frozen=True)
class Bundle:
    """A mobile app bundle `package` wrote: the zip's `path`, its size in `bytes` and the `files`
    it holds."""

    path: Path
    bytes: int
    files: tuple[str, ...]
