"""Devices for `sqexport bench`: how to make a folder there, copy files into it, run a command and
clean up, plus the parsers of what the device printed.

A device command is a shell command line the device's shell parses (ssh and adb hand it to a
remote shell; `local` to this machine's /bin/sh). Its placeholders are filled with values quoted
for that shell (shlex.quote), and for ssh/adb the filled command travels as one argument of an
argv list, so no local shell parses it a second time: a file or option value can never become a
command there (`m;touch${IFS}pwned;.ort` stays a file name). The files themselves are pushed
under fixed names (toolchain.bench stages them), so the user's file names never reach a shell.

Placeholders: {dir} (folder on the device), {model} {reference} {runner} (paths there),
{threads} (e.g. 1,2), {iters}, {python} (the device's Python), {perf_test}. Only these names,
without format specs, conversions, attributes or indexes.
Presets: `local`, `ssh://user@host[:port]`, `adb[:serial]`; `--device-cmd` replaces the run command.
"""
from __future__ import annotations

import re
import shlex
import shutil
import string
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

from sqexport.contracts.errors import ConfigError, DeviceError
from sqexport.runtime_check.children import run_child
from sqexport.runtime_check.runner_output import check_runner_result

__all__ = ["Device", "parse_device", "run_on_device", "parse_runner", "parse_perf_test", "fill_template",
           "PLACEHOLDERS", "RUNNER_ON_DEVICE"]

EXEC_RUNNER = "{python} {runner} {model} --reference {reference} --threads {threads} --iters {iters}"
EXEC_RUNNER_SYNTHETIC = "{python} {runner} {model} --threads {threads} --iters {iters}"  # no reference data
EXEC_PERF_TEST = "{perf_test} -e cpu -m times -r {iters} -x {threads} {model}"
PLACEHOLDERS = ("python", "runner", "model", "reference", "dir", "threads", "iters", "perf_test")
RUNNER_ON_DEVICE = "run_model.py"  # the name toolchain.bench pushes runtime_check/device_runner.py as
TIMEOUT_S = 900
_SSH_OPTS = ("-o", "BatchMode=yes", "-o", "ConnectTimeout=10")
# user, host and adb serial: names, never options or shell words (a leading '-' would be an option)
_NAME = r"[A-Za-z0-9_.][A-Za-z0-9_.-]*"


@dataclass(frozen=True)
class Device:
    name: str
    dir: str  # the folder on the device (ours: /tmp/sqexport-bench-<random>)
    exec: str = EXEC_RUNNER  # template of the run command, parsed by the device's shell
    remote: tuple[str, ...] = ()  # argv that runs one command line on the device; () = this machine
    copy: tuple[str, ...] = ()  # argv before the files: "scp ...", "adb push"; () = cp on this machine
    copy_dest: str = "{dir}/"  # the argument after the files
    python: str = "python3"
    parser: str = "runner"  # or "perf_test": onnxruntime_perf_test's text output


def _ssh(spec: str) -> Device:
    m = re.fullmatch(rf"ssh://(?:({_NAME})@)?({_NAME})(?::(\d{{1,5}}))?/?", spec)
    if not m:
        raise ConfigError(f"--device {spec}: expected ssh://user@host[:port]")
    target, port = f"{m.group(1) + '@' if m.group(1) else ''}{m.group(2)}", m.group(3) or "22"
    remote = f"/tmp/sqexport-bench-{uuid.uuid4().hex[:8]}"
    return Device(spec, remote, remote=("ssh", *_SSH_OPTS, "-p", port, target),
                  copy=("scp", *_SSH_OPTS, "-P", port), copy_dest=f"{target}:{{dir}}/")


def _adb(spec: str) -> Device:
    serial = spec.partition(":")[2]
    if serial and not re.fullmatch(r"[A-Za-z0-9_.][A-Za-z0-9_.:-]*", serial):
        raise ConfigError(f"--device {spec}: expected adb or adb:SERIAL (letters, digits, . _ : -)")
    adb = ("adb", "-s", serial) if serial else ("adb",)
    remote = f"/data/local/tmp/sqexport-bench-{uuid.uuid4().hex[:8]}"
    # Termux's Python when the runner is used; a pushed onnxruntime_perf_test binary otherwise
    return Device(spec, remote, remote=(*adb, "shell"), copy=(*adb, "push"),
                  python="/data/data/com.termux/files/usr/bin/python3")


def parse_device(spec: str, device_cmd: str | None = None, perf_test: str | None = None,
                 python: str | None = None) -> Device:
    if spec == "local":
        local = Path(tempfile.gettempdir()) / f"sqexport-bench-{uuid.uuid4().hex[:8]}"
        dev = Device("local", str(local), python=sys.executable)
    elif spec.startswith("ssh://"):
        dev = _ssh(spec)
    elif spec == "adb" or spec.startswith("adb:"):
        dev = _adb(spec)
    else:
        raise ConfigError(f"--device {spec}: expected local, ssh://user@host[:port] or adb[:serial]")
    dev = replace(dev, parser="perf_test" if perf_test else "runner",
                  exec=EXEC_PERF_TEST if perf_test else EXEC_RUNNER)
    if python:
        dev = replace(dev, python=python)
    if device_cmd is not None:
        fill_template(device_cmd, {k: "" for k in PLACEHOLDERS})  # a bad template fails before any push
        dev = replace(dev, exec=device_cmd)
    return dev


