"""The numba kernels of :mod:`backfill_utils.retrieval.counting` (imported only when numba is installed).

See :mod:`backfill_utils.retrieval.counting` for what they compute and why the bucketing
shortcut is exact. Every kernel works on rows ``r0..r1`` of a chunk, releases
the GIL (``nogil``) and is cached on disk (``cache=True``).

Row helpers (inlined into the kernels):

* :func:`tables`: the bucketing of one row's thresholds;
* :func:`fill`: bins and per-segment histogram of one distance row;
* :func:`row_ap`: AP and first-rank counts of one row at every ratio.
"""
from __future__ import annotations

import math

import numba
import numpy as np

MAX_BUCKETS = 1 << 18  # per row: the tables stay a few MB even for huge classes


@numba.njit(inline="always")
def bucket(x, lo, scale, m):
    """Monotone bucket ``min(max(floor((x - lo) * scale), 0), m - 1)`` (branch-free)."""
    b = np.int64(min(max((x - lo) * scale, 0.0), np.float64(m - 1)))
    return min(max(b, 0), m - 1)


@numba.njit(inline="always")
def left(t, x, a, c):
    """``a + #{k in [a, c) : t[k] < x}`` for sorted ``t``."""
    while a < c:
        mid = (a + c) >> 1
        if t[mid] < x:
            a = mid + 1
        else:
            c = mid
    return a


@numba.njit(inline="always")
def tables(t, K, mult):
    """Bucketing of the ``K`` finite thresholds ``t[:K]``: ``(lo, scale, m, start, tab)``.

    ``start[b]`` = #thresholds in buckets ``< b``; ``tab[b]`` = the first two
    thresholds of bucket ``b`` (``+inf`` if absent) and ``start[b]``, stored as
    ``-1 - start[b]`` when the bucket holds more than two (a crowded bucket).
    """
    lo, scale, m = 0.0, 0.0, 1
    if K > 0:
        lo = np.float64(t[0])
        m = min(mult * K, MAX_BUCKETS)
        span = np.float64(t[K - 1]) - lo
        if span > 0.0:
            scale = (m - 1) / span
            if not math.isfinite(scale):
                scale = 0.0
    start = np.zeros(m + 1, np.int64)
    for k in range(K):
        start[bucket(np.float64(t[k]), lo, scale, m) + 1] += 1
    for b in range(m):
        start[b + 1] += start[b]
    tab = np.full((m, 3), np.inf)
    for b in range(m):
        a, n = start[b], start[b + 1] - start[b]
        tab[b, 2] = a if n <= 2 else -1 - a
        if 1 <= n <= 2:
            tab[b, 0] = t[a]
        if n == 2:
            tab[b, 1] = t[a + 1]
    return lo, scale, m, start, tab


@numba.njit(inline="always")
def bin_of(x, lo, scale, m, start, tab, t):
    """``#{k : t[k] < x}``: the bucket's record, or a binary search in a crowded bucket."""
    b = bucket(x, lo, scale, m)
    a = np.int64(tab[b, 2])
    if a >= 0:
        return a + np.int64(tab[b, 0] < x) + np.int64(tab[b, 1] < x)
    return left(t, x, -1 - a, start[b + 1])


@numba.njit(inline="always")
def fill(row, q, t, tabs, seg, n_bins, ex, h):
    """Add one row's items to ``h`` (flat ``segment * n_bins + bin``), leaving out ``ex``."""
    lo, scale, m, start, tab = tabs
    for j in range(row.shape[0]):
        x = max(np.float64(row[j] + q), 0.0)  # the sum in raw's dtype: torch's rounding
        h[seg[j] * n_bins + bin_of(x, lo, scale, m, start, tab, t)] += 1
    if ex >= 0:
        x = max(np.float64(row[ex] + q), 0.0)
        h[seg[ex] * n_bins + bin_of(x, lo, scale, m, start, tab, t)] -= 1


@numba.njit(inline="always")
def row_ap(h_old, h_new, t, v_old, v_new, pos_seg, valid, t_best, prev_best, ap, n_lt, n_eq, work):
    """AP and first-rank counts of one row at every ratio (outputs: rows of ap/n_lt/n_eq).

    ``h_old``/``h_new``: (S, nb) histograms; at ratio ``r`` segments ``<= r`` are new.
    ``work``: (6, max(nb, P)) int64 scratch.
    """
    n_seg, nb = h_old.shape
    R, P = ap.shape[0], valid.shape[0]
    cnt, rel, n_le, n_rel_le, k_old, k_new = work[0], work[1], work[2], work[3], work[4], work[5]
    cnt[:nb] = 0
    rel[:nb] = 0
    n_rel = 0
    for p in range(P):  # bins of the relevant items themselves
        k_old[p] = left(t, v_old[p], 0, nb - 1)
        k_new[p] = left(t, v_new[p], 0, nb - 1)
        if valid[p]:
            rel[k_old[p]] += 1
            n_rel += 1
    for s in range(n_seg):  # every item on the old side
        for k in range(nb):
            cnt[k] += h_old[s, k]
    for r in range(R):  # segment r moves to the new side
        for k in range(nb):
            cnt[k] += h_new[r, k] - h_old[r, k]
        for p in range(P):
            if valid[p] and pos_seg[p] == r:
                rel[k_old[p]] -= 1
                rel[k_new[p]] += 1
        acc, acc_rel = 0, 0
        for k in range(nb):  # cumulative: #{d <= T[k]}
            acc += cnt[k]
            acc_rel += rel[k]
            n_le[k] = acc
            n_rel_le[k] = acc_rel
        total = 0.0
        for p in range(P):
            if valid[p]:
                k = k_new[p] if pos_seg[p] <= r else k_old[p]
                total += n_rel_le[k] / max(n_le[k], 1)
        ap[r] = total / n_rel if n_rel > 0 else np.nan
        n_lt[r] = n_le[left(t, prev_best[r], 0, nb - 1)]  # #{d <= prev(t*)} = #{d < t*}
        n_eq[r] = n_le[left(t, t_best[r], 0, nb - 1)] - n_lt[r]


