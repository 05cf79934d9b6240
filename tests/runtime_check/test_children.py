"""Issue 20 item 9: children (the device runner, qemu) run in their own process group and die with
it on every way out: a normal end, an error, a timeout, SIGTERM or Ctrl-C of sqexport."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from child_process import alive, signals_as_from_a_terminal
from sqexport.runtime_check.children import run_child

ROOT = Path(__file__).resolve().parents[2]


def _wait_gone(pids, timeout=10.0):
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def test_a_timeout_kills_the_whole_group(tmp_path):
    pid_file = tmp_path / "pid"
    script = f"import os, time; open('{pid_file}', 'w').write(str(os.getpid())); time.sleep(60)"
    cmd = f'{sys.executable} -c "{script}" & wait'
    with pytest.raises(subprocess.TimeoutExpired, match="timed out after 2 seconds"):
        run_child(cmd, timeout=2, shell=True)
    assert _wait_gone([int(pid_file.read_text())]) == []


def test_a_grandchild_left_behind_after_a_normal_end_is_killed(tmp_path):
    pid_file = tmp_path / "pid"
    cmd = (f"{sys.executable} -c 'import os, time; open(\"{pid_file}\", \"w\").write(str(os.getpid())); "
           "time.sleep(60)' >/dev/null 2>&1 & sleep 1; exit 0")
    assert run_child(cmd, timeout=30, shell=True).returncode == 0
    assert _wait_gone([int(pid_file.read_text())]) == []


SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from sqexport.toolchain import signals
    signals.install()
    import sqexport.runtime_check.arm64 as arm64
    import numpy as np
    arm64.emulator_status = lambda: (True, "")
    arm64._command = lambda root: [sys.executable]  # "qemu": a plain Python running the sleeper
    arm64._env = lambda root, tier: None
    arm64.RUNNER = Path(sys.argv[1])
    Path(sys.argv[2]).write_bytes(b"model")
    arm64.run_tiers(Path(sys.argv[2]), [{"x": np.zeros(1)}])
""")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_arm64_check_kills_every_emulator(tmp_path, sig):
    sleeper = tmp_path / "sleeper.py"
    sleeper.write_text(f"import os, time\nopen({str(tmp_path)!r} + f'/pid-{{os.getpid()}}', 'w').close()\n"
                       "time.sleep(120)\n")
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path / "tmp")}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(sleeper), str(tmp_path / "model.ort")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=signals_as_from_a_terminal)
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("pid-*"))) < 3:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"three emulators never started (exit {proc.poll()}): {proc.communicate(timeout=30)}")
            time.sleep(0.05)
        proc.send_signal(sig)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    pids = [int(p.name.split("-")[1]) for p in tmp_path.glob("pid-*")]
    assert _wait_gone(pids) == [], "an emulator outlived sqexport"
    assert [p for p in os.listdir(tmp_path / "tmp") if "sqexport" in p] == []  # not onnxruntime's `.ses`
