"""The engine's exact counting: bins, per-segment histograms, and AP from the counts.

Two steps of :mod:`backfill_utils.retrieval.engine`, each in two implementations that give
the same integers: ``numba`` (compiled loops, the default on the CPU) and
``torch`` (any device: CUDA, and the CPU when numba is not installed; also the
reference the tests compare with).

1. :func:`bin_histograms`. For every row ``i`` of a chunk of queries and every
   gallery item ``j``: the distance is ``d = max(raw[i, j] + qsq[i], 0)``,
   computed in the dtype of ``raw`` (exactly the arithmetic of
   ``(raw + qsq).clamp(min=0)`` in torch); its bin is ``#{k : T[i, k] < d}``
   for the row's sorted thresholds ``T[i]`` (finite values, then ``+inf``
   pads); ``hist[i, segment[j], bin]`` is incremented, except for the item
   ``exclude[i]`` (leave-one-out). The torch path is ``torch.searchsorted`` +
   ``bincount``. The numba path replaces the binary search with a *monotone
   bucketing function* ``f(x) = min(max(floor((x - lo) * scale), 0), M - 1)``
   (``float64``; ``lo`` = smallest threshold, ``M`` = 8 buckets per threshold, at
   most ``2**18``).
   ``f`` is applied to thresholds and distances by the same code and is
   non-decreasing, so a threshold ``t`` with ``f(t) < f(d)`` is ``< d`` and one
   with ``f(t) > f(d)`` is ``> d``: only the thresholds in ``d``'s own bucket
   need a comparison. Per bucket one record holds ``#{t : f(t) < b}`` and its
   first two thresholds; a bucket with at most two thresholds is resolved by
   two branch-free comparisons, a crowded one (ties, clusters) by a binary
   search over its own thresholds. Only comparisons decide a bin, so the result
   is exact whatever the rounding of ``f``.
2. :func:`ap_from_histograms`. At ratio ``r`` the segments ``<= r`` hold the new
   side; the counts of the mixed gallery are the per-segment histograms summed
   accordingly and accumulated over bins, which gives, per relevant item ``p``,
   ``#{d <= v_p}`` and ``#{relevant d <= v_p}`` at ``v_p``'s own bin, hence AP
   (the mean of their ratios), and the counts below and at the best relevant
   distance (for the first relevant rank). The numba path walks the ratios
   once per row, updating one running histogram segment by segment.

The engine calls :func:`chunk_counts` once per chunk: the torch path runs
:func:`relevant_thresholds` (the relevant items' distances, the best one per
ratio, the sorted thresholds) and both steps on the whole chunk; the numba path
does all of it row by row in one compiled loop (``counting_numba.statistics``),
so a row's distances and histograms stay in the cache.

AP values are sums of ``P`` float64 terms; the two paths add them in different
orders, so they may differ by a few units in the last place (under
``P * 2**-53`` relative); every count, and hence every rank and top-k, is
identical.

The numba kernels are compiled on first use (a few seconds) and cached on disk
(``cache=True``: ``__pycache__`` next to this file, or numba's user cache). Rows
are split over ``torch.get_num_threads()`` Python threads (the kernels release
the GIL); no numba threading layer is used. They need finite distances, which
the engine guarantees (:func:`backfill_utils.retrieval.engine.check_distance_range`).
"""
from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .phases import phase

__all__ = ["chunk_counts", "bin_histograms", "ap_from_histograms", "numba_available", "resolve_method"]

#: Buckets per finite threshold in the numba kernel (speed only, never the result).
BUCKETS_PER_THRESHOLD = 8
_FLAT_LIMIT = 2**31 - 1  # largest int32 histogram index (torch path)
_POOL: ThreadPoolExecutor | None = None
_NUMBA_MISSING_WARNED = False