@numba.njit(nogil=True, cache=True)
def histograms(raw, qsq, T, n_finite, seg, n_bins, excl, hist, mult, r0, r1):
    """Step 1 alone: ``hist[i]`` (flat, zeroed here) for rows ``r0..r1``."""
    for i in range(r0, r1):
        hist[i, :] = 0
        fill(raw[i], qsq[i], T[i], tables(T[i], n_finite[i], mult), seg, n_bins, excl[i], hist[i])


@numba.njit(nogil=True, cache=True)
def ap_counts(h_old, h_new, T, v_old, v_new, pos_seg, valid, t_best, prev_best, ap, n_lt, n_eq, r0, r1):
    """Step 2 alone, from (B, S, nb) histograms."""
    work = np.zeros((6, max(h_old.shape[2], valid.shape[1])), np.int64)
    for i in range(r0, r1):
        row_ap(h_old[i], h_new[i], T[i], v_old[i], v_new[i], pos_seg[i], valid[i], t_best[i],
               prev_best[i], ap[i], n_lt[i], n_eq[i], work)


@numba.njit(inline="always")
def row_thresholds(raw_o, q_o, raw_n, q_n, two, idx, valid, seg, v, t, t_best, prev_best, p_best, ps):
    """One row's relevant distances ``v`` (2, P), best per ratio, sorted thresholds ``t``.

    The same values as :func:`backfill_utils.retrieval.counting.relevant_thresholds`:
    ``v`` in ``t``'s dtype (+inf where not valid), ``(t_best, p_best)`` the
    smallest (distance, index) at each ratio, ``prev_best`` its predecessor.
    """
    P, R, N = idx.shape[0], t_best.shape[0], raw_o.shape[0]
    for p in range(P):
        j = idx[p]
        ps[p] = seg[j]
        v[0, p] = np.inf
        v[1, p] = np.inf
        if valid[p]:
            v[0, p] = max(raw_o[j] + q_o, 0.0)  # the sum in raw's dtype, then clamped
            v[1, p] = max(raw_n[j] + q_n, 0.0) if two else v[0, p]
    for r in range(R):  # array elements keep t's dtype (float32 stays float32)
        t_best[r], pb = np.inf, N
        for p in range(P):
            if valid[p]:
                x = v[1, p] if two and ps[p] <= r else v[0, p]
                if x < t_best[r] or (x == t_best[r] and idx[p] < pb):
                    t_best[r], pb = x, idx[p]
        p_best[r] = pb
        prev_best[r] = -np.inf
        if t_best[r] < np.inf:
            prev_best[r] = np.nextafter(t_best[r], prev_best[r])  # in t's dtype
        else:
            prev_best[r] = np.inf
    k = 0
    for side in range(2 if two else 1):
        for p in range(P):
            t[k] = v[side, p]
            k += 1
    for r in range(R):
        t[k + r] = prev_best[r]
    t.sort()


@numba.njit(nogil=True, cache=True)
def statistics(raw_o, q_o, raw_n, q_n, two, pos_idx, valid, seg, n_seg, excl, mult,
               vals, T, t_best, prev_best, p_best, ap, n_lt, n_eq, r0, r1):
    """A whole chunk, row by row: thresholds, histograms of both sides, AP and rank counts."""
    nb = T.shape[1] + 1
    P = pos_idx.shape[1]
    h_old = np.zeros((n_seg, nb), np.int32)
    h_new = np.zeros((n_seg, nb), np.int32) if two else h_old
    work = np.zeros((6, max(nb, P)), np.int64)
    ps = np.zeros(P, np.int64)
    for i in range(r0, r1):
        t = T[i]
        row_thresholds(raw_o[i], q_o[i], raw_n[i], q_n[i], two, pos_idx[i], valid[i], seg, vals[:, i],
                       t, t_best[i], prev_best[i], p_best[i], ps)
        n_finite = 0
        while n_finite < t.shape[0] and t[n_finite] < np.inf:
            n_finite += 1
        tabs = tables(t, n_finite, mult)
        h_old[:, :] = 0
        fill(raw_o[i], q_o[i], t, tabs, seg, nb, excl[i], h_old.reshape(-1))
        if two:
            h_new[:, :] = 0
            fill(raw_n[i], q_n[i], t, tabs, seg, nb, excl[i], h_new.reshape(-1))
        row_ap(h_old, h_new, t, vals[0, i], vals[1, i], ps, valid[i], t_best[i], prev_best[i],
               ap[i], n_lt[i], n_eq[i], work)
