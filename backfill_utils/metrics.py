"""Retrieval metrics: pure functions over distances and labels.

Two layers live here.

* **Dense reference functions** over a distance matrix ``(Q, N)`` and a boolean
  relevance mask (``is_relevant``), in the style of open-metric-learning:
  :func:`average_precision`, :func:`first_relevant_rank`, :func:`cmc_at_k`.
  They are short, easy to check and fine for small problems.
* **The chunked engine** behind :func:`evaluate_retrieval` (and
  :func:`backfill_utils.backfill.backfill_curve`): exact, the same numbers as the
  dense functions, but it never sorts a row and never holds more than one chunk
  of queries in memory (see "How the engine counts" below).

Definitions (where they differ from common usage, it is said here)
-------------------------------------------------------------------
Distance
    Squared Euclidean, ``|a|^2 + |b|^2 - 2 a.b`` clamped at 0
    (:func:`pairwise_distances`). The square is monotone on ``[0, inf)``, so the
    ranking -- hence every metric here -- is the same as with the Euclidean
    distance; only the distance *values* differ.
Relevant
    A gallery item is relevant to a query if it has the same label. With
    ``exclude_self=True`` query ``i`` *is* gallery item ``i`` (leave-one-out)
    and that item is removed from its ranking altogether (it is neither
    relevant nor counted among the items above a threshold).
Average precision (ties as in scikit-learn)
    ``AP = mean over relevant items p of  #{relevant j : d_j <= d_p} /
    #{j : d_j <= d_p}``. Items whose distances are *equal* form one threshold,
    exactly as ``sklearn.metrics.average_precision_score(is_relevant,
    -distance)`` treats tied scores; the value does not depend on how ties are
    ordered. The whole ranking is used (no cut-off). mAP = mean of AP over the
    queries, in percent.
Top-k / CMC (ties broken by gallery index)
    The ranking is ordered by ``(distance, gallery index)``: among equal
    distances the lower gallery index comes first (a stable sort). A query is
    correct at ``k`` if a relevant item is among the first ``k`` of that
    ranking, i.e. if its *first relevant rank* (0-based) is ``< k``.
    top-k = percent of correct queries.
A query with no relevant item
    AP is undefined for it (sklearn warns and returns a meaningless number). By
    default (``on_no_relevant="error"``) this is an error naming the queries;
    with ``on_no_relevant="skip"`` such queries are left out of every mean
    (mAP, top-k and, in backfill curves, the negative-flip rates) and their
    per-query values are ``ap = nan``, ``first_rank = -1``, ``evaluated = False``.

How the engine counts
---------------------
For one query, every AP term and the first relevant rank only need *counts of
gallery items at or below a few thresholds*: the distances ``v`` of its ``P``
relevant items (in a backfill curve on both sides, ``2P`` values) and, per
ratio, the float predecessor ``prev(t*) = nextafter(t*, -inf)`` of the best
relevant distance ``t*`` (so that ``#{d < t*} = #{d <= prev(t*)}``). Each
gallery distance is placed once into its bin ``#{t in T : t < d}`` (a binary
search, ``torch.searchsorted``, rows split over CPU threads) and the bins are
histogrammed (``bincount``), separately for each *backfill segment* (the items
that become backfilled between two consecutive ratios). The mixed gallery at
every ratio is a sum of per-segment histograms, and a cumulative sum gives the
counts. Cost per query: ``O(N log P)`` once plus ``O(R * P)`` per ratio,
instead of sorting the whole row at every ratio. Only comparisons touch the
distances, so the counts are exact, ties included. Items tied *exactly* with
the best relevant item (same float distance) are ordered by index: those are
counted directly on that row, which is rare on real data.

Where dense computation is needed: mAP over the whole ranking needs every
query-gallery distance, so the engine computes them all, a chunk of queries at a
time (a matrix product). faiss is used only for plain top-k search
(:func:`backfill_utils.backfill.knn_search`), where it is the right tool.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Sequence

import numpy as np
import torch

__all__ = [
    "pairwise_distances",
    "average_precision",
    "first_relevant_rank",
    "cmc_at_k",
    "evaluate_retrieval",
    "auto_chunk_size",
    "DEFAULT_MEMORY_BUDGET",
]

#: Default memory budget (bytes) for one chunk of queries in the engine.
DEFAULT_MEMORY_BUDGET = 1 << 30

_ON_NO_RELEVANT = ("error", "skip")


# ---------------------------------------------------------------------------
# Input handling
# ---------------------------------------------------------------------------
def as_embedding_tensor(x: Any, name: str) -> torch.Tensor:
    """``x`` as a 2-D floating CPU/GPU tensor, checked to be finite.

    Integer input becomes float32; float16/bfloat16 become float32; float32 and
    float64 are kept as they are (no silent change of values).
    """
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        try:
            t = torch.as_tensor(np.asarray(x))
        except Exception as exc:  # pragma: no cover - exotic inputs
            raise TypeError(f"{name}: cannot convert {type(x).__name__} to a tensor") from exc
    if t.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D array (items x dims), got shape {tuple(t.shape)}"
        )
    if not t.is_floating_point() or t.dtype in (torch.float16, torch.bfloat16):
        t = t.to(torch.float32)
    if t.numel() and not bool(torch.isfinite(t).all()):
        bad = (~torch.isfinite(t)).any(dim=1).nonzero().flatten()[:5].tolist()
        raise ValueError(
            f"{name} contains NaN or inf (first bad rows: {bad}); "
            "fix the embeddings (e.g. check the model output) before evaluating"
        )
    return t


def _common_dtype(*ts: torch.Tensor) -> torch.dtype:
    dtype = ts[0].dtype
    for t in ts[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def as_label_array(x: Any, name: str) -> np.ndarray:
    """Labels as a 1-D numpy array (any comparable dtype)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one label per item), got shape {a.shape}")
    return a


