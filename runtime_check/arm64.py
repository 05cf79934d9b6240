"""The same .onnx/.ort on the aarch64 build of the same onnxruntime, under user-mode emulation.

`make arm64` (scripts/setup_arm64.sh) puts qemu-aarch64-static on the host and an arm64 Python
with onnxruntime under the cache root. Each CPU tier a phone may have picks different int8 kernels
in onnxruntime's MLAS: cortex-a53 (NEON only), cortex-a76 (sdot/udot dot products), max (i8mm
smmla/ummla). Emulated runs measure outputs only; their timings say nothing about a phone.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from sqexport.contracts.errors import ConfigError
from sqexport.runtime_check.children import children
from sqexport.runtime_check.runner_output import check_runner_result

__all__ = ["TIERS", "arm64_root", "emulator_status", "run_tiers", "ARM64_RTOL", "ARM64_MAX_REL_ERROR", "DEVICE_MAX_REL_ERROR", "MAX_SAMPLES", "EMULATION_FACTOR",
           "BUDGET_S"]

TIERS = {"cortex-a53": "NEON only", "cortex-a76": "NEON + dot product (sdot/udot)",
         "max": "NEON + dot product + i8mm (smmla/ummla)"}
# ARM int8 kernels vs x86: a requantized activation may round one step apart (ARM requantizes in
# fixed point, the exact QDQ arithmetic in float) and such steps travel through the layers. The
# match is judged per sample on the whole output vector (runtime_check/agreement.py), against the
# closer of x86's exact arithmetic and x86's onnxruntime kernels: relative L2 error at most
# ARM64_MAX_REL_ERROR (cosine >= ~0.9998). Measured here: MiniLM's ARM64 outputs equal x86's
# kernels to 1.3e-7 and sit up to 0.029 (mean 0.005) from the exact arithmetic; digits-cnn's are
# within 8e-4 of the exact arithmetic while x86's kernels saturate (17% off, no VNNI). A wrong
# kernel or a corrupted weight is far beyond it; the accuracy gate is judged on the ARM64 outputs
# too. ARM64_RTOL (max |diff| over the largest |output|) is reported as data.
ARM64_MAX_REL_ERROR = 0.02
# The bundle's self-test (reference.npz) carries only the exact arithmetic, so a phone is allowed
# the distance ARM kernels were measured from it (MiniLM: 0.029) with margin: cosine >= ~0.9987.
DEVICE_MAX_REL_ERROR = 0.05
ARM64_RTOL = 0.01
# Emulation runs 30-100x slower than the host, more where the host has faster int8 kernels, so
# the host's run time is only a lower-bound estimate. The eval rows are taken in order until their
# host run time x EMULATION_FACTOR reaches BUDGET_S, and each tier's runner also stops after
# BUDGET_S of its own (device_runner --budget-s), which bounds the check when the estimate is
# too low. Measurements: benchmarks/results/arm64.md.
MAX_SAMPLES = 512
EMULATION_FACTOR = 30
BUDGET_S = 120.0
RUNNER = Path(__file__).with_name("device_runner.py")
# a tier stops its own samples after BUDGET_S; start-up under emulation adds a minute at most
TIMEOUT_S = 4 * BUDGET_S + 300


def arm64_root() -> Path:
    return Path(os.environ.get("SQEXPORT_ARM64_ROOT") or Path.home() / ".cache" / "sqexport" / "arm64")


def emulator_status() -> tuple[bool, str]:
    """(ready, why not): the emulator, the arm64 Python and the wheels must all be in place."""
    root = arm64_root()
    if shutil.which("qemu-aarch64-static") is None:
        return False, "qemu-aarch64-static is not installed (run `make arm64`)"
    if not (root / "ready.json").is_file() or not (root / "sysroot/usr/bin/python3.11").is_file():
        return False, f"no arm64 onnxruntime under {root} (run `make arm64`)"
    return True, ""


def _command(root: Path) -> list[str]:
    return ["qemu-aarch64-static", "-L", str(root / "sysroot"), str(root / "sysroot/usr/bin/python3.11")]


def _env(root: Path, tier: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "QEMU_"))}
    env.update(QEMU_CPU=tier, PYTHONPATH=str(root / "site"), PYTHONHOME=str(root / "sysroot/usr"),
               PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")
    return env


def _last_json(text: str):
    lines = text.strip().splitlines()
    try:
        return json.loads(lines[-1]) if lines else None
    except (ValueError, RecursionError):
        return None


def run_tiers(model_path: Path, feeds: list[dict], tiers=tuple(TIERS),
              budget_s: float | None = None) -> dict[str, dict]:
    """Run `feeds` (each at the model's fixed input shapes) through model_path under each tier,
    all tiers at once. Returns tier -> {"outputs": {name: stacked array}, "runner": runner JSON}.
    `budget_s`: each tier runs the feeds in order for that long at most (at least one), so its
    outputs may cover only the leading feeds."""
    ok, why = emulator_status()
    if not ok:
        raise ConfigError(f"--arch arm64: {why}")
    unknown = [t for t in tiers if t not in TIERS]
    if unknown:
        raise ConfigError(f"unknown arm64 tier {unknown[0]}; known: {', '.join(TIERS)}")
    root = arm64_root()
    with tempfile.TemporaryDirectory(prefix="sqexport-arm64-") as tmp:
        tmp = Path(tmp)
        model = tmp / Path(model_path).name
        shutil.copyfile(model_path, model)
        np.savez(tmp / "inputs.npz", **{f"input:{k}": np.stack([f[k] for f in feeds]) for k in feeds[0]})
        results = {}
        with children() as group:  # Ctrl-C or SIGTERM: every qemu is killed, none keeps running
            procs = {}
            for tier in tiers:
                cmd = [*_command(root), str(RUNNER), str(model), "--reference", str(tmp / "inputs.npz"),
                       "--threads", "1", "--no-timing", "--save-outputs", str(tmp / f"out-{tier}.npz"),
                       *(["--budget-s", str(budget_s)] if budget_s is not None else [])]
                procs[tier] = group.start(cmd, env=_env(root, tier))
            for tier, proc in procs.items():
                try:
                    out, err = proc.communicate(timeout=TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    raise ConfigError(f"arm64 run ({tier}) did not finish in {TIMEOUT_S:.0f} s") from None
                if proc.returncode != 0:
                    lines = [ln for ln in err.splitlines() if ln.strip() and "cpuinfo" not in ln]
                    why = lines[-1] if lines else f"exit {proc.returncode}"
                    raise ConfigError(f"arm64 run ({tier}) failed: {why}")
                data = np.load(tmp / f"out-{tier}.npz")
                runner = check_runner_result(_last_json(out), f"arm64 {tier}", latency=False)
                runner.pop("memory_mb", None)  # emulator memory, not a phone's
                results[tier] = {"outputs": {k[len("output:"):]: data[k] for k in data.files}, "runner": runner}
    return results
