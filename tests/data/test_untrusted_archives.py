"""Dataset files that someone else controls: CIFAR pickles are read by a restricted unpickler.
None of them runs code, none costs unbounded memory or time, each bad one is an error naming it."""
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from backfill_utils.data import layout_cifar as LC
from backfill_utils.data.api import get_dataset
from backfill_utils.data.registry import DatasetError

from layout_files import write_cifar100


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
    with pytest.warns(LC.UnofficialArchiveWarning, match="differ from the official"):
        ds = get_dataset("cifar100", "train", root=w.root)
    assert len(ds) == 6 and ds.archive_check.startswith("differs")
    assert LC.CIFAR100_MD5["train"] == "16019d7e3df5f24257cddd939b257f8d"


def test_safe_unpickler_reads_plain_data_and_numpy_arrays():
    import io as _io

    obj = {b"data": np.arange(6, dtype=np.uint8).reshape(2, 3), "names": ["a", b"b"], "x": (1, 2.5, None),
           "s": {1, 2}, "scalar": np.float32(1.5)}
    for protocol in (2, 4, 5):
        got = LC.safe_pickle_load(_io.BytesIO(pickle.dumps(obj, protocol=protocol)))
        assert np.array_equal(got[b"data"], obj[b"data"]) and got["names"] == ["a", b"b"] and got["s"] == {1, 2}
    for bad in (pickle.dumps(Path("x")), pickle.dumps(_Creates("/nonexistent/x"))):
        with pytest.raises(pickle.UnpicklingError, match="refused"):
            LC.safe_pickle_load(_io.BytesIO(bad))
