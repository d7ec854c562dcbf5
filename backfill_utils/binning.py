"""Exact binning of distances against sorted thresholds, with per-segment histograms.

This is the inner loop of the retrieval engine (:mod:`backfill_utils.engine`).
For every row ``i`` of a chunk of queries and every gallery item ``j``:

* the distance is ``d = max(raw[i, j] + qsq[i], 0)``, computed in the dtype of
  ``raw`` -- exactly the arithmetic of ``(raw + qsq).clamp(min=0)`` in torch, so
  the engine's distances are those of :func:`backfill_utils.metrics.pairwise_distances`;
* its bin is ``#{k < n_finite[i] : T[i, k] < d}`` for the row's sorted thresholds
  ``T[i]`` (finite values first, then ``+inf`` pads);
* ``hist[i, segment[j], bin]`` is incremented, except for the item
  ``exclude[i]`` (leave-one-out; ``-1``: none).

Two implementations give the same integers:

``numba`` (CPU, the default there)
    One compiled pass per row. The bin search is replaced by a *monotone
    bucketing function* ``f(x) = clip(floor((x - lo) * scale), 0, M - 1)``
    (``float64`` arithmetic; ``lo`` = smallest threshold, ``M`` = 8 buckets per
    threshold). ``f`` is applied to the thresholds and to the distances with the
    same code, and it is non-decreasing, so a threshold ``t`` with
    ``f(t) < f(d)`` is ``< d`` and one with ``f(t) > f(d)`` is ``> d``: only the
    thresholds in ``d``'s own bucket need a comparison. ``#{t : f(t) < b}`` is
    tabulated per bucket; a bucket with at most two thresholds is resolved by
    two branch-free comparisons, a crowded bucket (ties, clusters) by a binary
    search over its own thresholds. Only comparisons decide a bin, so the result
    is exact whatever the rounding of ``f``. Rows are split over
    ``torch.get_num_threads()`` Python threads (the kernel releases the GIL); no
    numba threading layer is used.
``torch`` (any device, the reference)
    ``torch.searchsorted`` (rows split over CPU threads) and ``bincount``. Used
    on CUDA, and on the CPU when numba is not installed.

The numba kernel is compiled on first use (a few seconds) and cached on disk
(``cache=True``, in ``__pycache__`` next to this file or numba's user cache).
"""
from __future__ import annotations

import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch

__all__ = ["bin_histograms", "numba_available"]

#: Buckets per finite threshold in the numba kernel (speed only, never the result).
BUCKETS_PER_THRESHOLD = 8
_FLAT_LIMIT = 2**31 - 1  # largest int32 histogram index (torch path)
_POOL: ThreadPoolExecutor | None = None
_KERNEL: Callable | None = None
_NUMBA_MISSING_WARNED = False


