"""The faiss index over the mixed gallery: serving queries during an online backfill.

:class:`OnlineBackfillIndex` holds the two sides of the mixed gallery of
:mod:`backfill_utils.backfill.systems` as two faiss indexes and serves a query the way
the service would while a backfill worker re-extracts the gallery:

* the **old side** holds the items not yet backfilled: their old embeddings
  (``add_old``), or ``h(phi_old)`` for a method that transforms the stored
  gallery (FCT, FastFill: ``gallery_transform=h``);
* the **new side** holds the backfilled items (``backfill``: an item leaves the
  old side and enters the new one in the same step) and the items that arrive
  during the backfill (``add``), through the new-side transform ``rho`` if any;
* ``search(query_new, k)`` takes the query's **new-model** embedding, applies
  the old-side query transform (psi for the paper's method, the identity for a
  compatible model) and the new-side transform (rho or the identity), searches
  both sides and merges the two lists by distance: one forward pass of the new
  model serves a query. Rank merge (two forward passes) passes the old model's
  embedding too: ``search(query_new, k, query_old=...)``.

The metric is the project's: squared Euclidean distance (faiss ``METRIC_L2``,
:func:`backfill_utils.retrieval.metrics.pairwise_distances`). The index does **not**
normalise anything: give embeddings as the models produce them (the project's
are L2-normalised unless the profile key ``normalize_embeddings`` is false; the
modules of :mod:`backfill_utils.compat.modules` then leave their outputs raw as well). Results follow faiss's convention: ``D`` float32 distances ascending,
``I`` int64 ids, ``inf`` / ``-1`` where an approximate side found fewer results;
``k`` beyond the number of items is capped at it (``min(k, len(index))`` columns). Equal
distances are ordered by id (the engine orders them by gallery index); which of
several items tied at the ``k``-th place *within one side* is returned is
faiss's choice.

How each method of the paper is served (the constructor's arguments):

==================  ==================  ================  ==================  ========
method              query_transform     new_transform     gallery_transform   two_pass
==================  ==================  ================  ==================  ========
RM                  --                  --                --                  True
RM+psi (+CMCL)      psi                 --                --                  False
Ours, CMCL-sep.     psi                 rho               --                  False
naive, BCT          -- (identity)       --                --                  False
FCT, FastFill,      -- (identity)       --                h (first output)    False
BiCT (BCT query)
==================  ==================  ================  ==================  ========

A registered method builds the index in one call,
:func:`backfill_utils.serve.from_method.index_from_method` (FastFill's backfill order comes
with :func:`~backfill_utils.serve.from_method.served_method`: backfill in that order). Thread safety: searches share a
readers-writer lock, mutations hold it alone, so a query never sees an item on
both sides or on neither; faiss releases the GIL while it searches.

>>> import numpy as np
>>> index = OnlineBackfillIndex(2, 2)
>>> index.add_old([10, 11, 12], np.array([[0, 0], [0, 2], [0, 1]], dtype="float32"))
>>> index.backfill([11], np.array([[1, 0]], dtype="float32"))
>>> D, I = index.search(np.array([[0.5, 0]], dtype="float32"), k=4)  # k capped at the 3 items
>>> D.tolist(), I.tolist()  # 10 and 11 tie at 0.25: the lower id first
([[0.25, 0.25, 1.25]], [[10, 11, 12]])
>>> len(index), round(index.backfilled_fraction, 3)
(3, 0.333)
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..retrieval.metrics import positive_int
from .checks import as_ids, as_matrix, contains_sorted
from .index_file import UNSET, load_index, save_index
from .lock import RWLock
from .merge import merge_topk
from .side import FaissSide, split_search_params
from .transform import Transform
from .tune import tune_search

__all__ = ["OnlineBackfillIndex"]

class OnlineBackfillIndex:
    """A faiss index of the mixed gallery (see the module docstring).

    Parameters
    ----------
    d_old, d_new
        Dimensions of the old model's embeddings (``add_old``, ``query_old``)
        and of the new model's (``backfill``, ``add``, ``search``).
    query_transform
        psi: new-model query embedding -> old side's space (``d_new`` in).
        ``None``: the identity (a compatible model), so the old side's
        dimension must equal ``d_new``.
    new_transform
        rho: applied to new embeddings stored on the new side and to the query
        searched there (``d_new`` in). ``None``: the identity.
    gallery_transform
        h: applied to old embeddings stored on the old side (``d_old`` in).
    factory
        faiss ``index_factory`` string of both sides: ``"Flat"`` (exact,
        default), ``"IVF<nlist>,Flat"`` (trained on the first batch added to a
        side, or by :meth:`train`), ``"HNSW<M>"``, ...
    search_params
        ``{"nprobe": n}`` (IVF) or ``{"efSearch": n}`` (HNSW) for both sides, or
        per side: ``{"old": {"nprobe": 2}, "new": {"nprobe": 8}}``; faiss defaults
        otherwise. :meth:`tune_search` chooses them per side for a target recall.
    two_pass
        Rank merge: every search must give ``query_old`` (the old model's query
        embedding); no query or gallery transform.
    batch_size
        Rows per forward pass of a torch-module transform.

    A transform is a ``torch.nn.Module`` (put in eval mode, run without
    gradients, batched) or a callable on float32 numpy arrays; see
    :class:`~backfill_utils.serve.transform.Transform`.

    A registered method builds its index in one call:
    :func:`backfill_utils.serve.from_method.index_from_method`.
    """

    def __init__(self, d_old: int, d_new: int, *, query_transform: Callable | None = None,
                 new_transform: Callable | None = None, gallery_transform: Callable | None = None,
                 factory: str = "Flat", search_params: dict | None = None, two_pass: bool = False,
                 batch_size: int = 4096) -> None:
        self.d_old, self.d_new = positive_int(d_old, "d_old"), positive_int(d_new, "d_new")
        self.factory, self.two_pass = str(factory), bool(two_pass)
        if self.two_pass and (query_transform is not None or gallery_transform is not None):
            raise ValueError("two_pass=True (rank merge) searches the old side with the old model's query "
                             "embedding against old embeddings: give no query_transform or gallery_transform")
        tf = lambda fn, name, d: None if fn is None else Transform(fn, name, d, batch_size)  # noqa: E731
        self._transforms = {"query": tf(query_transform, "query_transform", self.d_new),
                            "new": tf(new_transform, "new_transform", self.d_new),
                            "gallery": tf(gallery_transform, "gallery_transform", self.d_old)}
        g, n, q = (self._transforms[s] for s in ("gallery", "new", "query"))
        d_old_side = g.d_out if g else self.d_old
        d_query = q.d_out if q else self.d_new
        if not self.two_pass and d_query != d_old_side:
            what = (f"query_transform outputs dimension {d_query}" if q
                    else f"d_new is {self.d_new} (no query_transform)")
            raise ValueError(
                f"the old side holds vectors of dimension {d_old_side} but {what}: the query searched on the "
                "old side must have the old side's dimension (give a query_transform psi: new -> old, a "
                "gallery_transform h: old -> new, or two_pass=True for rank merge)")
        params_old, params_new = split_search_params(search_params)
        self._old = FaissSide(d_old_side, self.factory, "old", params_old)
        self._new = FaissSide(n.d_out if n else self.d_new, self.factory, "new", params_new)
        self._lock = RWLock()  # searches share it; visible state changes hold it alone
        self._mutate = threading.Lock()  # one writer at a time (see the mutations section)

    # ------------------------------------------------------------------ builders
    @classmethod
    def for_reverse_transform(cls, d_old: int, d_new: int, psi: Callable, rho: Callable | None = None,
                              **kwargs: Any) -> "OnlineBackfillIndex":
        """The paper's method: psi on the query for the old side, rho (optional) on the new side."""
        return cls(d_old, d_new, query_transform=psi, new_transform=rho, **kwargs)

    @classmethod
    def for_gallery_transform(cls, d_old: int, d_new: int, h: Callable, **kwargs: Any) -> "OnlineBackfillIndex":
        """FCT / FastFill: old items are stored as ``h(phi_old)``; the new query searches both sides."""
        return cls(d_old, d_new, gallery_transform=h, **kwargs)

    @classmethod
    def rank_merge(cls, d_old: int, d_new: int, **kwargs: Any) -> "OnlineBackfillIndex":
        """Distance rank merge: two forward passes, ``search(query_new, k, query_old=...)``."""
        return cls(d_old, d_new, two_pass=True, **kwargs)

    # ------------------------------------------------------------------- state
    def __len__(self) -> int:
        with self._lock.read():
            return len(self._old) + len(self._new)

    @property
    def n_old(self) -> int:
        """Items on the old side (not yet backfilled)."""
        return len(self._old)

    @property
    def n_new(self) -> int:
        """Items on the new side (backfilled or added during the backfill)."""
        return len(self._new)

    @property
    def backfilled_fraction(self) -> float:
        """``n_new / len(index)``: the fraction of items served from the new side (0 when empty)."""
        with self._lock.read():
            total = len(self._old) + len(self._new)
            return len(self._new) / total if total else 0.0

    def ids(self) -> np.ndarray:
        """Every id in the index, sorted."""
        with self._lock.read():
            return np.sort(np.concatenate([self._old.ids, self._new.ids]))

    def old_ids(self) -> np.ndarray:
        """Ids on the old side, sorted."""
        return self._old.ids.copy()

    def new_ids(self) -> np.ndarray:
        """Ids on the new side, sorted."""
        return self._new.ids.copy()

    def contains(self, ids: Any) -> np.ndarray:
        """Boolean array: which of ``ids`` are in the index (either side)."""
        a = as_ids(ids, "ids") if np.ndim(ids) else as_ids([ids], "ids")
        with self._lock.read():
            return contains_sorted(self._old.ids, a) | contains_sorted(self._new.ids, a)

    def __repr__(self) -> str:
        return (f"OnlineBackfillIndex(d_old={self.d_old}, d_new={self.d_new}, factory={self.factory!r}, "
                f"n_old={self.n_old}, n_new={self.n_new})")

    # --------------------------------------------------------------- mutations
    # Writers are serialised by ``_mutate``; the readers-writer lock is held for
    # writing only while the visible state changes. Slow preparation -- training
    # a side, rebuilding an HNSW graph, copying a shrunk side -- runs between the
    # two, so searches go on meanwhile. The faiss ``add`` itself needs the write
    # lock (faiss cannot add while searching): keep backfill batches small where
    # search latency matters.
    def _prepare(self, ids: Any, emb: Any, name: str, d: int, slot: str) -> tuple[np.ndarray, np.ndarray]:
        x = as_matrix(emb, name, d)
        a = as_ids(ids, "ids", len(x))
        t = self._transforms[slot]
        return a, (t(x) if t is not None and len(x) else x)

    def _check_absent(self, ids: np.ndarray, method: str) -> None:
        present = contains_sorted(self._old.ids, ids) | contains_sorted(self._new.ids, ids)
        if present.any():
            raise ValueError(
                f"{method}: {int(present.sum())} ids are already in the index (e.g. {ids[present][:5].tolist()}); "
                "remove them first, or use backfill() to replace an old item by its new embedding")

    def _ensure_trained(self, side: FaissSide, x: np.ndarray) -> None:
        """Train an untrained (hence empty) side on its first batch; ``_mutate`` held."""
        if len(x) and not side.is_trained:
            index = side.trained_index(x)
            with self._lock.write():
                side.install(index)

    def _maintain(self, *sides: FaissSide, force: bool = False) -> None:
        """Compact sides that need it (see ``FaissSide.maintenance``); ``_mutate`` held."""
        for side in sides:
            index = side.maintenance(force)
            if index is not None:
                with self._lock.write():
                    side.install(index)

    def _insert(self, side: FaissSide, ids: Any, emb: Any, name: str, d: int, slot: str, method: str) -> None:
        a, x = self._prepare(ids, emb, name, d, slot)
        with self._mutate:
            self._check_absent(a, method)
            self._ensure_trained(side, x)
            with self._lock.write():
                side.add(a, x)

    def add_old(self, ids: Any, old_embeddings: Any) -> None:
        """Add items of the gallery before the upgrade (old-model embeddings, ``d_old``)."""
        self._insert(self._old, ids, old_embeddings, "old_embeddings", self.d_old, "gallery", "add_old")

    def add(self, ids: Any, new_embeddings: Any) -> None:
        """Add items that arrive during the backfill: straight to the new side (``d_new``)."""
        self._insert(self._new, ids, new_embeddings, "new_embeddings", self.d_new, "new", "add")

    def backfill(self, ids: Any, new_embeddings: Any) -> None:
        """Re-extracted items: each leaves the old side and enters the new side, in one step."""
        a, x = self._prepare(ids, new_embeddings, "new_embeddings", self.d_new, "new")
        with self._mutate:
            on_old = contains_sorted(self._old.ids, a)
            if not on_old.all():
                bad = a[~on_old]
                n_new = int(contains_sorted(self._new.ids, bad).sum())
                raise ValueError(
                    f"backfill: {len(bad)} ids are not on the old side (e.g. {bad[:5].tolist()}; {n_new} of them "
                    f"are already on the new side, {len(bad) - n_new} unknown); only items added with add_old "
                    "can be backfilled, new items go through add()")
            self._ensure_trained(self._new, x)
            with self._lock.write():
                self._new.add(a, x)
                try:
                    self._old.remove(a)
                except BaseException:
                    self._new.remove(a)
                    raise
            self._maintain(self._old)

    def remove(self, ids: Any) -> None:
        """Remove items from whichever side holds them."""
        a = as_ids(ids, "ids")
        with self._mutate:
            on_old, on_new = contains_sorted(self._old.ids, a), contains_sorted(self._new.ids, a)
            unknown = ~(on_old | on_new)
            if unknown.any():
                raise ValueError(f"remove: {int(unknown.sum())} ids are not in the index "
                                 f"(e.g. {a[unknown][:5].tolist()}); nothing was removed")
            with self._lock.write():
                self._old.remove(a[on_old])
                self._new.remove(a[on_new])
            self._maintain(self._old, self._new)

    def train(self, *, old: Any = None, new: Any = None) -> None:
        """Train the empty sides of a trained factory (IVF, PQ) on samples.

        ``old``: old-model embeddings (``d_old``; the gallery transform is
        applied); ``new``: new-model embeddings (``d_new``; rho is applied).
        Without it a side is trained on the first batch added to it.
        """
        xs = {}
        if old is not None:
            x = as_matrix(old, "old", self.d_old)
            xs[self._old] = self._transforms["gallery"](x) if self._transforms["gallery"] else x
        if new is not None:
            x = as_matrix(new, "new", self.d_new)
            xs[self._new] = self._transforms["new"](x) if self._transforms["new"] else x
        if not xs:
            raise ValueError("train: give old=... and/or new=... (sample embeddings)")
        with self._mutate:
            trained = [(side, side.trained_index(x)) for side, x in xs.items()]
            with self._lock.write():
                for side, index in trained:
                    side.install(index)

    def set_search_params(self, *, old: dict | None = None, new: dict | None = None, **params: int) -> None:
        """Change ``nprobe`` (IVF) or ``efSearch`` (HNSW): ``params`` of both sides, ``old=`` /
        ``new=`` dicts of one side (they override ``params`` there), e.g.
        ``set_search_params(old={"nprobe": 2}, new={"nprobe": 8})``. Parameters not named keep
        their values. Both sides are checked before either changes."""
        params_old, params_new = split_search_params({**params, "old": old, "new": new})
        with self._mutate:
            self._set_search_params(params_old, params_new)

    def _set_search_params(self, params_old: dict, params_new: dict) -> None:
        """Check both, then set both under the write lock; ``_mutate`` held."""
        checked = self._old.checked_search_params(params_old), self._new.checked_search_params(params_new)
        with self._lock.write():
            self._old.search_params, self._new.search_params = checked

    @property
    def search_params(self) -> dict[str, dict[str, int]]:
        """The search parameters of each side: ``{"old": {...}, "new": {...}}`` (a copy)."""
        with self._lock.read():
            return {"old": dict(self._old.search_params), "new": dict(self._new.search_params)}

    def compact(self) -> None:
        """Rebuild HNSW graphs without their removed items, copy shrunk Flat / IVF sides (done by
        itself when removed items outnumber live ones, or a side has halved)."""
        with self._mutate:
            self._maintain(self._old, self._new, force=True)

    # ------------------------------------------------------------------ search
    def search(self, query_new: Any, k: int, *, query_old: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` of the mixed gallery: ``(D, I)``, each ``(n_queries, min(k, len(self)))``.

        ``query_new``: the queries' new-model embeddings (``d_new``).
        ``query_old``: the old model's embeddings of the same queries (rank
        merge, required with ``two_pass``); given, they are searched on the old
        side as they are, instead of ``query_transform(query_new)`` (they must
        have the old side's dimension). Both sides are searched under one read
        lock, so the result is that of one state of the index.

        ``k``: a positive integer (a bool, float or string is a ``TypeError``,
        zero or less a ``ValueError``, each naming ``k``). A ``k`` larger than the
        number of items in the index is capped at that number, counted under the
        same read lock as the search: the result never has more columns than
        items, so an empty index gives ``(n_queries, 0)`` arrays. Within those
        columns ``inf`` / ``-1`` (faiss's convention) still mark results an
        approximate side (IVF, HNSW) did not find.
        """
        k = positive_int(k, "k")
        q, qo = self._check_queries(query_new, query_old)
        with self._lock.read():
            k = min(k, len(self._old) + len(self._new))
            parts = [side.search(x, k) for side, x in self._side_queries(q, qo).items()] if len(q) else []
        return merge_topk(parts, len(q), k)

    def _check_queries(self, query_new: Any, query_old: Any, new_name: str = "query_new",
                       old_name: str = "query_old") -> tuple[np.ndarray, np.ndarray | None]:
        """The queries of :meth:`search` (and :meth:`tune_search`) checked: ``(q, qo)``."""
        q = as_matrix(query_new, new_name, self.d_new)
        qo = None
        if query_old is not None:
            qo = as_matrix(query_old, old_name, self._old.d)
            if len(qo) != len(q):
                raise ValueError(f"{old_name} has {len(qo)} rows but {new_name} has {len(q)}; "
                                 "both embed the same queries")
        elif self.two_pass:
            raise ValueError(f"this index serves rank merge (two_pass=True): pass {old_name}=, the old model's "
                             "embeddings of the queries")
        return q, qo

    def _side_queries(self, q: np.ndarray, qo: np.ndarray | None) -> dict[FaissSide, np.ndarray]:
        """What each non-empty side is searched with (under the read lock): the old-model
        queries ``qo`` or ``psi(q)`` on the old side, ``rho(q)`` on the new side."""
        psi, rho = self._transforms["query"], self._transforms["new"]
        out = {}
        if len(self._old):
            out[self._old] = qo if qo is not None else (psi(q) if psi is not None else q)
        if len(self._new):
            out[self._new] = rho(q) if rho is not None else q
        return out

    # ------------------------------------------------------------------ tuning
    def tune_search(self, queries_new: Any, target: float = 0.95, k: int = 10, *, queries_old: Any = None,
                    grid: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)) -> dict[str, Any]:
        """Choose ``nprobe`` per side for a target recall@``k`` on validation queries, and set it
        (:func:`backfill_utils.serve.tune.tune_search`, which says how)."""
        return tune_search(self, queries_new, target, k, queries_old=queries_old, grid=grid)

    # ------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike, *, skip_transforms: bool = False) -> Path:
        """Write the index to one file, atomically (temporary name, then ``os.replace``).

        The file (a numpy ``.npz`` archive, read without pickle) holds both faiss
        indexes (``faiss.serialize_index``), the ids of each side, the settings and
        the transforms: a torch module with a ``.config`` that
        :func:`backfill_utils.compat.modules.build_module` rebuilds (the compat modules)
        as its ``state_dict`` plus that config. Any other transform cannot be
        saved: an error, unless ``skip_transforms=True``, which records the slot
        as unsaved; :meth:`load` then needs it passed again (the format:
        :mod:`backfill_utils.serve.index_file`).
        """
        return save_index(self, path, skip_transforms=skip_transforms)

    @classmethod
    def load(cls, path: str | os.PathLike, *, query_transform: Any = UNSET, new_transform: Any = UNSET,
             gallery_transform: Any = UNSET, batch_size: int = 4096) -> "OnlineBackfillIndex":
        """Read an index written by :meth:`save`.

        A transform passed here replaces the saved one (it must keep the saved
        dimensions); one saved as unsaved (``skip_transforms``) must be passed.
        A missing, corrupt, truncated or mismatched file is a ``ValueError``
        (``FileNotFoundError`` if absent) naming the file. Only the members the
        index needs are read, each after its header is checked against its size; a
        transform's saved config is checked against its saved weights before the
        module is built, so a crafted file cannot make this allocate more than it holds.
        """
        return load_index(cls, path, {"query": query_transform, "new": new_transform,
                                      "gallery": gallery_transform}, batch_size)
