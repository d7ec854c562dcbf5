"""Retrieval metrics: pure functions over distances and labels.

Two layers live here.

* **Dense reference functions** over a distance matrix ``(Q, N)`` and a boolean
  relevance mask (``is_relevant``), in the style of open-metric-learning:
  :func:`average_precision`, :func:`first_relevant_rank`, :func:`cmc_at_k`.
  They are short, easy to check and fine for small problems.
* **The chunked engine** behind :func:`evaluate_retrieval` (and
  :func:`backfill_utils.backfill.curves.backfill_curve`): exact, the same numbers as the
  dense functions, but it never sorts a row and never holds more than one chunk
  of queries in memory (:mod:`backfill_utils.retrieval.engine`).

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

How the engine counts (bins, per-segment histograms, the compiled CPU loop,
chunk sizes on CPU and GPU) is described in :mod:`backfill_utils.retrieval.engine` and
:mod:`backfill_utils.retrieval.counting`.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from .distances import squared_euclidean
from .engine import DEFAULT_MEMORY_BUDGET, auto_chunk_size, retrieval_statistics

__all__ = [
    "pairwise_distances",
    "average_precision",
    "first_relevant_rank",
    "cmc_at_k",
    "evaluate_retrieval",
    "auto_chunk_size",
    "DEFAULT_MEMORY_BUDGET",
]

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


def positive_int(x: Any, name: str) -> int:
    """``x`` as an ``int`` if it is an integer >= 1 (a Python or numpy integer, or
    anything with ``__index__``); a ``TypeError`` naming ``name`` for a bool, a float
    or a string, a ``ValueError`` for zero or a negative number. The one rule for
    every cut-off ``k`` (metrics, the serving index) and the index's dimensions."""
    if isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, got the bool {x!r}")
    try:
        v = operator.index(x)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {x!r}") from None
    if v < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")
    return int(v)


def validate_ks(ks: Iterable[int]) -> tuple[int, ...]:
    """The cut-offs ``ks`` of top-k, each checked by :func:`positive_int`; a ``k``
    beyond the gallery's size is allowed (top-k then counts the whole ranking)."""
    if isinstance(ks, (str, bytes)) or not isinstance(ks, Iterable):
        raise TypeError(f"ks must be a non-empty list of integers >= 1, got {ks!r}")
    ks = tuple(positive_int(k, "ks") for k in ks)
    if not ks:
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
    return squared_euclidean(q, g)  # the one definition (backfill_utils.retrieval.distances)


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
# Summaries and the public entry point
# ---------------------------------------------------------------------------
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


def _checked_inputs(query_embeddings: Any, query_labels: Any, gallery_embeddings: Any,
                   gallery_labels: Any, exclude_self: bool) -> tuple:
    """The four inputs of :func:`evaluate_retrieval` as tensors / label arrays, checked
    against each other (an error naming the input otherwise)."""
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
    return q, g, ql, gl


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
    memory_budget: int | None = None,
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
        Queries per chunk; default from ``memory_budget`` (bytes; None: 1 GiB on
        the CPU, half the usable memory of a CUDA device, see
        :func:`backfill_utils.retrieval.engine.memory_budget_for`).
    device
        Torch device for the computation (default: where the inputs are), e.g.
        ``"cuda"``; the metrics are exact on every device, but a GPU's matrix
        product may round distances differently from the CPU's.
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
    q, g, ql, gl = _checked_inputs(query_embeddings, query_labels, gallery_embeddings, gallery_labels,
                                   exclude_self)
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
