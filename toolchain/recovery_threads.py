"""How many torch threads recovery trains with: measured, not assumed.

On an idle machine all cores are faster. On an oversubscribed one (more runnable processes than
cores) torch's intra-op threads wait for each other at every barrier while the scheduler runs
someone else, and one thread can be several times faster per step; a time-bounded budget then buys
that many times fewer steps. Which case holds is only known by measuring, so the first steps
alternate between all cores and one thread, and the faster (seconds per token, median) is kept for
the rest of the run. Four trials each, not two: text batches differ in length and a short one
costs more per token, so two trials can pick the slower option. Measurements:
benchmarks/results/structured-runs.md ("Recovery threads").
"""
from __future__ import annotations

import statistics

import torch

__all__ = ["ThreadPicker"]


class ThreadPicker:
    """`before(step)` sets the thread count for that step, `after(step, seconds, work)` records
    its time per unit of work (tokens, samples); `chosen` is None until the trials are done."""

    def __init__(self, threads: int | None = None, trials: int = 4):
        self.original = torch.get_num_threads()
        cores = self.original
        self.options = [cores, 1] if threads is None and cores > 1 else []
        self.chosen = threads if threads is not None else (None if self.options else cores)
        self.trials = trials
        self.times: dict[int, list[float]] = {n: [] for n in self.options}
        self.current = self.original

    def before(self, step: int) -> None:
        if self.chosen is not None:
            n = self.chosen
        else:  # step 0 warms up (first allocations); then the options take turns
            n = self.options[0] if step == 0 else self.options[(step - 1) % len(self.options)]
        if n != self.current:
            torch.set_num_threads(n)
            self.current = n

    def after(self, step: int, seconds: float, work: int) -> None:
        if self.chosen is not None or step == 0:
            return
        self.times[self.current].append(seconds / max(1, work))
        if all(len(v) >= self.trials for v in self.times.values()):
            self.chosen = min(self.options, key=lambda n: statistics.median(self.times[n]))

    def restore(self) -> None:
        torch.set_num_threads(self.original)

    def record(self) -> dict:
        return {"threads": self.chosen if self.chosen is not None else self.current,
                "thread_trials": {str(n): [round(t, 9) for t in v] for n, v in self.times.items()}}
