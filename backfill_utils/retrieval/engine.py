"""The exact retrieval engine: AP and first relevant rank of every query, chunk by chunk.

Behind :func:`backfill_utils.retrieval.metrics.evaluate_retrieval` (one ranking) and
:func:`backfill_utils.backfill.curves.backfill_curve` (a ranking at every backfill
ratio). The definitions (distance, relevance, tie rules) are in
:mod:`backfill_utils.retrieval.metrics`; this module computes them exactly, never sorts a
gallery row and never holds more than one chunk of queries in memory.

How the engine counts
---------------------
For one query, every AP term and the first relevant rank only need *counts of
gallery items at or below a few thresholds*: the distances ``v`` of its ``P``
relevant items (in a backfill curve on both sides, ``2P`` values) and, per
ratio, the float predecessor ``prev(t*) = nextafter(t*, -inf)`` of the best
relevant distance ``t*`` (so that ``#{d < t*} = #{d <= prev(t*)}``). Each
gallery distance is placed once into its bin ``#{t in T : t < d}`` and the bins
are histogrammed separately for each *backfill segment* (the items that become
backfilled between two consecutive ratios). The mixed gallery at every ratio is
a sum of per-segment histograms, and a cumulative sum gives the counts. Cost
per query: ``O(N)`` once plus ``O(P)`` per ratio and threshold, instead of
sorting the whole row at every ratio. Only comparisons touch the distances, so
the counts are exact, ties included. :mod:`backfill_utils.retrieval.counting` does this
counting: on the CPU one compiled numba loop per row (an exact bucketing
shortcut instead of a binary search, and the row's AP derived while its
histograms are in the cache), ``torch.searchsorted`` + ``bincount`` on other
devices. Items tied *exactly* with the best relevant item (same float
distance) are ordered by index: those are counted directly on that row, which
is rare on real data.

The distances. Exact mAP over the whole ranking needs every query-gallery
distance, so each chunk computes its two ``(B, N)`` blocks of ``|g|^2 - 2 q.g``
with one ``addmm`` per side into a buffer reused across chunks (``|q|^2`` is
added, and the result clamped at 0, inside the counting pass); these matrix
products are the floor of the engine's time (``python -m backfill_utils.tools.bench``
measures them alone). Chunk sizes come from a memory budget:
1 GiB on the CPU by default, half of the memory the process can still use on a
CUDA device (``torch.cuda.mem_get_info`` plus what torch's allocator holds
free), rounded down to a power of two so that repeated calls split the queries
the same way.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from . import counting
from .distances import finish, raw_distances
from .phases import phase

__all__ = ["retrieval_statistics", "auto_chunk_size", "memory_budget_for", "DEFAULT_MEMORY_BUDGET"]

#: Default memory budget (bytes) for one chunk of queries on the CPU.
DEFAULT_MEMORY_BUDGET = 1 << 30
#: Share of the usable GPU memory given to one chunk when no budget is passed.
CUDA_MEMORY_SHARE = 0.5

#: CPU binning method ("auto": numba when installed); tests switch it to "torch".
CPU_METHOD = "auto"


# ---------------------------------------------------------------------------
# distances
# ---------------------------------------------------------------------------
def common_dtype(*ts: torch.Tensor) -> torch.dtype:
    """The promoted floating dtype of several tensors."""
    dtype = ts[0].dtype
    for t in ts[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def check_distance_range(q: torch.Tensor, g: torch.Tensor, q_name: str, g_name: str) -> None:
    """Raise if squared distances between ``q`` and ``g`` could overflow their dtype.

    ``|q|^2 + |g|^2 - 2 q.g`` and every partial sum of the product are bounded by
    ``(|q| + |g|)^2`` (Cauchy-Schwarz); it must stay below half the largest
    finite value, so that no distance becomes inf or NaN.
    """
    dtype = common_dtype(q, g)
    if not len(q) or not len(g):
        return
    mq = float(q.double().pow(2).sum(1).max())
    mg = float(g.double().pow(2).sum(1).max())
    bound = (math.sqrt(mq) + math.sqrt(mg)) ** 2
    limit = torch.finfo(dtype).max / 2
    if not bound < limit:
        raise ValueError(
            f"{q_name} and {g_name} have norms up to {math.sqrt(mq):.3g} and {math.sqrt(mg):.3g}: "
            f"their squared distances can overflow {dtype} (largest finite {torch.finfo(dtype).max:.3g}); "
            "scale the embeddings down (e.g. L2-normalise them) or pass float64 arrays"
        )


# ---------------------------------------------------------------------------
# chunk sizes
# ---------------------------------------------------------------------------
def _row_bytes(n_gallery: int, n_thresholds: int, n_segments: int, n_ratios: int, max_pos: int,
               dense_bytes_per_item: int = 40) -> int:
    """Rough peak bytes per query row of one engine chunk (both sides)."""
    nb = n_thresholds + n_ratios + 1  # relevant distances, predecessors of the best
    dense = dense_bytes_per_item * n_gallery
    hist = 8 * (3 * n_segments * nb + 4 * n_ratios * nb)
    pos = 8 * 8 * n_ratios * max(max_pos, 1)
    return dense + hist + pos


def _dense_bytes_per_item(device: torch.device) -> int:
    if device.type == "cpu" and counting.numba_available() and CPU_METHOD != "torch":
        return 16  # two raw rows (up to float64); bins are never materialised
    return 40  # two distance rows + int64 bins and temporaries of the torch path


def memory_budget_for(device: Any = None, memory_budget: int | None = None) -> int:
    """Bytes for one chunk: ``memory_budget`` if given, else a default for ``device``.

    On the CPU :data:`DEFAULT_MEMORY_BUDGET`; on CUDA :data:`CUDA_MEMORY_SHARE` of
    the memory the process can still use (free device memory plus what torch's
    caching allocator holds unused), rounded down to a power of two.
    """
    if memory_budget is not None:
        memory_budget = int(memory_budget)
        if memory_budget < 1:
            raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget}")
        return memory_budget
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type != "cuda":
        return DEFAULT_MEMORY_BUDGET
    free, _ = torch.cuda.mem_get_info(dev)
    usable = free + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
    share = max(int(usable * CUDA_MEMORY_SHARE), 1 << 20)
    return 1 << (share.bit_length() - 1)


def auto_chunk_size(
    n_queries: int,
    n_gallery: int,
    max_relevant: int,
    n_ratios: int = 11,
    memory_budget: int | None = None,
    device: Any = None,
) -> int:
    """Queries per chunk so that one chunk of the engine fits the memory budget.

    The estimate assumes the two-sided (backfill) case even for a plain
    evaluation, so :func:`backfill_utils.retrieval.metrics.evaluate_retrieval` and a
    backfill curve split the queries the same way and compute bit-identical
    distance rows. ``memory_budget`` None: :func:`memory_budget_for` ``device``.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    budget = memory_budget_for(dev, memory_budget)
    per_row = _row_bytes(n_gallery, 2 * max_relevant, n_ratios + 1, n_ratios, max_relevant,
                         _dense_bytes_per_item(dev))
    return int(max(1, min(n_queries, budget // max(per_row, 1))))


# ---------------------------------------------------------------------------
# relevant items
# ---------------------------------------------------------------------------
class _Positives:
    """Gallery items of each label, for gathering a chunk's relevant items."""

    def __init__(self, gallery_codes: np.ndarray, n_codes: int):
        order = np.argsort(gallery_codes, kind="stable")
        counts = np.bincount(gallery_codes, minlength=n_codes)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self.sorted_idx = torch.from_numpy(order.astype(np.int64))
        self.counts = torch.from_numpy(counts.astype(np.int64))
        self.starts = torch.from_numpy(starts.astype(np.int64))

    def max_count(self, query_codes: np.ndarray) -> int:
        if len(query_codes) == 0:
            return 0
        return int(self.counts[torch.from_numpy(query_codes)].max())

    def gather(self, codes: torch.Tensor, query_index: torch.Tensor | None):
        """``(idx, valid)`` of shape (B, P): relevant gallery indices (padded)."""
        cnt = self.counts[codes]
        p = max(int(cnt.max()) if len(cnt) else 0, 1)
        ar = torch.arange(p)
        valid = ar.unsqueeze(0) < cnt.unsqueeze(1)
        flat = (self.starts[codes].unsqueeze(1) + ar).clamp(max=max(len(self.sorted_idx) - 1, 0))
        idx = self.sorted_idx[flat] if len(self.sorted_idx) else torch.zeros_like(flat)
        idx = torch.where(valid, idx, 0)
        if query_index is not None:
            valid = valid & (idx != query_index.unsqueeze(1))
        return idx, valid


# ---------------------------------------------------------------------------
# one chunk
# ---------------------------------------------------------------------------
def _chunk_statistics(
    sides: list[tuple[torch.Tensor, torch.Tensor]],
    dtype: torch.dtype,
    pos_idx: torch.Tensor,
    pos_valid: torch.Tensor,
    segment: torch.Tensor,
    n_ratios: int,
    exclude_col: torch.Tensor | None,
    method: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact per-ratio AP and first relevant rank for one chunk of queries.

    ``sides``: one or two ``(raw, q_sq)`` pairs of :func:`raw_distances` (old,
    then new; one pair: a single ranking, ``n_ratios`` must be 1); distances are
    compared in ``dtype``. Item ``j`` holds its new-side distance at ratio ``i``
    iff ``segment[j] <= i`` (segments ``0..n_ratios``).
    ``pos_idx``/``pos_valid``: (B, P) relevant gallery items (padded).
    ``exclude_col``: (B,) gallery item left out of each row, or None.
    Returns ``ap`` (B, R) float64 (nan: no relevant item) and ``rank`` (B, R)
    int64 (-1: no relevant item).

    Thresholds ``T`` (sorted, +inf pads): the distances of the relevant items
    on both sides and, per ratio, the float predecessor ``prev(t*)``
    (``nextafter(t*, -inf)``) of the best relevant distance ``t*``. An item's
    bin is ``#{t in T: t < d}``, so ``d <= T[k]`` iff ``bin <= k``: a
    cumulative histogram of bins gives ``#{d <= v}`` at ``v``'s own bin, and
    ``#{d < t*} = #{d <= prev(t*)}``. Comparisons only: exact, ties included.
    The counting is :func:`backfill_utils.retrieval.counting.chunk_counts`.
    """
    B = pos_idx.shape[0]
    dev = pos_idx.device
    excl = exclude_col if exclude_col is not None else torch.full((B,), -1, dtype=torch.int64, device=dev)
    ap, n_lt, n_eq, t_best, p_best = counting.chunk_counts(
        sides, dtype, pos_idx, pos_valid, segment, n_ratios, excl, method)
    has_rel = (pos_valid.sum(1) > 0).unsqueeze(1)

    # first relevant rank = #items closer than t* + #items tied with it at a lower index
    rank = n_lt
    tie = has_rel & (n_eq > 1)
    if bool(tie.any()):
        rank = rank + _tie_counts(tie, sides, dtype, segment, t_best, p_best, exclude_col)
    rank = torch.where(has_rel, rank, -1)
    return ap, rank


def _tie_counts(tie, sides, dtype, segment, t_best, p_best, exclude_col, block: int = 256):
    """#items at distance ``t_best`` with a lower index than ``p_best`` (rare: exact ties)."""
    out = torch.zeros_like(p_best)
    bq, br = tie.nonzero(as_tuple=True)
    N = sides[0][0].shape[1]
    ar = torch.arange(N, device=p_best.device).unsqueeze(0)
    for s in range(0, len(bq), block):
        qi, ri = bq[s:s + block], br[s:s + block]
        rows = [finish(raw[qi], q_sq[qi]).to(dtype) for raw, q_sq in sides]
        row = rows[0]
        if len(rows) == 2:
            row = torch.where(segment.unsqueeze(0) <= ri.unsqueeze(1), rows[1], row)
        hit = (row == t_best[qi, ri].unsqueeze(1)) & (ar < p_best[qi, ri].unsqueeze(1))
        if exclude_col is not None:
            hit &= ar != exclude_col[qi].unsqueeze(1)
        out[qi, ri] = hit.sum(1)
    return out


# ---------------------------------------------------------------------------
# all queries
# ---------------------------------------------------------------------------
def retrieval_statistics(
    query_old: torch.Tensor,
    gallery_old: torch.Tensor,
    query_new: torch.Tensor | None,
    gallery_new: torch.Tensor | None,
    query_codes: np.ndarray,
    gallery_codes: np.ndarray,
    *,
    segment: np.ndarray | None = None,
    n_ratios: int = 1,
    exclude_self: bool = False,
    chunk_size: int | None = None,
    device: Any = None,
    memory_budget: int | None = None,
    progress: bool = False,
    desc: str = "queries",
) -> dict[str, np.ndarray]:
    """Run the engine over all queries, chunk by chunk.

    Inputs are validated tensors and integer-coded labels (see
    :func:`backfill_utils.retrieval.metrics.evaluate_retrieval` and
    ``backfill.backfill_curve`` for the public entry points). ``device``: where
    the distances and counts are computed (default: where ``query_old`` is).
    Returns ``ap`` (R, Q) float64, ``first_rank`` (R, Q) int64 and
    ``n_relevant`` (Q,) int64.
    """
    dev = torch.device(device) if device is not None else query_old.device
    with phase("total", dev):
        return _retrieval_statistics(query_old, gallery_old, query_new, gallery_new, query_codes,
                                     gallery_codes, segment, n_ratios, exclude_self, chunk_size,
                                     dev, memory_budget, progress, desc)


def _retrieval_statistics(query_old, gallery_old, query_new, gallery_new, query_codes, gallery_codes,
                          segment, n_ratios, exclude_self, chunk_size, dev, memory_budget, progress,
                          desc) -> dict[str, np.ndarray]:
    Q, N = query_old.shape[0], gallery_old.shape[0]
    two = query_new is not None
    if not two:
        n_ratios = 1
    names = (("query_old", "gallery_old"), ("query_new", "gallery_new")) if two else \
        (("query_embeddings", "gallery_embeddings"),)
    pairs = [(query_old, gallery_old)] + ([(query_new, gallery_new)] if two else [])
    for (q, g), (qn, gn) in zip(pairs, names):
        check_distance_range(q, g, qn, gn)
    n_codes = int(max(query_codes.max(initial=-1), gallery_codes.max(initial=-1)) + 1)
    positives = _Positives(gallery_codes, n_codes)
    max_rel = positives.max_count(query_codes)
    if chunk_size is None:
        chunk_size = auto_chunk_size(Q, N, max_rel, max(n_ratios, 11), memory_budget, dev)
    chunk_size = int(chunk_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

    # each side is computed in its own precision, then compared (exactly
    # widened) in a common dtype, so a side gives the same distances as on its own
    side_dtypes = [common_dtype(q, g) for q, g in pairs]
    dtype = common_dtype(*[torch.empty(0, dtype=d) for d in side_dtypes])
    galleries = []
    for (_, g), dt in zip(pairs, side_dtypes):
        g = g.to(dev, dt)
        galleries.append((g, (g * g).sum(1)))
    seg = torch.zeros(N, dtype=torch.int64) if segment is None else torch.as_tensor(segment, dtype=torch.int64)
    seg = seg.to(dev)
    codes = torch.from_numpy(query_codes)
    method = CPU_METHOD if dev.type == "cpu" else "auto"

    ap = np.empty((n_ratios, Q), dtype=np.float64)
    rank = np.empty((n_ratios, Q), dtype=np.int64)
    n_rel = np.empty(Q, dtype=np.int64)

    from tqdm import tqdm

    buffers = [torch.empty((min(chunk_size, Q), N), dtype=dt, device=dev) for dt in side_dtypes]
    starts = range(0, Q, chunk_size)
    for s in tqdm(starts, desc=desc, disable=not progress, unit="chunk", leave=False):
        e = min(s + chunk_size, Q)
        qidx = torch.arange(s, e)
        pidx, pval = positives.gather(codes[s:e], qidx if exclude_self else None)  # on CPU
        pidx, pval = pidx.to(dev), pval.to(dev)
        with phase("distances (matrix products)", dev):
            sides = [raw_distances(q[s:e].to(dev, dt), g, g_sq, out=buf[: e - s])
                     for (q, _), dt, (g, g_sq), buf in zip(pairs, side_dtypes, galleries, buffers)]
        excl = qidx.to(dev) if exclude_self else None
        a, r = _chunk_statistics(sides, dtype, pidx, pval, seg, n_ratios, excl, method)
        del sides
        ap[:, s:e] = a.T.cpu().numpy()
        rank[:, s:e] = r.T.cpu().numpy()
        n_rel[s:e] = pval.sum(1).cpu().numpy()
    return {"ap": ap, "first_rank": rank, "n_relevant": n_rel}
