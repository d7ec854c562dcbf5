"""The file format of a saved index: a numpy ``.npz`` archive read without pickle.

:func:`save_index` and :func:`load_index` are behind
:meth:`~backfill_utils.serve.index.OnlineBackfillIndex.save` and
:meth:`~backfill_utils.serve.index.OnlineBackfillIndex.load`;
:func:`transform_state` and :func:`transform_from_state` save and rebuild the
transforms; :func:`open_index_file` opens the archive, checking each member's header
against its size before it is read (:class:`IndexMembers`).
"""
from __future__ import annotations

import json
import os
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import faiss
import numpy as np
import torch

from .. import __version__
from .. import io
from ..compat.modules import build_module

from .checks import contains_sorted
from .transform import Transform

__all__ = ["FORMAT", "FORMAT_VERSION", "SLOTS", "UNSET", "save_index", "load_index", "transform_state",
           "transform_from_state", "IndexMembers", "open_index_file"]

#: ``format`` field of a saved index and the version this code reads and writes. The name is the
#: index's module path when the format was made (``serve.py``): kept, so that saved files still load.
FORMAT = "backfill_utils.serve.OnlineBackfillIndex"
FORMAT_VERSION = 1
#: A transform not given to ``load``: the saved one is rebuilt.
UNSET: Any = object()
#: The transform slots of an index, in its files.
SLOTS = ("query", "new", "gallery")
MAX_SAVED_DIM = 1 << 20  # an embedding dimension in a saved index file


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
            why = f"backfill_utils.compat.modules.build_module cannot rebuild it from its .config ({exc})"
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
        from .. import io

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


def save_index(index, path: str | os.PathLike, *, skip_transforms: bool = False) -> Path:
    """Write ``index`` (an :class:`~backfill_utils.serve.index.OnlineBackfillIndex`) to ``path``
    atomically; see its ``save``."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    transforms = {slot: transform_state(index._transforms[slot], slot, skip_transforms, arrays)
                  for slot in SLOTS}
    with index._lock.read():
        sides = {name: side.state() for name, side in (("old", index._old), ("new", index._new))}
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "backfill_utils": __version__,
                "faiss": faiss.__version__, "d_old": index.d_old, "d_new": index.d_new,
                "factory": index.factory, "two_pass": index.two_pass, "transforms": transforms,
                # one dict when both sides agree (what files before per-side parameters hold)
                "search_params": (index._old.search_params
                                  if index._old.search_params == index._new.search_params
                                  else {"old": index._old.search_params, "new": index._new.search_params}),
                "sides": {n: {"d": s.d, "mode": s.mode, "n": len(s), "n_dead": s.n_dead}
                          for n, s in (("old", index._old), ("new", index._new))}}
    for name, st in sides.items():
        arrays.update({f"{name}.{key}": value for key, value in st.items()})
    arrays["meta"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.savez adds no ".npz" to the name
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())

    return io.atomic_write(path, write)


def load_index(cls, path: str | os.PathLike, given: dict, batch_size: int = 4096):
    """An index of class ``cls`` read from ``path`` (see ``OnlineBackfillIndex.load``);
    ``given``: the transforms passed by slot (:data:`UNSET`: the saved one)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such index file")
    with open_index_file(path, FORMAT, FORMAT_VERSION) as (data, meta):
        return _from_file(cls, path, data, meta, batch_size, given)


def _from_file(cls, path: Path, data, meta: dict, batch_size: int, given: dict):
    try:
        for name in ("old", "new"):
            saved = meta["sides"][name]
            ids = data[f"{name}.ids"]
            if ids.ndim != 1 or len(ids) != saved["n"] or not 1 <= int(saved["d"]) <= MAX_SAVED_DIM:
                raise ValueError(f"{path}: the {name} side's metadata (n = {saved['n']}, d = {saved['d']}) does "
                                 f"not match its {ids.shape} saved ids; the file is inconsistent")
        for side_dim in ("d_old", "d_new"):
            if not 1 <= int(meta[side_dim]) <= MAX_SAVED_DIM:
                raise ValueError(f"{path}: {side_dim} = {meta[side_dim]} is outside 1..{MAX_SAVED_DIM}; the file "
                                 "is crafted or corrupt")
        fns = {slot: given[slot] if given[slot] is not UNSET
               else transform_from_state(meta["transforms"][slot], slot, data, path) for slot in SLOTS}
        index = cls(meta["d_old"], meta["d_new"], query_transform=fns["query"], new_transform=fns["new"],
                    gallery_transform=fns["gallery"], factory=meta["factory"],
                    search_params=meta["search_params"], two_pass=meta["two_pass"], batch_size=batch_size)
        for name, side in (("old", index._old), ("new", index._new)):
            saved = meta["sides"][name]
            if saved["d"] != side.d or saved["mode"] != side.mode:
                raise ValueError(
                    f"{path}: the {name} side was saved with dimension {saved['d']} ({saved['mode']}) but the "
                    f"transforms now give {side.d} ({side.mode}); pass transforms with the saved dimensions")
            side.restore({key: data[f"{name}.{key}"] for key in ("index", "ids", "labels", "live")}, str(path))
    except (KeyError, TypeError, RuntimeError, AttributeError) as exc:
        raise ValueError(f"{path}: not a consistent OnlineBackfillIndex file "
                         f"({type(exc).__name__}: {exc})") from None
    if contains_sorted(index._old.ids, index._new.ids).any():
        raise ValueError(f"{path}: some ids are on both sides; the file is inconsistent")
    return index
