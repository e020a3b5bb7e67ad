"""Timing helpers shared by the benchmarks (imported as ``from timing import ...``: a benchmark
runs as a script, so its own folder is on ``sys.path``)."""

from __future__ import annotations

import statistics
import time
from typing import Callable

#: The clocks a benchmark's ``--clock`` can name: wall time, or this process's CPU time (steadier
#: on a machine that other jobs share).
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def interleaved(fns: dict[str, Callable[[], object]], repeat: int, clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median time of each function over ``repeat`` rounds that call every function once (after a
    warm-up round); interleaving keeps slow phases of a shared machine from favouring one."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t = clock()
            fn()
            times[name].append(clock() - t)
    return {name: statistics.median(v) for name, v in times.items()}
