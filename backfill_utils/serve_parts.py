"""Building blocks of :mod:`backfill_utils.serve`: a lock, input checks, transforms, one side.

* :class:`RWLock` -- a writer-preferring readers-writer lock: searches share it,
  mutations hold it alone.
* :func:`as_matrix`, :func:`as_ids` -- the checks every public method applies to
  its input (dimensions, NaN/inf, dtypes, duplicate or negative ids).
* :class:`Transform` -- psi, rho or h: a torch module (run in eval mode, without
  gradients, in batches) or a plain callable on float32 numpy arrays.
* :class:`FaissSide` -- one side of the mixed gallery: a faiss index built from a
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
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import faiss
import numpy as np
import torch

__all__ = ["RWLock", "as_matrix", "as_ids", "Transform", "FaissSide", "merge_topk"]

_INT64_MAX = np.iinfo(np.int64).max


# ---------------------------------------------------------------------------
# Readers-writer lock
# ---------------------------------------------------------------------------
class RWLock:
    """A writer-preferring readers-writer lock (not reentrant).

    Any number of threads may hold :meth:`read` together; :meth:`write` is held
    by one thread alone. A waiting writer stops new readers from entering, so a
    steady stream of searches cannot starve a backfill.

    >>> lock = RWLock()
    >>> with lock.read():
    ...     with lock.read():  # readers share (from any thread)
    ...         pass
    >>> with lock.write():
    ...     pass
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


# ---------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------
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


