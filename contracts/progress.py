"""How long-running code reports progress, without knowing who (if anyone) is watching.

Every layer may import this module: a loop takes a `progress: Progress = NULL_PROGRESS` argument and
wraps its iterable with `track(progress, items, "calibration", unit="batch")`. The CLI builds the
real reporter (rich bars on a terminal, plain lines otherwise, nothing with --quiet: see
toolchain/progress.py) and passes it down; library callers and tests get the silent default.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from typing import Iterable, Iterator, Protocol, TypeVar, runtime_checkable

__all__ = ["Progress", "ProgressTask", "NullProgress", "NULL_PROGRESS", "track"]

T = TypeVar("T")


@runtime_checkable
class ProgressTask(Protocol):
    """One unit-counted piece of work inside a stage (a bar on a terminal)."""

    def advance(self, n: float = 1) -> None: ...

    def set_total(self, total: float | None) -> None:
        """Re-estimate the amount of work (e.g. a loop bounded by a time budget)."""


@runtime_checkable
class Progress(Protocol):
    """A stage is a named step of the pipeline (one line with its time and peak memory); a task is
    a counted loop within it: `unit` names what is counted ("batch", "layer", "round")."""

    def stage_started(self, name: str) -> None: ...

    def stage_finished(self, name: str, seconds: float, peak_rss_mb: float | None) -> None: ...

    def task(self, description: str, total: float | None, unit: str) -> AbstractContextManager[ProgressTask]: ...

    def message(self, text: str) -> None:
        """A one-off informational line (not an error: errors are raised, never reported here)."""


class _NullTask:
    def advance(self, n: float = 1) -> None:
        pass

    def set_total(self, total: float | None) -> None:
        pass


class NullProgress:
    """Reports nothing: the default for library calls, tests and `--quiet`."""

    def stage_started(self, name: str) -> None:
        pass

    def stage_finished(self, name: str, seconds: float, peak_rss_mb: float | None) -> None:
        pass

    @contextmanager
    def task(self, description: str, total: float | None, unit: str) -> Iterator[ProgressTask]:
        yield _NullTask()

    def message(self, text: str) -> None:
        pass


NULL_PROGRESS = NullProgress()


def track(progress: Progress, items: Iterable[T], description: str, unit: str,
          total: int | None = None) -> Iterator[T]:
    """Yield `items`, advancing one task by one per item. `total` defaults to len(items) when the
    iterable has a length; the task closes when the loop ends, breaks or raises."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with progress.task(description, total, unit) as task:
        for item in items:
            yield item
            task.advance()
