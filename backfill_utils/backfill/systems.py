"""Online backfilling systems: four embedding sets and the backfilled-at-r rule.

A backfilling system is four embedding sets (:class:`BackfillSystem`):

* ``query_old`` is compared with the gallery items that are **not yet**
  backfilled, which hold ``gallery_old``;
* ``query_new`` is compared with the items that **are** backfilled, which hold
  ``gallery_new``.

At backfill ratio ``r`` the first ``floor(r * N)`` items of the backfill order
hold ``gallery_new`` (:func:`~backfill_utils.backfill.orders.backfilled_count`; orders and
ratios in :mod:`backfill_utils.backfill.orders`). The system owns that rule:
:meth:`BackfillSystem.backfilled` (the mask at one ratio) and
:meth:`BackfillSystem.segments` (the first ratio at which each item is backfilled,
what the engine counts with); the curves (:mod:`backfill_utils.backfill.curves`), the
figures and the top-k lists all use them. Searching the two parts separately and merging
the two ranked lists by distance (the paper's distance rank merge, Sec. 2.1) is exactly
one ranking over the *mixed distance row*

    d_j = d(query_old, gallery_old_j)   if j is not yet backfilled
    d_j = d(query_new, gallery_new_j)   if j is backfilled,

so every system -- rank merge, the paper's method, naive, BCT, FCT, FastFill,
BiCT -- is evaluated by one function,
:func:`backfill_utils.backfill.curves.backfill_curve`. The "mixed" systems
(one query against the mixed gallery) are the case ``query_old is query_new``.

| method            | query_old          | gallery_old       | query_new   | gallery_new |
|-------------------|--------------------|-------------------|-------------|-------------|
| RM (2 passes)     | phi_old(q)         | phi_old(g)        | phi_new(q)  | phi_new(g)  |
| RM + psi (+CMCL)  | psi(phi_new(q))    | phi_old(g)        | phi_new(q)  | phi_new(g)  |
| Ours (+ rho)      | psi(phi_new(q))    | phi_old(g)        | rho_new(q)  | rho_new(g)  |
| naive / BCT       | phi_new(q)         | phi_old(g)        | phi_new(q)  | phi_new(g)  |
| FCT / FastFill    | phi_new(q)         | h(phi_old(g))     | phi_new(q)  | phi_new(g)  |
| BiCT              | phi_bct(q)         | h(phi_old(g))     | phi_bct(q)  | phi_bct(g)  |

The ranked lists behind a curve point (figures) come from
:func:`backfill_utils.figures.illustrate.retrieve_topk` (exact, the engine's arithmetic and
tie rule); a service searches the mixed gallery with faiss
(:mod:`backfill_utils.serve.index`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..retrieval import metrics as MT
from .orders import backfill_segments, backfilled_count, check_order, check_ratios, random_order

__all__ = ["BackfillSystem"]


# ---------------------------------------------------------------------------
# Systems
# ---------------------------------------------------------------------------
@dataclass
class BackfillSystem:
    """An online backfilling retrieval system (see the module docstring).

    Attributes
    ----------
    name
        Label used in tables and figures.
    query_old
        (Q, d_o) query embeddings compared with not-yet-backfilled items.
    gallery_old
        (N, d_o) what not-yet-backfilled gallery items hold.
    query_new
        (Q, d_n) query embeddings compared with backfilled items.
    gallery_new
        (N, d_n) what backfilled items hold.
    order
        Backfill order, a permutation of ``range(N)`` (item ``order[0]`` is
        backfilled first); ``None``: a seeded random order (the ``seed`` of
        :func:`backfill_curve`).
    query_passes
        Forward passes per query (the cost column of the paper's Table 2).

    Embeddings are stored as finite floating torch tensors (numpy input shares
    memory where possible). Shapes are checked on construction.
    """

    name: str
    query_old: Any
    gallery_old: Any
    query_new: Any
    gallery_new: Any
    order: Any = None
    query_passes: int = 1

    def __post_init__(self) -> None:
        n = self.name
        self.query_old = MT.as_embedding_tensor(self.query_old, f"{n}: query_old")
        self.gallery_old = MT.as_embedding_tensor(self.gallery_old, f"{n}: gallery_old")
        self.query_new = MT.as_embedding_tensor(self.query_new, f"{n}: query_new")
        self.gallery_new = MT.as_embedding_tensor(self.gallery_new, f"{n}: gallery_new")
        qo, go, qn, gn = self.query_old, self.gallery_old, self.query_new, self.gallery_new
        if qo.shape[1] != go.shape[1]:
            raise ValueError(
                f"system {n!r}: query_old has shape {tuple(qo.shape)} but gallery_old has shape "
                f"{tuple(go.shape)}; the query compared with not-yet-backfilled items must have "
                f"the old gallery's dimension {go.shape[1]} (e.g. a reverse transform psi must "
                "output the old embedding dimension)"
            )
        if qn.shape[1] != gn.shape[1]:
            raise ValueError(
                f"system {n!r}: query_new has shape {tuple(qn.shape)} but gallery_new has shape "
                f"{tuple(gn.shape)}; the query compared with backfilled items must have the new "
                f"gallery's dimension {gn.shape[1]}"
            )
        if qo.shape[0] != qn.shape[0]:
            raise ValueError(
                f"system {n!r}: query_old has {qo.shape[0]} rows (shape {tuple(qo.shape)}) but "
                f"query_new has {qn.shape[0]} (shape {tuple(qn.shape)}); both embed the same queries"
            )
        if go.shape[0] != gn.shape[0]:
            raise ValueError(
                f"system {n!r}: gallery_old has {go.shape[0]} rows (shape {tuple(go.shape)}) but "
                f"gallery_new has {gn.shape[0]} (shape {tuple(gn.shape)}); both embed the same gallery"
            )
        if self.order is not None:
            self.order = check_order(self.order, go.shape[0], f"system {n!r}: order")
        if int(self.query_passes) < 1:
            raise ValueError(f"system {n!r}: query_passes must be >= 1, got {self.query_passes}")
        self.query_passes = int(self.query_passes)

    @property
    def n_queries(self) -> int:
        return int(self.query_old.shape[0])

    @property
    def n_gallery(self) -> int:
        return int(self.gallery_old.shape[0])

    # -- the one rule for "which items are backfilled at ratio r" ------------------ #
    def resolved_order(self, seed: int = 0) -> np.ndarray:
        """The backfill order: ``order``, or ``random_order(N, seed)`` if it is ``None``."""
        return self.order if self.order is not None else random_order(self.n_gallery, seed)

    def backfilled(self, ratio: float, *, seed: int = 0) -> np.ndarray:
        """``(N,)`` bool: which gallery items hold ``gallery_new`` at ``ratio``, i.e.
        the first :func:`backfilled_count` ``(ratio, N)`` items of the order
        (:meth:`resolved_order`).

        >>> s = BackfillSystem.mixed("s", np.eye(4), np.eye(4), np.eye(4), order=[2, 0, 1, 3])
        >>> s.backfilled(0.5).tolist()
        [True, False, True, False]
        """
        n = self.n_gallery
        mask = np.zeros(n, dtype=bool)
        mask[self.resolved_order(seed)[:backfilled_count(ratio, n)]] = True
        return mask

    def segments(self, ratios: Any, *, seed: int = 0) -> np.ndarray:
        """``(N,)`` int: for each gallery item, the index of the first of ``ratios``
        at which it is backfilled (``len(ratios)`` if never); see
        :func:`backfill_segments`. Item ``j`` holds ``gallery_new`` at ``ratios[i]``
        iff ``segments(ratios)[j] <= i``, which is :meth:`backfilled` at every ratio."""
        return backfill_segments(self.resolved_order(seed), check_ratios(ratios))

    @classmethod
    def merge(
        cls,
        name: str,
        query_old: Any,
        gallery_old: Any,
        query_new: Any,
        gallery_new: Any,
        *,
        order: Any = None,
        query_passes: int = 1,
    ) -> "BackfillSystem":
        """Two searches merged by distance (rank merge, the paper's method).

        Distance rank merge (Sec. 2.1) uses ``query_old = phi_old(q)`` and costs
        two forward passes per query: pass ``query_passes=2``. With a reverse
        transform, ``query_old = psi(phi_new(q))`` and one pass suffices.
        """
        return cls(name, query_old, gallery_old, query_new, gallery_new, order, query_passes)

    @classmethod
    def mixed(
        cls,
        name: str,
        query: Any,
        gallery_old: Any,
        gallery_new: Any,
        *,
        order: Any = None,
        query_passes: int = 1,
    ) -> "BackfillSystem":
        """One query embedding against the mixed gallery (naive, BCT, FCT, FastFill).

        ``gallery_old`` is what a not-yet-backfilled item holds (for FCT the
        transformed old embedding ``h(phi_old(x))``); ``gallery_new`` what a
        backfilled item holds. ``query`` must have the dimension of both.
        """
        return cls(name, query, gallery_old, query, gallery_new, order, query_passes)
