"""Signals: Ctrl-C (SIGINT), SIGTERM and SIGHUP at any moment end the run with exit 128 + N, one
line on stderr, no traceback, and no output or temporary folder left behind; a folder left by a
killed run is removed by the next one. Real subprocesses, signalled at different moments."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from child_process import signals_as_from_a_terminal
from sqexport.toolchain import signals
from sqexport.toolchain.output_folder import TMP_MARKER, remove_stale_temps

ROOT = Path(__file__).resolve().parents[2]


def _start(cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sqexport", "digits-mlp", "-o", "out"], cwd=cwd,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=signals_as_from_a_terminal)


def _handlers_installed(pid: int) -> bool:
    """Only sqexport's own handler catches SIGTERM: once it does, start-up has begun."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


def _temp_folder(cwd: Path, holding: str | None = None) -> bool:
    temps = [p for p in cwd.iterdir() if ".tmp-" in p.name]
    return bool(temps) and (holding is None or any((t / holding).is_file() for t in temps))


MOMENTS = {
    "start-up": lambda proc, cwd: _handlers_installed(proc.pid),  # imports of click, torch, ...
    "export.baseline": lambda proc, cwd: _temp_folder(cwd),  # made just before the first export
    "later-stage": lambda proc, cwd: _temp_folder(cwd, "baseline.onnx"),  # pruning / quantization
}


def _wait_for(moment, proc, cwd, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not MOMENTS[moment](proc, cwd):
        assert proc.poll() is None, "the run ended before the moment came"
        assert time.monotonic() < deadline
        time.sleep(0.005)


@pytest.mark.parametrize("moment, sig", [
    ("start-up", signal.SIGINT), ("start-up", signal.SIGTERM), ("start-up", signal.SIGHUP),
    ("export.baseline", signal.SIGINT), ("later-stage", signal.SIGTERM),
])
def test_a_signal_ends_the_run_cleanly(tmp_path, moment, sig):
    proc = _start(tmp_path)
    try:
        _wait_for(moment, proc, tmp_path)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == 128 + sig, stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and errors[0].startswith(f"Error: interrupted by {signal.Signals(sig).name}"), stderr
    assert stderr.strip().splitlines()[-1] == errors[0], "a progress line came after the error"
    assert os.listdir(tmp_path) == [], "output or temporary folder left behind"


def test_a_killed_run_leaves_a_folder_the_next_run_can_prove_is_its_own(tmp_path):
    proc = _start(tmp_path)
    try:
        _wait_for("later-stage", proc, tmp_path)  # marker written by then
        proc.kill()  # SIGKILL: nothing can clean up
    finally:
        proc.kill()
        proc.wait(timeout=30)
    (stale,) = [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert json.loads((stale / TMP_MARKER).read_text())["pid"] == proc.pid
    assert remove_stale_temps(tmp_path) == [stale]
    assert os.listdir(tmp_path) == []


def test_a_swallowed_signal_still_ends_the_run(monkeypatch):
    """A library that catches everything (torch.onnx did, early in an export) cannot hide it."""
    saved = {s: signal.getsignal(s) for s in (*signals.HANDLED, signal.SIGXFSZ)}
    monkeypatch.setattr(signals, "_pending", [])
    try:
        signals.install()
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
        except BaseException:
            pass  # swallowed
        with pytest.raises(signals.Interrupted, match="SIGTERM") as info:
            signals.check()
        assert info.value.exit_code == 143
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
