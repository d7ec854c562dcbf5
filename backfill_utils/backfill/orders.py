"""Backfill orders and ratios: which items are backfilled at ratio ``r``.

At ratio ``r`` the first :func:`backfilled_count` ``(r, N)`` = ``floor(r N)`` items of
the backfill order hold their new embeddings. :class:`~backfill_utils.backfill.systems.BackfillSystem`
applies this rule (``backfilled``, ``segments``); the functions here are its parts:
orders (:func:`random_order`, :func:`check_order`, and :func:`method_order`, the one rule for
the order a registered method is backfilled in), ratios (:func:`check_ratios`,
:data:`DEFAULT_RATIOS`), counts and the first ratio of each item (:func:`backfill_segments`).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = ["DEFAULT_RATIOS", "random_order", "method_order", "backfilled_count", "check_ratios", "check_order",
           "backfill_segments"]

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


def method_order(method: Any, trained: Any, old_gallery: Any, seed: int) -> np.ndarray:
    """The order in which ``method`` (a :class:`~backfill_utils.backfill.registry.Method`) backfills
    the gallery whose old embeddings are ``old_gallery``: its own order
    ``method.order(trained, old_gallery)`` if it defines one (FastFill's sigma order), else
    the seeded random order ``random_order(len(old_gallery), seed)`` (``seed``: the
    profile's ``eval.order_seed``). Checked to be a permutation; int64.

    >>> class NoOrder: order = None
    >>> method_order(NoOrder, None, [[0.0]] * 5, seed=0).tolist() == random_order(5, 0).tolist()
    True
    >>> class Reverse: order = staticmethod(lambda trained, old: list(range(len(old)))[::-1])
    >>> method_order(Reverse, None, [[0.0]] * 3, seed=0).tolist()
    [2, 1, 0]
    """
    n = len(old_gallery)
    if getattr(method, "order", None) is None:
        return random_order(n, seed)
    name = getattr(method, "name", type(method).__name__)
    return check_order(method.order(trained, old_gallery), n, f"the backfill order of {name!r}")


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
    """For each gallery item, the index of the first ratio at which it is backfilled
    (the primitive behind :meth:`BackfillSystem.segments`).

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