def encode_labels(query_labels: np.ndarray, gallery_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map both label arrays to consecutive integers with one shared code book."""
    try:
        _, inv = np.unique(np.concatenate([query_labels, gallery_labels]), return_inverse=True)
    except TypeError as exc:
        raise TypeError(
            "query and gallery labels must be comparable values of one kind "
            f"(got dtypes {query_labels.dtype} and {gallery_labels.dtype})"
        ) from exc
    inv = inv.reshape(-1).astype(np.int64)
    return inv[: len(query_labels)], inv[len(query_labels):]


def validate_ks(ks: Iterable[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty list of integers >= 1, got {ks}")
    return ks


def check_on_no_relevant(on_no_relevant: str) -> None:
    if on_no_relevant not in _ON_NO_RELEVANT:
        raise ValueError(
            f"on_no_relevant must be one of {_ON_NO_RELEVANT}, got {on_no_relevant!r}"
        )


# ---------------------------------------------------------------------------
# Dense reference functions
# ---------------------------------------------------------------------------
def pairwise_distances(query: Any, gallery: Any) -> torch.Tensor:
    """Squared Euclidean distances ``(Q, N)`` between the rows of two matrices.

    Computed as ``|a|^2 + |b|^2 - 2 a.b`` (one matrix product) and clamped at 0
    against rounding. Ranking by squared Euclidean distance is the same as
    ranking by Euclidean distance (the square is monotone on ``[0, inf)``).

    >>> q = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    >>> g = torch.tensor([[0.0, 1.0], [3.0, 1.0]])
    >>> pairwise_distances(q, g)
    tensor([[ 1., 10.],
            [ 1.,  4.]])
    """
    q = as_embedding_tensor(query, "query")
    g = as_embedding_tensor(gallery, "gallery")
    if q.shape[1] != g.shape[1]:
        raise ValueError(
            f"query has dimension {q.shape[1]} (shape {tuple(q.shape)}) but gallery has "
            f"dimension {g.shape[1]} (shape {tuple(g.shape)}); they must live in the same space"
        )
    dtype = _common_dtype(q, g)
    q, g = q.to(dtype), g.to(g.device if q.device == g.device else q.device, dtype)
    return _sq_dists(q, g, (g * g).sum(1))


def _sq_dists(q: torch.Tensor, g: torch.Tensor, g_sq: torch.Tensor) -> torch.Tensor:
    """``|q|^2 + |g|^2 - 2 q.g``, clamped at 0 (``g_sq`` precomputed)."""
    d = torch.addmm(g_sq.unsqueeze(0), q, g.T, beta=1.0, alpha=-2.0)
    d.add_((q * q).sum(1, keepdim=True))
    return d.clamp_(min=0)


def _dense_inputs(distances: Any, is_relevant: Any, valid: Any | None):
    d = torch.as_tensor(np.asarray(distances) if not isinstance(distances, torch.Tensor) else distances)
    rel = torch.as_tensor(np.asarray(is_relevant) if not isinstance(is_relevant, torch.Tensor) else is_relevant)
    if d.ndim != 2 or rel.shape != d.shape:
        raise ValueError(
            f"distances must be 2-D and is_relevant must have the same shape; got "
            f"{tuple(d.shape)} and {tuple(rel.shape)}"
        )
    if not d.is_floating_point():
        d = d.to(torch.float64)
    if bool(torch.isnan(d).any()):
        raise ValueError("distances contain NaN")
    rel = rel.to(torch.bool)
    if valid is None:
        val = torch.ones_like(rel)
    else:
        val = torch.as_tensor(np.asarray(valid) if not isinstance(valid, torch.Tensor) else valid).to(torch.bool)
        if val.shape != d.shape:
            raise ValueError(f"valid must have shape {tuple(d.shape)}, got {tuple(val.shape)}")
    return d, rel & val, val


def average_precision(distances: Any, is_relevant: Any, valid: Any | None = None) -> torch.Tensor:
    """Per-query average precision over the whole ranking (ties as in sklearn).

    ``AP_i = mean over relevant p of #{relevant j: d_ij <= d_ip} / #{j: d_ij <= d_ip}``
    where ``j`` runs over the items with ``valid[i, j]`` (default: all). This is
    ``sklearn.metrics.average_precision_score(is_relevant[i], -distances[i])``:
    tied distances form one threshold. Rows with no relevant item give ``nan``.

    >>> d = [[0.1, 0.2, 0.3, 0.4],
    ...      [0.5, 0.5, 0.5, 0.1]]
    >>> rel = [[True, False, True, False],
    ...        [True, False, False, False]]
    >>> average_precision(d, rel)  # row 0: (1/1 + 2/3) / 2; row 1: tie of 3 -> 1/4
    tensor([0.8333, 0.2500], dtype=torch.float64)
    >>> average_precision(d, rel, valid=[[True] * 4, [True, False, True, False]])
    tensor([0.8333, 0.5000], dtype=torch.float64)
    """
    d, rel, val = _dense_inputs(distances, is_relevant, valid)
    inf = torch.tensor(float("inf"), dtype=d.dtype)
    all_sorted = torch.where(val, d, inf).sort(dim=1).values
    rel_sorted = torch.where(rel, d, inf).sort(dim=1).values
    n_le = torch.searchsorted(all_sorted, d.contiguous(), right=True)
    n_rel_le = torch.searchsorted(rel_sorted, d.contiguous(), right=True)
    prec = torch.where(rel, n_rel_le.double() / n_le.clamp(min=1).double(), 0.0)
    n_rel = rel.sum(1)
    out = prec.sum(1) / n_rel.double()
    return torch.where(n_rel > 0, out, torch.nan)


def first_relevant_rank(distances: Any, is_relevant: Any, valid: Any | None = None) -> torch.Tensor:
    """0-based rank of the first relevant item, ranking by (distance, gallery index).

    Among equal distances the lower gallery (column) index ranks first, as with
    a stable sort. Items with ``valid`` False are left out of the ranking. Rows
    with no relevant item give ``-1``. ``cmc_at_k(rank, k)`` turns it into
    top-k correctness.

    >>> d = [[0.3, 0.1, 0.1, 0.2],
    ...      [0.1, 0.1, 0.1, 0.1]]
    >>> rel = [[False, False, True, False],
    ...        [False, False, False, True]]
    >>> first_relevant_rank(d, rel)  # row 0: column 1 ties with 2 and wins by index
    tensor([1, 3])
    >>> first_relevant_rank(d, rel, valid=[[True] * 4, [False, True, True, True]])
    tensor([1, 2])
    """
    d, rel, val = _dense_inputs(distances, is_relevant, valid)
    inf = torch.tensor(float("inf"), dtype=d.dtype)
    d_rel = torch.where(rel, d, inf)
    t = d_rel.min(dim=1, keepdim=True).values
    n = d.shape[1]
    idx = torch.arange(n).unsqueeze(0)
    big = torch.tensor(n)
    p = torch.where(rel & (d == t), idx, big).min(dim=1, keepdim=True).values
    rank = (val & (d < t)).sum(1) + (val & (d == t) & (idx < p)).sum(1)
    return torch.where(rel.any(1), rank, torch.tensor(-1))


def cmc_at_k(first_rank: Any, k: int) -> torch.Tensor:
    """Top-k correctness from first relevant ranks (``0 <= rank < k``).

    >>> cmc_at_k(torch.tensor([0, 3, -1, 5]), 5)
    tensor([ True,  True, False, False])
    """
    r = torch.as_tensor(first_rank)
    return (r >= 0) & (r < int(k))


# ---------------------------------------------------------------------------
# The chunked engine
# ---------------------------------------------------------------------------
def _row_bytes(n_gallery: int, n_thresholds: int, n_segments: int, n_ratios: int, max_pos: int) -> int:
    """Rough peak bytes per query row of one engine chunk (both sides)."""
    nb = n_thresholds + n_ratios + 1  # relevant distances, predecessors of the best
    dense = 2 * 4 * n_gallery + 4 * 8 * n_gallery  # two distance rows + int64 temporaries
    hist = 8 * (3 * n_segments * nb + 4 * n_ratios * nb)
    pos = 8 * 8 * n_ratios * max(max_pos, 1)
    return dense + hist + pos


def auto_chunk_size(
    n_queries: int,
    n_gallery: int,
    max_relevant: int,
    n_ratios: int = 11,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> int:
    """Queries per chunk so that one chunk of the engine fits ``memory_budget`` bytes.

    The estimate assumes the two-sided (backfill) case even for a plain
    evaluation, so :func:`evaluate_retrieval` and a backfill curve split the
    queries the same way and compute bit-identical distance rows.
    """
    per_row = _row_bytes(n_gallery, 2 * max_relevant, n_ratios + 1, n_ratios, max_relevant)
    return int(max(1, min(n_queries, memory_budget // max(per_row, 1))))


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


_POOL: ThreadPoolExecutor | None = None
_FLAT_LIMIT = 2**31 - 1  # largest int32 histogram index


def _searchsorted_rows(T: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``torch.searchsorted(T, d, out_int32=True)`` (left) with rows split over threads.

    ``torch.searchsorted`` runs on one thread on the CPU; it dominates the
    engine's time, so blocks of rows are searched in parallel (as many threads
    as ``torch.get_num_threads()``; torch releases the GIL inside the op).
    """
    n_threads = torch.get_num_threads()
    B = d.shape[0]
    if d.device.type != "cpu" or n_threads < 2 or B < 2 or d.numel() < (1 << 20):
        return torch.searchsorted(T, d, out_int32=True)
    global _POOL
    if _POOL is None or _POOL._max_workers < n_threads:
        _POOL = ThreadPoolExecutor(max_workers=n_threads, thread_name_prefix="searchsorted")
    out = torch.empty(d.shape, dtype=torch.int32, device=d.device)
    bounds = np.linspace(0, B, min(n_threads, B) + 1).astype(int)

    def run(a: int, b: int) -> None:
        torch.searchsorted(T[a:b], d[a:b], out_int32=True, out=out[a:b])

    list(_POOL.map(run, bounds[:-1], bounds[1:]))
    return out


def _chunk_statistics(
    d_old: torch.Tensor,
    d_new: torch.Tensor | None,
    pos_idx: torch.Tensor,
    pos_valid: torch.Tensor,
    segment: torch.Tensor,
    n_ratios: int,
    exclude_col: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact per-ratio AP and first relevant rank for one chunk of queries.

    ``d_old``/``d_new``: (B, N) distance rows of the two sides (``d_new`` None:
    a single ranking, ``n_ratios`` must be 1). Item ``j`` holds its new-side
    distance at ratio ``i`` iff ``segment[j] <= i`` (segments ``0..n_ratios``).
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
    """
    B, N = d_old.shape
    dev = d_old.device
    two = d_new is not None
    sides = [d_old, d_new] if two else [d_old]
    n_seg = n_ratios + 1 if two else 1
    R = n_ratios
    inf = torch.tensor(float("inf"), dtype=d_old.dtype, device=dev)

    # distances of the relevant items, per side and at every ratio
    vals = [torch.where(pos_valid, d.gather(1, pos_idx), inf) for d in sides]  # (B, P)
    pos_seg = segment[pos_idx]  # (B, P)
    if two:
        is_new = pos_seg.unsqueeze(1) <= torch.arange(R, device=dev).view(1, R, 1)  # (B, R, P)
        cur = torch.where(is_new, vals[1].unsqueeze(1), vals[0].unsqueeze(1))
    else:
        cur = vals[0].unsqueeze(1)  # (B, 1, P)
    # best relevant item per ratio: smallest (distance, gallery index)
    t_best = cur.min(-1).values  # (B, R)
    cand = pos_valid.unsqueeze(1) & (cur == t_best.unsqueeze(-1))
    p_best = torch.where(cand, pos_idx.unsqueeze(1), N).min(-1).values  # (B, R)
    prev_best = torch.where(torch.isfinite(t_best), torch.nextafter(t_best, -inf), inf)

    T = torch.cat(vals + [prev_best], 1).sort(dim=1).values.contiguous()
    nb = T.shape[1] + 1  # bins 0..len(T)
    size = n_seg * nb
    row_len = size + 1  # + a trash slot for the excluded item
    flat = B * row_len < _FLAT_LIMIT  # int32 flat histogram index (bincount) possible
    seg_off = (segment * nb).to(torch.int32 if flat else torch.int64)  # (N,)
    row_off = (torch.arange(B, device=dev, dtype=torch.int32) * row_len).unsqueeze(1) if flat else None
    pos_w = pos_valid.to(torch.int32)

    hists, pos_hists, k_own = [], [], []
    for d in sides:
        idx = _searchsorted_rows(T, d)  # (B, N) int32 bins
        k_own.append(idx.gather(1, pos_idx).long())  # bins of the relevant items themselves
        idx = idx.add_(seg_off) if flat else idx.long().add_(seg_off)  # slot (segment, bin)
        if exclude_col is not None:
            idx.scatter_(1, exclude_col.unsqueeze(1), size)  # the query itself -> trash slot
        if flat:
            h = torch.bincount(idx.add_(row_off).view(-1), minlength=B * row_len).view(B, row_len)
        else:
            h = torch.zeros((B, row_len), dtype=torch.int64, device=dev)
            h.scatter_add_(1, idx, torch.ones((1, 1), dtype=torch.int64, device=dev).expand(B, N))
        del idx
        hists.append(h[:, :size].view(B, n_seg, nb))
        ph = torch.zeros((B, size), dtype=torch.int32, device=dev)
        ph.scatter_add_(1, pos_seg * nb + k_own[-1], pos_w)
        pos_hists.append(ph.view(B, n_seg, nb))

    if two:
        # at ratio i the segments <= i hold the new side, the others the old side
        def at_ratios(h_old, h_new):
            pre_old = h_old.cumsum(1, dtype=torch.int32)
            return h_new.cumsum(1, dtype=torch.int32)[:, :R] + (pre_old[:, -1:] - pre_old[:, :R])

        comb = at_ratios(hists[0], hists[1])  # (B, R, nb)
        comb_pos = at_ratios(pos_hists[0], pos_hists[1])
        k = torch.where(is_new, k_own[1].unsqueeze(1), k_own[0].unsqueeze(1))  # (B, R, P)
    else:
        comb, comb_pos = hists[0], pos_hists[0]  # (B, 1, nb)
        k = k_own[0].unsqueeze(1)
    del hists, pos_hists

    n_le = comb.cumsum(-1, dtype=torch.int32)  # n_le[..., k] = #items with distance <= T[k]
    n_rel_le = comb_pos.cumsum(-1, dtype=torch.int32)

    valid = pos_valid.unsqueeze(1).expand_as(k)
    all_le = n_le.gather(2, k)
    rel_le = n_rel_le.gather(2, k)
    n_rel = pos_valid.sum(1)
    prec = torch.where(valid, rel_le.double() / all_le.clamp(min=1).double(), 0.0)
    ap = prec.sum(-1) / n_rel.double().unsqueeze(1)
    has_rel = (n_rel > 0).unsqueeze(1)
    ap = torch.where(has_rel, ap, torch.nan)

    # first relevant rank = #items closer than t* + #items tied with it at a lower index
    k_lt = torch.searchsorted(T, prev_best.contiguous())  # bin of prev(t*)
    k_le = torch.searchsorted(T, t_best.contiguous())  # bin of t* (first index of its run)
    n_lt = n_le.gather(2, k_lt.unsqueeze(-1)).squeeze(-1).long()
    n_eq = n_le.gather(2, k_le.unsqueeze(-1)).squeeze(-1).long() - n_lt
    rank = n_lt
    tie = has_rel & (n_eq > 1)
    if bool(tie.any()):
        rank = rank + _tie_counts(tie, d_old, d_new, segment, t_best, p_best, exclude_col)
    rank = torch.where(has_rel, rank, -1)
    return ap, rank


def _tie_counts(tie, d_old, d_new, segment, t_best, p_best, exclude_col, block: int = 256):
    """#items at distance ``t_best`` with a lower index than ``p_best`` (rare: exact ties)."""
    out = torch.zeros_like(p_best)
    bq, br = tie.nonzero(as_tuple=True)
    N = d_old.shape[1]
    ar = torch.arange(N, device=d_old.device).unsqueeze(0)
    for s in range(0, len(bq), block):
        qi, ri = bq[s:s + block], br[s:s + block]
        row = d_old[qi]
        if d_new is not None:
            row = torch.where(segment.unsqueeze(0) <= ri.unsqueeze(1), d_new[qi], row)
        hit = (row == t_best[qi, ri].unsqueeze(1)) & (ar < p_best[qi, ri].unsqueeze(1))
        if exclude_col is not None:
            hit &= ar != exclude_col[qi].unsqueeze(1)
        out[qi, ri] = hit.sum(1)
    return out


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
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: bool = False,
    desc: str = "queries",
) -> dict[str, np.ndarray]:
    """Run the engine over all queries, chunk by chunk.

    Inputs are validated tensors and integer-coded labels (see
    :func:`evaluate_retrieval` and ``backfill.backfill_curve`` for the public
    entry points). Returns ``ap`` (R, Q) float64, ``first_rank`` (R, Q) int64
    and ``n_relevant`` (Q,) int64.
    """
    Q, N = query_old.shape[0], gallery_old.shape[0]
    two = query_new is not None
    if not two:
        n_ratios = 1
    dev = torch.device(device) if device is not None else query_old.device
    n_codes = int(max(query_codes.max(initial=-1), gallery_codes.max(initial=-1)) + 1)
    positives = _Positives(gallery_codes, n_codes)
    max_rel = positives.max_count(query_codes)
    if chunk_size is None:
        chunk_size = auto_chunk_size(Q, N, max_rel, max(n_ratios, 11), memory_budget)
    chunk_size = int(chunk_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

    # each side is computed in its own precision, then widened (exactly) to a
    # common dtype, so a side gives the same distances as on its own
    dt_old = _common_dtype(query_old, gallery_old)
    dt_new = _common_dtype(query_new, gallery_new) if two else dt_old
    dtype = torch.promote_types(dt_old, dt_new)
    g_old = gallery_old.to(dev, dt_old)
    g_old_sq = (g_old * g_old).sum(1)
    if two:
        g_new = gallery_new.to(dev, dt_new)
        g_new_sq = (g_new * g_new).sum(1)
    seg = torch.zeros(N, dtype=torch.int64) if segment is None else torch.as_tensor(segment, dtype=torch.int64)
    seg = seg.to(dev)
    codes = torch.from_numpy(query_codes)

    ap = np.empty((n_ratios, Q), dtype=np.float64)
    rank = np.empty((n_ratios, Q), dtype=np.int64)
    n_rel = np.empty(Q, dtype=np.int64)

    from tqdm import tqdm

    starts = range(0, Q, chunk_size)
    for s in tqdm(starts, desc=desc, disable=not progress, unit="chunk", leave=False):
        e = min(s + chunk_size, Q)
        qidx = torch.arange(s, e)
        pidx, pval = positives.gather(codes[s:e], qidx if exclude_self else None)  # on CPU
        pidx, pval = pidx.to(dev), pval.to(dev)
        d_old = _sq_dists(query_old[s:e].to(dev, dt_old), g_old, g_old_sq).to(dtype)
        d_new = _sq_dists(query_new[s:e].to(dev, dt_new), g_new, g_new_sq).to(dtype) if two else None
        excl = qidx.to(dev) if exclude_self else None
        a, r = _chunk_statistics(d_old, d_new, pidx, pval, seg, n_ratios, excl)
        ap[:, s:e] = a.T.cpu().numpy()
        rank[:, s:e] = r.T.cpu().numpy()
        n_rel[s:e] = pval.sum(1).cpu().numpy()
    return {"ap": ap, "first_rank": rank, "n_relevant": n_rel}


def no_relevant_error(n_relevant: np.ndarray, what: str = "query") -> ValueError:
    bad = np.flatnonzero(n_relevant == 0)
    return ValueError(
        f"{len(bad)} {what}(s) have no relevant item in the gallery (first: "
        f"{bad[:10].tolist()}), so their average precision is undefined (e.g. a class "
        "with a single member under exclude_self=True, or a query label missing from "
        "the gallery). Remove them, or pass on_no_relevant='skip' to leave them out of "
        "every mean."
    )


def summarize_statistics(
    ap: np.ndarray, first_rank: np.ndarray, evaluated: np.ndarray, ks: Sequence[int]
) -> dict[str, np.ndarray]:
    """Percent metrics per ratio (rows of ``ap``/``first_rank``) over ``evaluated`` queries.

    The mean of AP is a correctly rounded sum (``math.fsum``), so it does not
    depend on the array layout: a ratio-1 curve point equals the plain
    evaluation bit for bit.
    """
    n = int(evaluated.sum())
    nan = np.full(ap.shape[0], np.nan)
    out = {"mAP": np.array([100.0 * math.fsum(row[evaluated]) / n for row in ap]) if n else nan}
    for k in ks:
        corr = (first_rank >= 0) & (first_rank < k)
        out[f"top{k}"] = 100.0 * corr[:, evaluated].sum(1) / n if n else nan
    return out


def evaluate_retrieval(
    query_embeddings: Any,
    query_labels: Any,
    gallery_embeddings: Any,
    gallery_labels: Any,
    *,
    exclude_self: bool = False,
    ks: Sequence[int] = (1, 5),
    chunk_size: int | None = None,
    device: Any = None,
    return_per_query: bool = False,
    on_no_relevant: str = "error",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: bool = False,
) -> dict[str, Any]:
    """mAP and CMC top-k of a query set against a gallery, in percent.

    Parameters
    ----------
    query_embeddings, gallery_embeddings
        ``(Q, d)`` and ``(N, d)`` arrays (numpy or torch), finite.
    query_labels, gallery_labels
        ``(Q,)`` and ``(N,)``; relevant = same label.
    exclude_self
        Leave-one-out: query ``i`` is gallery item ``i`` and is removed from its
        own ranking. Requires ``Q == N``.
    ks
        Cut-offs of the CMC top-k metrics (keys ``top{k}``).
    chunk_size
        Queries per chunk; default from ``memory_budget`` (bytes).
    device
        Torch device for the computation (default: where the inputs are).
    return_per_query
        Also return per-query arrays: ``ap`` (fraction, nan if not evaluated),
        ``first_rank`` (0-based, index tie-break, -1 if no relevant item),
        ``correct_at_{k}`` (bool), ``n_relevant`` and ``evaluated`` (bool).
    on_no_relevant
        ``"error"`` (default) or ``"skip"``; see the module docstring.

    Returns
    -------
    dict with ``mAP``, ``top1``, ``top5`` (one ``top{k}`` per ``ks``) as floats
    in percent, and ``n_evaluated``.

    Ties: AP treats equal distances as one threshold (as sklearn); top-k breaks
    ties by gallery index (see the module docstring).
    """
    ks = validate_ks(ks)
    check_on_no_relevant(on_no_relevant)
    q = as_embedding_tensor(query_embeddings, "query_embeddings")
    g = as_embedding_tensor(gallery_embeddings, "gallery_embeddings")
    ql = as_label_array(query_labels, "query_labels")
    gl = as_label_array(gallery_labels, "gallery_labels")
    if len(ql) != q.shape[0]:
        raise ValueError(f"query_labels has {len(ql)} entries but query_embeddings has {q.shape[0]} rows")
    if len(gl) != g.shape[0]:
        raise ValueError(f"gallery_labels has {len(gl)} entries but gallery_embeddings has {g.shape[0]} rows")
    if q.shape[1] != g.shape[1]:
        raise ValueError(
            f"query_embeddings has shape {tuple(q.shape)} but gallery_embeddings has shape "
            f"{tuple(g.shape)}: the embedding dimensions must agree"
        )
    if exclude_self and q.shape[0] != g.shape[0]:
        raise ValueError(
            f"exclude_self=True needs query i to be gallery item i, but there are "
            f"{q.shape[0]} queries and {g.shape[0]} gallery items; pass exclude_self=False "
            "for a separate query set"
        )
    if q.shape[0] == 0 or g.shape[0] == 0:
        raise ValueError(f"empty query set or gallery (shapes {tuple(q.shape)}, {tuple(g.shape)})")
    qc, gc = encode_labels(ql, gl)
    stats = retrieval_statistics(
        q, g, None, None, qc, gc, exclude_self=exclude_self, chunk_size=chunk_size,
        device=device, memory_budget=memory_budget, progress=progress, desc="evaluate",
    )
    evaluated = stats["n_relevant"] > 0
    if not evaluated.all() and on_no_relevant == "error":
        raise no_relevant_error(stats["n_relevant"])
    summ = summarize_statistics(stats["ap"], stats["first_rank"], evaluated, ks)
    out: dict[str, Any] = {k: float(v[0]) for k, v in summ.items()}
    out["n_evaluated"] = int(evaluated.sum())
    if return_per_query:
        rank = stats["first_rank"][0]
        out["ap"] = stats["ap"][0]
        out["first_rank"] = rank
        for k in ks:
            out[f"correct_at_{k}"] = (rank >= 0) & (rank < k)
        out["n_relevant"] = stats["n_relevant"]
        out["evaluated"] = evaluated
    return out