def fill_template(template: str, values: dict) -> str:
    """`template` with each {name} replaced by values[name]: plain names only. str.format would
    also run `{model.attr}`, `{x[0]}` and `{iters:>999999999}` (an attribute lookup, a gigabyte
    string)."""
    out = []
    try:
        for literal, field, spec, conversion in string.Formatter().parse(template):
            out.append(literal)
            if field is None:
                continue
            if field not in values or spec or conversion:
                shown = "{" + field + (f"!{conversion}" if conversion else "") + (f":{spec[:20]}" if spec else "") + "}"
                raise ConfigError(f"device command template: {shown[:60]} is not a placeholder; "
                                  f"use {', '.join('{' + p + '}' for p in PLACEHOLDERS)} (no format specs)")
            out.append(str(values[field]))
    except ValueError as exc:
        raise ConfigError(f"device command template {template[:80]!r}: {exc}") from None
    return "".join(out)


def _run(argv, what: str, device: str, shell: bool = False) -> str:
    try:
        proc = run_child(argv, TIMEOUT_S, shell=shell)
    except subprocess.TimeoutExpired:
        raise DeviceError(f"device {device}: {what} timed out after {TIMEOUT_S} s") from None
    except OSError as exc:  # e.g. ssh or adb not installed
        raise DeviceError(f"device {device}: {what} failed: {exc.strerror or exc}") from None
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + "\n" + proc.stdout).splitlines() if ln.strip()]
        raise DeviceError(f"device {device}: {what} failed (exit {proc.returncode}): "
                          f"{lines[-1].strip()[:300] if lines else 'no output'}")
    return proc.stdout


def _on_device(device: Device, command: str, what: str) -> str:
    """Run one command line in the device's shell (this machine's /bin/sh for `local`)."""
    if device.remote:
        return _run([*device.remote, command], what, device.name)
    return _run(command, what, device.name, shell=True)


def _push(device: Device, files: list[Path]) -> None:
    if not device.remote:  # this machine: no shell needed to make a folder and copy files
        try:
            Path(device.dir).mkdir(parents=True)
            for f in files:
                shutil.copyfile(f, Path(device.dir) / Path(f).name)
        except OSError as exc:
            raise DeviceError(f"device {device.name}: push failed: {exc.strerror or exc}") from None
        return
    _on_device(device, f"mkdir -p {shlex.quote(device.dir)}", "push")
    _run([*device.copy, *map(str, files), device.copy_dest.format(dir=device.dir)], "push", device.name)


def _cleanup(device: Device) -> None:
    if not device.remote:
        shutil.rmtree(device.dir, ignore_errors=True)
        return
    try:
        _on_device(device, f"rm -rf {shlex.quote(device.dir)}", "cleanup")
    except DeviceError:
        pass  # the result stands; a leftover temp folder on the device is not worth failing for


def run_on_device(device: Device, files: list[Path], model: str, threads: str, iters: int,
                  perf_test: str | None = None, reference: bool = True) -> tuple[dict, str]:
    """Push `files` (already under their device names), run the runner (or onnxruntime_perf_test)
    there, clean up on every way out; returns (checked result, command)."""
    q = shlex.quote
    values = {"dir": q(device.dir), "threads": q(threads), "iters": int(iters), "python": q(device.python),
              "model": q(f"{device.dir}/{model}"), "reference": q(f"{device.dir}/reference.npz"),
              "runner": q(f"{device.dir}/{RUNNER_ON_DEVICE}"),
              "perf_test": q(f"{device.dir}/{Path(perf_test).name}") if perf_test else ""}
    template = device.exec
    if device.parser == "runner" and not reference and template == EXEC_RUNNER:
        template = EXEC_RUNNER_SYNTHETIC
    command = fill_template(template, values)
    try:
        _push(device, files)
        if device.parser == "perf_test":
            latency = {t: parse_perf_test(_on_device(device, fill_template(template, {**values, "threads": q(t)}),
                                                     "onnxruntime_perf_test"), t) for t in threads.split(",")}
            parsed = {"runner": "onnxruntime_perf_test", "latency_ms": latency}
        else:
            parsed = parse_runner(_on_device(device, command, "runner"), device.name)
    finally:
        _cleanup(device)
    return parsed, command


def parse_runner(text: str, device: str = "device") -> dict:
    """The runner prints one JSON line; anything before it (shell banners) is ignored. The line is
    untrusted input: checked field by field (runtime_check.runner_output)."""
    import json

    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                data = json.loads(line)
            except (ValueError, RecursionError):
                break
            return check_runner_result(data, device)
    raise DeviceError(f"device {device}: the runner printed no result line")


_AVG = re.compile(r"Average inference time cost(?: total)?\s*:\s*([0-9.eE+-]+)\s*(ms|s)?")
_PCT = re.compile(r"P(50|90) Latency\s*:\s*([0-9.eE+-]+)\s*(ms|s)?")


def parse_perf_test(text: str, threads: str = "1") -> dict:
    """onnxruntime_perf_test's text: 'Average inference time cost: 12.3 ms' (older builds add
    'total'), and P50/P90 latency lines in seconds where present."""
    import math

    m = _AVG.search(text)
    if not m:
        raise DeviceError("onnxruntime_perf_test printed no 'Average inference time cost' line")
    scale = lambda unit: 1000.0 if unit == "s" else 1.0  # noqa: E731
    try:
        out = {"mean": float(m.group(1)) * scale(m.group(2) or "ms")}
        for p, value, unit in _PCT.findall(text):
            out[f"p{p}"] = float(value) * scale(unit or "s")
    except ValueError:
        raise DeviceError("onnxruntime_perf_test printed a latency that is not a number") from None
    if not all(math.isfinite(v) and v >= 0 for v in out.values()):
        raise DeviceError("onnxruntime_perf_test printed a negative or non-finite latency")
    out.setdefault("p50", out["mean"])
    out.setdefault("p90", out["mean"])
    return out
