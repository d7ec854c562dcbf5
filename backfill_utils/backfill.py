"""Online backfilling: retrieval systems, merge, orders, curves, AUC, flips.

A backfilling system is four embedding sets (:class:`BackfillSystem`):

* ``query_old`` is compared with the gallery items that are **not yet**
  backfilled, which hold ``gallery_old``;
* ``query_new`` is compared with the items that **are** backfilled, which hold
  ``gallery_new``.

At backfill ratio ``r`` the first ``floor(r * N)`` items of the backfill order
hold ``gallery_new`` (:func:`backfilled_count`). Searching the two parts
separately and merging the two ranked lists by distance (the paper's distance
rank merge, Sec. 2.1) is exactly one ranking over the *mixed distance row*

    d_j = d(query_old, gallery_old_j)   if j is not yet backfilled
    d_j = d(query_new, gallery_new_j)   if j is backfilled,

so every system -- rank merge, the paper's method, naive, BCT, FCT, FastFill --
is evaluated by one function, :func:`backfill_curve`. The "mixed" systems
(one query against the mixed gallery) are the case ``query_old is query_new``.

| method            | query_old          | gallery_old       | query_new   | gallery_new |
|-------------------|--------------------|-------------------|-------------|-------------|
| RM (2 passes)     | phi_old(q)         | phi_old(g)        | phi_new(q)  | phi_new(g)  |
| RM + psi (+CMCL)  | psi(phi_new(q))    | phi_old(g)        | phi_new(q)  | phi_new(g)  |
| Ours (+ rho)      | psi(phi_new(q))    | phi_old(g)        | rho_new(q)  | rho_new(g)  |
| naive / BCT       | phi_new(q)         | phi_old(g)        | phi_new(q)  | phi_new(g)  |
| FCT / FastFill    | phi_new(q)         | h(phi_old(g))     | phi_new(q)  | phi_new(g)  |

Metrics and their tie rules are those of :mod:`backfill_utils.metrics` (AP:
ties as sklearn; top-k: ties broken by gallery index). The curve is computed
exactly, without sorting a row per ratio (see the metrics module docstring).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from . import metrics as _m

__all__ = [
    "BackfillSystem",
    "random_order",
    "backfilled_count",
    "check_ratios",
    "check_order",
    "backfill_segments",
    "backfill_curve",
    "offline_curve",
    "summarize_curve",
    "knn_search",
    "merged_search",
    "DEFAULT_RATIOS",
]

#: The paper's backfill ratios 0, 0.1, ..., 1.0.
DEFAULT_RATIOS = np.linspace(0.0, 1.0, 11)


# ---------------------------------------------------------------------------
# Orders, ratios, counts
# ---------------------------------------------------------------------------
def random_order(n: int, seed: int = 0) -> np.ndarray:
    """A seeded random backfill order: a permutation of ``range(n)``.

    Uses ``numpy.random.default_rng(seed).permutation(n)``.

    >>> random_order(5, seed=0).tolist()
    [2, 4, 3, 0, 1]
    """
    if int(n) < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return np.random.default_rng(seed).permutation(int(n)).astype(np.int64)


def backfilled_count(ratio: float, n: int) -> int:
    """Number of backfilled items at ratio ``ratio``: ``floor(ratio * n)``.

    Robust to floating-point error in the product: if ``ratio * n`` is within a
    relative ``1e-9`` of an integer it is rounded to that integer, otherwise
    floored. So ``0.3 * 10`` gives 3 (also ``np.linspace(0, 1, 11)[3] * 10 ==
    3.0000000000000004``), ``0.29 * 100 == 28.999999999999996`` gives 29 (the
    decimal ratio the user wrote, where a plain floor gives 28), while
    ``0.25 * 10`` gives 2.

    >>> backfilled_count(0.3, 10), backfilled_count(0.29, 100), backfilled_count(0.25, 10)
    (3, 29, 2)
    """
    r = float(ratio)
    n = int(n)
    if not (0.0 <= r <= 1.0):
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    x = r * n
    nearest = round(x)
    if abs(x - nearest) <= 1e-9 * max(1.0, abs(x)):
        return int(nearest)
    return int(math.floor(x))


def check_ratios(ratios: Any = None) -> np.ndarray:
    """Validated backfill ratios (default 0, 0.1, ..., 1): in [0, 1], ascending."""
    if ratios is None:
        return DEFAULT_RATIOS.copy()
    r = np.asarray(ratios, dtype=np.float64).reshape(-1) if not np.isscalar(ratios) else np.array([ratios], float)
    if r.size == 0:
        raise ValueError("ratios is empty; pass e.g. numpy.linspace(0, 1, 11)")
    if not np.isfinite(r).all() or (r < 0).any() or (r > 1).any():
        raise ValueError(f"every ratio must be a number in [0, 1], got {r.tolist()}")
    if (np.diff(r) < 0).any():
        raise ValueError(f"ratios must be sorted ascending, got {r.tolist()}; sort them first")
    return r


def check_order(order: Any, n: int, name: str = "order") -> np.ndarray:
    """``order`` as an int64 array, checked to be a permutation of ``range(n)``."""
    if isinstance(order, torch.Tensor):
        order = order.detach().cpu().numpy()
    a = np.asarray(order)
    if a.ndim != 1 or len(a) != n:
        raise ValueError(
            f"{name} must be a permutation of range({n}) (one entry per gallery item), "
            f"got shape {a.shape}"
        )
    if a.dtype.kind not in "iu":
        if a.dtype.kind == "f" and np.all(np.isfinite(a)) and np.all(a == np.round(a)):
            a = a.astype(np.int64)
        else:
            raise ValueError(f"{name} must hold integer gallery indices, got dtype {a.dtype}")
    a = a.astype(np.int64)
    seen = np.zeros(n, dtype=bool)
    inside = (a >= 0) & (a < n)
    seen[a[inside]] = True
    if not inside.all() or not seen.all():
        missing = np.flatnonzero(~seen)[:5].tolist()
        raise ValueError(
            f"{name} is not a permutation of range({n}): indices must be 0..{n - 1}, "
            f"each exactly once (out of range: {int((~inside).sum())}, missing e.g. {missing}); "
            "use backfill.random_order(n, seed) or numpy.argsort of a score"
        )
    return a


def backfill_segments(order: np.ndarray, ratios: np.ndarray) -> np.ndarray:
    """For each gallery item, the index of the first ratio at which it is backfilled.

    Item ``j`` at position ``pos`` of ``order`` is backfilled at ratio ``r_i``
    iff ``pos < backfilled_count(r_i, N)``. Returns ``seg`` (N,) with ``seg[j]``
    the smallest such ``i``, or ``len(ratios)`` if never.

    >>> backfill_segments(np.array([2, 0, 1, 3]), np.array([0.0, 0.5, 1.0])).tolist()
    [1, 2, 1, 2]
    """
    n = len(order)
    counts = np.array([backfilled_count(r, n) for r in ratios], dtype=np.int64)
    pos = np.empty(n, dtype=np.int64)
    pos[order] = np.arange(n)
    return np.searchsorted(counts, pos, side="right").astype(np.int64)


# ---------------------------------------------------------------------------
# Systems
# ---------------------------------------------------------------------------
@dataclass
class BackfillSystem:
    """An online backfilling retrieval system (see the module docstring).

    Attributes
    ----------
    name
        Label used in tables and figures.
    query_old
        (Q, d_o) query embeddings compared with not-yet-backfilled items.
    gallery_old
        (N, d_o) what not-yet-backfilled gallery items hold.
    query_new
        (Q, d_n) query embeddings compared with backfilled items.
    gallery_new
        (N, d_n) what backfilled items hold.
    order
        Backfill order, a permutation of ``range(N)`` (item ``order[0]`` is
        backfilled first); ``None``: a seeded random order (the ``seed`` of
        :func:`backfill_curve`).
    query_passes
        Forward passes per query (the cost column of the paper's Table 2).

    Embeddings are stored as finite floating torch tensors (numpy input shares
    memory where possible). Shapes are checked on construction.
    """

    name: str
    query_old: Any
    gallery_old: Any
    query_new: Any
    gallery_new: Any
    order: Any = None
    query_passes: int = 1

    def __post_init__(self) -> None:
        n = self.name
        self.query_old = _m.as_embedding_tensor(self.query_old, f"{n}: query_old")
        self.gallery_old = _m.as_embedding_tensor(self.gallery_old, f"{n}: gallery_old")
        self.query_new = _m.as_embedding_tensor(self.query_new, f"{n}: query_new")
        self.gallery_new = _m.as_embedding_tensor(self.gallery_new, f"{n}: gallery_new")
        qo, go, qn, gn = self.query_old, self.gallery_old, self.query_new, self.gallery_new
        if qo.shape[1] != go.shape[1]:
            raise ValueError(
                f"system {n!r}: query_old has shape {tuple(qo.shape)} but gallery_old has shape "
                f"{tuple(go.shape)}; the query compared with not-yet-backfilled items must have "
                f"the old gallery's dimension {go.shape[1]} (e.g. a reverse transform psi must "
                "output the old embedding dimension)"
            )
        if qn.shape[1] != gn.shape[1]:
            raise ValueError(
                f"system {n!r}: query_new has shape {tuple(qn.shape)} but gallery_new has shape "
                f"{tuple(gn.shape)}; the query compared with backfilled items must have the new "
                f"gallery's dimension {gn.shape[1]}"
            )
        if qo.shape[0] != qn.shape[0]:
            raise ValueError(
                f"system {n!r}: query_old has {qo.shape[0]} rows (shape {tuple(qo.shape)}) but "
                f"query_new has {qn.shape[0]} (shape {tuple(qn.shape)}); both embed the same queries"
            )
        if go.shape[0] != gn.shape[0]:
            raise ValueError(
                f"system {n!r}: gallery_old has {go.shape[0]} rows (shape {tuple(go.shape)}) but "
                f"gallery_new has {gn.shape[0]} (shape {tuple(gn.shape)}); both embed the same gallery"
            )
        if self.order is not None:
            self.order = check_order(self.order, go.shape[0], f"system {n!r}: order")
        if int(self.query_passes) < 1:
            raise ValueError(f"system {n!r}: query_passes must be >= 1, got {self.query_passes}")
        self.query_passes = int(self.query_passes)

    @property
    def n_queries(self) -> int:
        return int(self.query_old.shape[0])

    @property
    def n_gallery(self) -> int:
        return int(self.gallery_old.shape[0])

    @classmethod
    def merge(
        cls,
        name: str,
        query_old: Any,
        gallery_old: Any,
        query_new: Any,
        gallery_new: Any,
        *,
        order: Any = None,
        query_passes: int = 1,
    ) -> "BackfillSystem":
        """Two searches merged by distance (rank merge, the paper's method).

        Distance rank merge (Sec. 2.1) uses ``query_old = phi_old(q)`` and costs
        two forward passes per query: pass ``query_passes=2``. With a reverse
        transform, ``query_old = psi(phi_new(q))`` and one pass suffices.
        """
        return cls(name, query_old, gallery_old, query_new, gallery_new, order, query_passes)

    @classmethod
    def mixed(
        cls,
        name: str,
        query: Any,
        gallery_old: Any,
        gallery_new: Any,
        *,
        order: Any = None,
        query_passes: int = 1,
    ) -> "BackfillSystem":
        """One query embedding against the mixed gallery (naive, BCT, FCT, FastFill).

        ``gallery_old`` is what a not-yet-backfilled item holds (for FCT the
        transformed old embedding ``h(phi_old(x))``); ``gallery_new`` what a
        backfilled item holds. ``query`` must have the dimension of both.
        """
        return cls(name, query, gallery_old, query, gallery_new, order, query_passes)


# ---------------------------------------------------------------------------
# Curves
# ---------------------------------------------------------------------------
def _check_labels(system: BackfillSystem, query_labels: Any, gallery_labels: Any):
    ql = _m.as_label_array(query_labels, "query_labels")
    gl = _m.as_label_array(gallery_labels, "gallery_labels")
    if len(ql) != system.n_queries:
        raise ValueError(
            f"query_labels has {len(ql)} entries but system {system.name!r} has "
            f"{system.n_queries} queries"
        )
    if len(gl) != system.n_gallery:
        raise ValueError(
            f"gallery_labels has {len(gl)} entries but system {system.name!r} has "
            f"{system.n_gallery} gallery items"
        )
    return ql, gl


def _flip_rate(prev: np.ndarray, cur: np.ndarray, evaluated: np.ndarray) -> float:
    n = int(evaluated.sum())
    if n == 0:
        return float("nan")
    return 100.0 * float((prev & ~cur & evaluated).sum()) / n


def backfill_curve(
    system: BackfillSystem,
    query_labels: Any,
    gallery_labels: Any,
    *,
    ratios: Any = None,
    exclude_self: bool = False,
    seed: int = 0,
    reference_correct: Any = None,
    chunk_size: int | None = None,
    device: Any = None,
    return_per_query: bool = False,
    ks: Sequence[int] = (1, 5),
    on_no_relevant: str = "error",
    memory_budget: int | None = None,
    progress: bool = False,
):
    """Retrieval quality of an online backfilling system at every backfill ratio.

    At ratio ``r`` the first ``backfilled_count(r, N)`` items of the order
    (``system.order``, else ``random_order(N, seed)``) hold ``gallery_new`` and
    are searched with ``query_new``; the others hold ``gallery_old`` and are
    searched with ``query_old``; the results are merged by distance.

    Returns a DataFrame with one row per ratio and columns ``ratio``,
    ``n_backfilled``, ``mAP``, ``top1``, ``top5`` (one ``top{k}`` per ``ks``,
    percent), ``negative_flips`` (percent of evaluated queries whose top-1 is
    correct at the previous ratio and wrong at this one; 0 at the first ratio)
    and, if ``reference_correct`` (bool per query, e.g. the old/old
    ``correct_at_1``) is given, ``negative_flips_vs_old`` (percent of evaluated
    queries correct in the reference and wrong at this ratio).

    With ``return_per_query=True`` returns ``(curve, per_query)`` where
    ``per_query`` holds ``ap`` and ``first_rank`` of shape (R, Q),
    ``correct_at_{k}`` (R, Q) bool, ``n_relevant`` and ``evaluated`` (Q,), and
    the ``order`` used.

    ``exclude_self``, ``chunk_size``, ``device``, ``on_no_relevant`` and
    ``memory_budget`` are as in :func:`backfill_utils.metrics.evaluate_retrieval`;
    at ratio 0 the curve equals ``evaluate_retrieval(query_old, ..., gallery_old, ...)``
    and at ratio 1 ``evaluate_retrieval(query_new, ..., gallery_new, ...)``.
    """
    if not isinstance(system, BackfillSystem):
        raise TypeError(f"system must be a BackfillSystem, got {type(system).__name__}")
    ks = _m.validate_ks(ks)
    _m.check_on_no_relevant(on_no_relevant)
    r = check_ratios(ratios)
    ql, gl = _check_labels(system, query_labels, gallery_labels)
    Q, N = system.n_queries, system.n_gallery
    if Q == 0 or N == 0:
        raise ValueError(f"system {system.name!r} has no queries or no gallery items")
    if exclude_self and Q != N:
        raise ValueError(
            f"exclude_self=True needs query i to be gallery item i, but system "
            f"{system.name!r} has {Q} queries and {N} gallery items; pass exclude_self=False"
        )
    ref = None
    if reference_correct is not None:
        ref = np.asarray(
            reference_correct.detach().cpu().numpy() if isinstance(reference_correct, torch.Tensor)
            else reference_correct
        )
        if ref.shape != (Q,) or ref.dtype != bool:
            raise ValueError(
                f"reference_correct must be a boolean array with one entry per query "
                f"(shape ({Q},)), got dtype {ref.dtype} and shape {ref.shape}; e.g. pass "
                "evaluate_retrieval(..., return_per_query=True)['correct_at_1']"
            )
    order = system.order if system.order is not None else random_order(N, seed)
    seg = backfill_segments(order, r)
    qc, gc = _m.encode_labels(ql, gl)
    stats = _m.retrieval_statistics(
        system.query_old, system.gallery_old, system.query_new, system.gallery_new, qc, gc,
        segment=seg, n_ratios=len(r), exclude_self=exclude_self, chunk_size=chunk_size,
        device=device, memory_budget=memory_budget, progress=progress, desc=system.name,
    )
    evaluated = stats["n_relevant"] > 0
    if not evaluated.all() and on_no_relevant == "error":
        raise _m.no_relevant_error(stats["n_relevant"])
    summ = _m.summarize_statistics(stats["ap"], stats["first_rank"], evaluated, ks)
    rank = stats["first_rank"]
    correct1 = (rank >= 0) & (rank < 1)
    flips = [0.0] + [_flip_rate(correct1[i - 1], correct1[i], evaluated) for i in range(1, len(r))]
    curve = pd.DataFrame({"ratio": r, "n_backfilled": [backfilled_count(x, N) for x in r]})
    for key, vals in summ.items():
        curve[key] = vals
    curve["negative_flips"] = flips
    if ref is not None:
        curve["negative_flips_vs_old"] = [_flip_rate(ref, correct1[i], evaluated) for i in range(len(r))]
    curve.attrs["system"] = system.name
    curve.attrs["query_passes"] = system.query_passes
    if not return_per_query:
        return curve
    per_query = {"ap": stats["ap"], "first_rank": rank}
    for k in ks:
        per_query[f"correct_at_{k}"] = (rank >= 0) & (rank < k)
    per_query["n_relevant"] = stats["n_relevant"]
    per_query["evaluated"] = evaluated
    per_query["order"] = order
    return curve, per_query


def offline_curve(old_metrics: dict, new_metrics: dict, ratios: Any = None) -> pd.DataFrame:
    """Offline backfilling: old/old quality until ``r = 1``, then new/new.

    ``old_metrics``/``new_metrics`` are :func:`evaluate_retrieval` results (at
    least ``mAP``, ``top1``, ``top5``). Negative flips are 0 except at the
    switch to ``r = 1``; if both dicts carry per-query ``correct_at_1`` (from
    ``return_per_query=True``), the flips at the switch are computed (percent
    of queries evaluated in both that are correct with old/old and wrong with
    new/new) and a ``negative_flips_vs_old`` column is added; otherwise they
    are reported as 0.
    """
    r = check_ratios(ratios)
    keys = [k for k in old_metrics if (k == "mAP" or (k.startswith("top") and k[3:].isdigit()))
            and k in new_metrics and np.isscalar(old_metrics[k])]
    for k in ("mAP", "top1", "top5"):
        if k not in keys:
            raise ValueError(f"old_metrics and new_metrics must both contain {k!r} (evaluate_retrieval output)")
    is_new = r >= 1.0
    curve = pd.DataFrame({"ratio": r})
    for k in keys:
        curve[k] = np.where(is_new, float(new_metrics[k]), float(old_metrics[k]))
    per_query = "correct_at_1" in old_metrics and "correct_at_1" in new_metrics
    flips = np.zeros(len(r))
    if per_query:
        co = np.asarray(old_metrics["correct_at_1"], bool)
        cn = np.asarray(new_metrics["correct_at_1"], bool)
        if co.shape != cn.shape:
            raise ValueError(f"per-query correct_at_1 of old ({co.shape}) and new ({cn.shape}) differ in length")
        ev = np.asarray(old_metrics.get("evaluated", np.ones_like(co)), bool) & np.asarray(
            new_metrics.get("evaluated", np.ones_like(cn)), bool)
        switch = _flip_rate(co, cn, ev)
        first_new = np.flatnonzero(is_new)
        if len(first_new) and first_new[0] > 0:
            flips[first_new[0]] = switch
        curve["negative_flips"] = flips
        curve["negative_flips_vs_old"] = np.where(is_new, switch, 0.0)
    else:
        curve["negative_flips"] = flips
    curve.attrs["system"] = "offline"
    return curve


def summarize_curve(curve: pd.DataFrame, old_ref: dict, new_ref: dict) -> dict[str, float]:
    """AUCs, means, final values, relative gains and flip totals of a curve.

    * ``auc_map``, ``auc_top1``, ``auc_top5``: trapezoid rule over the ratios,
      which must start at 0 and end at 1 (the area over [0, 1]);
    * ``mean_map``, ``mean_top1``, ``mean_top5``: plain mean of the points (as
      FastFill reports);
    * ``final_map``, ``final_top1``, ``final_top5``: the value at the last ratio;
    * ``rel_gain_map``, ``rel_gain_top1``, ``rel_gain_top5``:
      ``(AUC - M_old) / (M_new - M_old)`` with ``M_old``/``M_new`` from
      ``old_ref``/``new_ref`` (old/old and new/new metrics). If ``M_new == M_old``
      the upgrade has no gain to deliver and the ratio is undefined: the value is
      ``nan`` and a ``RuntimeWarning`` says so;
    * ``negative_flips_total``: sum of the per-step ``negative_flips``;
      ``negative_flips_vs_old_max`` if that column exists.
    """
    if "ratio" not in curve:
        raise ValueError("curve must have a 'ratio' column (backfill_curve output)")
    r = check_ratios(curve["ratio"].to_numpy())
    if len(r) < 2 or r[0] != 0.0 or r[-1] != 1.0:
        raise ValueError(
            f"the AUC is the area over [0, 1]: the curve's ratios must start at 0 and end at 1, "
            f"got {r[0]} .. {r[-1]} ({len(r)} points)"
        )
    out: dict[str, float] = {}
    for col, short in (("mAP", "map"), ("top1", "top1"), ("top5", "top5")):
        if col not in curve:
            raise ValueError(f"curve has no {col!r} column")
        y = curve[col].to_numpy(dtype=np.float64)
        auc = float(np.trapezoid(y, r))
        out[f"auc_{short}"] = auc
        out[f"mean_{short}"] = float(y.mean())
        out[f"final_{short}"] = float(y[-1])
        if col not in old_ref or col not in new_ref:
            raise ValueError(f"old_ref and new_ref must contain {col!r} (evaluate_retrieval output)")
        m_old, m_new = float(old_ref[col]), float(new_ref[col])
        if m_new == m_old:
            warnings.warn(
                f"relative gain of {col} is undefined: old and new reference are equal "
                f"({m_old}); reporting nan", RuntimeWarning, stacklevel=2)
            out[f"rel_gain_{short}"] = float("nan")
        else:
            out[f"rel_gain_{short}"] = (auc - m_old) / (m_new - m_old)
    out["negative_flips_total"] = float(curve["negative_flips"].sum()) if "negative_flips" in curve else float("nan")
    if "negative_flips_vs_old" in curve:
        out["negative_flips_vs_old_max"] = float(curve["negative_flips_vs_old"].max())
    return out


# ---------------------------------------------------------------------------
# Plain top-k search (faiss) and the merged list of Fig. 1
# ---------------------------------------------------------------------------
def _faiss_array(x: Any, name: str) -> np.ndarray:
    t = _m.as_embedding_tensor(x, name)
    return np.ascontiguousarray(t.cpu().numpy(), dtype=np.float32)


def knn_search(query: Any, gallery: Any, k: int, *, exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k search with faiss (``IndexFlatL2``): ``(D, I)``, each (Q, k).

    ``D`` are squared Euclidean distances (faiss' own float32 arithmetic, which
    can differ from :func:`~backfill_utils.metrics.pairwise_distances` in the
    last bits; faiss does not promise the index tie-break). Use it for plain
    top-k on large galleries (lists, figures); the metrics use the exact engine.
    Missing results (gallery smaller than ``k``) are ``I = -1``, ``D = inf``.
    With ``exclude_self`` query ``i`` is gallery item ``i`` and is dropped.
    """
    import faiss

    q = _faiss_array(query, "query")
    g = _faiss_array(gallery, "gallery")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"query has shape {q.shape} but gallery has shape {g.shape}; dimensions must agree")
    if exclude_self and len(q) != len(g):
        raise ValueError(f"exclude_self=True needs as many queries as gallery items, got {len(q)} and {len(g)}")
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    index = faiss.IndexFlatL2(g.shape[1])
    if len(g):
        index.add(g)
    kk = min(k + int(exclude_self), max(len(g), 1))
    D, I = index.search(q, kk) if len(g) else (np.full((len(q), kk), np.inf, np.float32), np.full((len(q), kk), -1))
    if exclude_self:
        keep = I != np.arange(len(q))[:, None]
        # drop self if found, else the last column
        drop_last = keep.all(1)
        keep[drop_last, -1] = False
        D = D[keep].reshape(len(q), kk - 1)
        I = I[keep].reshape(len(q), kk - 1)
    D = np.where(I < 0, np.inf, D)
    if D.shape[1] < k:
        pad = k - D.shape[1]
        D = np.pad(D, ((0, 0), (0, pad)), constant_values=np.inf)
        I = np.pad(I, ((0, 0), (0, pad)), constant_values=-1)
    return D, I


def merged_search(
    system: BackfillSystem,
    ratio: float,
    k: int,
    *,
    queries: Any = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """The two searches of a system at one ratio and their merge (Fig. 1).

    The not-yet-backfilled items are searched with ``query_old``, the backfilled
    ones with ``query_new`` (faiss, :func:`knn_search`); the two lists are
    merged by ``(distance, gallery index)``. ``queries``: indices of the queries
    to search (default all). Returns ``distances``, ``indices`` (global gallery
    indices) and ``from_new`` (bool), each (len(queries), k), plus the two
    unmerged lists ``old_*`` and ``new_*``.
    """
    N = system.n_gallery
    m = backfilled_count(ratio, N)
    order = system.order if system.order is not None else random_order(N, seed)
    qsel = np.arange(system.n_queries) if queries is None else np.asarray(queries, dtype=np.int64).reshape(-1)
    new_items, old_items = np.sort(order[:m]), np.sort(order[m:])
    go = system.gallery_old.cpu().numpy()[old_items]
    gn = system.gallery_new.cpu().numpy()[new_items]
    Do, Io = knn_search(system.query_old.cpu().numpy()[qsel], go, k)
    Dn, In = knn_search(system.query_new.cpu().numpy()[qsel], gn, k)
    Io = np.where(Io >= 0, old_items[np.clip(Io, 0, None)] if len(old_items) else -1, -1)
    In = np.where(In >= 0, new_items[np.clip(In, 0, None)] if len(new_items) else -1, -1)
    D = np.concatenate([Do, Dn], 1)
    I = np.concatenate([Io, In], 1)
    src = np.concatenate([np.zeros_like(Io, bool), np.ones_like(In, bool)], 1)
    big = np.where(I < 0, np.iinfo(np.int64).max, I)
    sel = np.lexsort((big, D), axis=1)[:, :k] if D.size else np.zeros((len(qsel), 0), int)
    take = lambda a: np.take_along_axis(a, sel, 1)  # noqa: E731
    return {
        "distances": take(D), "indices": take(I), "from_new": take(src) & (take(I) >= 0),
        "old_distances": Do, "old_indices": Io, "new_distances": Dn, "new_indices": In,
    }