def numba_available() -> bool:
    """Whether the compiled CPU kernel can be used (numba importable)."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def _pool(n_threads: int) -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None or _POOL._max_workers < n_threads:
        _POOL = ThreadPoolExecutor(max_workers=n_threads, thread_name_prefix="engine")
    return _POOL


def _split_rows(B: int, n_threads: int) -> list[tuple[int, int]]:
    bounds = np.linspace(0, B, max(1, min(n_threads, B)) + 1).astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


# ---------------------------------------------------------------------------
# numba kernel
# ---------------------------------------------------------------------------
def _build_kernel() -> Callable:
    """Compile (or load from the cache) the numba kernel; see the module docstring."""
    import numba

    @numba.njit(inline="always")
    def bucket(x, lo, scale, mf):
        u = (x - lo) * scale
        u = u if u > 0.0 else 0.0  # also maps NaN to 0: never an index out of range
        u = u if u < mf else mf
        return np.int64(u)

    @numba.njit(inline="always")
    def bin_of(x, lo, scale, mf, base, e1, e2, start, t):
        b = bucket(x, lo, scale, mf)
        a = base[b]
        if a >= 0:  # at most two thresholds in the bucket: compare with both
            return a + np.int64(e1[b] < x) + np.int64(e2[b] < x)
        a = -1 - a  # crowded bucket: binary search among its thresholds
        c = start[b + 1]
        while a < c:
            mid = (a + c) >> 1
            if t[mid] < x:
                a = mid + 1
            else:
                c = mid
        return a

    @numba.njit(nogil=True, cache=True)
    def kernel(raw, qsq, T, n_finite, seg, n_bins, excl, hist, mult, r0, r1):
        N = raw.shape[1]
        for i in range(r0, r1):
            row, t, h, q = raw[i], T[i], hist[i], qsq[i]
            K = n_finite[i]
            lo, scale, M = 0.0, 0.0, 1
            if K > 0:
                lo = np.float64(t[0])
                M = mult * K
                span = np.float64(t[K - 1]) - lo
                if span > 0.0:
                    scale = (M - 1) / span
                    if not math.isfinite(scale):
                        scale = 0.0
            mf = np.float64(M - 1)
            start = np.zeros(M + 1, np.int64)  # start[b] = #{thresholds in buckets < b}
            for k in range(K):
                start[bucket(np.float64(t[k]), lo, scale, mf) + 1] += 1
            for b in range(M):
                start[b + 1] += start[b]
            base = np.empty(M, np.int64)
            e1 = np.full(M, np.inf, t.dtype)
            e2 = np.full(M, np.inf, t.dtype)
            for b in range(M):
                a, n = start[b], start[b + 1] - start[b]
                base[b] = a if n <= 2 else -1 - a
                if 1 <= n <= 2:
                    e1[b] = t[a]
                if n == 2:
                    e2[b] = t[a + 1]
            for j in range(N):
                x = row[j] + q  # the dtype of raw: the same rounding as torch
                x = np.float64(x if x > 0 else x * 0)  # clamp at 0 (keeps -0.0 / NaN as torch)
                h[seg[j] * n_bins + bin_of(x, lo, scale, mf, base, e1, e2, start, t)] += 1
            ex = excl[i]
            if ex >= 0:
                x = row[ex] + q
                x = np.float64(x if x > 0 else x * 0)
                h[seg[ex] * n_bins + bin_of(x, lo, scale, mf, base, e1, e2, start, t)] -= 1

    return kernel


def _kernel() -> Callable:
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = _build_kernel()
    return _KERNEL


def _histograms_numba(raw, qsq, T, n_finite, segment, n_segments, exclude) -> torch.Tensor:
    B = raw.shape[0]
    nb = T.shape[1] + 1
    hist = torch.zeros((B, n_segments * nb), dtype=torch.int32)
    args = (raw.numpy(), qsq.reshape(-1).numpy(), T.numpy(), n_finite.numpy(),
            segment.numpy(), nb, exclude.numpy(), hist.numpy(), BUCKETS_PER_THRESHOLD)
    kernel = _kernel()
    blocks = _split_rows(B, torch.get_num_threads())
    if len(blocks) == 1:
        kernel(*args, 0, B)
    else:
        list(_pool(len(blocks)).map(lambda ab: kernel(*args, ab[0], ab[1]), blocks))
    return hist.view(B, n_segments, nb)


# ---------------------------------------------------------------------------
# torch path (reference; CUDA)
# ---------------------------------------------------------------------------
def searchsorted_rows(T: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``torch.searchsorted(T, d, out_int32=True)`` (left) with rows split over threads.

    ``torch.searchsorted`` runs on one thread on the CPU, so blocks of rows are
    searched in parallel there (torch releases the GIL inside the op).
    """
    n_threads = torch.get_num_threads()
    B = d.shape[0]
    if d.device.type != "cpu" or n_threads < 2 or B < 2 or d.numel() < (1 << 20):
        return torch.searchsorted(T, d, out_int32=True)
    out = torch.empty(d.shape, dtype=torch.int32, device=d.device)

    def run(ab: tuple[int, int]) -> None:
        a, b = ab
        torch.searchsorted(T[a:b], d[a:b], out_int32=True, out=out[a:b])

    list(_pool(n_threads).map(run, _split_rows(B, n_threads)))
    return out


