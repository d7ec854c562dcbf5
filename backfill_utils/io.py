"""Atomic writes, checksums and .npy headers: how every file of the package is written and checked.

**Atomic writes.** Every file of the package is written by :func:`atomic_write`:
to a temporary name in the target's folder, then moved into place with
``os.replace``, so an interrupted run never leaves a half-written checkpoint,
cache entry, figure or table.

**Checksums.** Every entry of the artifact cache (:mod:`backfill_utils.cache`) and a
backbone's ``model.pt`` and training checkpoint has its SHA-256 written next to it
(``<file>.sha256``, :func:`write_checksum`) right after the entry; the cache checks
it before a load (:func:`backfill_utils.cache.verify_entry`).

**Arrays.** :func:`npy_header` checks the header of an ``.npy`` member against the
bytes it has before anything is read; DataFrames are stored as arrays
(:func:`frame_to_arrays`, :func:`arrays_to_frame`).
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd



# --------------------------------------------------------------------------- atomic writes
def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary path next to ``path``, then move it into place.

    The temporary name keeps the suffix (writers that pick the format by the
    extension, such as Pillow or ``np.savez``, see the right one). If ``write``
    fails or is interrupted, the temporary file is removed and ``path`` is left
    as it was. Returns ``path``.

    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "sub" / "a.txt"
    >>> atomic_write(p, lambda t: t.write_text("hi")).read_text()
    'hi'
    >>> sorted(x.name for x in p.parent.iterdir())
    ['a.txt']
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(temporary_name(path.name))
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def temporary_name(name: str) -> str:
    """A hidden temporary name for a file ``name`` in the same folder: short whatever
    the length of ``name`` (a valid target name never gives an invalid temporary one),
    unique per call, keeping a short suffix (``.npz``, ``.png``) for writers that pick
    the format by the extension.

    >>> t = temporary_name("x" * 240 + ".npz")
    >>> len(t) < 80, t.startswith(".xxx"), t.endswith(".tmp.npz")
    (True, True, True)
    """
    stem, dot, suffix = name.rpartition(".")
    if not dot or len(suffix) > 12 or not stem:
        stem, suffix = name, ""
    return f".{stem[:32]}.{os.getpid()}.{secrets.token_hex(6)}.tmp" + (f".{suffix}" if suffix else "")


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    return atomic_write(path, lambda p: p.write_text(text))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda p: p.write_bytes(data))


def atomic_write_json(path: str | os.PathLike, obj: Any, **dump_kwargs: Any) -> Path:
    """``json.dump(obj)`` (indent 2 unless given, a final newline) to ``path`` atomically."""
    dump_kwargs.setdefault("indent", 2)
    return atomic_write_text(path, json.dumps(obj, **dump_kwargs) + "\n")


def atomic_torch_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` atomically."""
    import torch

    return atomic_write(path, lambda p: torch.save(obj, p))


# --------------------------------------------------------------------------- .npy headers
def npy_header(fh, where: str, available: int) -> tuple[tuple[int, ...], np.dtype]:
    """Read and check the header of a ``.npy`` stream before its data is read: the shape
    and dtype, refusing Python objects (pickle) and a shape whose bytes differ from the
    ``available`` bytes of the stream (a header that claims more rows than the file holds
    is refused without allocating). ``where`` names the input in the ``ValueError``.

    >>> import io as _io
    >>> b = _io.BytesIO(); np.save(b, np.zeros((3, 2), np.float32)); n = b.tell(); _ = b.seek(0)
    >>> npy_header(b, "x.npy", n)
    ((3, 2), dtype('float32'))
    """
    import tokenize

    fmt = np.lib.format
    start = fh.tell()
    try:
        version = fmt.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, _, dtype = fmt.read_array_header_2_0(fh)
        else:
            raise ValueError(f"format version {version[0]}.{version[1]} (this reads 1.0 and 2.0, as numpy.save writes)")
    except (ValueError, SyntaxError, tokenize.TokenError, EOFError, OSError, TypeError, KeyError) as exc:
        raise ValueError(f"{where} is not a readable .npy array: bad header ({type(exc).__name__}: {exc}); "
                         "write it with numpy.save") from None
    if dtype.hasobject:
        raise ValueError(f"{where} is not a readable .npy array without pickled objects: it holds Python "
                         "objects; save numbers or strings")
    count = 1
    for n in shape:
        count *= int(n)
    need, have = count * dtype.itemsize, available - (fh.tell() - start)
    if need != have:
        raise ValueError(f"{where} is not a readable .npy array: the header claims shape {tuple(shape)} of {dtype} ({need} bytes) but the file "
                         f"holds {have} bytes of data; the file is truncated or not what it says")
    return tuple(int(n) for n in shape), dtype


# --------------------------------------------------------------------------- checksums
def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checksum_path(path: str | os.PathLike) -> Path:
    """Where the checksum of the cache entry ``path`` is stored: ``<path>.sha256``."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def write_checksum(path: str | os.PathLike) -> Path:
    """Record the SHA-256 of ``path`` next to it (``sha256sum`` format), atomically."""
    path = Path(path)
    return atomic_write_text(checksum_path(path), f"{file_sha256(path)}  {path.name}\n")



def record_checksum(path: str | os.PathLike) -> None:
    """After an unchecked entry loaded: record its checksum (silently skipped on a
    read-only cache)."""
    try:
        write_checksum(path)
    except OSError:
        pass



# --------------------------------------------------------------------------- tables in the cache
def frame_to_arrays(df: pd.DataFrame, prefix: str = "") -> dict[str, np.ndarray]:
    """A DataFrame as arrays that :func:`cached_arrays` can store (no pickle): one per
    column (text columns as ``str``), names prefixed by ``prefix``;
    :func:`arrays_to_frame` inverts it.

    >>> arrays_to_frame(frame_to_arrays(pd.DataFrame({"m": ["a", "b"], "x": [1.5, 2.0]}), "t::"), "t::")
       m    x
    0  a  1.5
    1  b  2.0
    """
    out = {}
    for c in df.columns:
        v = df[c].to_numpy()
        out[f"{prefix}col::{c}"] = v.astype(str) if v.dtype == object else v
    out[f"{prefix}columns"] = np.array([str(c) for c in df.columns])
    return out


def arrays_to_frame(arrays: Mapping[str, np.ndarray], prefix: str = "") -> pd.DataFrame:
    """The DataFrame stored by :func:`frame_to_arrays` under ``prefix``."""
    return pd.DataFrame({str(c): arrays[f"{prefix}col::{c}"] for c in arrays[f"{prefix}columns"]})
