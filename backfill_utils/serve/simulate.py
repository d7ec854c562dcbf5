"""Online backfilling under query load: a backfill worker and a query stream on one index.

:func:`simulate` runs the service of a registered method
(:func:`backfill_utils.serve.from_method.served_method`) on a **simulated clock**: at every
tick of ``tick_s`` simulated seconds the backfill worker re-extracts the next items of
the method's backfill order (``throughput`` items per simulated second: the
``index.backfill`` call is real, the re-extraction itself is the cached new
embedding), then the tick's queries are served one by one by ``index.search``. The
interleaving is fixed, so the **quality** columns (top-1 and mAP@k of the tick's
labelled queries, leave-one-out: the query's own gallery item is dropped) are the same
numbers for the same seed. The stream replays the same seeded sample of labelled
queries at every tick (:func:`query_stream`), so a curve moves with the backfill, not
with the sample. The **latency** columns are measured wall-clock times of
this machine (``time.perf_counter`` around each ``index.search`` call, batch 1, and
around the worker's ``backfill`` call) and vary from run to run; they are kept in
their own table.

A query costs a forward pass of each backbone of its query side
(:func:`backfill_utils.backfill.registry.query_side`: two for rank merge), which the index does
not see: ``forward_ms`` states that cost per query (the caller's numbers, e.g. the
backbones' measured time per query of :func:`backfill_utils.studies.query_cost.query_cost`),
and ``total_*`` adds it to the measured search latency. psi and rho run inside
``search`` and are measured there.

Offline backfilling (the reference ``offline``) is served by :class:`OfflineService`:
an old/old index until the worker has re-extracted every item, then a new/new index.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import pandas as pd
from tqdm import tqdm

from ..backfill import registry as MM
from ..retrieval.metrics import positive_int

__all__ = ["LoadPlan", "OfflineService", "ap_at_k", "query_stream", "backfill_schedule", "service",
           "simulate", "simulate_all", "LATENCY_NOTE", "load_figure"]


@dataclass(frozen=True)
class LoadPlan:
    """The load of one simulation: the worker's ``throughput`` (items per simulated
    second), the clock's ``tick_s`` (simulated seconds per measurement), the labelled
    queries served per tick, the cut-off ``k`` of mAP@k, the ticks served after the
    backfill completed (``settle_ticks``) and the query stream's ``seed``."""

    throughput: float
    tick_s: float = 1.0
    queries_per_tick: int = 100
    k: int = 10
    settle_ticks: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.throughput > 0 and self.tick_s > 0 and math.isfinite(self.throughput * self.tick_s)):
            raise ValueError(f"throughput and tick_s must be positive, got {self.throughput}, {self.tick_s}")
        positive_int(self.queries_per_tick, "queries_per_tick")
        positive_int(self.k, "k")
        if self.settle_ticks < 0:
            raise ValueError(f"settle_ticks must be >= 0, got {self.settle_ticks}")

    @classmethod
    def for_gallery(cls, n: int, *, throughput: float | None = None, queries_per_tick: int | None = None,
                    ticks: int = 20, **kw: Any) -> "LoadPlan":
        """A plan whose backfill of ``n`` items takes ``ticks`` ticks of 1 s unless
        ``throughput`` is given; ``queries_per_tick`` default ``min(n, 250)``."""
        return cls(throughput=float(throughput) if throughput else n / ticks,
                   queries_per_tick=int(queries_per_tick or min(n, 250)), **kw)


def ap_at_k(hits: np.ndarray, n_relevant: np.ndarray) -> np.ndarray:
    """AP@k per query: ``sum_i precision@i * hit_i / min(k, n_relevant)`` over the first
    ``k`` results (0 for a query without relevant items).

    >>> ap_at_k(np.array([[True, False, True], [False, False, False]]), np.array([2, 4])).round(4).tolist()
    [0.8333, 0.0]
    """
    hits = np.asarray(hits, dtype=bool)
    k = hits.shape[1]
    precision = np.cumsum(hits, axis=1) / np.arange(1, k + 1)
    denom = np.minimum(np.asarray(n_relevant), k)
    return np.where(denom > 0, (precision * hits).sum(1) / np.maximum(denom, 1), 0.0)


def query_stream(n: int, plan: LoadPlan, n_ticks: int) -> list[np.ndarray]:
    """Rows of the queries of each tick: the same seeded sample of ``queries_per_tick``
    of the ``n`` test items at every tick (without replacement), so that what changes
    from tick to tick is the gallery, not the sample of queries."""
    rows = np.sort(np.random.default_rng(plan.seed).choice(n, min(n, plan.queries_per_tick), replace=False))
    return [rows] * n_ticks


