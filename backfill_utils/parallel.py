"""Independent jobs on the machine's cores: worker processes for training runs.

The expensive stages of the series are many independent, single-threaded trainings
(backbones, compatibility modules, tuning trials, regimes). On a small CPU, one
thread per training and one training per core is faster than several threads per
training (small convolutions and MLPs scale badly with threads), and it gives
**the same numbers as a serial run**: every job runs alone in its process with
``BACKFILL_THREADS`` threads, seeded by its own arguments, and writes its result to
the artifact cache (atomically), from which the caller reads it.

``BACKFILL_WORKERS`` sets the number of worker processes (default 1: everything in
the calling process, as before); ``make reproduce`` / ``make tune`` / ``make
regimes`` pass ``WORKERS=2``. Workers are started with ``spawn`` (safe inside a
Jupyter kernel and with torch's thread pools) and import the package afresh, so a
job must be a module-level function of :mod:`backfill_utils` and its arguments
plain data (a method registered in a notebook is trained in the calling process:
see :func:`backfill_utils.backfill.experiments.train_many`).
"""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import time
from typing import Any, Callable, Sequence

from tqdm import tqdm

from . import config as C

__all__ = ["WORKERS_ENV", "workers", "run_jobs"]

WORKERS_ENV = "BACKFILL_WORKERS"


def workers(explicit: int | None = None) -> int:
    """The number of worker processes: ``explicit``, else ``$BACKFILL_WORKERS``, else 1."""
    value = explicit if explicit is not None else os.environ.get(WORKERS_ENV, "1")
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{WORKERS_ENV} must be a positive integer, got {value!r}") from None
    if n < 1:
        raise ValueError(f"the number of workers must be >= 1, got {n}")
    return n


def _init_worker() -> None:
    if os.environ.get(C.THREADS_ENV):
        import torch

        torch.set_num_threads(int(os.environ[C.THREADS_ENV]))


def _order(n: int, after: dict[int, set[int]], cost: Sequence[float]) -> list[int]:
    """Start order when one job runs at a time: dependencies first, then by cost (largest
    first), ties by index."""
    done: set[int] = set()
    order = []
    while len(order) < n:
        ready = [i for i in range(n) if i not in done and after.get(i, set()) <= done]
        if not ready:
            raise ValueError("the job dependencies form a cycle")
        i = max(ready, key=lambda j: (_unblocks(j, after, done), cost[j], -j))
        order.append(i)
        done.add(i)
    return order


def _unblocks(j: int, after: dict[int, set[int]], done: set[int]) -> int:
    return sum(1 for k, deps in after.items() if k not in done and j in deps)


def run_jobs(fn: Callable[..., Any], jobs: Sequence[tuple], *, after: dict[int, set[int]] | None = None,
             cost: Sequence[float] | None = None, n_workers: int | None = None, desc: str = "jobs",
             progress: bool = True, labels: Sequence[str] | None = None) -> list[Any]:
    """``[fn(*job) for job in jobs]``, computed by :func:`workers` processes.

    ``after[i]``: indices of the jobs that must finish before job ``i`` starts (e.g. a
    BCT backbone after its old model). Among the jobs that may start, those that unblock
    others go first, then the costliest (``cost[i]``, default equal), so that the last
    long job does not start alone at the end. With one worker the jobs run here, in
    that order. Results come back in the order of ``jobs``; a job's exception is raised
    here. A plain ``tqdm`` bar counts finished jobs; a line per job gives its time.
    """
    n = len(jobs)
    after = {i: set(d) for i, d in (after or {}).items() if d}
    cost = list(cost) if cost is not None else [1.0] * n
    labels = list(labels) if labels is not None else [str(i) for i in range(n)]
    k = min(workers(n_workers), max(1, n))
    results: list[Any] = [None] * n
    bar = tqdm(total=n, desc=desc, disable=not progress)
    if k == 1:
        for i in _order(n, after, cost):
            t0 = time.perf_counter()
            results[i] = fn(*jobs[i])
            bar.update(1)
            if progress:
                tqdm.write(f"{desc}: {labels[i]} in {time.perf_counter() - t0:.1f} s")
        bar.close()
        return results
    ctx = multiprocessing.get_context("spawn")
    done: set[int] = set()
    running: dict[cf.Future, tuple[int, float]] = {}
    with cf.ProcessPoolExecutor(max_workers=k, mp_context=ctx, initializer=_init_worker) as pool:
        while len(done) < n:
            started = {i for i, _ in running.values()}
            ready = [i for i in range(n) if i not in done and i not in started and after.get(i, set()) <= done]
            ready.sort(key=lambda j: (-_unblocks(j, after, done), -cost[j], j))
            for i in ready[:k - len(running)]:
                running[pool.submit(fn, *jobs[i])] = (i, time.perf_counter())
            if not running:
                raise ValueError("the job dependencies form a cycle")
            finished, _ = cf.wait(list(running), return_when=cf.FIRST_COMPLETED)
            for fut in finished:
                i, t0 = running.pop(fut)
                results[i] = fut.result()
                done.add(i)
                bar.update(1)
                if progress:
                    tqdm.write(f"{desc}: {labels[i]} in {time.perf_counter() - t0:.1f} s")
    bar.close()
    return results
