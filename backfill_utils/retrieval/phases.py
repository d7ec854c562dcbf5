"""Wall (or CPU) time per phase of the retrieval engine, for the benchmark.

:func:`phase_times` switches the timers on for a block; the engine marks its
phases with :func:`phase`, which costs nothing while the timers are off.

>>> with phase_times() as times:
...     with phase("distances"):
...         pass
>>> sorted(times)
['distances']
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator

import torch

__all__ = ["phase_times", "phase"]

_TIMES: dict[str, float] | None = None
_CLOCK: Callable[[], float] = time.perf_counter


@contextlib.contextmanager
def phase_times(clock: Callable[[], float] = time.perf_counter) -> Iterator[dict[str, float]]:
    """Accumulate seconds per phase name while the block runs (a dict, filled in place).

    ``clock``: ``time.perf_counter`` (wall time) or ``time.process_time`` (CPU
    time of the process, meaningful with one thread on a loaded machine).
    Phases may nest (``total`` contains the others).
    """
    global _TIMES, _CLOCK
    _TIMES, _CLOCK = {}, clock
    try:
        yield _TIMES
    finally:
        _TIMES = None


@contextlib.contextmanager
def phase(name: str, device: torch.device | None = None) -> Iterator[None]:
    """Time the block under ``name`` if :func:`phase_times` is active (CUDA: synchronised)."""
    if _TIMES is None:
        yield
        return
    t0 = _CLOCK()
    yield
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    if _TIMES is not None:
        _TIMES[name] = _TIMES.get(name, 0.0) + _CLOCK() - t0
