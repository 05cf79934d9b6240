"""The runner's JSON line, checked as untrusted input: it comes from another machine (or from a
--device-cmd that ran something else), and bench prints it, gates on it and writes it into the
report. Every field sqexport reads must have its type and a finite value; strings are cut to one
short line without control characters (no terminal escapes reach the console). Unknown fields are
dropped. Anything else is a DeviceError (exit 2, one line)."""
from __future__ import annotations

import math
import re

from sqexport.contracts.errors import DeviceError
from sqexport.contracts.files import is_sha256

__all__ = ["check_runner_result"]

_TEXT_MAX = 200
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_THREADS = re.compile(r"[1-9][0-9]{0,3}")
_REFERENCE_NUMBERS = ("max_abs_diff", "reference_max_abs", "min_cosine", "max_rel_error", "argmax_agreement")
_TEXTS = ("model", "onnxruntime", "machine", "cpu", "python")


class _Bad(Exception):
    pass


def _number(value, what: str, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _Bad(f"{what} must be a finite number, got {_show(value)}")
    if minimum is not None and value < minimum:
        raise _Bad(f"{what} must be >= {minimum}, got {value}")
    return float(value)


def _count(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _Bad(f"{what} must be a count, got {_show(value)}")
    return value


def _text(value, what: str) -> str:
    if not isinstance(value, str):
        raise _Bad(f"{what} must be a string, got {_show(value)}")
    return _CONTROL.sub("?", value)[:_TEXT_MAX]


def _show(value) -> str:
    return type(value).__name__ if isinstance(value, (dict, list)) else repr(value)[:40]


def _latency(value) -> dict:
    if not isinstance(value, dict) or not value:
        raise _Bad(f"latency_ms must be an object per thread count, got {_show(value)}")
    out = {}
    for threads, entry in value.items():
        if not _THREADS.fullmatch(str(threads)):
            raise _Bad(f"latency_ms keys must be thread counts, got {str(threads)[:20]!r}")
        if not isinstance(entry, dict):
            raise _Bad(f"latency_ms[{threads}] must be an object, got {_show(entry)}")
        out[threads] = {k: _number(entry.get(k), f"latency_ms[{threads}].{k}", 0.0) for k in ("p50", "p90")}
        if "n" in entry:
            out[threads]["n"] = _count(entry["n"], f"latency_ms[{threads}].n")
    return out


def _reference(value) -> dict:
    if not isinstance(value, dict):
        raise _Bad(f"reference must be an object, got {_show(value)}")
    out = {}
    for key in _REFERENCE_NUMBERS:
        if key in value or key in ("max_abs_diff", "reference_max_abs"):
            out[key] = _number(value.get(key), f"reference.{key}", None if key == "min_cosine" else 0.0)
    for key in ("samples", "samples_given"):
        if key in value:
            out[key] = _count(value[key], f"reference.{key}")
    return out


def _memory(value) -> dict:
    if not isinstance(value, dict):
        raise _Bad(f"memory_mb must be an object, got {_show(value)}")
    return {k: None if value.get(k) is None else _number(value[k], f"memory_mb.{k}")
            for k in ("peak_rss", "session") if k in value}


def _check(data, latency: bool) -> dict:
    if not isinstance(data, dict):
        raise _Bad(f"the result must be a JSON object, got {_show(data)}")
    out = {}
    if latency or "latency_ms" in data:
        out["latency_ms"] = _latency(data.get("latency_ms"))
    digest = data.get("model_sha256")
    if not is_sha256(digest):
        raise _Bad(f"model_sha256 must be 64 lowercase hex digits, got {_show(digest)}")
    out["model_sha256"] = digest
    if "outputs_sha256" in data:
        if not is_sha256(data["outputs_sha256"]):
            raise _Bad("outputs_sha256 must be 64 lowercase hex digits")
        out["outputs_sha256"] = data["outputs_sha256"]
    runner = data.get("runner")
    if runner is not None:
        out["runner"] = _count(runner, "runner") if not isinstance(runner, str) else _text(runner, "runner")
    for key in _TEXTS:
        if data.get(key) is not None:
            out[key] = _text(data[key], key)
    if data.get("int8_saturates") is not None:
        if not isinstance(data["int8_saturates"], bool):
            raise _Bad(f"int8_saturates must be true or false, got {_show(data['int8_saturates'])}")
        out["int8_saturates"] = data["int8_saturates"]
    if data.get("reference") is not None:
        out["reference"] = _reference(data["reference"])
    if data.get("memory_mb") is not None:
        out["memory_mb"] = _memory(data["memory_mb"])
    return out


def check_runner_result(data, device: str = "device", latency: bool = True) -> dict:
    """The runner's result with every field checked (see the module docstring); `latency`: the
    result must carry latency_ms (bench), not when the runner ran with --no-timing (arm64)."""
    try:
        return _check(data, latency)
    except _Bad as exc:
        raise DeviceError(f"device {device}: the runner's result is malformed: {exc}") from None
