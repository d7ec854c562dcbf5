"""The two sides' ``(D, I)`` lists merged into one top-k by ``(distance, id)`` (:func:`merge_topk`).
"""
from __future__ import annotations


import numpy as np



_INT64_MAX = np.iinfo(np.int64).max

def merge_topk(parts: list[tuple[np.ndarray, np.ndarray]], nq: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-side ``(D, I)`` lists into the top ``k`` by ``(distance, id)``.

    Missing results (``I < 0``) sort last; the output is padded to ``k`` columns
    with ``inf`` / ``-1`` (faiss's convention). The caller caps ``k`` at the
    number of items searched (:meth:`OnlineBackfillIndex.search`), so padding only
    stands for results an approximate side did not return.

    >>> D, I = merge_topk([(np.array([[1., 3.]]), np.array([[7, 2]])),
    ...                    (np.array([[1., 2.]]), np.array([[5, -1]]))], 1, 3)
    >>> D.tolist(), I.tolist()
    ([[1.0, 1.0, 3.0]], [[5, 7, 2]])
    """
    if not parts:
        return np.full((nq, k), np.inf, np.float32), np.full((nq, k), -1, np.int64)
    D = parts[0][0] if len(parts) == 1 else np.concatenate([p[0] for p in parts], axis=1)
    I = parts[0][1] if len(parts) == 1 else np.concatenate([p[1] for p in parts], axis=1)
    D, I = D.astype(np.float32, copy=False), I.astype(np.int64, copy=False)
    missing = I < 0
    if missing.any():
        D = np.where(missing, np.float32(np.inf), D)
    # one faiss list is sorted by distance already; sort when there are two, or ties to order by id
    if len(parts) > 1 or (D[:, 1:] == D[:, :-1]).any():
        sel = np.lexsort((np.where(missing, _INT64_MAX, I), D), axis=1)[:, :k]
        rows = np.arange(len(D))[:, None]
        D, I = D[rows, sel], I[rows, sel]
    D, I = D[:, :k], I[:, :k]
    if D.shape[1] < k:
        pad = ((0, 0), (0, k - D.shape[1]))
        D, I = np.pad(D, pad, constant_values=np.inf), np.pad(I, pad, constant_values=-1)
    return np.ascontiguousarray(D, dtype=np.float32), np.ascontiguousarray(I, dtype=np.int64)
