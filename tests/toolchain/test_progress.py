"""Progress reporting: plain lines off a terminal, rich bars on one (through a pseudo-terminal),
nothing with --quiet, and per-stage time and peak memory in report.json."""
from __future__ import annotations

import io
import json
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sqexport.contracts.progress import NULL_PROGRESS, NullProgress, Progress, track
from sqexport.toolchain.progress import PlainProgress, make_progress
from sqexport.toolchain.stage_meter import SAMPLE_S, StageMeter, measured_stage

ROOT = Path(__file__).resolve().parents[2]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_plain_progress_writes_whole_lines_without_ansi():
    out = io.StringIO()
    progress = PlainProgress(out)
    assert isinstance(progress, Progress)
    with measured_stage(progress, "quantize.int8"):
        assert list(track(progress, [1, 2, 3], "calibration", "batches")) == [1, 2, 3]
    text = out.getvalue()
    lines = text.splitlines()
    assert lines[0] == "quantize.int8 ..."
    assert re.fullmatch(r"  calibration: 3 batches in \d+\.\d\d s", lines[1])
    assert re.fullmatch(r"quantize\.int8 +\d+\.\d\d s  peak RSS [\d,]+ MB", lines[2])
    assert "\x1b" not in text and "\r" not in text


def test_track_counts_items_and_closes_its_task_on_break():
    events = []

    class Recorder(NullProgress):
        def task(self, description, total, unit):
            from contextlib import contextmanager

            @contextmanager
            def cm():
                events.append(("open", description, total, unit))

                class T:
                    def advance(self, n=1):
                        events.append(("advance", n))

                    def set_total(self, t):
                        pass
                try:
                    yield T()
                finally:
                    events.append(("close",))
            return cm()

    for i in track(Recorder(), range(5), "eval", "batches"):
        if i == 1:
            break
    assert events == [("open", "eval", 5, "batches"), ("advance", 1), ("close",)]


def test_make_progress_picks_null_for_quiet_and_lines_off_a_terminal():
    with make_progress(quiet=True, stream=io.StringIO()) as p:
        assert p is NULL_PROGRESS
    with make_progress(quiet=False, stream=io.StringIO()) as p:
        assert isinstance(p, PlainProgress)


def test_stage_meter_sees_memory_a_stage_allocates():
    with StageMeter() as before:
        pass
    with StageMeter() as meter:
        block = np.ones(200 * 1024 * 1024 // 8)  # 200 MB, every page touched
        # held past a sampling period: after earlier tests the process's high-water mark may
        # already exceed this, and then only the sampler sees the block
        time.sleep(3 * SAMPLE_S)
        del block
    assert meter.seconds > 0
    assert meter.peak_rss_mb >= before.peak_rss_mb + 150


def test_cli_off_a_terminal_prints_stage_lines_and_report_has_time_and_memory(default_export):
    err = default_export.result.stderr
    assert "\x1b" not in err and "\r" not in err
    assert re.search(r"^quantize\.int8 +\d+\.\d\d s  peak RSS [\d,]+ MB$", err, re.M)
    assert re.search(r"^  calibration: \d+ batches in ", err, re.M)
    assert re.search(r"^  latency, \d thread\(s\): \d+ rounds in ", err, re.M)
    for stage in default_export.report["stages"]:
        assert stage["seconds"] >= 0 and stage["peak_rss_mb"] > 0


@pytest.mark.e2e
def test_quiet_prints_no_progress_but_still_the_error(run_cli, tmp_path):
    result = run_cli(["export", "digits-mlp", "--prune", "none", "--threads", "1", "--min-speedup", "1000",
                      "--quiet", "-o", tmp_path / "out"])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith("Error: gate failed: speedup") and len(result.stderr.splitlines()) == 1
    assert re.match(r"Error: gate failed: speedup \d+\.\d\dx \(limit 1000\.00x\)", result.stderr)  # with its unit
    assert json.loads((tmp_path / "out" / "report.json").read_text())["stages"]


@pytest.mark.e2e
@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_cli_on_a_terminal_shows_bars_and_stage_lines(tmp_path):
    """The real CLI in a subprocess whose stdout/stderr are a pty: rich draws bars with units."""
    master, slave = os.openpty()
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR", "TERM", "TTY_COMPATIBLE")}
    env.update(TERM="xterm-256color", COLUMNS="120", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "sqexport", "digits-mlp", "--prune", "none", "--threads", "1",
                             "-o", str(tmp_path / "out")], stdin=slave, stdout=slave, stderr=slave, env=env,
                            cwd=ROOT, close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + 300
    try:
        while True:
            ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                pytest.fail(f"no end of output from the CLI on a terminal in 300 s: {b''.join(chunks)[-2000:]!r}")
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
        if proc.poll() is None and time.monotonic() > deadline:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.wait(timeout=60) == 0
    raw = b"".join(chunks).decode("utf-8", "replace")
    text = ANSI.sub("", raw)
    assert "\x1b[" in raw  # styled: a terminal was detected
    assert "━" in text  # a bar was drawn
    assert re.search(r"calibration ━+ \d+/\d+ batches", text)
    assert re.search(r"latency, 1 thread\(s\) .*\d+/\d+ rounds", text)
    assert re.search(r"✓ quantize\.int8 +\d+\.\d\d s  peak RSS [\d,]+ MB", text)
    assert "digits-mlp -> " in text  # the summary follows the progress
