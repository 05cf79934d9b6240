"""The CLI's progress reporters (contracts.progress.Progress), chosen by where stderr goes.

- a terminal: rich, one live line per running stage (spinner, elapsed time) and a bar per task with
  its unit of work and an ETA; a finished stage leaves one permanent line with its time and peak
  memory, finished bars vanish;
- anything else (a pipe, a CI log): plain text lines, no ANSI codes, no carriage returns; a task
  prints its count when it ends and every PLAIN_EVERY_S while it runs;
- `--quiet`: nothing (contracts.progress.NullProgress). Errors are raised, never reported here.
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from typing import IO, Iterator

from sqexport.contracts.progress import NULL_PROGRESS, Progress
from sqexport.toolchain import signals

__all__ = ["RichProgress", "PlainProgress", "make_progress", "stage_line"]

PLAIN_EVERY_S = 10.0  # a plain-text task says how far it is at least this often


def stage_line(name: str, seconds: float, peak_rss_mb: float | None) -> str:
    mem = f"  peak RSS {peak_rss_mb:,.0f} MB" if peak_rss_mb is not None else ""
    return f"{name:<24} {seconds:8.2f} s{mem}"


def _count(done: float, total: float | None, unit: str) -> str:
    return f"{done:g}/{total:g} {unit}" if total is not None else f"{done:g} {unit}"


class _PlainTask:
    def __init__(self, out: "PlainProgress", description: str, total: float | None, unit: str):
        self.out, self.description, self.total, self.unit = out, description, total, unit
        self.done, self.t0 = 0.0, time.perf_counter()
        self.last = self.t0

    def advance(self, n: float = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= PLAIN_EVERY_S:
            self.last = now
            self.out.write(f"  {self.description}: {_count(self.done, self.total, self.unit)} "
                           f"({now - self.t0:.0f} s)")

    def set_total(self, total: float | None) -> None:
        self.total = total


class PlainProgress:
    """Line-oriented progress for logs: every line is complete when written."""

    def __init__(self, stream: IO[str]):
        self.stream = stream

    def write(self, line: str) -> None:
        if signals.received():  # after "interrupted" nothing more: a generator closed late (track)
            return              # would otherwise print its task line after the error line
        print(line, file=self.stream, flush=True)

    def stage_started(self, name: str) -> None:
        self.write(f"{name} ...")

    def stage_finished(self, name: str, seconds: float, peak_rss_mb: float | None) -> None:
        self.write(stage_line(name, seconds, peak_rss_mb))

    @contextmanager
    def task(self, description: str, total: float | None, unit: str) -> Iterator[_PlainTask]:
        task = _PlainTask(self, description, total, unit)
        try:
            yield task
        except GeneratorExit:  # the loop stopped early (a `break` in the caller): still a result
            self.write(f"  {description}: {task.done:g} {unit} in {time.perf_counter() - task.t0:.2f} s")
            raise
        # an error ends the task without a line: the error is what the user sees next
        self.write(f"  {description}: {task.done:g} {unit} in {time.perf_counter() - task.t0:.2f} s")

    def message(self, text: str) -> None:
        self.write(text)


class _RichTask:
    def __init__(self, bars, task_id, total: float | None, unit: str):
        self.bars, self.task_id, self.total, self.unit, self.done = bars, task_id, total, unit, 0.0

    def _show(self) -> None:  # the "3/16 batches" column moves with the bar
        self.bars.update(self.task_id, completed=self.done, total=self.total,
                         count=_count(self.done, self.total, self.unit))

    def advance(self, n: float = 1) -> None:
        self.done += n
        self._show()

    def set_total(self, total: float | None) -> None:
        self.total = total
        self._show()


class _TaskOnly:
    """A rich column shown on task rows only: a stage row is a spinner, its name and elapsed time."""

    def __init__(self, column):
        self.column = column

    def __call__(self, task):
        from rich.text import Text

        return Text("") if task.fields.get("stage") else self.column(task)

    def __getattr__(self, name):  # rich reads table_column etc. from the wrapped column
        return getattr(self.column, name)


class RichProgress:
    """Live bars on a terminal; use as a context manager (it owns the live display)."""

    def __init__(self, stream: IO[str]):
        from rich.console import Console
        from rich.progress import (BarColumn, Progress as Bars, SpinnerColumn, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.console = Console(file=stream, force_terminal=True)
        self.bars = Bars(SpinnerColumn(), TextColumn("{task.description}"), _TaskOnly(BarColumn()),
                         _TaskOnly(TextColumn("{task.fields[count]}")), TimeElapsedColumn(),
                         _TaskOnly(TextColumn("ETA")), _TaskOnly(TimeRemainingColumn()),
                         console=self.console, transient=True)
        self.stages: dict[str, int] = {}

    def __enter__(self) -> "RichProgress":
        self.bars.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bars.stop()

    def stage_started(self, name: str) -> None:
        self.stages[name] = self.bars.add_task(f"[bold]{name}[/]", total=None, count="", stage=True)

    def stage_finished(self, name: str, seconds: float, peak_rss_mb: float | None) -> None:
        task_id = self.stages.pop(name, None)
        if task_id is not None:
            self.bars.remove_task(task_id)
        if signals.received():
            return
        self.console.print(f"[green]✓[/] {stage_line(name, seconds, peak_rss_mb)}", highlight=False)

    @contextmanager
    def task(self, description: str, total: float | None, unit: str) -> Iterator[_RichTask]:
        task_id = self.bars.add_task(f"  {description}", total=total, count=_count(0, total, unit))
        handle = _RichTask(self.bars, task_id, total, unit)
        try:
            yield handle
        finally:
            self.bars.refresh()  # a bar shorter than one refresh period is still drawn once
            self.bars.remove_task(task_id)

    def message(self, text: str) -> None:
        if not signals.received():
            self.console.print(text, highlight=False, markup=False)


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty() and os.environ.get("TERM", "") != "dumb"
    except (AttributeError, ValueError):
        return False


@contextmanager
def make_progress(quiet: bool = False, stream: IO[str] | None = None) -> Iterator[Progress]:
    """Nothing with quiet; rich bars when `stream` (stderr by default) is a terminal; else lines."""
    stream = stream if stream is not None else sys.stderr
    if quiet:
        yield NULL_PROGRESS
    elif _is_terminal(stream):
        with RichProgress(stream) as progress:
            yield progress
    else:
        yield PlainProgress(stream)