def numba_available() -> bool:
    """Whether the compiled CPU kernels can be used (numba importable)."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_method(method: str, device: torch.device) -> str:
    """``"numba"`` or ``"torch"`` for ``method`` in ("auto", "numba", "torch") on ``device``."""
    if method not in ("auto", "numba", "torch"):
        raise ValueError(f"method must be 'auto', 'numba' or 'torch', got {method!r}")
    if method == "numba" and device.type != "cpu":
        raise ValueError(f"the numba kernels run on the CPU only, got tensors on {device}")
    if method != "auto":
        return method
    if device.type != "cpu":
        return "torch"
    if numba_available():
        return "numba"
    _warn_numba_missing()
    return "torch"


def _warn_numba_missing() -> None:
    global _NUMBA_MISSING_WARNED
    if not _NUMBA_MISSING_WARNED:
        _NUMBA_MISSING_WARNED = True
        warnings.warn("numba is not installed: the retrieval engine uses its slower torch path "
                      "on the CPU (same numbers); `pip install numba` to speed it up",
                      RuntimeWarning, stacklevel=4)


def _split_rows(B: int, n_threads: int) -> list[tuple[int, int]]:
    bounds = np.linspace(0, B, max(1, min(n_threads, B)) + 1).astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _run_rows(kernel, args: tuple, B: int) -> None:
    """``kernel(*args, r0, r1)`` over row blocks, one per torch thread."""
    global _POOL
    blocks = _split_rows(B, torch.get_num_threads())
    if len(blocks) <= 1:
        kernel(*args, 0, B)
        return
    if _POOL is None or _POOL._max_workers < len(blocks):
        _POOL = ThreadPoolExecutor(max_workers=len(blocks), thread_name_prefix="engine")
    list(_POOL.map(lambda ab: kernel(*args, ab[0], ab[1]), blocks))


def _kernels():
    """The numba kernels (compiled on first use, then loaded from numba's cache)."""
    from . import counting_numba

    return counting_numba


# ---------------------------------------------------------------------------
# step 1: bins and histograms
# ---------------------------------------------------------------------------
def searchsorted_rows(T: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``torch.searchsorted(T, d, out_int32=True)`` (left) with CPU rows split over threads."""
    if d.device.type != "cpu" or torch.get_num_threads() < 2 or d.numel() < (1 << 20):
        return torch.searchsorted(T, d, out_int32=True)
    out = torch.empty(d.shape, dtype=torch.int32, device=d.device)

    def run(Tb, db, outb, r0, r1):
        torch.searchsorted(Tb[r0:r1], db[r0:r1], out_int32=True, out=outb[r0:r1])

    _run_rows(run, (T, d, out), d.shape[0])
    return out


def _histograms_torch(raw, qsq, T, segment, n_segments, exclude) -> torch.Tensor:
    dev = raw.device
    nb = T.shape[1] + 1
    with phase("bin search (searchsorted)", dev):
        d = (raw + qsq.reshape(-1, 1)).clamp_(min=0).to(T.dtype)
        idx = searchsorted_rows(T, d)  # (B, N) int32 bins: #{t in T : t < d}
        del d
    with phase("histograms (bincount)", dev):
        return _bincount_rows(idx, segment, n_segments, nb, exclude)


def _bincount_rows(idx, segment, n_segments, nb, exclude) -> torch.Tensor:
    B, N = idx.shape
    dev = idx.device
    size = n_segments * nb
    row_len = size + 1  # + a trash slot for the excluded item
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
        ``max(raw[i, j] + qsq[i], 0)`` in the dtype of ``raw``; finite.
    thresholds
        ``(B, K)`` sorted ascending per row (``+inf`` pads at the end), in a
        dtype that holds ``raw``'s values exactly.
    segment
        ``(N,)`` integers in ``[0, n_segments)``.
    exclude
        ``(B,)`` gallery item left out of each row (``-1``: none), or None.
    method
        ``"auto"`` (numba on the CPU when installed, else torch), ``"numba"`` or
        ``"torch"``.

    Returns ``(B, n_segments, K + 1)`` int32 counts; bin ``k`` holds the
    distances ``d`` with ``#{t in thresholds : t < d} == k``.

    >>> raw = torch.tensor([[0.5, 1.0, 2.0, 3.0, 1.0]])
    >>> T = torch.tensor([[1.0, 2.5, float("inf")]])
    >>> seg = torch.tensor([0, 0, 1, 1, 1])
    >>> bin_histograms(raw, torch.zeros(1), T, seg, 2, method="torch").tolist()
    [[[2, 0, 0, 0], [1, 1, 1, 0]]]
    """
    method = resolve_method(method, raw.device)
    B = raw.shape[0]
    if exclude is None:
        exclude = torch.full((B,), -1, dtype=torch.int64, device=raw.device)
    if method == "torch":
        return _histograms_torch(raw, qsq, thresholds, segment, n_segments, exclude)
    nb = thresholds.shape[1] + 1
    hist = torch.empty((B, n_segments * nb), dtype=torch.int32)  # zeroed row by row
    n_finite = torch.isfinite(thresholds).sum(1).to(torch.int64)
    args = (raw.contiguous().numpy(), qsq.reshape(-1).contiguous().numpy(),
            thresholds.contiguous().numpy(), n_finite.numpy(), segment.to(torch.int64).contiguous().numpy(),
            nb, exclude.to(torch.int64).contiguous().numpy(), hist.numpy(), BUCKETS_PER_THRESHOLD)
    _run_rows(_kernels().histograms, args, B)
    return hist.view(B, n_segments, nb)


# ---------------------------------------------------------------------------
# step 2: AP and the counts of the first relevant rank
# ---------------------------------------------------------------------------
def _ap_torch(hists, T, vals, pos_seg, valid, t_best, prev_best):
    B, n_seg, nb = hists[0].shape
    R = t_best.shape[1]
    dev = hists[0].device
    k_own = [torch.searchsorted(T, v) for v in vals]  # bins of the relevant items themselves
    pos_w = valid.to(torch.int32)
    pos_hists = []
    for k in k_own:
        ph = torch.zeros((B, n_seg * nb), dtype=torch.int32, device=dev)
        ph.scatter_add_(1, pos_seg * nb + k, pos_w)
        pos_hists.append(ph.view(B, n_seg, nb))

    def at_ratios(h_old, h_new):  # at ratio r the segments <= r hold the new side
        pre_old = h_old.cumsum(1, dtype=torch.int32)
        return h_new.cumsum(1, dtype=torch.int32)[:, :R] + (pre_old[:, -1:] - pre_old[:, :R])

    n_le = at_ratios(*hists).cumsum(-1, dtype=torch.int32)  # (B, R, nb): #{d <= T[k]}
    n_rel_le = at_ratios(*pos_hists).cumsum(-1, dtype=torch.int32)
    is_new = pos_seg.unsqueeze(1) <= torch.arange(R, device=dev).view(1, R, 1)  # (B, R, P)
    k = torch.where(is_new, k_own[1].unsqueeze(1), k_own[0].unsqueeze(1))
    v = valid.unsqueeze(1).expand_as(k)
    prec = torch.where(v, n_rel_le.gather(2, k).double() / n_le.gather(2, k).clamp(min=1).double(), 0.0)
    n_rel = valid.sum(1)
    ap = torch.where((n_rel > 0).unsqueeze(1), prec.sum(-1) / n_rel.double().unsqueeze(1), torch.nan)
    k_lt = torch.searchsorted(T, prev_best.contiguous())  # #{d <= prev(t*)} = #{d < t*}
    k_le = torch.searchsorted(T, t_best.contiguous())
    n_lt = n_le.gather(2, k_lt.unsqueeze(-1)).squeeze(-1).long()
    n_eq = n_le.gather(2, k_le.unsqueeze(-1)).squeeze(-1).long() - n_lt
    return ap, n_lt, n_eq


def ap_from_histograms(
    hists: list[torch.Tensor],
    thresholds: torch.Tensor,
    vals: list[torch.Tensor],
    pos_seg: torch.Tensor,
    valid: torch.Tensor,
    t_best: torch.Tensor,
    prev_best: torch.Tensor,
    method: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AP and first-rank counts at every ratio from the histograms of both sides.

    ``hists``: ``[old, new]`` (or ``[h]`` for a single ranking), each
    ``(B, S, nb)`` from :func:`bin_histograms` with ``thresholds``; at ratio
    ``r`` the segments ``<= r`` hold the new side. ``vals`` (per side),
    ``pos_seg`` and ``valid``: ``(B, P)`` distance, segment and validity of each
    relevant item. ``t_best``, ``prev_best``: ``(B, R)`` best relevant distance
    at each ratio and its float predecessor. Returns ``ap`` (B, R) float64
    (nan: no relevant item), ``n_lt`` = #items below the best relevant distance
    and ``n_eq`` = #items at it, (B, R) int64.
    """
    if len(hists) == 1:
        hists, vals = [hists[0], hists[0]], [vals[0], vals[0]]
    method = resolve_method(method, hists[0].device)
    if method == "torch":
        return _ap_torch(hists, thresholds, vals, pos_seg, valid, t_best, prev_best)
    B, R = t_best.shape
    ap = torch.empty((B, R), dtype=torch.float64)
    n_lt = torch.empty((B, R), dtype=torch.int64)
    n_eq = torch.empty((B, R), dtype=torch.int64)
    args = tuple(x.contiguous().numpy() for x in (
        hists[0], hists[1], thresholds, vals[0], vals[1], pos_seg.long(), valid, t_best, prev_best,
        ap, n_lt, n_eq))
    _run_rows(_kernels().ap_counts, args, B)
    return ap, n_lt, n_eq


# ---------------------------------------------------------------------------
# a whole chunk
# ---------------------------------------------------------------------------
def relevant_thresholds(sides, dtype, pos_idx, pos_valid, segment, n_ratios):
    """Distances of the relevant items, the best one per ratio and the sorted thresholds.

    Returns ``vals`` (per side, (B, P); +inf where not valid), ``pos_seg``
    (B, P), ``t_best`` / ``p_best`` (B, R): the smallest (distance, gallery
    index) among the relevant items at each ratio (+inf / N if none),
    ``prev_best`` = ``nextafter(t_best, -inf)`` and ``T`` (B, K) sorted: all
    ``vals`` and ``prev_best`` (the torch path; the numba kernel does the same
    per row).
    """
    N = sides[0][0].shape[1]
    dev = pos_idx.device
    R = n_ratios
    inf = torch.tensor(float("inf"), dtype=dtype, device=dev)
    vals = [torch.where(pos_valid, (raw.gather(1, pos_idx) + q_sq).clamp_(min=0).to(dtype), inf)
            for raw, q_sq in sides]
    pos_seg = segment[pos_idx]
    if len(sides) == 2:
        is_new = pos_seg.unsqueeze(1) <= torch.arange(R, device=dev).view(1, R, 1)  # (B, R, P)
        cur = torch.where(is_new, vals[1].unsqueeze(1), vals[0].unsqueeze(1))
    else:
        cur = vals[0].unsqueeze(1)  # (B, 1, P)
    t_best = cur.min(-1).values
    cand = pos_valid.unsqueeze(1) & (cur == t_best.unsqueeze(-1))
    p_best = torch.where(cand, pos_idx.unsqueeze(1), N).min(-1).values
    prev_best = torch.where(torch.isfinite(t_best), torch.nextafter(t_best, -inf), inf)
    T = torch.cat(vals + [prev_best], 1).sort(dim=1).values.contiguous()
    return vals, pos_seg, t_best, p_best, prev_best, T


def chunk_counts(
    sides: list[tuple[torch.Tensor, torch.Tensor]],
    dtype: torch.dtype,
    pos_idx: torch.Tensor,
    pos_valid: torch.Tensor,
    segment: torch.Tensor,
    n_ratios: int,
    exclude: torch.Tensor,
    method: str = "auto",
) -> tuple[torch.Tensor, ...]:
    """Everything the engine counts for one chunk of queries.

    ``sides``: one or two ``(raw, qsq)`` pairs (old, then new; distances
    ``max(raw + qsq, 0)``, compared in ``dtype``); at ratio ``r`` the items with
    ``segment <= r`` hold the new side. ``pos_idx`` / ``pos_valid``: (B, P)
    relevant gallery items; ``exclude``: (B,) item left out of each row (-1:
    none). Returns ``ap`` (B, R) float64, ``n_lt`` / ``n_eq`` (B, R) int64 (items
    below / at the best relevant distance) and ``t_best`` / ``p_best`` (B, R),
    the best relevant distance and the lowest gallery index at it.

    The torch path runs :func:`relevant_thresholds`, :func:`bin_histograms` and
    :func:`ap_from_histograms` on the whole chunk; the numba path does all of it
    row by row in one compiled loop, so a row's distances and histograms stay in
    the cache and no (B, R, P) temporaries are built.
    """
    dev = sides[0][0].device
    method = resolve_method(method, dev)
    two = len(sides) == 2
    n_seg = n_ratios + 1 if two else 1
    if method == "torch":
        vals, pos_seg, t_best, p_best, prev_best, T = relevant_thresholds(
            sides, dtype, pos_idx, pos_valid, segment, n_ratios)
        hists = [bin_histograms(raw, qsq, T, segment, n_seg, exclude, "torch") for raw, qsq in sides]
        with phase("counts to AP", dev):
            ap, n_lt, n_eq = ap_from_histograms(hists, T, vals, pos_seg, pos_valid, t_best, prev_best, "torch")
        return ap, n_lt, n_eq, t_best, p_best
    (raw_o, q_o), (raw_n, q_n) = sides[0], sides[-1]
    B, P = pos_idx.shape
    R = n_ratios
    np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    out = dict(vals=np.empty((2, B, P), np_dtype), T=np.empty((B, (2 if two else 1) * P + R), np_dtype),
               t_best=np.empty((B, R), np_dtype), prev_best=np.empty((B, R), np_dtype),
               p_best=np.empty((B, R), np.int64), ap=np.empty((B, R)), n_lt=np.empty((B, R), np.int64),
               n_eq=np.empty((B, R), np.int64))
    args = (*[x.contiguous().numpy() for x in (raw_o, q_o.reshape(-1), raw_n, q_n.reshape(-1))], two,
            pos_idx.contiguous().numpy(), pos_valid.contiguous().numpy(),
            segment.to(torch.int64).contiguous().numpy(), n_seg, exclude.to(torch.int64).contiguous().numpy(),
            BUCKETS_PER_THRESHOLD, *out.values())
    with phase("bins + histograms + AP (numba)", dev):
        _run_rows(_kernels().statistics, args, B)
    return tuple(torch.from_numpy(out[k]) for k in ("ap", "n_lt", "n_eq", "t_best", "p_best"))
