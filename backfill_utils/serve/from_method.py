"""A registered method as a served index: :func:`index_from_method` and, with its gallery, :func:`served_method`.

A trained method of the registry (:mod:`backfill_utils.backfill.registry`) has its modules by
slot; the index of :mod:`backfill_utils.serve.index` takes the same slots
(``methods.Method`` -> ``OnlineBackfillIndex`` arguments):

===================================  ==========================================
registration                         index
===================================  ==========================================
``psi``                              ``query_transform``
``rho``                              ``new_transform`` (and ``query_transform``
                                     when there is no ``psi``: the engine then
                                     searches the old side with ``rho(q)``)
``h``                                ``gallery_transform``
``two_pass`` (RM)                    ``two_pass=True``: ``search(..., query_old=)``
``backbone`` (``new``, ``bct``)      what ``search`` and ``backfill`` take
``order`` (FastFill)                 :attr:`ServedMethod.order`: backfill in it
===================================  ==========================================

The references ``old``, ``new`` and ``offline`` are curves, not systems that serve a
mixed gallery: :func:`served_method` raises an error that says how to serve them
(``old``: ``OnlineBackfillIndex(d_old, d_old)`` holding old embeddings, searched with
the old query; offline backfilling: that index until the backfill completes, then
one of the new embeddings; :mod:`backfill_utils.serve.simulate` does so).

:func:`served_method` returns the index together with the setting's gallery (the
evaluation split: gallery = queries, ids ``0 .. N-1`` = rows), the backfill order the
engine uses (the method's own, else the profile's seeded random order) and the
query embeddings, so that a backfill to ratio ``r`` is
``index.backfill(order[:backfilled_count(r, N)], ...)`` and the index's exact search
is the engine's ranking (``tests/serve/test_from_method.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backfill import experiments as X
from ..backfill import orders
from ..backfill import registry as MM
from .index import OnlineBackfillIndex

__all__ = ["ServedMethod", "served_method", "index_arguments"]


def index_arguments(method: MM.Method, trained: MM.Trained) -> dict[str, Any]:
    """The :class:`~backfill_utils.serve.index.OnlineBackfillIndex` keyword arguments of a
    trained method (the module docstring's table); references are an error."""
    if method.reference is not None:
        raise ValueError(
            f"{method.name!r} is a reference curve ({method.reference}), not a system that serves a mixed "
            "gallery: serve old/old with OnlineBackfillIndex(d_old, d_old) (add_old the old embeddings, search "
            "with the old query embedding) and new/new likewise with new embeddings; offline backfilling serves "
            "the first until the backfill completes, then the second (backfill_utils.serve.simulate.simulate does so)")
    query = trained.psi if trained.psi is not None else (trained.rho if not method.two_pass else None)
    return {"query_transform": query, "new_transform": trained.rho, "gallery_transform": trained.h,
            "two_pass": method.two_pass}


@dataclass
class ServedMethod:
    """A method's index and what serving it needs (:func:`served_method`).

    ``index``: the :class:`~backfill_utils.serve.index.OnlineBackfillIndex` (filled with the
    old gallery when built with ``fill=True``: ids ``0 .. N-1``); ``old``: phi_old of
    the gallery ``(N, d_old)`` (= the queries' old embeddings); ``new``: the method's
    query backbone (``new`` or ``bct``) on the gallery ``(N, d_new)``, what
    ``backfill`` stores and ``search`` takes; ``labels`` ``(N,)``; ``order``: the
    backfill order of the engine (:func:`backfill_utils.backfill.experiments.make_system`).
    """

    name: str
    index: Any
    old: np.ndarray
    new: np.ndarray
    labels: np.ndarray
    order: np.ndarray
    two_pass: bool

    def backfill_to(self, count: int) -> int:
        """Backfill the next items of :attr:`order` until ``count`` items are on the new
        side (items added with ``add_old`` only); returns how many were moved."""
        done = self.index.n_new
        if not 0 <= count <= len(self.order):
            raise ValueError(f"count must be in [0, {len(self.order)}], got {count}")
        if count < done:
            raise ValueError(f"{done} items are already backfilled; a backfill cannot go back to {count}")
        batch = self.order[done:count]
        if len(batch):
            self.index.backfill(batch, self.new[batch])
        return len(batch)

    def search(self, rows: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Search the queries of gallery rows ``rows`` (their ``new`` embeddings, and
        their ``old`` ones for rank merge: the second forward pass)."""
        rows = np.asarray(rows, dtype=np.int64)
        return self.index.search(self.new[rows], k, query_old=self.old[rows] if self.two_pass else None)


def served_method(cfg: dict, setting: str, name: str, *, recipe: Any = None, seed: int | None = None,
                  split: str = "test", fill: bool = True, data: X.SettingData | None = None,
                  progress: bool = True, **index_kwargs: Any) -> ServedMethod:
    """The index of registered method ``name`` in ``setting``, with its gallery.

    Trains the method's modules or loads them from the cache
    (:func:`backfill_utils.backfill.experiments.train_method`, ``recipe`` and ``seed`` as
    there); ``split``: the evaluation split whose embeddings are the gallery;
    ``fill``: add the old gallery (ids = rows); ``index_kwargs``: ``factory``,
    ``search_params``, ``batch_size`` of the index.
    """
    m = MM.get(name)
    kwargs = index_arguments(m, MM.Trained())  # references fail before anything is loaded
    data = data or X.SettingData(cfg, setting, progress=progress, split=split)
    if data.split != split:
        raise ValueError(f"served_method(split={split!r}) was given data of the {data.split!r} split")
    trained = (X.train_method(cfg, setting, name, recipe=recipe, seed=seed, data=data, progress=progress)
               if m.trainable else MM.Trained())
    kwargs = index_arguments(m, trained)
    old, new = data.test("old"), data.test(m.backbone)
    order = orders.method_order(m, trained, old, int(cfg["eval"]["order_seed"]))
    index = OnlineBackfillIndex(old.shape[1], new.shape[1], **kwargs, **index_kwargs)
    if fill:
        index.add_old(np.arange(len(old)), old)
    return ServedMethod(name, index, old, new, np.asarray(data.test_labels), order, m.two_pass)


def index_from_method(cfg: dict, setting: str, name: str, **kwargs: Any) -> OnlineBackfillIndex:
    """The index of registered method ``name`` in ``setting``, its modules trained or
    loaded from the cache, filled with the old gallery of the test split (ids = rows).

    The slots map as in the module docstring (psi, rho, h, two passes); the
    references old/new/offline are an error. ``kwargs``: those of :func:`served_method`
    (``recipe``, ``seed``, ``split``, ``fill``, ``factory``, ``search_params``, ...),
    which also returns the gallery's new embeddings and the method's backfill order.
    """
    return served_method(cfg, setting, name, **kwargs).index
