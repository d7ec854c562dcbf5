"""The input checks of the index's public methods and its helpers on sorted id arrays.

* :func:`as_matrix`, :func:`as_ids` -- the checks every public method applies to
  its input (dimensions, NaN/inf, dtypes, duplicate or negative ids);
* :func:`contains_sorted`, :func:`insert_sorted`, :func:`delete_sorted` -- membership,
  insertion and removal on the sorted id arrays of a side.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch


_INT64_MAX = np.iinfo(np.int64).max


def as_matrix(x: Any, name: str, d: int) -> np.ndarray:
    """``x`` as a C-contiguous float32 ``(n, d)`` array, checked to be finite.

    Accepts numpy arrays, torch tensors and nested lists of numbers (integers and
    float64 are converted; float64 values beyond the float32 range become inf and
    are rejected). faiss needs C-contiguous float32.

    >>> as_matrix([[1, 2]], "x", 2).dtype
    dtype('float32')
    """
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        x = (t.float() if t.is_floating_point() and t.dtype != torch.float64 else t).numpy()
    a = np.asarray(x)
    if a.dtype.kind not in "iuf":
        raise TypeError(f"{name} must hold real numbers (an int or float array), got dtype {a.dtype}")
    if a.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D array (items x {d} dimensions), got shape {a.shape}; "
            "for a single vector pass x.reshape(1, -1)")
    if a.shape[1] != d:
        raise ValueError(f"{name} has dimension {a.shape[1]} (shape {a.shape}) but this index expects {d}")
    with np.errstate(over="ignore"):  # float64 beyond the float32 range becomes inf: reported below
        a = np.ascontiguousarray(a, dtype=np.float32)
    if a.size and not np.isfinite(a).all():
        bad = np.flatnonzero(~np.isfinite(a).all(axis=1))
        raise ValueError(
            f"{name} contains NaN or inf in {len(bad)} rows (first: {bad[:5].tolist()}); "
            "fix the embeddings (e.g. check the model output) before adding or searching")
    return a


def as_ids(ids: Any, name: str, n: int | None = None) -> np.ndarray:
    """``ids`` as a 1-D int64 array of distinct non-negative integers.

    ``n``: the number of embedding rows they label (checked).

    >>> as_ids([3, 1], "ids").tolist()
    [3, 1]
    """
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    a = np.asarray(ids)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one id per item), got shape {a.shape}; for one id pass [id]")
    if a.size == 0:
        a = a.astype(np.int64)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must be integers, got dtype {a.dtype}")
    if a.dtype.kind == "u" and a.size and int(a.max()) > _INT64_MAX:
        raise ValueError(f"{name} must fit in int64; the largest is {int(a.max())}")
    a = a.astype(np.int64)
    if a.size and int(a.min()) < 0:
        raise ValueError(
            f"{name} must be >= 0 (faiss reserves -1 for a missing result); got {a[a < 0][:5].tolist()}")
    if n is not None and len(a) != n:
        raise ValueError(f"{name} has {len(a)} entries but there are {n} embedding rows; give one id per row")
    s = np.sort(a)
    dup = s[1:][s[1:] == s[:-1]]
    if dup.size:
        raise ValueError(f"{name} contains duplicate ids (e.g. {np.unique(dup)[:5].tolist()}); each id once")
    return a


def contains_sorted(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Boolean mask: which of ``ids`` are in the sorted array ``sorted_ids``."""
    if len(sorted_ids) == 0:
        return np.zeros(len(ids), dtype=bool)
    pos = np.searchsorted(sorted_ids, ids)
    return sorted_ids[np.minimum(pos, len(sorted_ids) - 1)] == ids


def insert_sorted(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``sorted_ids`` with ``ids`` (not in it) inserted, still sorted; O(n + m)."""
    ids = np.sort(ids)
    return np.insert(sorted_ids, np.searchsorted(sorted_ids, ids), ids)


def delete_sorted(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``sorted_ids`` without the sorted ``ids`` (all in it); O(n + m)."""
    return np.delete(sorted_ids, np.searchsorted(sorted_ids, ids))
