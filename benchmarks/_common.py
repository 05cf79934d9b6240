"""Shared helpers for the side-by-side benchmarks: machine info, latency over many models,
file sizes, Markdown tables and the results folder."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import platform
import re
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import onnxruntime as ort

from sqexport.exporters.sparse import file_sizes
from sqexport.runtime_check.latency import measure_interleaved
from sqexport.runtime_check.session import default_threads

__all__ = ["RESULTS_DIR", "quiet", "run_sqexport", "machine_info", "project_revision", "thread_settings", "other_cpu_load", "wait_for_quiet", "latency_table", "size_of",
           "markdown_table", "write_results"]

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = PROJECT_ROOT / "benchmarks" / "results"
MB = 1e6
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


@contextlib.contextmanager
def quiet():
    """Silence the exporters' warnings, progress prints and INFO logs."""
    loggers = [logging.getLogger(n) for n in ("", "optimum", "transformers", "torch.onnx", "onnxruntime")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def run_sqexport(model: str, flags: list[str], out: Path) -> tuple[int, dict]:
    """`sqexport export MODEL FLAGS -o OUT` in-process, exactly as a user types it; returns (exit
    code, report.json). Exit 1 (a gate failed) still writes model.onnx and the report; anything
    else is an error."""
    from click.testing import CliRunner

    from sqexport.toolchain.cli import cli

    args = ["export", model, *flags]
    with quiet():
        result = CliRunner().invoke(cli, [*args, "-o", str(out)], catch_exceptions=False)
    if result.exit_code not in (0, 1) or not (out / "report.json").is_file():
        raise RuntimeError(f"`sqexport {' '.join(args)}` exited {result.exit_code}:\n{result.output}")
    return result.exit_code, json.loads((out / "report.json").read_text())


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info(packages: tuple[str, ...] = ("onnxruntime", "onnx", "torch")) -> dict:
    """CPU model, core counts, int8-relevant instruction sets and library versions."""
    info = _cpuinfo()
    model = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", info, re.M)
    flag_set = set(flags.group(1).split()) if flags else set()
    return {
        "cpu": model.group(1).strip() if model else platform.processor() or "unknown",
        "cpu_count": os.cpu_count(),
        "usable_cores": default_threads(),
        "isa": [f for f in ISA_FLAGS if f in flag_set],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "versions": {p: _version(p) for p in packages},
    }


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def project_revision() -> str:
    """The project's commit, '+local changes' when files outside benchmarks/ differ from it."""
    commit = _git("rev-parse", "--short", "HEAD")
    if commit is None:
        return "unknown"
    changed = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks")
    return commit + (" + local changes" if changed else "")


def thread_settings() -> list[int]:
    """1 thread and all usable cores (one entry when they coincide)."""
    return sorted({1, default_threads()})


def _busy_seconds() -> float | None:
    """CPU seconds all processes spent busy since boot (user+nice+system+irq+softirq+steal)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    """CPU seconds of this process and of its children that ended (a benchmark's child process
    is its own work, not another process's load)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def other_cpu_load(fn):
    """Run fn(); return (its result, CPU cores used meanwhile by *other* processes, or None)."""
    busy0, own0, wall0 = _busy_seconds(), _own_seconds(), time.perf_counter()
    result = fn()
    busy1, own1, wall = _busy_seconds(), _own_seconds(), time.perf_counter() - wall0
    if busy0 is None or busy1 is None:
        return result, None
    return result, max(0.0, (busy1 - busy0) - (own1 - own0)) / wall


def wait_for_quiet(max_wait_s: float, threshold: float = 0.25, log=print) -> float | None:
    """Wait (up to max_wait_s) until other processes use less than `threshold` CPU cores over a
    2 s window; returns the last reading."""
    deadline = time.monotonic() + max_wait_s
    _, others = other_cpu_load(lambda: time.sleep(2.0))
    while others is not None and others >= threshold and time.monotonic() < deadline:
        log(f"other processes use {others:.2f} cores; waiting for a quiet machine "
            f"({deadline - time.monotonic():.0f} s left)")
        _, others = other_cpu_load(lambda: time.sleep(10.0))
    return others


def latency_table(paths: dict[str, Path], feed: dict, threads: list[int], max_iters: int,
                  budget_s: float, max_wait_s: float = 0.0, log=print) -> tuple[dict[int, dict], dict[int, float | None]]:
    """Every model in one interleaved run per thread setting. Returns
    ({threads: {name: {p50, p90, mean, n, speedup}}}, {threads: cores other processes used}),
    speedup = p50 of the first model (the baseline) / p50 of this one."""
    baseline = next(iter(paths))
    table, others = {}, {}
    for t in threads:
        if max_wait_s > 0:
            wait_for_quiet(max_wait_s, log=log)
        log(f"latency at {t} thread(s): {len(paths)} models interleaved, "
            f"up to {max_iters} rounds / {budget_s:.0f} s")
        res, others[t] = other_cpu_load(
            lambda: measure_interleaved(paths, feed, t, max_iters=max_iters, budget_s=budget_s))
        for stats in res.values():
            stats["speedup"] = res[baseline]["p50"] / stats["p50"]
        table[t] = res
    return table, others


def size_of(path: Path) -> dict:
    """Raw and zip-deflated (level 9) size of one file."""
    s = file_sizes(path)
    return {"bytes": s["raw"], "zipped_bytes": s["compressed"],
            "mb": s["raw"] / MB, "zipped_mb": s["compressed"] / MB}


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def line(cells):
        return "| " + " | ".join(str(c) for c in cells) + " |"

    align = ["---" if i < 2 else "---:" for i in range(len(headers))]
    return "\n".join([line(headers), line(align), *(line(r) for r in rows)])


# a Haswell's int8-relevant CPU flags (AVX2, no VNNI): builds "as on a host without VNNI" swap these in
HASWELL_FLAGS = frozenset({"sse4_2", "avx", "avx2", "fma"})


def results_header(name: str) -> str:
    """Where and when: the host's CPU and int8 flags, the commit and the date (UTC)."""
    import datetime

    m = machine_info()
    commit, _, changes = project_revision().partition(" + ")
    local = f" + {changes}" if changes else ""
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"# {name}\n\n- Host: {m['cpu']}, {m['cpu_count']} logical CPUs; ISA flags {', '.join(m['isa']) or 'none'}.\n"
            f"- Commit: `{commit}`{local}; date: {when}.\n")


def write_results(name: str, data: dict, markdown: str) -> tuple[Path, Path]:
    """results/<name>.json and .md; a page that does not already name its commit gets the header
    (a rerun must not lose where and when it ran)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    json_path, md_path = RESULTS_DIR / f"{name}.json", RESULTS_DIR / f"{name}.md"
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    if not re.search(r"`[0-9a-f]{7}|revision [0-9a-f]{7}", markdown[:1500]):
        markdown = results_header(name) + "\n" + markdown
    md_path.write_text(markdown + "\n")
    return json_path, md_path


@dataclass
class Variant:
    """One model a benchmark measures: its row name, how it was built, the file."""

    name: str
    settings: str
    path: Path
    info: dict = field(default_factory=dict)  # builder-specific facts, kept in the JSON
