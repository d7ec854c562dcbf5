"""Index files and search arguments that someone else controls.
None of them runs code, none costs unbounded memory or time, each bad one is an error naming it."""
import json
import zipfile

import numpy as np
import pytest

from backfill_utils.compat import modules as K
from backfill_utils.serve.index import MAX_K, OnlineBackfillIndex


def _small_index(n=10, d=4):
    x = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
    index = OnlineBackfillIndex(d, d)
    index.add_old(np.arange(n), x)
    return index, x


def test_an_unbounded_k_is_an_error_without_allocating():
    index, x = _small_index()
    for k in (2 ** 31, 2 ** 40):
        with pytest.raises(ValueError, match=rf"k = {k} is larger than the index \(10 items\).*pass k <= {MAX_K}"):
            index.search(x[:1], k)
    for k in (0, -3, 2.5, "3"):
        with pytest.raises((ValueError, TypeError), match="k must be"):
            index.search(x[:1], k)
    D, I = index.search(x[:1], 12)  # a small k beyond the gallery is padded as before
    assert I.shape == (1, 12) and (I[0, 10:] == -1).all()


def _rewrite(src, dst, members):
    """Copy the index archive ``src`` to ``dst`` with some members replaced (name -> bytes) or added."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            if info.filename not in members:
                zout.writestr(info, zin.read(info.filename))
        for name, (data, compress) in members.items():
            zout.writestr(name, data, compress_type=compress)


def _npy_bytes(a):
    import io as _io

    b = _io.BytesIO()
    np.save(b, a)
    return b.getvalue()


def _with_psi(tmp_path):
    x = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    psi = K.build_module({"type": "ReverseTransform", "d_new": 4, "d_old": 4, "depth": 2})
    index = OnlineBackfillIndex.for_reverse_transform(4, 4, psi)
    index.add_old(np.arange(10), x)
    return index.save(tmp_path / "i.npz")


def test_a_crafted_transform_size_is_refused_before_allocating(tmp_path):
    path = _with_psi(tmp_path)
    with np.load(path) as z:
        meta = json.loads(bytes(z["meta"]).decode())
    cfg = meta["transforms"]["query"]["config"]
    key = next(k for k in cfg if k not in ("type", "d_new", "d_old", "depth"))
    for value in (10 ** 7, 300):
        cfg[key] = value
        bad = tmp_path / f"bad{value}.npz"
        _rewrite(path, bad, {"meta.npy": (_npy_bytes(np.frombuffer(json.dumps(meta).encode(), np.uint8)),
                                          zipfile.ZIP_STORED)})
        with pytest.raises(ValueError, match="crafted or corrupt"):
            OnlineBackfillIndex.load(bad)


def test_an_unused_compressed_member_is_never_unpacked(tmp_path):
    path = _with_psi(tmp_path)
    bomb = tmp_path / "bomb.npz"
    big = b"\x00" * (64 << 20)  # 64 MiB of zeros: a few tens of KiB compressed
    _rewrite(path, bomb, {"unused.npy": (big, zipfile.ZIP_DEFLATED)})
    assert bomb.stat().st_size < 1 << 20
    import tracemalloc

    tracemalloc.start()
    OnlineBackfillIndex.load(bomb)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 << 20, f"loading used {peak >> 20} MiB"
    # a needed member that unpacks beyond the file's size is refused
    _rewrite(path, bomb, {"old.ids.npy": (_npy_bytes(np.zeros(8 << 20, np.int64)), zipfile.ZIP_DEFLATED)})
    with pytest.raises(ValueError, match="more than the .* of the file"):
        OnlineBackfillIndex.load(bomb)


def test_load_of_a_plain_npy_or_a_malformed_header_is_a_value_error(tmp_path):
    np.save(tmp_path / "plain.npy", np.zeros(3))
    with pytest.raises(ValueError, match="a single .npy array"):
        OnlineBackfillIndex.load(tmp_path / "plain.npy")
    path = _with_psi(tmp_path)
    header = b"\x93NUMPY\x01\x00" + (8).to_bytes(2, "little") + b"{'descr'"  # unterminated header dict
    _rewrite(path, tmp_path / "h.npz", {"old.ids.npy": (header, zipfile.ZIP_STORED)})
    with pytest.raises(ValueError, match="member old.ids"):
        OnlineBackfillIndex.load(tmp_path / "h.npz")
    import io as _io

    import numpy.lib.format as F

    claims = _io.BytesIO()  # a header that claims 10**12 ids in a member of a few bytes
    F.write_array_header_1_0(claims, {"descr": "<i8", "fortran_order": False, "shape": (10 ** 12,)})
    _rewrite(path, tmp_path / "c.npz", {"old.ids.npy": (claims.getvalue() + b"\0" * 80, zipfile.ZIP_STORED)})
    with pytest.raises(ValueError, match=r"member old.ids is not a readable .npy array: the header claims"):
        OnlineBackfillIndex.load(tmp_path / "c.npz")
