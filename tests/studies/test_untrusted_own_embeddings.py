"""Own embeddings (.npy files) that someone else controls.
None of them runs code, none costs unbounded memory or time, each bad one is an error naming it."""
import numpy as np
import pytest

from backfill_utils.studies import own_models as OM


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
