"""Jobs done / running / failed, told through the CLI's progress reporter (silent with --quiet)."""
from __future__ import annotations

from sqexport.contracts.progress import Progress
from sqexport.toolchain.sweep_state import Outcome

__all__ = ["Tally", "verdict"]


def verdict(outcome: Outcome) -> str:
    if outcome.exit_code is None:
        return "cancelled"
    return {0: "passed", 1: "gate failed", 2: "bad input", 3: "internal error"}.get(
        outcome.exit_code, "interrupted" if outcome.exit_code > 128 else "crashed")


class Tally:
    """Counts jobs as executors report them; one line per event, and a bar over all jobs."""

    def __init__(self, total: int, progress: Progress, bar=None):
        self.total, self.progress, self.bar = total, progress, bar
        self.running: set[str] = set()
        self.done = self.failed = 0

    def _line(self, text: str) -> None:
        self.progress.message(f"sweep: {self.done}/{self.total} done, {len(self.running)} running, "
                              f"{self.failed} failed | {text}")

    def started(self, name: str, attempt: int = 1) -> None:
        self.running.add(name)
        self._line(f"{name} started" + (f" (attempt {attempt})" if attempt > 1 else ""))

    def retrying(self, name: str, why: str) -> None:
        self.running.discard(name)
        self._line(f"{name} {why}; retrying")

    def finished(self, outcome: Outcome) -> None:
        self.running.discard(outcome.name)
        self.done += 1
        self.failed += outcome.exit_code != 0
        if self.bar is not None:
            self.bar.advance(1)
        how = "skipped: output matches its manifest and job spec" if outcome.skipped else (
            f"{verdict(outcome)} in {outcome.seconds:.1f} s" + (f" on {outcome.where}" if outcome.where else ""))
        self._line(f"{outcome.name} {how}")
