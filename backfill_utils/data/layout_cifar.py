"""On-disk layout of CIFAR-100's python archive, read without unrestricted unpickling.

* :func:`cifar100` -- the python archive ``root/cifar-100-python/{train,test,meta}``.

The files are read here rather than by torchvision's class, which checks the md5 of
the official files and so refuses any other copy in the same format (a subset, a
re-packed archive, a test fixture). torchvision still downloads them with
``download=True`` (verifying the official archive); reading does not. No code runs
from a dataset folder: the pickles are read by :class:`SafeUnpickler`, which builds
only plain containers, strings, bytes, numbers and numpy arrays and refuses anything
else with an error naming the file. Their md5 sums are compared with the official
ones (:data:`CIFAR100_MD5`, as listed by torchvision): a copy that differs is reported
(:class:`UnofficialArchiveWarning`) and read the same restricted way; the dataset's
``archive_check`` says which it was.
"""
from __future__ import annotations

import _codecs
import hashlib
import pickle
from pathlib import Path
import warnings

import numpy as np

from .datasets import ArrayDataset
from .registry import DatasetError


class UnofficialArchiveWarning(UserWarning):
    """A dataset file differs from the official release (md5); it is read anyway, safely."""



# --------------------------------------------------------------------------------------
# CIFAR-100's python archive
# --------------------------------------------------------------------------------------

_CIFAR_HOW = ("pass download=True to fetch it, or extract "
              "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz into root")


#: md5 of the files of the official CIFAR-100 python archive (as listed by torchvision,
#: ``torchvision.datasets.CIFAR100.train_list``, ``test_list`` and ``meta``)
CIFAR100_MD5 = {"train": "16019d7e3df5f24257cddd939b257f8d", "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
                "meta": "7973b15100ade9c7d40fb424638fde48"}


def _latin1_encode(obj, encoding="utf-8", errors="strict"):
    """``_codecs.encode`` limited to the text codecs pickle uses for the bytes of numpy arrays."""
    if str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1", "utf-8", "utf8", "ascii"):
        raise RefusedPickleError(f"refused the codec {encoding!r}")
    return _codecs.encode(obj, encoding, errors)


class RefusedPickleError(pickle.UnpicklingError):
    """A pickle asks for something other than plain data (a function to call, a class to build)."""


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that builds only data: the builtin containers, str, bytes, numbers and
    numpy arrays (numpy's array, buffer and scalar reconstruction functions, ``ndarray``,
    ``dtype``). Any other global (a function to call, a class to build) is refused with
    :class:`RefusedPickleError` (a :class:`pickle.UnpicklingError`) before anything runs."""

    _ALLOWED = {
        ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "bytearray"), ("builtins", "complex"),
        ("__builtin__", "set"), ("__builtin__", "frozenset"), ("__builtin__", "bytearray"),
        ("__builtin__", "complex"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise RefusedPickleError(f"refused to load the global {module}.{name}: only plain data "
                                     "(containers, strings, numbers, numpy arrays) is read")


def safe_pickle_load(fh) -> object:
    """Unpickle plain data only (:class:`SafeUnpickler`); Python 2 strings as latin1."""
    return SafeUnpickler(fh, encoding="latin1").load()  # numpy arrays pickled by Python 2 need latin1


_MD5_SEEN: dict[tuple, bool] = {}


def _official(path: Path) -> bool:
    """Whether a CIFAR-100 file has the official md5 (:data:`CIFAR100_MD5`); remembered per file state."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _MD5_SEEN:
        h = hashlib.md5(usedforsecurity=False)
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _MD5_SEEN[key] = h.hexdigest() == CIFAR100_MD5.get(path.name)
    return _MD5_SEEN[key]


def _read_pickle(path: Path) -> dict:
    """A CIFAR pickle as a dict with ``str`` keys (the archive's are Python 2 strings),
    read by :class:`SafeUnpickler` whatever its md5."""
    if not path.is_file():
        raise DatasetError(f"cifar100: {path} not found (expected the extracted CIFAR-100 python archive: "
                           f"train, test, meta); {_CIFAR_HOW}")
    try:
        with open(path, "rb") as f:
            obj = safe_pickle_load(f)
    except RefusedPickleError as err:
        raise DatasetError(f"cifar100: {path} is not a plain-data CIFAR pickle ({err}); it was not loaded. "
                           f"Replace it with the official file; {_CIFAR_HOW}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as err:
        raise DatasetError(f"cifar100: {path} is not a CIFAR pickle ({err}); {_CIFAR_HOW}") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"cifar100: {path} holds a {type(obj).__name__}, not a dict; {_CIFAR_HOW}")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def cifar_names(folder: Path) -> list[str]:
    meta = _read_pickle(folder / "meta")
    if "fine_label_names" not in meta:
        raise DatasetError(f"cifar100: {folder / 'meta'} has no 'fine_label_names'; {_CIFAR_HOW}")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in meta["fine_label_names"]]


def _cifar_arrays(folder: Path, split: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    path = folder / split
    batch = _read_pickle(path)
    if "data" not in batch or "fine_labels" not in batch:
        raise DatasetError(f"cifar100: {path} lacks 'data' or 'fine_labels' (keys: {sorted(batch)}); "
                           f"{_CIFAR_HOW}")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["fine_labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise DatasetError(f"cifar100: {path} holds data {data.dtype} {data.shape} and {len(labels)} labels; "
                           f"expected uint8 (N, 3072) and N labels; {_CIFAR_HOW}")
    if len(labels) and not 0 <= labels.min() <= labels.max() < num_classes:
        raise DatasetError(f"cifar100: {path} has labels outside 0..{num_classes - 1} "
                           f"(meta names {num_classes} classes); {_CIFAR_HOW}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels  # rows are R, G, B planes


def cifar100(split: str, root: Path, download: bool, transform) -> ArrayDataset:
    """CIFAR-100 from ``root/cifar-100-python/{train,test,meta}`` (fine labels), in memory."""
    folder = root / "cifar-100-python"
    if download:
        import torchvision.datasets as tvd

        try:  # fetches and verifies the official archive if it is not there yet
            tvd.CIFAR100(str(root), train=split == "train", download=True)
        except (RuntimeError, OSError) as err:
            raise DatasetError(f"cifar100 could not be downloaded into {root}: {err}") from err
    if not folder.is_dir():
        raise DatasetError(f"cifar100: {folder} not found (expected the extracted CIFAR-100 python archive: "
                           f"train, test, meta); {_CIFAR_HOW} (root={root})")
    classes = cifar_names(folder)
    images, labels = _cifar_arrays(folder, split, len(classes))
    differ = [name for name in ("meta", split) if not _official(folder / name)]
    if differ:
        warnings.warn(f"cifar100: {', '.join(str(folder / n) for n in differ)} differ from the official "
                      "CIFAR-100 files (md5 as listed by torchvision); read as plain data only. Expected for "
                      "a subset or a re-packed archive; otherwise fetch the official one with download=True",
                      UnofficialArchiveWarning, stacklevel=2)
    ds = ArrayDataset(images, labels, transform, classes)
    ds.archive_check = (f"differs from the official files: {', '.join(differ)}" if differ
                        else "matches the official files (md5 as listed by torchvision)")
    return ds