def _insert_sorted(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    ids = np.sort(ids)
    return np.insert(sorted_ids, np.searchsorted(sorted_ids, ids), ids)


def _delete_sorted(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    return np.delete(sorted_ids, np.searchsorted(sorted_ids, ids))


# ---------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------
class Transform:
    """An embedding transform (psi, rho, h): a torch module or a numpy callable.

    A ``torch.nn.Module`` is put in eval mode and run without gradients
    (``torch.inference_mode``) in batches of ``batch_size`` rows, on the device
    and in the dtype its first parameter has at construction; a module returning a tuple (e.g.
    :class:`~backfill_utils.compat.FastFillTransform`) gives its first output. Any
    other callable is called on the whole float32 ``(n, d_in)`` array and must
    return an ``(n, d_out)`` array or tensor. The output dimension is found by
    applying the transform to two fixed unit vectors at construction. The
    module is shared with the caller, not copied: do not train it while it serves.
    """

    def __init__(self, fn: Callable, name: str, d_in: int, batch_size: int = 4096) -> None:
        if not callable(fn):
            raise TypeError(f"{name} must be a torch module or a callable on numpy arrays, got {type(fn).__name__}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.fn, self.name, self.d_in, self.batch_size = fn, name, int(d_in), int(batch_size)
        self.is_module = isinstance(fn, torch.nn.Module)
        self._device, self._dtype = torch.device("cpu"), torch.float32
        if self.is_module:
            fn.eval()
            p = next(iter(fn.parameters()), None)
            if p is not None and p.is_floating_point():
                self._device, self._dtype = p.device, p.dtype
        probe = np.random.default_rng(0).standard_normal((2, self.d_in)).astype(np.float32)
        probe /= np.linalg.norm(probe, axis=1, keepdims=True)
        try:
            out = self._run(probe)
        except Exception as exc:
            raise ValueError(
                f"{name} could not be applied to a (2, {self.d_in}) float32 input: {exc}; it must take "
                f"embeddings of dimension {self.d_in}") from exc
        if out.ndim != 2 or out.shape[0] != 2:
            raise ValueError(f"{name} must map (n, {self.d_in}) to (n, d_out); it returned shape {out.shape}")
        self.d_out = int(out.shape[1])

    def _run(self, x: np.ndarray) -> np.ndarray:
        if not self.is_module:
            out = self.fn(x)
            if isinstance(out, torch.Tensor):
                out = out.detach().cpu().float().numpy()
            return np.asarray(out)
        module = self.fn
        if module.training:
            module.eval()
        plain = self._device.type == "cpu" and self._dtype == torch.float32  # no conversions (the usual case)
        parts = []
        with torch.inference_mode():
            for start in range(0, max(len(x), 1), self.batch_size):
                chunk = x[start:start + self.batch_size]
                t = torch.from_numpy(chunk if chunk.flags.writeable else chunk.copy())
                out = module(t if plain else t.to(self._device, self._dtype))
                out = out[0] if isinstance(out, (tuple, list)) else out
                parts.append(out.numpy() if plain and out.dtype == torch.float32 and out.device.type == "cpu"
                             else out.detach().float().cpu().numpy())
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Apply to checked float32 ``(n, d_in)`` input; float32 C-contiguous output."""
        out = self._run(x)
        if out.shape != (len(x), self.d_out):
            raise ValueError(f"{self.name} returned shape {out.shape} for {len(x)} inputs; expected "
                             f"({len(x)}, {self.d_out})")
        out = np.ascontiguousarray(out, dtype=np.float32)
        if out.size and not np.isfinite(out).all():
            bad = np.flatnonzero(~np.isfinite(out).all(axis=1))
            raise ValueError(f"{self.name} returned NaN or inf for {len(bad)} rows (first: {bad[:5].tolist()})")
        return out


# ---------------------------------------------------------------------------
# One side of the mixed gallery
# ---------------------------------------------------------------------------
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
    """Validated search parameters of a side: ``nprobe`` (IVF), ``efSearch`` (HNSW)."""
    out = {}
    for key, value in dict(params or {}).items():
        if key not in _PARAM_KINDS:
            raise ValueError(f"unknown search parameter {key!r}; known: {sorted(_PARAM_KINDS)}")
        if _PARAM_KINDS[key] != mode:
            raise ValueError(f"search parameter {key!r} applies to {_PARAM_KINDS[key].upper()} indexes, "
                             f"not to factory {factory!r}")
        if int(value) != value or int(value) < 1:
            raise ValueError(f"search parameter {key} must be a positive integer, got {value!r}")
        out[key] = int(value)
    return out


def _bitmap_selector(mask: np.ndarray) -> tuple:
    """A faiss selector of the positions where ``mask`` is True (with the bitmap it reads)."""
    bits = np.packbits(mask, bitorder="little")
    return bits, faiss.IDSelectorBitmap(bits)


class FaissSide:
    """One side (old or new) of the mixed gallery. Not thread-safe by itself:
    :class:`~backfill_utils.serve.OnlineBackfillIndex` calls it under its lock.

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
        self.ids = _insert_sorted(self.ids, ids)
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
        self.ids = _delete_sorted(self.ids, np.sort(ids))

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

    def set_search_params(self, params: dict) -> None:
        self.search_params = check_search_params({**self.search_params, **params}, self.mode, self.factory)

    # -- search (caller holds the read lock) ----------------------------------
    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Top-``min(k, len(self))`` of the live items as ``(D, ids)``, or ``None`` if empty."""
        if len(self.ids) == 0:
            return None
        kk = min(int(k), len(self.ids))
        if self.mode == "ivf":
            return self.index.search(x, kk, params=faiss.SearchParametersIVF(**self.search_params))
        if self.mode == "hnsw":
            params = faiss.SearchParametersHNSW(**self.search_params)
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
        """Replace the index by a serialized one, checked against the saved ids."""
        index = faiss.deserialize_index(np.ascontiguousarray(state["index"], dtype=np.uint8))
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


def merge_topk(parts: list[tuple[np.ndarray, np.ndarray]], nq: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-side ``(D, I)`` lists into the top ``k`` by ``(distance, id)``.

    Missing results (``I < 0``) sort last; the output is padded to ``k`` columns
    with ``inf`` / ``-1`` (faiss's convention).

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
