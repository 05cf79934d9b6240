"""Devices for `sqexport bench`: push / exec / cleanup command templates plus an output parser.

Templates are shell command lines; placeholders are filled with shell-quoted values:
{files} (local files to push), {dir} (folder on the device), {model} {reference} {runner} (their
paths on the device), {threads} (e.g. 1,2), {iters}, {python} (the device's Python).
Presets: `local`, `ssh://user@host[:port]`, `adb[:serial]`; `--device-cmd` replaces the exec template.
"""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

from contracts.errors import ConfigError, DeviceError

__all__ = ["Device", "parse_device", "run_on_device", "parse_runner", "parse_perf_test"]

EXEC_RUNNER = "{python} {runner} {model} --reference {reference} --threads {threads} --iters {iters}"
EXEC_RUNNER_SYNTHETIC = "{python} {runner} {model} --threads {threads} --iters {iters}"  # no reference data
EXEC_PERF_TEST = "{perf_test} -e cpu -m times -r {iters} -x {threads} {model}"
TIMEOUT_S = 900


@dataclass(frozen=True)
class Device:
    name: str
    push: str
    exec: str
    cleanup: str
    dir: str
    python: str = "python3"
    parser: str = "runner"  # or "perf_test": onnxruntime_perf_test's text output


def _ssh(spec: str) -> Device:
    m = re.fullmatch(r"ssh://([^@/\s]+@)?([^:/\s]+)(?::(\d+))?/?", spec)
    if not m:
        raise ConfigError(f"--device {spec}: expected ssh://user@host[:port]")
    target, port = f"{m.group(1) or ''}{m.group(2)}", m.group(3) or "22"
    opts = "-o BatchMode=yes -o ConnectTimeout=10"
    remote = f"/tmp/sqexport-bench-{uuid.uuid4().hex[:8]}"
    ssh = f"ssh {opts} -p {port} {shlex.quote(target)}"
    return Device(spec, push=f"{ssh} mkdir -p {{dir}} && scp {opts} -P {port} {{files}} {shlex.quote(target)}:{{dir}}/",
                  exec=f"{ssh} {{exec}}", cleanup=f"{ssh} rm -rf {{dir}}", dir=remote)


def _adb(spec: str, perf_test: str | None) -> Device:
    serial = spec.partition(":")[2]
    adb = "adb" + (f" -s {shlex.quote(serial)}" if serial else "")
    remote = f"/data/local/tmp/sqexport-bench-{uuid.uuid4().hex[:8]}"
    # Termux's Python when the runner is used; a pushed onnxruntime_perf_test binary otherwise
    return Device(spec, push=f"{adb} shell mkdir -p {{dir}} && {adb} push {{files}} {{dir}}/",
                  exec=f"{adb} shell {{exec}}", cleanup=f"{adb} shell rm -rf {{dir}}", dir=remote,
                  python="/data/data/com.termux/files/usr/bin/python3",
                  parser="perf_test" if perf_test else "runner")


def parse_device(spec: str, device_cmd: str | None = None, perf_test: str | None = None,
                 python: str | None = None) -> Device:
    if spec == "local":
        local = Path(tempfile.gettempdir()) / f"sqexport-bench-{uuid.uuid4().hex[:8]}"
        dev = Device("local", push="mkdir -p {dir} && cp {files} {dir}/", exec="{exec}", cleanup="rm -rf {dir}",
                     dir=str(local), python=sys.executable, parser="perf_test" if perf_test else "runner")
    elif spec.startswith("ssh://"):
        dev = _ssh(spec)
        dev = replace(dev, parser="perf_test" if perf_test else "runner")
    elif spec == "adb" or spec.startswith("adb:"):
        dev = _adb(spec, perf_test)
    else:
        raise ConfigError(f"--device {spec}: expected local, ssh://user@host[:port] or adb[:serial]")
    if python:
        dev = replace(dev, python=python)
    if device_cmd:
        dev = replace(dev, exec=dev.exec.replace("{exec}", device_cmd) if "{exec}" in dev.exec else device_cmd)
    return dev


def _fill(template: str, values: dict) -> str:
    try:
        return template.format(**values)
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"device command template {template!r}: unknown or malformed placeholder {exc}") from None


def _run(cmd: str, what: str, device: str) -> str:
    try:
        proc = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise DeviceError(f"device {device}: {what} timed out after {TIMEOUT_S} s") from None
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + "\n" + proc.stdout).splitlines() if ln.strip()]
        raise DeviceError(f"device {device}: {what} failed (exit {proc.returncode}): "
                          f"{lines[-1].strip() if lines else 'no output'}")
    return proc.stdout


def run_on_device(device: Device, files: list[Path], model: str, threads: str, iters: int,
                  perf_test: str | None = None, reference: bool = True) -> tuple[dict, str]:
    """Push `files`, run the runner (or onnxruntime_perf_test) there, clean up; (parsed, command)."""
    q = shlex.quote
    values = {"dir": q(device.dir), "files": " ".join(q(str(f)) for f in files), "threads": q(threads),
              "iters": int(iters), "python": q(device.python), "model": q(f"{device.dir}/{model}"),
              "reference": q(f"{device.dir}/reference.npz"), "runner": q(f"{device.dir}/run_model.py"),
              "perf_test": q(f"{device.dir}/{Path(perf_test).name}") if perf_test else ""}
    inner = EXEC_PERF_TEST if device.parser == "perf_test" else EXEC_RUNNER if reference else EXEC_RUNNER_SYNTHETIC
    exec_cmd = _fill(device.exec.replace("{exec}", inner), values)
    _run(_fill(device.push, values), "push", device.name)
    try:
        if device.parser == "perf_test":
            results = [parse_perf_test(_run(_fill(device.exec.replace("{exec}", inner), {**values, "threads": t}),
                                           "onnxruntime_perf_test", device.name), t) for t in threads.split(",")]
            parsed = {"runner": "onnxruntime_perf_test", "latency_ms": {t: r for t, r in zip(threads.split(","), results)}}
        else:
            parsed = parse_runner(_run(exec_cmd, "runner", device.name), device.name)
    finally:
        try:
            _run(_fill(device.cleanup, values), "cleanup", device.name)
        except DeviceError:
            pass  # the result stands; a leftover temp folder on the device is not worth failing for
    return parsed, exec_cmd


def parse_runner(text: str, device: str = "device") -> dict:
    """The runner prints one JSON line; anything before it (shell banners) is ignored."""
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                break
    raise DeviceError(f"device {device}: the runner printed no result line")


_AVG = re.compile(r"Average inference time cost(?: total)?\s*:\s*([0-9.eE+-]+)\s*(ms|s)?")
_PCT = re.compile(r"P(50|90) Latency\s*:\s*([0-9.eE+-]+)\s*(ms|s)?")


def parse_perf_test(text: str, threads: str = "1") -> dict:
    """onnxruntime_perf_test's text: 'Average inference time cost: 12.3 ms' (older builds add
    'total'), and P50/P90 latency lines in seconds where present."""
    m = _AVG.search(text)
    if not m:
        raise DeviceError("onnxruntime_perf_test printed no 'Average inference time cost' line")
    scale = lambda unit: 1000.0 if unit == "s" else 1.0  # noqa: E731
    out = {"mean": float(m.group(1)) * scale(m.group(2) or "ms")}
    for p, value, unit in _PCT.findall(text):
        out[f"p{p}"] = float(value) * scale(unit or "s")
    out.setdefault("p50", out["mean"])
    out.setdefault("p90", out["mean"])
    return out
