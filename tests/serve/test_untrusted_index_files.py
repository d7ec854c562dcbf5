"""Index files and search arguments that someone else controls.
None of them runs code, none costs unbounded memory or time, each bad one is an error naming it."""
import json
import zipfile

import numpy as np
import pytest

from backfill_utils.compat import modules as K
from backfill_utils.serve.index import OnlineBackfillIndex


def _small_index(n=10, d=4):
    x = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
    index = OnlineBackfillIndex(d, d)
    index.add_old(np.arange(n), x)
    return index, x


def test_k_beyond_the_index_is_capped_at_its_items_without_allocating_k_columns():
    index, x = _small_index()
    for k in (11, 2 ** 31, 2 ** 62):  # 2**31 columns of float32 + int64 would need 24 GB per query
        D, I = index.search(x[:3], k)
        assert D.shape == I.shape == (3, 10)
        assert [sorted(row) for row in I.tolist()] == [list(range(10))] * 3
    D, I = index.search(x[:1], np.int64(4))
    assert I.shape == (1, 4) and I[0, 0] == 0
    index.remove(np.arange(7))  # the cap follows the items left
    assert index.search(x[:2], 2 ** 31)[1].shape == (2, 3)
    index.remove(np.arange(7, 10))
    D, I = index.search(x[:2], 2 ** 31)
    assert D.shape == I.shape == (2, 0)


@pytest.mark.parametrize("k, error, message", [
    (0, ValueError, "k must be >= 1, got 0"), (-3, ValueError, "k must be >= 1, got -3"),
    (2.0, TypeError, "k must be an integer, got 2.0"), (True, TypeError, "k must be an integer, got the bool"),
    (np.bool_(True), TypeError, "k must be an integer, got the bool"), ("3", TypeError, "k must be an integer"),
    (None, TypeError, "k must be an integer")])
def test_k_that_is_not_a_positive_integer_is_an_error_naming_k(k, error, message):
    index, x = _small_index()
    with pytest.raises(error, match=message):
        index.search(x[:1], k)


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


def test_a_crafted_count_inside_a_faiss_blob_is_refused_before_faiss_allocates(tmp_path):
    import resource
    import struct

    index, x = _small_index()
    path = index.save(tmp_path / "i.npz")
    with np.load(path) as z:
        blob = bytes(z["old.index"])
    # a Flat index stores its codes as a count of 10 * 4 floats followed by the floats
    at = blob.index(struct.pack("<Q", x.size) + x.tobytes()[:16])
    crafted = bytearray(blob)
    struct.pack_into("<Q", crafted, at, 1 << 28)  # claims 1 GiB of codes in a blob of a few hundred bytes
    bad = tmp_path / "bad.npz"
    _rewrite(path, bad, {"old.index.npy": (_npy_bytes(np.frombuffer(bytes(crafted), np.uint8)), zipfile.ZIP_STORED)})
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with pytest.raises(ValueError, match=rf"{bad.name}: the old side's faiss index cannot be read within its "
                                         rf"{len(blob)} bytes"):
        OnlineBackfillIndex.load(bad)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown < 128 << 10, f"the peak memory grew by {grown >> 10} MiB"
    assert len(OnlineBackfillIndex.load(path)) == 10  # the genuine blob loads under the same bound

