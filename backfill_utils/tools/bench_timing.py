"""Measuring helpers of the serving benchmark: interleaved timing, recall against exact
results, and the process's resident memory."""
from __future__ import annotations

import ctypes
import time
from typing import Callable

import numpy as np


def status_mb(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process in MiB (Linux), else ``nan``.

    Before reading ``VmRSS`` freed heap memory is handed back to the system
    (glibc ``malloc_trim``), so that growth measures what an index holds.
    """
    if field == "VmRSS":
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def interleaved(fns: dict[str, Callable], inputs: list, min_n: int, max_seconds: float) -> dict[str, list]:
    """Time each function on each input, alternating their order; stop after
    ``max_seconds`` once ``min_n`` inputs are done. Three untimed warm-up calls."""
    for fn in fns.values():
        for x in inputs[:3]:
            fn(x)
    times: dict[str, list] = {name: [] for name in fns}
    names, start = list(fns), time.perf_counter()
    for i, x in enumerate(inputs):
        if i >= min_n and time.perf_counter() - start > max_seconds:
            break
        for name in names if i % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            fns[name](x)
            times[name].append(time.perf_counter() - t0)
    return times


def recall_at(I: np.ndarray, I_exact: np.ndarray) -> float:
    """Mean over queries of ``|top-k  intersect  exact top-k| / k``."""
    return float(np.mean([len(set(a) & set(b)) / I.shape[1] for a, b in zip(I.tolist(), I_exact.tolist())]))
