"""One side of the mixed gallery of :mod:`backfill_utils.serve.index`: a faiss index and its ids.

:class:`FaissSide` holds the old or the new side: a faiss index built from a
factory string, in squared Euclidean distance (``METRIC_L2``), with the ids of
the items it holds.

How a side keeps ids (faiss indexes differ in what they can remove):

========================  =========================================================
factory family            ids and removal
========================  =========================================================
``Flat``, ``PQ``, ``SQ``  vectors are numbered by position; a numpy array maps
                          position -> id; ``remove_ids`` (a bitmap of positions)
                          keeps the order of the other vectors, and so does the map
``IVF...``                the IVF index's own ids (``add_with_ids``) with a hash-table
                          direct map, so removal does not scan the lists (an
                          ``IndexIDMap`` around an IVF index maps ids wrongly after
                          a removal)
``HNSW...``               position -> id as for Flat; HNSW graphs cannot remove
                          nodes, so removed items are tombstones that a bitmap
                          selector keeps out of every search; when they outnumber
                          the live items the graph is rebuilt from the live vectors
========================  =========================================================

The position -> id map plays the part of ``faiss.IndexIDMap`` / ``IndexIDMap2``
without their cost: ``IndexIDMap.search`` translates labels in an OpenMP
region of its own, which on a loaded machine can stall a one-query search for
milliseconds, and ``IndexIDMap2`` rebuilds a hash table on every removal.
"""
from __future__ import annotations

import threading
from typing import Any

import faiss
import numpy as np

from .checks import contains_sorted, delete_sorted, insert_sorted

__all__ = ["FaissSide", "check_search_params", "split_search_params"]

_PARAM_KINDS = {"nprobe": "ivf", "efSearch": "hnsw"}


def _family(index: Any) -> str | None:
    """How a side keeps ids in ``index``: ``"ivf"``, ``"hnsw"``, ``"flat"``, or None (unsupported)."""
    for cls, mode in ((faiss.IndexIVF, "ivf"), (faiss.IndexHNSW, "hnsw"), (faiss.IndexFlatCodes, "flat")):
        if isinstance(index, cls):
            return mode
    return None


def _new_index(d: int, factory: str) -> tuple[Any, str]:
    try:
        index = faiss.index_factory(int(d), str(factory), faiss.METRIC_L2)
    except RuntimeError as exc:
        msg = str(exc).strip().splitlines()[-1]
        raise ValueError(f"factory {factory!r} is not a faiss index_factory string faiss can build "
                         f"for dimension {d} ({msg}); e.g. 'Flat', 'IVF1024,Flat', 'HNSW32'") from None
    mode = _family(index)
    if mode == "ivf":
        index.set_direct_map_type(faiss.DirectMap.Hashtable)
    if mode is not None:
        return index, mode
    raise ValueError(
        f"factory {factory!r} builds a faiss {type(index).__name__}, which this index cannot serve "
        "(it needs removal by id); use 'Flat' (exact), 'PQ<m>', 'SQ8', 'IVF<nlist>,<codes>' or 'HNSW<M>[,<codes>]' "
        "(no 'IDMap': ids are handled by the index)")


def check_search_params(params: dict | None, mode: str, factory: str) -> dict:
    """Validated search parameters of a side: ``nprobe`` (IVF), ``efSearch`` (HNSW).

    >>> check_search_params({"nprobe": 8}, "ivf", "IVF64,Flat")
    {'nprobe': 8}
    """
    if params is not None and not isinstance(params, dict):
        raise ValueError(f"search parameters must be a dict such as {{'nprobe': 8}}, got {params!r}")
    out = {}
    for key, value in dict(params or {}).items():
        if key not in _PARAM_KINDS:
            raise ValueError(f"unknown search parameter {key!r}; known: {sorted(_PARAM_KINDS)}")
        if _PARAM_KINDS[key] != mode:
            raise ValueError(f"search parameter {key!r} applies to {_PARAM_KINDS[key].upper()} indexes, "
                             f"not to factory {factory!r}")
        ok = not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, float, np.integer, np.floating))
        if not ok or not np.isfinite(value) or int(value) != value or int(value) < 1:
            raise ValueError(f"search parameter {key} must be a positive integer, got {value!r}")
        out[key] = int(value)
    return out


