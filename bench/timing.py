"""Shared timing helper for the bench/ scripts."""

import statistics
import time


def median_time(fn, repeats: int) -> float:
    """Median wall time of `repeats` calls of fn, after one warm-up call (compile / allocate)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
