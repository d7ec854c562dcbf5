"""Building blocks of :mod:`backfill_utils.serve`: lock, input checks, transforms, merge, file.

* :class:`RWLock` -- a writer-preferring readers-writer lock: searches share it,
  mutations hold it alone.
* :func:`as_matrix`, :func:`as_ids` -- the checks every public method applies to
  its input (dimensions, NaN/inf, dtypes, duplicate or negative ids).
* :class:`Transform` -- psi, rho or h: a torch module (run in eval mode, without
  gradients, in batches) or a plain callable on float32 numpy arrays.
* :func:`merge_topk` -- the two sides' lists merged by (distance, id);
* :func:`transform_state`, :func:`transform_from_state`, :func:`open_index_file`
  -- the transforms and the archive of a saved index.

One side of the gallery (a faiss index and its ids) is
:class:`backfill_utils.serve_side.FaissSide`.

"""
from __future__ import annotations

import json
import threading
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from .compat import build_module

__all__ = ["RWLock", "as_matrix", "as_ids", "contains_sorted", "insert_sorted", "delete_sorted", "Transform",
           "merge_topk", "transform_state", "transform_from_state", "IndexMembers", "open_index_file"]

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


def insert_sorted(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``sorted_ids`` with ``ids`` (not in it) inserted, still sorted; O(n + m)."""
    ids = np.sort(ids)
    return np.insert(sorted_ids, np.searchsorted(sorted_ids, ids), ids)


def delete_sorted(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``sorted_ids`` without the sorted ``ids`` (all in it); O(n + m)."""
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


# ---------------------------------------------------------------------------
# Persistence helpers
# ---------------------------------------------------------------------------
def transform_state(t: Transform | None, slot: str, skip: bool, arrays: dict) -> dict | None:
    """Meta entry of one transform; its ``state_dict`` goes into ``arrays``."""
    if t is None:
        return None
    fn = t.fn
    config = getattr(fn, "config", None) if t.is_module else None
    why = None
    if not isinstance(config, dict):
        why = "it is not a torch module with a .config" if not t.is_module else "the module has no .config dict"
    else:
        try:
            build_module(config).load_state_dict(fn.state_dict())
        except Exception as exc:  # noqa: BLE001 - any failure means: cannot be rebuilt
            why = f"backfill_utils.compat.build_module cannot rebuild it from its .config ({exc})"
    if why is not None:
        if skip:
            return {"kind": "unsaved", "type": type(fn).__name__}
        raise ValueError(
            f"cannot save the {slot}_transform ({type(fn).__name__}): {why}. Pass skip_transforms=True to save "
            f"the index without it, and give it again to OnlineBackfillIndex.load(path, {slot}_transform=...)")
    keys = []
    for key, value in fn.state_dict().items():
        arrays[f"transform.{slot}.{key}"] = value.detach().cpu().numpy()
        keys.append(key)
    return {"kind": "module", "config": config, "keys": keys}


def transform_from_state(state: dict | None, slot: str, data: dict, path: Path) -> torch.nn.Module | None:
    if state is None:
        return None
    if state.get("kind") == "unsaved":
        raise ValueError(f"{path}: the {slot}_transform ({state.get('type')}) was not saved "
                         f"(skip_transforms=True); pass it: OnlineBackfillIndex.load(path, {slot}_transform=...)")
    config = state["config"]
    big = [v for v in _numbers(config) if abs(v) > MAX_CONFIG_INT]
    if big:
        raise ValueError(f"{path}: the {slot}_transform's config has the value {big[0]:g}, beyond {MAX_CONFIG_INT}; "
                         "the file is crafted or corrupt")
    sd = {key: data[f"transform.{slot}.{key}"] for key in state["keys"]}
    with torch.device("meta"):  # the shapes the config gives, without allocating them
        expected = {k: tuple(v.shape) for k, v in build_module(config).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in sd.items()}
    if expected != got:
        wrong = sorted(k for k in set(expected) | set(got) if expected.get(k) != got.get(k))[:3]
        raise ValueError(f"{path}: the {slot}_transform's config does not match its saved weights (e.g. "
                         f"{', '.join(f'{k}: config {expected.get(k)}, saved {got.get(k)}' for k in wrong)}); "
                         "the file is crafted or corrupt")
    module = build_module(config)
    module.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()})
    return module.eval()


MAX_CONFIG_INT = 1 << 20  # no dimension, width or depth of a saved transform is larger


def _numbers(obj: Any) -> Iterator[float]:
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _numbers(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield obj


class IndexMembers:
    """The arrays of a saved index, read one at a time when asked for (an unused member is
    never read), each after its ``.npy`` header is checked against its size
    (:func:`io.npy_header`); a member larger than the file (a compressed bomb: saves are
    uncompressed) is refused. Errors are ``ValueError`` naming the file."""

    def __init__(self, path: Path, z) -> None:
        self.path, self._z, self._size = path, z, path.stat().st_size

    def __contains__(self, key: str) -> bool:
        return key in self._z.files

    def __getitem__(self, key: str) -> np.ndarray:
        from . import io

        if key not in self._z.files:
            raise KeyError(key)
        name = f"{key}.npy"
        try:
            info = self._z.zip.getinfo(name)
            if info.file_size > self._size:
                raise ValueError(f"{self.path}: member {key} unpacks to {info.file_size} bytes, more than the "
                                 f"{self._size} of the file (an index is saved uncompressed); the file is crafted "
                                 "or corrupt")
            with self._z.zip.open(name) as fh:
                io.npy_header(fh, f"{self.path}: member {key}", info.file_size)
            return self._z[key]
        except (OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
            raise ValueError(f"{self.path}: member {key} cannot be read (corrupt or truncated?): "
                             f"{type(exc).__name__}: {exc}") from None


@contextmanager
def open_index_file(path: Path, fmt: str, version: int) -> Iterator[tuple[IndexMembers, dict]]:
    """Open a saved index: its arrays (:class:`IndexMembers`, each read when asked for) and
    its metadata. A file that is not an ``.npz`` archive of the format (a plain ``.npy``,
    a truncated or corrupt file, a malformed header) is a ``ValueError`` naming it."""
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path}: not a readable OnlineBackfillIndex file (corrupt or truncated?): "
                         f"{type(exc).__name__}: {exc}") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: not an OnlineBackfillIndex file (a single .npy array, not the .npz archive "
                         "that OnlineBackfillIndex.save writes)")
    with z:
        data = IndexMembers(path, z)
        try:
            meta = json.loads(bytes(data["meta"]).decode())
        except (KeyError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not a readable OnlineBackfillIndex file (no readable metadata: "
                             f"{type(exc).__name__}: {exc})") from None
        if not isinstance(meta, dict) or meta.get("format") != fmt:
            raise ValueError(f"{path}: not an OnlineBackfillIndex file (format field "
                             f"{meta.get('format') if isinstance(meta, dict) else None!r})")
        if meta.get("version") != version:
            raise ValueError(f"{path}: saved in format version {meta.get('version')!r}; this code reads version "
                             f"{version} (use the backfill_utils version that wrote it)")
        yield data, meta