def split_search_params(params: dict | None) -> tuple[dict, dict]:
    """``(old, new)`` search parameters from the flat form (both sides) or the per-side form.

    The flat form ``{"nprobe": 8}`` applies to both sides; ``{"old": {...}, "new": {...}}``
    gives each side its own (a side left out keeps faiss's defaults). Flat keys beside
    ``old`` / ``new`` apply to both sides, and the per-side entries override them. Only the
    shape is checked here; :func:`check_search_params` checks names and values.

    >>> split_search_params({"nprobe": 4, "new": {"nprobe": 8}})
    ({'nprobe': 4}, {'nprobe': 8})
    """
    if params is None:
        return {}, {}
    if not isinstance(params, dict):
        raise ValueError(f"search_params must be a dict (flat {{'nprobe': 8}} or per side "
                         f"{{'old': {{...}}, 'new': {{...}}}}), got {params!r}")
    flat = {key: value for key, value in params.items() if key not in ("old", "new")}
    sides = []
    for name in ("old", "new"):
        own = params.get(name)
        if own is not None and not isinstance(own, dict):
            raise ValueError(f"search_params[{name!r}] must be a dict such as {{'nprobe': 8}}, got {own!r}")
        sides.append({**flat, **(own or {})})
    return sides[0], sides[1]


_DESERIALIZING = threading.Lock()  # faiss's deserialization limits are process-wide settings


def deserialize_bounded(blob: np.ndarray) -> Any:
    """``faiss.deserialize_index(blob)`` that allocates no more than the blob can hold.

    faiss sizes each array it reads from a count stored in the blob and allocates
    (and zero-fills) it before finding out the blob is shorter, so a few hundred
    crafted bytes can claim up to 1 TB per array. No array of a genuine index holds
    more bytes than the blob that carries it, nor does a loop-driving count (lists,
    levels) exceed its length: faiss's per-array byte limit and loop limit are set
    to the blob's size for the call (under a lock, and restored after), so a crafted
    count is a ``RuntimeError`` from faiss before it allocates. A faiss without those
    settings reads the blob unbounded."""
    blob = np.ascontiguousarray(blob, dtype=np.uint8).reshape(-1)
    if not hasattr(faiss, "set_deserialization_vector_byte_limit"):
        return faiss.deserialize_index(blob)
    with _DESERIALIZING:
        saved = faiss.get_deserialization_vector_byte_limit(), faiss.get_deserialization_loop_limit()
        faiss.set_deserialization_vector_byte_limit(blob.nbytes + 1)  # faiss checks bytes < limit
        faiss.set_deserialization_loop_limit(max(blob.nbytes, 1))
        try:
            return faiss.deserialize_index(blob)
        finally:
            faiss.set_deserialization_vector_byte_limit(saved[0])
            faiss.set_deserialization_loop_limit(saved[1])


def _bitmap_selector(mask: np.ndarray) -> tuple:
    """A faiss selector of the positions where ``mask`` is True (with the bitmap it reads)."""
    bits = np.packbits(mask, bitorder="little")
    return bits, faiss.IDSelectorBitmap(bits)