def _histograms_torch(raw, qsq, T, segment, n_segments, exclude) -> torch.Tensor:
    B, N = raw.shape
    dev = raw.device
    nb = T.shape[1] + 1
    size = n_segments * nb
    row_len = size + 1  # + a trash slot for the excluded item
    d = (raw + qsq.reshape(-1, 1)).clamp_(min=0).to(T.dtype)
    idx = searchsorted_rows(T, d)  # (B, N) int32 bins: #{t in T : t < d}
    del d
    flat = B * row_len < _FLAT_LIMIT  # int32 flat histogram index (bincount) possible
    seg_off = (segment * nb).to(torch.int32 if flat else torch.int64)
    idx = idx.add_(seg_off) if flat else idx.long().add_(seg_off)
    rows = torch.arange(B, device=dev)
    has_ex = exclude >= 0
    if bool(has_ex.any()):
        idx[rows[has_ex], exclude[has_ex]] = size  # the excluded item -> trash slot
    if flat:
        row_off = (torch.arange(B, device=dev, dtype=torch.int32) * row_len).unsqueeze(1)
        h = torch.bincount(idx.add_(row_off).view(-1), minlength=B * row_len).view(B, row_len)
    else:
        h = torch.zeros((B, row_len), dtype=torch.int64, device=dev)
        h.scatter_add_(1, idx, torch.ones((1, 1), dtype=torch.int64, device=dev).expand(B, N))
    return h[:, :size].to(torch.int32).view(B, n_segments, nb)


# ---------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------
def bin_histograms(
    raw: torch.Tensor,
    qsq: torch.Tensor,
    thresholds: torch.Tensor,
    segment: torch.Tensor,
    n_segments: int,
    exclude: torch.Tensor | None = None,
    method: str = "auto",
) -> torch.Tensor:
    """Per-row histograms of distances over (segment, bin); see the module docstring.

    Parameters
    ----------
    raw, qsq
        ``(B, N)`` and ``(B,)`` or ``(B, 1)``: the distance of ``(i, j)`` is
        ``max(raw[i, j] + qsq[i], 0)`` in the dtype of ``raw``.
    thresholds
        ``(B, K)`` sorted ascending per row (``+inf`` pads at the end), finite
        values in a dtype that holds ``raw``'s exactly.
    segment
        ``(N,)`` integers in ``[0, n_segments)``.
    exclude
        ``(B,)`` gallery item left out of each row (``-1``: none), or None.
    method
        ``"auto"`` (numba on the CPU when installed, else torch), ``"numba"`` or
        ``"torch"``.

    Returns ``(B, n_segments, K + 1)`` int32 counts. Bin ``k`` holds the
    distances ``d`` with ``#{t in thresholds : t < d} == k``.

    >>> raw = torch.tensor([[0.5, 1.0, 2.0, 3.0, 1.0]])
    >>> T = torch.tensor([[1.0, 2.5, float("inf")]])
    >>> seg = torch.tensor([0, 0, 1, 1, 1])
    >>> bin_histograms(raw, torch.zeros(1), T, seg, 2, method="torch").tolist()
    [[[2, 0, 0, 0], [1, 1, 1, 0]]]
    """
    if method not in ("auto", "numba", "torch"):
        raise ValueError(f"method must be 'auto', 'numba' or 'torch', got {method!r}")
    B = raw.shape[0]
    if exclude is None:
        exclude = torch.full((B,), -1, dtype=torch.int64, device=raw.device)
    if method == "auto":
        method = "numba" if raw.device.type == "cpu" and numba_available() else "torch"
        if raw.device.type == "cpu" and method == "torch":
            _warn_numba_missing()
    if method == "torch":
        return _histograms_torch(raw, qsq, thresholds, segment, n_segments, exclude)
    if raw.device.type != "cpu":
        raise ValueError(f"the numba kernel runs on the CPU only, got tensors on {raw.device}")
    n_finite = torch.isfinite(thresholds).sum(1).to(torch.int64)
    return _histograms_numba(raw.contiguous(), qsq.contiguous(), thresholds.contiguous(), n_finite,
                             segment.to(torch.int64).contiguous(), n_segments,
                             exclude.to(torch.int64).contiguous())


def _warn_numba_missing() -> None:
    global _NUMBA_MISSING_WARNED
    if not _NUMBA_MISSING_WARNED:
        _NUMBA_MISSING_WARNED = True
        warnings.warn("numba is not installed: the retrieval engine uses its slower torch path "
                      "on the CPU (same numbers); `pip install numba` to speed it up",
                      RuntimeWarning, stacklevel=3)
