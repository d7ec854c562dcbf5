"""Distances between embeddings: the one definition used by the losses, the retrieval
metrics and the figures.

The project ranks by the **squared Euclidean distance** (on L2-normalised embeddings
it orders exactly as the Euclidean distance and as the cosine similarity):

* :func:`squared_euclidean` -- all pairs ``(Q, N)``, computed as ``|g|^2 - 2 q.g``
  with one matrix product (``torch.addmm``), then ``+ |q|^2`` and clamped at 0
  against rounding. This is the evaluation engine's arithmetic, bit for bit, so a
  top-k list computed from it (:func:`backfill_utils.figures.illustrate.retrieve_topk`) is
  the ranking whose correctness the backfilling curves count.
* :func:`pairwise_distance` -- all pairs for the **losses** (differentiable):
  ``"squared"`` or ``"euclidean"`` = ``sqrt(squared + eps)`` (the ``eps`` keeps the
  gradient finite where two embeddings coincide). It sums the terms in the order
  ``(|a|^2 + |b|^2) - 2 a.b``: the same quantity as :func:`squared_euclidean` up to
  rounding (the two agree within the float error bound of either), kept in this
  order because the trained compatibility modules of ``COMPAT_VERSION`` 2 were
  trained with it (a different rounding changes training in the last bits, which
  training then amplifies).
* :func:`paired_euclidean` -- ``||a_i - b_i||`` for matched rows (the pair
  distances of the distance-distribution figure), from the differences directly.

>>> import torch
>>> q = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
>>> g = torch.tensor([[0.0, 1.0], [3.0, 1.0]])
>>> squared_euclidean(q, g)
tensor([[ 1., 10.],
        [ 1.,  4.]])
>>> pairwise_distance(q, g, "squared")
tensor([[ 1., 10.],
        [ 1.,  4.]])
>>> paired_euclidean(q, g)
tensor([1., 2.])
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["DISTANCES", "squared_euclidean", "raw_distances", "finish", "pairwise_distance",
           "paired_euclidean", "as_matrix"]

#: The distances a loss may use (:func:`pairwise_distance`).
DISTANCES = ("euclidean", "squared")
_EPS = 1e-8


def as_matrix(x: Any, name: str) -> torch.Tensor:
    """``x`` (numpy array or tensor) as a 2-D floating tensor; a clear error otherwise.

    Integer input becomes float32; numpy input shares memory where it can.
    """
    t = torch.from_numpy(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
    if t.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (n, d) matrix of embeddings, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.to(torch.float32)
    return t


def _same_space(a: torch.Tensor, b: torch.Tensor, names: tuple[str, str]) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{names[0]} has dimension {a.shape[1]} (shape {tuple(a.shape)}) but {names[1]} has "
            f"dimension {b.shape[1]} (shape {tuple(b.shape)}); they must live in the same space")


def squared_euclidean(query: Any, gallery: Any) -> torch.Tensor:
    """Squared Euclidean distances ``(Q, N)`` between the rows of ``query`` and ``gallery``.

    ``addmm(|g|^2, q, g^T, alpha=-2) + |q|^2``, clamped at 0: one matrix product, in
    the promoted dtype of the two inputs (float32 stays float32), on ``query``'s
    device. The evaluation engine's arithmetic (see the module docstring).
    """
    q, g = as_matrix(query, "query"), as_matrix(gallery, "gallery")
    _same_space(q, g, ("query", "gallery"))
    dtype = torch.promote_types(q.dtype, g.dtype)
    q, g = q.to(dtype), g.to(q.device, dtype)
    return finish(*raw_distances(q, g, (g * g).sum(1)))


def raw_distances(q: torch.Tensor, g: torch.Tensor, g_sq: torch.Tensor,
                  out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(|g|^2 - 2 q.g, |q|^2)``: one ``addmm``; the distance is :func:`finish` of the pair.

    The two halves of :func:`squared_euclidean`, for callers that keep the product
    (the evaluation engine reuses one ``out`` buffer per side, and adds ``|q|^2``
    inside its compiled loop with the same float addition and clamp as
    :func:`finish`).
    """
    raw = torch.addmm(g_sq.unsqueeze(0), q, g.T, beta=1.0, alpha=-2.0, out=out)
    return raw, (q * q).sum(1, keepdim=True)


def finish(raw: torch.Tensor, q_sq: torch.Tensor) -> torch.Tensor:
    """Squared distances from :func:`raw_distances`: ``raw + |q|^2`` clamped at 0 (in place)."""
    return (raw + q_sq).clamp_(min=0)


def pairwise_distance(a: torch.Tensor, b: torch.Tensor, distance: str = "euclidean",
                      eps: float = _EPS) -> torch.Tensor:
    """All-pairs distance matrix ``D[i, j] = d(a_i, b_j)`` of the losses, differentiable.

    ``distance="euclidean"``: ``sqrt(||a_i - b_j||^2 + eps)``; ``"squared"``:
    ``||a_i - b_j||^2`` (clamped at 0).

    >>> a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> pairwise_distance(a, a, "squared")
    tensor([[0., 2.],
            [2., 0.]])
    """
    if distance not in DISTANCES:
        raise ValueError(f"distance={distance!r} is not one of {DISTANCES}")
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"pairwise_distance needs two 2-D tensors with the same dimension, got "
            f"{tuple(a.shape)} and {tuple(b.shape)}")
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    sq = sq.clamp_min(0.0)
    if distance == "squared":
        return sq
    return torch.sqrt(sq + eps)


def paired_euclidean(a: Any, b: Any) -> torch.Tensor:
    """``||a_i - b_i||`` for each row ``i`` of two matrices of the same shape."""
    a, b = as_matrix(a, "a"), as_matrix(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape (one pair per row), got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    return (a - b).norm(dim=1)
