"""Latency of baseline vs model, interleaved in one run so machine noise hits both alike."""
from __future__ import annotations

import time

import numpy as np

from contracts.progress import NULL_PROGRESS, Progress
from runtime_check.session import make_session

__all__ = ["measure_interleaved", "measure_pair", "percentiles"]


def percentiles(samples_s: list[float]) -> dict:
    ms = np.asarray(samples_s) * 1000.0
    return {"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
            "mean": float(ms.mean()), "n": int(len(ms))}


def measure_interleaved(paths: dict, feed: dict, threads: int, warmup: int = 10,
                        max_iters: int = 300, budget_s: float = 8.0, progress: Progress = NULL_PROGRESS) -> dict:
    """Round-robin over the models (order alternating each round) after warm-up; stop at
    max_iters rounds or after budget_s seconds (at least 20 rounds). Returns percentiles per name."""
    # Spinning off for every session alike: with it, the session that just ran keeps its threads
    # busy-waiting and slows the next one (2 threads: FP32 MiniLM 10 ms alone, 40 ms interleaved).
    sessions = {k: make_session(p, threads, spinning=False) for k, p in paths.items()}
    feeds = {k: {i.name: feed[i.name] for i in s.get_inputs()} for k, s in sessions.items()}
    names = list(sessions)
    for _ in range(warmup):
        for k in names:
            sessions[k].run(None, feeds[k])
    samples = {k: [] for k in names}
    with progress.task(f"latency, {threads} thread(s)", max_iters, "rounds") as task:
        start = time.perf_counter()
        for i in range(max_iters):
            for k in (names if i % 2 == 0 else names[::-1]):
                t0 = time.perf_counter()
                sessions[k].run(None, feeds[k])
                samples[k].append(time.perf_counter() - t0)
            elapsed = time.perf_counter() - start
            task.set_total(_expected_rounds(i + 1, elapsed, max_iters, budget_s))
            task.advance()
            if i >= 20 and elapsed > budget_s:
                break
    return {k: percentiles(v) for k, v in samples.items()}


def _expected_rounds(done: int, elapsed: float, max_iters: int, budget_s: float) -> int:
    """Rounds the loop will run: max_iters, or fewer when the time budget runs out first."""
    by_budget = int(done * budget_s / elapsed) + 1 if elapsed > 0 else max_iters
    return max(done, min(max_iters, max(21, by_budget)))


def measure_pair(baseline_path, model_path, feed: dict, threads: int, **kw) -> dict:
    """Baseline and model interleaved (ABBA...) in one run; speedup = baseline p50 / model p50."""
    res = measure_interleaved({"baseline": baseline_path, "model": model_path}, feed, threads, **kw)
    base, model = res["baseline"], res["model"]
    return {"threads": threads, "baseline": base, "model": model,
            "speedup": base["p50"] / model["p50"] if model["p50"] > 0 else float("inf")}