def backfill_schedule(n: int, plan: LoadPlan) -> np.ndarray:
    """Items backfilled at each tick: ``min(n, floor(throughput * tick_s * t))``, from 0
    to ``n``, then ``settle_ticks`` more ticks at ``n``.

    >>> backfill_schedule(10, LoadPlan(throughput=4, settle_ticks=1)).tolist()
    [0, 4, 8, 10, 10]
    """
    per_tick = plan.throughput * plan.tick_s
    done = int(math.ceil(n / per_tick))
    t = np.arange(done + 1 + plan.settle_ticks)
    return np.minimum(n, np.floor(per_tick * t + 1e-9).astype(np.int64))


class OfflineService:
    """Offline backfilling as a service: old/old until every item is re-extracted, then
    new/new. ``old`` / ``new``: the gallery's embeddings by each model (ids = rows)."""

    two_pass = False

    def __init__(self, old: np.ndarray, new: np.ndarray, labels: np.ndarray, order: np.ndarray, **kw: Any) -> None:
        from .index import OnlineBackfillIndex

        self.name, self.old, self.new, self.labels, self.order = "offline", old, new, labels, order
        self.old_index = OnlineBackfillIndex(old.shape[1], old.shape[1], **kw)
        self.old_index.add_old(np.arange(len(old)), old)
        self.new_index = OnlineBackfillIndex(new.shape[1], new.shape[1], **kw)  # built, not served, until done

    @property
    def switched(self) -> bool:
        return len(self.new_index) == len(self.order)

    def backfill_to(self, count: int) -> int:
        done = len(self.new_index)
        batch = self.order[done:count]
        if len(batch):
            self.new_index.add(batch, self.new[batch])
        return len(batch)

    def search(self, rows: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        rows = np.asarray(rows, dtype=np.int64)
        return self.new_index.search(self.new[rows], k) if self.switched else self.old_index.search(self.old[rows], k)


def service(cfg: dict, setting: str, name: str, *, progress: bool = True, **index_kwargs: Any):
    """What :func:`simulate` serves for registered method ``name``: its
    :class:`~backfill_utils.serve.from_method.ServedMethod`, or an :class:`OfflineService`
    for ``offline`` (on the same gallery and random order)."""
    from ..backfill import orders
    from ..backfill import experiments as X
    from .from_method import served_method

    if MM.get(name).reference == "offline":
        data = X.SettingData(cfg, setting, progress=progress)
        old = data.test("old")
        order = orders.method_order(MM.get(name), MM.Trained(), old, int(cfg["eval"]["order_seed"]))
        return OfflineService(old, data.test("new"), np.asarray(data.test_labels), order, **index_kwargs)
    return served_method(cfg, setting, name, progress=progress, **index_kwargs)


def _serve_tick(svc: Any, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Serve the queries ``rows`` one at a time: (top-1 hit, AP@k, search seconds) per query."""
    labels = svc.labels
    hits = np.zeros((len(rows), k), dtype=bool)
    seconds = np.empty(len(rows))
    for j, row in enumerate(rows):
        t0 = time.perf_counter()
        _, ids = svc.search([row], k + 1)
        seconds[j] = time.perf_counter() - t0
        got = ids[0][(ids[0] != row) & (ids[0] >= 0)][:k]  # leave-one-out: the query's own item is dropped
        hits[j, :len(got)] = labels[got] == labels[row]
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    n_rel = counts[inverse[rows]] - 1
    return hits[:, 0], ap_at_k(hits, n_rel), seconds


def simulate(svc: Any, plan: LoadPlan, *, forward_ms: float | Mapping[bool, float] = 0.0,
             progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Serve ``plan``'s query stream while the worker backfills ``svc`` (see the module docstring).

    ``forward_ms``: the stated backbone cost per query (for :class:`OfflineService` a
    mapping ``{switched: ms}``). Returns ``(quality, latency)``, one row per tick:
    ``method, tick, elapsed_s, backfilled, fraction, top1, map_at_k`` (percent; the same
    for the same seed) and ``method, tick, elapsed_s, search_p50_ms, search_p99_ms,
    forward_ms, total_p50_ms, total_p99_ms, worker_ms`` (measured wall-clock times).
    """
    n = len(svc.order)
    if getattr(svc, "index", None) is not None and svc.index.n_new:
        raise ValueError("simulate starts from a gallery with nothing backfilled; build a fresh service")
    schedule = backfill_schedule(n, plan)
    stream = query_stream(n, plan, len(schedule))
    quality, latency = [], []
    for t in tqdm(range(len(schedule)), desc=f"serve {svc.name}", disable=not progress):
        t0 = time.perf_counter()
        svc.backfill_to(int(schedule[t]))
        worker = time.perf_counter() - t0
        top1, ap, seconds = _serve_tick(svc, stream[t], plan.k)
        elapsed = t * plan.tick_s
        fwd = forward_ms[getattr(svc, "switched", False)] if isinstance(forward_ms, Mapping) else forward_ms
        ms = 1e3 * seconds
        quality.append({"method": svc.name, "tick": t, "elapsed_s": elapsed, "backfilled": int(schedule[t]),
                        "fraction": schedule[t] / n, "top1": 100 * top1.mean(), "map_at_k": 100 * ap.mean()})
        latency.append({"method": svc.name, "tick": t, "elapsed_s": elapsed,
                        "search_p50_ms": np.percentile(ms, 50), "search_p99_ms": np.percentile(ms, 99),
                        "forward_ms": float(fwd), "total_p50_ms": np.percentile(ms + fwd, 50),
                        "total_p99_ms": np.percentile(ms + fwd, 99), "worker_ms": 1e3 * worker})
    return pd.DataFrame(quality), pd.DataFrame(latency)


def simulate_all(cfg: dict, setting: str, names, plan_kw: Mapping | None = None, *,
                 backbone_ms: Mapping[str, float] | None = None,
                 progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame, LoadPlan]:
    """:func:`simulate` for each registered method of ``names`` on the same query stream.

    ``plan_kw``: :meth:`LoadPlan.for_gallery` arguments (``throughput``,
    ``queries_per_tick``, ...); ``backbone_ms``: the forward cost per query of each
    backbone (``{"old": ms, "new": ms, "bct": ms}``; default 0), summed over each method's
    query side. Returns the two long tables and the plan.
    """
    costs = dict(backbone_ms or {})
    q, lat, plan = [], [], None
    for name in names:
        svc = service(cfg, setting, name, progress=progress)
        plan = plan or LoadPlan.for_gallery(len(svc.order), **dict(plan_kw or {}))
        if isinstance(svc, OfflineService):
            fwd: Any = {False: costs.get("old", 0.0), True: costs.get("new", 0.0)}
        else:
            fwd = sum(costs.get(role, 0.0) for role, _ in MM.query_side(name))
        a, b = simulate(svc, plan, forward_ms=fwd, progress=progress)
        q.append(a)
        lat.append(b)
    return pd.concat(q, ignore_index=True), pd.concat(lat, ignore_index=True), plan


#: What the latency panels of :func:`load_figure` measure, and how it differs from Table 2.
LATENCY_NOTE = ("Latency: one query at a time (batch 1) = the measured index.search (faiss search of both sides; psi and "
                "rho run inside it, at batch 1) + the stated backbone forward per query.\nTable 2's ms/query: the query "
                "forward alone (backbones + psi, rho) per query of a batch of 64, without the search.")


def load_figure(quality: pd.DataFrame, latency: pd.DataFrame, plan: LoadPlan, n_items: int, title: str = ""):
    """Top-1 and mAP@k of the query stream (top row), and the p50 and p99 query latency
    (search at batch 1 + stated forward cost; bottom row, plain decimal ticks) against the
    simulated elapsed time; a dotted line where the backfill completes; one legend, and
    :data:`LATENCY_NOTE` under the panels."""
    import matplotlib.pyplot as plt

    from ..figures.style import plain_log_axis

    fig, axes = plt.subplots(2, 2, figsize=(11.0, 7.6), sharex=True)
    done = math.ceil(n_items / (plan.throughput * plan.tick_s)) * plan.tick_s
    panels = ((quality, "top1", "CMC top-1 (%)"), (quality, "map_at_k", f"mAP@{plan.k} (%)"),
              (latency, "total_p50_ms", "p50 latency per query, batch 1 (ms)"),
              (latency, "total_p99_ms", "p99 latency per query, batch 1 (ms)"))
    for ax, (frame, col, what) in zip(axes.ravel(), panels):
        for name in dict.fromkeys(quality["method"]):
            part = frame[frame.method == name]
            ax.plot(part.elapsed_s, part[col], label=name, **MM.style(name))
        ax.axvline(done, color="0.6", lw=0.8, ls=":")
        ax.set_ylabel(what)
    for ax in axes[1]:
        ax.set_xlabel("elapsed (simulated s)")
    axes[1][1].set_yscale("log")
    plain_log_axis(axes[1][1].yaxis)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.955), ncol=len(labels), fontsize=9)
    fig.suptitle(title or f"serving while the gallery is backfilled at {plan.throughput:g} items/s", fontsize=11)
    fig.text(0.5, 0.005, LATENCY_NOTE, ha="center", va="bottom", fontsize=8, color="0.25", wrap=True)
    fig.tight_layout(rect=(0, 0.06, 1, 0.93))
    return fig
