"""Choosing the search parameter of each side of the mixed gallery for a target recall.

:func:`tune_search` (also :meth:`OnlineBackfillIndex.tune_search`) picks ``nprobe`` per side
of an index of ``IVF<nlist>,Flat`` sides on validation queries: the cheapest pair (vectors
scanned per query) whose merged recall@k against the exact merged search reaches the target.
At ratio 0.5 the old side needs fewer probes than the new one, because the new side's
neighbours dominate the merged top-k; one parameter for both sides pays for the larger.
"""
from __future__ import annotations

from typing import Any

import faiss
import numpy as np

from ..retrieval.metrics import positive_int
from .merge import merge_topk

__all__ = ["tune_search"]


def tune_search(index, queries_new: Any, target: float = 0.95, k: int = 10, *, queries_old: Any = None,
                grid: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)) -> dict[str, Any]:
    """Choose ``nprobe`` per side for a target recall@``k`` on validation queries, and set it.

    For ``IVF<nlist>,Flat`` sides. The reference is the exact merged search of
    this index: each side searched with ``nprobe = nlist`` (every list: exact
    for IVF,Flat), the two lists merged. For each pair of grid values (those
    ``<= nlist``; an empty side keeps its parameters and is not tuned) the
    merged top-``k`` is compared with the reference: recall@``k`` = fraction
    of the reference's ids found, averaged over the queries. The cheapest pair
    whose recall is ``>= target`` is set (cost = sum over the sides of
    ``nprobe / nlist * items on that side``, the vectors scanned per query;
    ties: the smaller parameters); if none reaches ``target`` it is a
    ``ValueError`` giving the best recall reached, and nothing changes.

    ``queries_new`` (and ``queries_old`` for rank merge) as for :meth:`OnlineBackfillIndex.search`.
    Writers wait while it runs (it holds the writers' mutex; searches go on
    under the shared read lock), so the table and the parameters it sets
    belong to one state of the index. Returns ``{"params": {"old": {...},
    "new": {...}}, "recall", "cost", "target", "k", "table"}``; ``table``
    lists ``{"old", "new", "recall", "cost"}`` for every pair evaluated
    (``None`` for an empty side).
    """
    k = positive_int(k, "k")
    if isinstance(target, (bool, np.bool_)) or not isinstance(target, (int, float, np.integer, np.floating)) \
            or not 0 < float(target) <= 1:
        raise ValueError(f"target must be a recall in (0, 1], got {target!r}")
    values = sorted({positive_int(g, "grid value") for g in grid})
    if not values:
        raise ValueError("grid must hold at least one positive integer (nprobe values)")
    for side in (index._old, index._new):
        if not isinstance(side.index, faiss.IndexIVFFlat):
            raise ValueError(
                f"tune_search chooses nprobe of 'IVF<nlist>,Flat' sides, whose search with every list is "
                f"exact (the reference); factory {index.factory!r} builds a faiss "
                f"{type(side.index).__name__} (Flat is exact already; HNSW and compressed codes have no "
                "exact reference inside the index: tune them against your own ground truth)")
    q, qo = index._check_queries(queries_new, queries_old, "queries_new", "queries_old")
    if len(q) == 0:
        raise ValueError("tune_search needs at least one validation query")
    with index._mutate:
        with index._lock.read():
            sides = [side for side in (index._old, index._new) if len(side)]
            if not sides:
                raise ValueError("tune_search: the index is empty")
            k = min(k, len(index._old) + len(index._new))
            xq = index._side_queries(q, qo)
            # every side's top-k for each grid value, and the exhaustive (exact) reference
            found = {side: {p: side.search(xq[side], k, {"nprobe": p})
                            for p in values if p <= side.index.nlist} for side in sides}
            _, ref = merge_topk([side.search(xq[side], k, {"nprobe": side.index.nlist}) for side in sides],
                                len(q), k)
        table = []
        for combo in np.ndindex(*(len(found[side]) for side in sides)):
            chosen = {side: list(found[side])[i] for side, i in zip(sides, combo)}
            _, ids = merge_topk([found[side][p] for side, p in chosen.items()], len(q), k)
            hit = (ref[:, :, None] == ids[:, None, :]).any(axis=2) & (ref >= 0)
            recall = float(np.mean(hit.sum(axis=1) / np.maximum((ref >= 0).sum(axis=1), 1)))
            cost = float(sum(p / side.index.nlist * len(side) for side, p in chosen.items()))
            table.append({"old": chosen.get(index._old), "new": chosen.get(index._new),
                          "recall": recall, "cost": cost})
        ok = [row for row in table if row["recall"] >= target]
        if not ok:
            best = max(table, key=lambda row: row["recall"])
            raise ValueError(
                f"tune_search: no nprobe pair of the grid {values} reaches recall@{k} >= {target} on the "
                f"{len(q)} validation queries; the best is {best['recall']:.4f} (old {best['old']}, new "
                f"{best['new']}); lower the target or add larger values to the grid")
        best = min(ok, key=lambda row: (row["cost"], (row["old"] or 0) + (row["new"] or 0),
                                        row["old"] or 0))
        index._set_search_params({"nprobe": best["old"]} if best["old"] else {},
                                {"nprobe": best["new"]} if best["new"] else {})
        params = {"old": dict(index._old.search_params), "new": dict(index._new.search_params)}
    return {"params": params, "recall": best["recall"], "cost": best["cost"], "target": float(target),
            "k": k, "table": table}

