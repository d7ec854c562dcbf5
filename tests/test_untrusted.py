"""Inputs that someone else controls: dataset files, parameters, index files, own
embeddings. None of them runs code, none costs unbounded memory or time, each bad one
is an error naming it."""
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

from backfill_utils import layouts as L
from backfill_utils.data import get_dataset
from backfill_utils.dataset_registry import DatasetError

sys.path.insert(0, str(Path(__file__).parent))
from layouts import write_cifar100  # noqa: E402


class _Creates:
    """A pickle that, when loaded unrestricted, creates a file."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.mark.parametrize("member", ["train", "meta"])
def test_a_cifar_pickle_that_would_run_code_is_refused(tmp_path, member):
    w = write_cifar100(tmp_path / "d", classes=2, per_class=2)
    victim = w.root / "cifar-100-python" / member
    pwned = tmp_path / "pwned"
    victim.write_bytes(pickle.dumps({"data": _Creates(pwned), "fine_labels": [0]}, protocol=2))
    with pytest.raises(DatasetError, match=rf"{member} is not a plain-data CIFAR pickle.*posix.system|system"):
        get_dataset("cifar100", "train", root=w.root)
    assert not pwned.exists(), "the pickle's command ran"


def test_a_cifar_copy_that_differs_from_the_official_files_is_reported_and_read(tmp_path):
    w = write_cifar100(tmp_path, classes=3, per_class=2)
    with pytest.warns(L.UnofficialArchiveWarning, match="differ from the official"):
        ds = get_dataset("cifar100", "train", root=w.root)
    assert len(ds) == 6 and ds.archive_check.startswith("differs")
    assert L.CIFAR100_MD5["train"] == "16019d7e3df5f24257cddd939b257f8d"


def test_safe_unpickler_reads_plain_data_and_numpy_arrays():
    import io as _io

    obj = {b"data": np.arange(6, dtype=np.uint8).reshape(2, 3), "names": ["a", b"b"], "x": (1, 2.5, None),
           "s": {1, 2}, "scalar": np.float32(1.5)}
    for protocol in (2, 4, 5):
        got = L.safe_pickle_load(_io.BytesIO(pickle.dumps(obj, protocol=protocol)))
        assert np.array_equal(got[b"data"], obj[b"data"]) and got["names"] == ["a", b"b"] and got["s"] == {1, 2}
    for bad in (pickle.dumps(Path("x")), pickle.dumps(_Creates("/nonexistent/x"))):
        with pytest.raises(pickle.UnpicklingError, match="refused"):
            L.safe_pickle_load(_io.BytesIO(bad))


# ----------------------------------------------------------------------------- parameters
import time  # noqa: E402

from backfill_utils import config as C  # noqa: E402
from backfill_utils import run as R  # noqa: E402
from backfill_utils import session  # noqa: E402


@pytest.mark.parametrize("keys, match", [
    ({"seed": "/../../../../x/seedpwn"}, "seed must be an integer"),
    ({"seed": 1.5}, "seed must be an integer"),
    ({"seed": True}, "seed must be an integer"),
    ({"dataset": "../../x"}, "dataset must be a dataset name"),
    ({"overrides": "{train: {epochs: 0}}"}, r"train.epochs must be an integer >= 1, got 0"),
    ({"overrides": "{train: {batch_size: '64'}}"}, "train.batch_size must be an integer"),
    ({"overrides": "{compat: {epochs: -1}}"}, "compat.epochs must be an integer >= 1"),
    ({"overrides": "{old_fraction: 1.5}"}, "old_fraction must be a number with 0 < old_fraction < 1"),
    ({"overrides": "{val_fraction: .nan}"}, "val_fraction must be a number"),
])
def test_bad_values_are_refused_when_the_profile_loads(keys, match):
    with pytest.raises(ValueError, match=match):
        C.load_profile("smoke", **keys)
    with pytest.raises(ValueError, match=match):  # a notebook's set-up: the same rule
        session.setup("smoke", kind="compute", style=False, **keys)


@pytest.mark.parametrize("profile", ["../../../x/evilprof", "smoke/../smoke", "x/evil.yaml", ".."])
def test_a_profile_is_a_name_or_an_absolute_path(profile):
    with pytest.raises(ValueError, match="neither a profile name"):
        C.load_profile(profile)
    with pytest.raises(ValueError, match="neither a profile name"):  # papermill -p profile ... on a notebook
        session.setup(profile, kind="compute", style=False)


def test_a_profile_file_given_by_absolute_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text((C.PARAMS_DIR / "smoke.yaml").read_text())
    assert C.load_profile(str(path))["profile"] == "mine"


def test_run_folders_stay_inside_the_results_root(monkeypatch, tmp_path):
    monkeypatch.delenv(C.RESULTS_ENV, raising=False)
    monkeypatch.setattr(C, "RESULTS_DIR", tmp_path / "results")
    for name in ("../x", "a/../../b", "/abs"):
        with pytest.raises(ValueError, match="not a plain folder name"):
            C.output_dir({"run_name": name})
    assert C.output_dir({"run_name": "smoke_seed3"}) == tmp_path / "results" / "smoke_seed3"


def test_runner_refuses_traversal_and_malformed_values_in_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv(C.RESULTS_ENV, raising=False)
    monkeypatch.setattr(C, "RESULTS_DIR", tmp_path / "results")
    monkeypatch.setattr(R, "_execute", lambda *a, **k: pytest.fail("a notebook ran"))
    for argv, msg in ((["-p", "seed", "/../../../../x/seedpwn"], "seed must be an integer"),
                      (["-p", "overrides", "{train: [}"], "-p overrides is not valid YAML"),
                      (["-p", "overrides", "{train: {epochs: 0}}"], "train.epochs must be an integer >= 1")):
        with pytest.raises(SystemExit):
            R.main(["--profile", "smoke", "--only", "00"] + argv)
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err
        assert len(err.strip().splitlines()) <= 3, err
    assert not (tmp_path / "results").exists()
    assert not (tmp_path.parent / "x").exists()


def test_yaml_alias_bomb_is_refused_quickly():
    bomb = ("{dataset_options: {a0: &a0 [x, x, x, x, x, x, x, x, x, x], a1: &a1 [*a0, *a0, *a0, *a0, *a0, *a0, *a0,"
            " *a0, *a0], a2: &a2 [*a1, *a1, *a1, *a1, *a1, *a1, *a1, *a1, *a1], a3: &a3 [*a2, *a2, *a2, *a2, *a2,"
            " *a2, *a2, *a2, *a2], a4: &a4 [*a3, *a3, *a3, *a3, *a3, *a3, *a3, *a3, *a3], a5: &a5 [*a4, *a4, *a4,"
            " *a4, *a4, *a4, *a4, *a4, *a4], a6: &a6 [*a5, *a5, *a5, *a5, *a5, *a5, *a5, *a5, *a5], a7: &a7 [*a6,"
            " *a6, *a6, *a6, *a6, *a6, *a6, *a6, *a6], a8: [*a7, *a7, *a7, *a7, *a7, *a7, *a7, *a7, *a7]}}")
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="aliases"):
        C.load_profile("smoke", overrides=bomb)
    with pytest.raises(ValueError, match="aliases"):
        R._coerce(bomb, "overrides")
    # the same expansion built without YAML (a mapping passed directly) is refused by its size
    a = ["x"] * 10
    for _ in range(8):
        a = [a] * 9
    with pytest.raises(ValueError, match="more than"):
        C.load_profile("smoke", overrides={"dataset_options": {"a": a}})
    assert time.perf_counter() - t0 < 2.0


def test_sigterm_during_a_notebook_leaves_no_temporary_file(monkeypatch, tmp_path):
    import signal

    import papermill

    def fake(book, out, **kwargs):
        Path(out).write_text("{}")  # papermill writes the executed copy as it goes
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        pytest.fail("SIGTERM was not handled")

    monkeypatch.setattr(papermill, "execute_notebook", fake)
    book = R.list_notebooks(["00"])[0]
    with pytest.raises(KeyboardInterrupt), R._terminate_as_interrupt():
        R._execute(book, tmp_path / "executed" / book.name, {}, None)
    left = [p.name for p in (tmp_path / "executed").iterdir()] if (tmp_path / "executed").exists() else []
    assert not [n for n in left if ".tmp" in n], left
    assert signal.getsignal(signal.SIGTERM) is not None


def test_sigterm_while_a_kernel_runs_stops_it_and_removes_its_connection_file(monkeypatch, tmp_path):
    """A real kernel, started the way nbclient starts it, when SIGTERM arrives and nbclient's own
    clean-up does not run (the runner's event loop is left where the signal found it)."""
    import asyncio
    import signal

    import papermill
    from jupyter_client import AsyncKernelManager

    started = []

    def fake(book, out, **kwargs):
        km = kwargs.get("kernel_manager_class", AsyncKernelManager)(kernel_name="python3")
        asyncio.run(km.start_kernel())
        started.append(km)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        pytest.fail("SIGTERM was not handled")

    monkeypatch.setattr(papermill, "execute_notebook", fake)
    book = R.list_notebooks(["00"])[0]
    try:
        with pytest.raises(KeyboardInterrupt), R._terminate_as_interrupt():
            R._execute(book, tmp_path / "executed" / book.name, {}, None)
        (km,) = started
        assert not Path(km.connection_file).exists(), f"{km.connection_file} was left behind"
        assert km.provisioner.process.poll() is not None, "the kernel is still running"
    finally:
        for km in started:  # whatever happened above, no kernel outlives the test
            if km.provisioner is not None and km.provisioner.process.poll() is None:
                km.provisioner.process.kill()
            Path(km.connection_file).unlink(missing_ok=True)


def test_runner_prints_a_missing_input_without_traceback(monkeypatch, tmp_path):
    from papermill.exceptions import PapermillExecutionError

    import papermill

    def fake(book, out, **kwargs):
        raise PapermillExecutionError(0, 1, "s", "MissingArtifactError", "missing input: x; run 10_train first",
                                      ["long", "traceback"] * 20)

    monkeypatch.setattr(papermill, "execute_notebook", fake)
    book = R.list_notebooks(["40"])[0] if R.list_notebooks(["40"]) else R.list_notebooks()[-1]
    with pytest.raises(SystemExit, match=r"^\S+: MissingArtifactError: missing input: x; run 10_train first"):
        R._execute(book, tmp_path / book.name, {}, None)


# ----------------------------------------------------------------------------- the serving index
import json  # noqa: E402
import zipfile  # noqa: E402

from backfill_utils import compat as K  # noqa: E402
from backfill_utils.serve import OnlineBackfillIndex  # noqa: E402


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


# ----------------------------------------------------------------------------- own embeddings
from backfill_utils import own_models as OM  # noqa: E402


def test_own_labels_beyond_exact_integers_are_refused():
    y = np.array([0, 1, 1e19, 2e19])
    with pytest.raises(ValueError, match=r"train_labels .* not exact integers.*1e\+19"):
        OM._labels("train_labels", y, "x.npy")
    assert OM._labels("train_labels", np.array([0.0, 3.0]), "x").tolist() == [0, 3]


def test_own_embeddings_bound_dimension_and_rows_from_the_header(tmp_path):
    with pytest.raises(ValueError, match=r"dimension 20000; at most 8192"):
        OM._embedding("old_train", np.zeros((2, 20000), np.float32), "array", True)
    p = tmp_path / "big.npy"
    import numpy.lib.format as F

    with open(p, "wb") as fh:
        F.write_array_header_1_0(fh, {"descr": "<f4", "fortran_order": False, "shape": (10 ** 12, 3)})
        fh.write(b"\x00" * 48)
    with pytest.raises(ValueError, match=r"big.npy is not a readable .npy array: the header claims shape"):
        OM._read("old_train", p)
    with open(p, "wb") as fh:
        F.write_array_header_1_0(fh, {"descr": "<f4", "fortran_order": False, "shape": (2, 20000)})
        fh.write(b"\x00" * 2 * 20000 * 4)
    with pytest.raises(ValueError, match=r"shape \(2, 20000\); at most"):
        OM._read("old_train", p)


# ----------------------------------------------------------------------------- relative gain
import pandas as pd  # noqa: E402

from backfill_utils import backfill as bf  # noqa: E402
from backfill_utils import report  # noqa: E402
from backfill_utils import tables  # noqa: E402


def _curve(lo, hi):
    r = np.linspace(0, 1, 11)
    y = lo + (hi - lo) * r
    return pd.DataFrame({"ratio": r, "mAP": y, "top1": y, "top5": y, "negative_flips": np.zeros(11)})


@pytest.mark.parametrize("m_old, m_new, match", [
    (43.44, 30.72, "below M_old"),           # the new model is worse: no sign-flipped gain
    (40.0, 40.3, "no more than the noise"),  # a difference within noise
])
def test_relative_gain_is_nan_with_a_reason_when_new_is_not_better(m_old, m_new, match):
    refs = ({k: m_old for k in ("mAP", "top1", "top5")}, {k: m_new for k in ("mAP", "top1", "top5")})
    with pytest.warns(RuntimeWarning, match=match):
        s = bf.summarize_curve(_curve(29.0, 31.0), *refs)
    assert np.isnan(s["rel_gain_map"]) and np.isnan(s["rel_gain_top1"])
    summary = pd.DataFrame([{"dataset": "d", "setting": "open", "method": m, "query_passes": 1, "auc_map": a,
                             "auc_top1": a, "mean_map": a, "mean_top1": a, "final_map": a, "final_top1": a,
                             "rel_gain_map": np.nan, "rel_gain_top1": np.nan, "negative_flips_total": 0.0}
                            for m, a in (("old", m_old), ("new", m_new), ("Ours", 29.89))])
    t1 = tables.table1(summary, ["old", "new", "Ours"])
    assert t1["gain_mAP_%"].isna().all() and t1["gain_note"].str.contains(match).all()
    assert report._gain(t1, "open", "Ours").startswith("not applicable")


def test_relative_gain_unchanged_where_the_new_model_is_better():
    s = bf.summarize_curve(_curve(10.0, 20.0), {"mAP": 10.0, "top1": 10.0, "top5": 10.0},
                           {"mAP": 20.0, "top1": 20.0, "top5": 20.0})
    assert s["rel_gain_map"] == pytest.approx(0.5)
    assert bf.gain_not_applicable(17.12, 38.62) == ""


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