class FaissSide:
    """One side (old or new) of the mixed gallery. Not thread-safe by itself:
    :class:`~backfill_utils.serve.index.OnlineBackfillIndex` calls it under its lock.

    ``ids`` (sorted int64) are the live items. Flat and HNSW indexes number their
    vectors by position; ``labels[position]`` is the id there, and for HNSW
    ``live[position]`` says whether it is still in the gallery (tombstones).
    """

    def __init__(self, d: int, factory: str, name: str, search_params: dict | None = None) -> None:
        self.d, self.factory, self.name = int(d), str(factory), name
        self.index, self.mode = _new_index(self.d, self.factory)
        self.search_params = check_search_params(search_params, self.mode, self.factory)
        self.ids = np.empty(0, np.int64)
        self.labels = np.empty(0, np.int64)
        self.live = np.empty(0, bool)
        self._selector: tuple | None = None
        self._peak = 0  # most items held since the last copy (see remove)

    # -- state --------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_dead(self) -> int:
        """HNSW tombstones: removed items whose vectors are still in the graph."""
        return int(len(self.live) - self.live.sum())

    @property
    def is_trained(self) -> bool:
        return bool(self.index.is_trained)

    def trained_index(self, x: np.ndarray) -> Any:
        """A fresh index of this side's factory trained on float32 vectors ``x`` (IVF, PQ, SQ).

        Built without touching the side; :meth:`install` puts it in place (the
        side must be empty: faiss cannot retrain a filled index).
        """
        if len(self.ids) or self.index.ntotal:
            raise ValueError(f"the {self.name} side already holds {len(self.ids)} items; faiss cannot "
                             "retrain a filled index (train before adding)")
        fresh, _ = _new_index(self.d, self.factory)
        try:
            fresh.train(x)
        except RuntimeError as exc:
            msg = str(exc).strip().splitlines()[-1]
            raise ValueError(
                f"could not train the {self.name} side ({self.factory!r}) on {len(x)} vectors ({msg}); give "
                "a representative sample of at least nlist items (faiss recommends 39 x nlist) to "
                "OnlineBackfillIndex.train") from None
        return fresh

    # -- mutations (caller holds the write lock; ids are checked by the caller) --
    def add(self, ids: np.ndarray, x: np.ndarray) -> None:
        if len(ids) == 0:
            return
        if not self.is_trained:
            raise RuntimeError(f"the {self.name} side must be trained before adding (trained_index, install)")
        if self.mode == "ivf":
            self.index.add_with_ids(x, ids)
        else:
            self.index.add(x)
            self.labels = np.concatenate([self.labels, ids])
            self.live = np.concatenate([self.live, np.ones(len(ids), bool)])
            if self._selector is not None:
                self._selector = _bitmap_selector(self.live)
        self.ids = insert_sorted(self.ids, ids)
        self._peak = max(self._peak, len(self.ids))

    def remove(self, ids: np.ndarray) -> None:
        if len(ids) == 0:
            return
        if self.mode == "ivf":
            removed = self.index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64))
            if removed != len(ids):
                raise RuntimeError(f"faiss removed {removed} of {len(ids)} items from the {self.name} side")
        else:
            hit = contains_sorted(np.sort(ids), self.labels) & self.live
            if self.mode == "flat":  # IndexFlatCodes.remove_ids keeps the order of the other vectors
                bits, selector = _bitmap_selector(hit)  # bits must outlive the call
                self.index.remove_ids(selector)
                self.labels, self.live = self.labels[~hit], self.live[~hit]
            else:
                self.live = self.live & ~hit
                self._selector = _bitmap_selector(self.live)
        self.ids = delete_sorted(self.ids, np.sort(ids))

    # -- maintenance: built without the write lock (readers go on), installed under it --
    def maintenance(self, force: bool = False) -> Any | None:
        """A compacted copy of the index if one is due (or ``force``), else ``None``.

        HNSW: a fresh graph of the live vectors once tombstones outnumber live
        items (or none is left). Flat / IVF: a copy once the side holds fewer than
        half the items it held at its largest, because faiss keeps the capacity of
        its code vectors when they shrink (the old side empties during a
        backfill); amortised O(1) per removed item. Only reads the index, so
        searches may run meanwhile; the caller must keep other writers out.
        """
        if self.mode == "hnsw":
            if self.n_dead and (force or len(self.ids) == 0 or self.n_dead > len(self.ids)):
                return self._live_graph()
        elif force or 2 * len(self.ids) < self._peak:
            return faiss.clone_index(self.index)
        return None

    def _live_graph(self, chunk: int = 65536) -> Any:
        fresh, _ = _new_index(self.d, self.factory)
        for start in range(0, len(self.labels), chunk):
            keep = self.live[start:start + chunk]
            if keep.any():
                vecs = self.index.reconstruct_n(start, len(keep))
                fresh.add(np.ascontiguousarray(vecs[keep]))
        return fresh

    def install(self, index: Any) -> None:
        """Put a trained index (empty side) or a :meth:`maintenance` copy in place (write lock held)."""
        if self.mode == "hnsw" and len(self.labels):
            self.labels, self.live, self._selector = self.labels[self.live], np.ones(len(self.ids), bool), None
        self.index, self._peak = index, len(self.ids)

    def checked_search_params(self, params: dict) -> dict:
        """This side's parameters updated by ``params``, checked (the side is not changed)."""
        return check_search_params({**self.search_params, **params}, self.mode, self.factory)

    def set_search_params(self, params: dict) -> None:
        self.search_params = self.checked_search_params(params)

    # -- search (caller holds the read lock) ----------------------------------
    def search(self, x: np.ndarray, k: int, search_params: dict | None = None
               ) -> tuple[np.ndarray, np.ndarray] | None:
        """Top-``min(k, len(self))`` of the live items as ``(D, ids)``, or ``None`` if empty.

        ``search_params``: checked parameters used for this search instead of the side's own
        (the side is not changed)."""
        if len(self.ids) == 0:
            return None
        kk = min(int(k), len(self.ids))
        own = self.search_params if search_params is None else search_params
        if self.mode == "ivf":
            return self.index.search(x, kk, params=faiss.SearchParametersIVF(**own))
        if self.mode == "hnsw":
            params = faiss.SearchParametersHNSW(**own)
            if self._selector is not None:
                params.sel = self._selector[1]
            D, P = self.index.search(x, kk, params=params)
        else:
            D, P = self.index.search(x, kk)
        return D, np.where(P >= 0, self.labels[np.maximum(P, 0)], -1)

    # -- persistence -------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"index": faiss.serialize_index(self.index), "ids": self.ids, "labels": self.labels,
                "live": self.live}

    def restore(self, state: dict[str, np.ndarray], where: str) -> None:
        """Replace the index by a serialized one (read within its own size, see
        :func:`deserialize_bounded`), checked against the saved ids."""
        try:
            index = deserialize_bounded(state["index"])
        except RuntimeError as exc:
            msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"{where}: the {self.name} side's faiss index cannot be read within its "
                             f"{np.asarray(state['index']).nbytes} bytes (crafted or corrupt): {msg}") from None
        if _family(index) != self.mode or index.d != self.d:
            raise ValueError(f"{where}: the {self.name} side's faiss index is a {type(index).__name__} of "
                             f"dimension {index.d}, not the {self.mode} index of dimension {self.d} "
                             f"that factory {self.factory!r} builds")
        ids = np.asarray(state["ids"], np.int64)
        labels, live = np.asarray(state["labels"], np.int64), np.asarray(state["live"], bool)
        consistent = (np.diff(ids) > 0).all() and (
            index.ntotal == len(ids) if self.mode == "ivf" else
            index.ntotal == len(labels) == len(live) and np.array_equal(np.sort(labels[live]), ids))
        if not consistent:
            raise ValueError(f"{where}: the {self.name} side holds {index.ntotal} vectors, which do not match the "
                             f"{len(ids)} ids saved with it; the file is inconsistent")
        self.index, self.ids, self.labels, self.live = index, ids, labels, live
        self._peak = len(ids)
        self._selector = _bitmap_selector(live) if self.n_dead else None
