"""Latency of baseline vs model, interleaved in one run so machine noise hits both alike."""
from __future__ import annotations

import math
import time

import numpy as np
import onnxruntime as ort

from sqexport.contracts.progress import NULL_PROGRESS, Progress
from sqexport.runtime_check.session import make_session

__all__ = ["measure_interleaved", "measure_pair", "percentiles", "ratio_settled"]

# Early stop of a pair: once the 95% interval of the median per-round speedup is within +-2% of it
# (the report prints speedups to 2 decimals), after at least 20 rounds: p50 and p90 of fewer are
# coarse (p90 of 20 rounds lies between the 18th and 19th fastest).
RATIO_TOLERANCE = 0.02
MIN_SETTLED_ROUNDS = 20
# Warm-up ends after `warmup` rounds or once it has run this long, after at least
# MIN_WARMUP_ROUNDS: the first run allocates buffers and starts threads, the next is at steady
# state; ten 300 ms rounds of a BERT-base-size model at 1 thread were 3 s of nothing measured.
WARMUP_S = 1.0
MIN_WARMUP_ROUNDS = 2


def percentiles(samples_s: list[float]) -> dict:
    ms = np.asarray(samples_s) * 1000.0
    return {"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
            "mean": float(ms.mean()), "n": int(len(ms))}


def measure_interleaved(paths: dict, feed: dict, threads: int, warmup: int = 10,
                        max_iters: int = 300, budget_s: float = 8.0, progress: Progress = NULL_PROGRESS) -> dict:
    """Round-robin over the models (order alternating each round) after warm-up; stop at
    max_iters rounds or after budget_s seconds (at least 20 rounds). Returns percentiles per name."""
    return _measure(paths, feed, threads, warmup, max_iters, budget_s, None, progress)[0]


def ratio_settled(a: list[float], b: list[float], tolerance: float, z: float = 1.96) -> bool:
    """True when the distribution-free 95% confidence interval of the median per-round ratio a/b
    (order statistics n/2 -+ z*sqrt(n)/2 of the sorted log ratios) is within +-tolerance of it:
    more rounds would not move the speedup by more than that."""
    n = len(a)
    half = z * math.sqrt(n) / 2.0
    lo, hi = math.floor(n / 2.0 - half), math.ceil(n / 2.0 + half)
    if lo < 0 or hi >= n:
        return False
    r = np.sort(np.log(np.asarray(a, np.float64) / np.asarray(b, np.float64)))
    return (r[hi] - r[lo]) / 2.0 <= math.log1p(tolerance)


def _measure(paths: dict, feed: dict, threads: int, warmup: int, max_iters: int, budget_s: float,
             ratio_tolerance: float | None, progress: Progress) -> tuple[dict, str]:
    """measure_interleaved plus why it stopped; with two models and `ratio_tolerance` it also stops
    (after MIN_SETTLED_ROUNDS) once their per-round ratio is settled (ratio_settled)."""
    # Spinning off for every session alike: with it, the session that just ran keeps its threads
    # busy-waiting and slows the next one (measured in benchmarks/README.md, "spinning is off").
    # a value may be a ready session (made with these threads and spinning off, verify.latency_sessions)
    sessions = {k: p if isinstance(p, ort.InferenceSession) else make_session(p, threads, spinning=False)
                for k, p in paths.items()}
    feeds = {k: {i.name: feed[i.name] for i in s.get_inputs()} for k, s in sessions.items()}
    names = list(sessions)
    start = time.perf_counter()
    for i in range(warmup):
        for k in names:
            sessions[k].run(None, feeds[k])
        if i + 1 >= MIN_WARMUP_ROUNDS and time.perf_counter() - start >= WARMUP_S:
            break
    samples = {k: [] for k in names}
    stopped = "max_iters"
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
            if (ratio_tolerance is not None and len(names) == 2 and i + 1 >= MIN_SETTLED_ROUNDS
                    and ratio_settled(samples[names[0]], samples[names[1]], ratio_tolerance)):
                stopped = "ratio_settled"
                break
            if i >= 20 and elapsed > budget_s:
                stopped = "time_budget"
                break
    return {k: percentiles(v) for k, v in samples.items()}, stopped


def _expected_rounds(done: int, elapsed: float, max_iters: int, budget_s: float) -> int:
    """Rounds the loop will run: max_iters, or fewer when the time budget runs out first."""
    by_budget = int(done * budget_s / elapsed) + 1 if elapsed > 0 else max_iters
    return max(done, min(max_iters, max(21, by_budget)))


def measure_pair(baseline_path, model_path, feed: dict, threads: int, warmup: int = 10, max_iters: int = 300,
                 budget_s: float = 8.0, ratio_tolerance: float | None = RATIO_TOLERANCE,
                 progress: Progress = NULL_PROGRESS) -> dict:
    """Baseline and model interleaved (ABBA...) in one run; speedup = baseline p50 / model p50.
    Stops early once the per-round ratio is settled to `ratio_tolerance` (None: never early);
    `stopped_by` says which bound ended it (ratio_settled, time_budget, max_iters)."""
    res, stopped = _measure({"baseline": baseline_path, "model": model_path}, feed, threads, warmup, max_iters,
                            budget_s, ratio_tolerance, progress)
    base, model = res["baseline"], res["model"]
    return {"threads": threads, "baseline": base, "model": model,
            "speedup": base["p50"] / model["p50"] if model["p50"] > 0 else float("inf"),
            "stopped_by": stopped}
