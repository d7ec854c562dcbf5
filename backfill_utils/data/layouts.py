"""On-disk dataset layouts: each reader turns one folder layout into a dataset.

Readers (``root`` is an absolute folder, ``split`` is ``"train"`` or ``"test"``):

* :func:`imagefolder` -- ``root/train/<class>/**/<image>`` and ``root/val/`` (or
  ``root/test/``) with the same class folders.
* :func:`tinyimagenet` -- ``tiny-imagenet-200``: ``train/<wnid>/images/*.JPEG``,
  ``val/images/*.JPEG`` + ``val/val_annotations.txt`` (or ``val/<wnid>/``); class
  names from ``words.txt`` when present.
* :func:`cifar100` -- the python archive ``root/cifar-100-python/{train,test,meta}``.
* :func:`imagenet` -- ImageFolder ``train/`` + ``val/`` (class names from
  torchvision's ``meta.bin`` when present), else the official archives through
  ``torchvision.datasets.ImageNet``.
* :func:`places365` -- ImageFolder ``train/`` + ``val/``, else torchvision's
  Places365 layout (category and file-list text files, image folders).
* :func:`torchvision_dataset` -- the other sets of ``dataset_registry.TORCHVISION_DATASETS``.

CIFAR-100 and Places-365 files are read here rather than by torchvision's classes,
which check the md5 of the official files and so refuse any other copy in the same
format (a subset, a re-packed archive, a test fixture). torchvision still downloads
them with ``download=True`` (verifying the official archive); reading does not.
No code runs from a dataset folder: the CIFAR pickles are read by
:class:`SafeUnpickler`, which builds only plain containers, strings, bytes, numbers
and numpy arrays and refuses anything else with an error naming the file. Their md5
sums are compared with the official ones (:data:`CIFAR100_MD5`, as listed by
torchvision): a copy that differs is reported (:class:`UnofficialArchiveWarning`) and
read the same restricted way; the dataset's ``archive_check`` says which it was.

Behaviour on imperfect folders: hidden entries (``.name``) are ignored; a class
folder with no image is skipped with a warning naming it (class indices come from
the training folders, so both splits agree; a test-split class whose training folder
is empty is an error); an image that cannot be decoded is an error naming the file
when it is loaded (:func:`backfill_utils.data.datasets.load_rgb`).
"""
from __future__ import annotations

import _codecs
import hashlib
import os
import pickle
from pathlib import Path
import warnings

import numpy as np
import torch
from torch.utils.data import Dataset

from .datasets import ArrayDataset, FolderDataset, TorchvisionDataset
from .registry import TORCHVISION_DATASETS, DatasetError

__all__ = ["IMG_EXTENSIONS", "EmptyClassFolderWarning", "UnofficialArchiveWarning", "SafeUnpickler",
           "CIFAR100_MD5", "RefusedPickleError", "safe_pickle_load", "class_folders", "scan_image_folder", "imagefolder",
           "tinyimagenet", "cifar100", "imagenet", "places365", "torchvision_dataset", "num_classes_on_disk"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class EmptyClassFolderWarning(UserWarning):
    """A class folder holds no image and was skipped."""


class UnofficialArchiveWarning(UserWarning):
    """A dataset file differs from the official release (md5); it is read anyway, safely."""


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _is_image(name: str) -> bool:
    return _visible(name) and name.lower().endswith(IMG_EXTENSIONS)


def _images_under(folder: str, first_only: bool = False) -> list[str]:
    """Image files under ``folder`` (recursively, sorted); ``first_only``: stop at the first."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if _visible(d))
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f))
        if first_only and out:
            return out[:1]
    return out


def _class_dirs(folder: Path, how_to: str) -> list[str]:
    if not folder.is_dir():
        raise DatasetError(f"{folder} does not exist or is not a directory; expected one sub-folder of "
                           f"images per class ({folder}/<class>/<image>.jpg). {how_to}")
    dirs = sorted(d.name for d in os.scandir(folder) if d.is_dir() and _visible(d.name))
    if not dirs:
        raise DatasetError(f"{folder} has no class sub-folders; expected {folder}/<class>/<image>.jpg. {how_to}")
    return dirs


def class_folders(folder: Path, how_to: str = "") -> list[str]:
    """The class sub-folders of ``folder`` that hold at least one image, sorted by name.

    Cheap (stops at each folder's first image). Raises :class:`DatasetError` when
    ``folder`` is missing or no class folder holds an image.
    """
    dirs = _class_dirs(folder, how_to)
    classes = [c for c in dirs if _images_under(os.path.join(folder, c), first_only=True)]
    if not classes:
        raise DatasetError(f"{folder}: no images ({', '.join(IMG_EXTENSIONS)}) in any class folder "
                           f"{dirs[:5]}{' ...' if len(dirs) > 5 else ''}. {how_to}")
    return classes


def _warn_empty(folder: Path, empty: list[str]) -> None:
    shown = ", ".join(str(folder / c) for c in empty[:5]) + (" ..." if len(empty) > 5 else "")
    warnings.warn(f"{folder}: skipped {len(empty)} class folder(s) with no images "
                  f"({', '.join(IMG_EXTENSIONS)}): {shown}", EmptyClassFolderWarning, stacklevel=2)


def scan_image_folder(folder: Path, how_to: str, class_to_idx: dict[str, int] | None = None
                      ) -> tuple[list[tuple[str, int]], list[str]]:
    """``folder/<class>/**/<image>`` -> ``(samples, classes)``.

    Without ``class_to_idx`` (a training split) the classes are the non-empty class
    folders sorted by name; empty ones are skipped with an :class:`EmptyClassFolderWarning`.
    With it (a test split, indexed by its training split's classes) a folder whose
    class the training split lacks is an error; an empty folder is skipped with a warning.
    """
    dirs = _class_dirs(folder, how_to)
    if class_to_idx is None:
        classes = class_folders(folder, how_to)
        class_to_idx = {c: i for i, c in enumerate(classes)}
    else:
        classes = sorted(class_to_idx, key=class_to_idx.get)
    samples, empty, unknown = [], [], []
    for c in dirs:
        files = _images_under(os.path.join(folder, c))
        if not files:
            empty.append(c)
        elif c not in class_to_idx:
            unknown.append(c)
        else:
            samples.extend((f, class_to_idx[c]) for f in files)
    if unknown:
        raise DatasetError(f"{folder} has images in class folders that the training split lacks (absent or "
                           f"empty there): {unknown[:5]}{' ...' if len(unknown) > 5 else ''}. {how_to}")
    if empty:
        _warn_empty(folder, empty)
    return samples, classes


def imagefolder(name: str, split: str, root: Path, transform, how_to: str,
                names: dict[str, str] | None = None) -> FolderDataset:
    """``root/train/<class>/`` and ``root/val/<class>/`` (or ``root/test/``).

    ``names`` maps folder names to class names (e.g. ImageNet wnids to words).
    """
    if not root.is_dir():
        raise DatasetError(f"{name}: root {root} does not exist. {how_to}")
    train_samples, folders = scan_image_folder(root / "train", how_to)
    classes = folders if names is None else [names.get(f, f) for f in folders]
    if split == "train":
        return FolderDataset(train_samples, classes, transform, root, folders=folders)
    for sub in ("val", "test"):
        if (root / sub).is_dir():
            samples, _ = scan_image_folder(root / sub, how_to, {c: i for i, c in enumerate(folders)})
            return FolderDataset(samples, classes, transform, root, folders=folders)
    raise DatasetError(f"{name}: {root} has no val/ or test/ sub-folder for the test split. {how_to}")


# --------------------------------------------------------------------------------------
# Tiny-ImageNet
# --------------------------------------------------------------------------------------

_TINY_HOW = ("Get Tiny-ImageNet-200 from http://cs231n.stanford.edu/tiny-imagenet-200.zip and unzip it; "
             "root is the tiny-imagenet-200 folder holding train/<wnid>/images/*.JPEG and "
             "val/images/*.JPEG + val/val_annotations.txt (or val/<wnid>/*.JPEG).")


def _tiny_words(root: Path) -> dict[str, str] | None:
    """wnid -> first synonym, from ``words.txt`` (``<wnid>\\t<name>, <name>, ...``)."""
    path = root / "words.txt"
    if not path.is_file():
        return None
    names = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            wnid, _, words = line.rstrip("\n").partition("\t")
            if wnid and words:
                names[wnid] = words.split(",")[0].strip()
    return names


def _tiny_val_samples(root: Path, folders: list[str]) -> list[tuple[str, int]]:
    val = root / "val"
    ann = val / "val_annotations.txt"
    idx = {c: i for i, c in enumerate(folders)}
    samples, missing, unknown = [], [], []
    with open(ann) as f:
        for line_no, line in enumerate(f, 1):
            parts = line.strip().split("\t")
            if not parts or parts == [""]:
                continue
            if len(parts) < 2:
                raise DatasetError(f"{ann}, line {line_no}: expected '<file>\\t<wnid>\\t...', got {line!r}")
            path = val / "images" / parts[0]
            if parts[1] not in idx:
                unknown.append(parts[1])
            elif not path.is_file():
                missing.append(str(path))
            else:
                samples.append((str(path), idx[parts[1]]))
    if unknown:
        raise DatasetError(f"{ann} names classes absent from (or with an empty folder in) {root / 'train'}: "
                           f"{sorted(set(unknown))[:5]}. {_TINY_HOW}")
    if missing:
        raise DatasetError(f"{ann} lists {len(missing)} images that do not exist, e.g. {missing[0]}. "
                           f"{_TINY_HOW}")
    if not samples:
        raise DatasetError(f"{ann} lists no images. {_TINY_HOW}")
    return sorted(samples)


def tinyimagenet(split: str, root: Path, transform) -> FolderDataset:
    """The ``tiny-imagenet-200`` folder; the test split is its labelled val set."""
    if not root.is_dir():
        raise DatasetError(f"tinyimagenet: root {root} does not exist. {_TINY_HOW}")
    train_samples, folders = scan_image_folder(root / "train", _TINY_HOW)
    words = _tiny_words(root)
    classes = folders if words is None else [words.get(w, w) for w in folders]
    if split == "train":
        return FolderDataset(train_samples, classes, transform, root, folders=folders)
    val = root / "val"
    if (val / "val_annotations.txt").is_file():
        return FolderDataset(_tiny_val_samples(root, folders), classes, transform, root, folders=folders)
    if val.is_dir():
        samples, _ = scan_image_folder(val, _TINY_HOW, {c: i for i, c in enumerate(folders)})
        return FolderDataset(samples, classes, transform, root, folders=folders)
    raise DatasetError(f"tinyimagenet: {val} not found (expected val/images + val/val_annotations.txt "
                       f"or val/<wnid>/). {_TINY_HOW}")


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


def _cifar_names(folder: Path) -> list[str]:
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
    classes = _cifar_names(folder)
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


# --------------------------------------------------------------------------------------
# ImageNet, Places-365, other torchvision sets
# --------------------------------------------------------------------------------------

_IMAGENET_HOW = ("Prepare either root/train/<wnid>/*.JPEG and root/val/<wnid>/*.JPEG (ImageFolder layout; "
                 "class names from torchvision's root/meta.bin if present), "
                 "or the official ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar and "
                 "ILSVRC2012_devkit_t12.tar.gz in root for torchvision.datasets.ImageNet "
                 "(https://image-net.org, registration needed).")
_PLACES_HOW = ("Prepare either root/train/<category>/*.jpg and root/val/<category>/*.jpg (ImageFolder layout), "
               "or the torchvision.datasets.Places365 layout: categories_places365.txt, "
               "places365_train_standard.txt, places365_val.txt, data_256_standard/ and val_256/ "
               "(pass download=True to fetch it).")


def _torchvision_targets(base: Dataset, tv_name: str) -> np.ndarray:
    for attr in ("targets", "labels", "_labels"):
        t = getattr(base, attr, None)
        if t is not None:
            return np.asarray(t.numpy() if isinstance(t, torch.Tensor) else t, dtype=np.int64).reshape(-1)
    for attr in ("_samples", "samples", "imgs"):
        s = getattr(base, attr, None)
        if s is not None:
            return np.asarray([lab for _, lab in s], dtype=np.int64)
    raise DatasetError(f"torchvision {tv_name}: cannot find the labels (.targets/.labels/._labels/._samples)")


def torchvision_dataset(key: str, split: str, root: Path, download: bool, transform, options) -> TorchvisionDataset:
    """A set of ``dataset_registry.TORCHVISION_DATASETS`` through its torchvision class."""
    import torchvision.datasets as tvd

    tv_name, split_kwargs, *_rest, downloadable = TORCHVISION_DATASETS[key]
    how = ("pass download=True to fetch it" if downloadable else
           f"download it by hand as described in torchvision.datasets.{tv_name}'s documentation")
    if not download and not root.is_dir():
        raise DatasetError(f"{key}: root {root} does not exist; {how}")
    kwargs = {**split_kwargs[split], **options}
    try:
        base = getattr(tvd, tv_name)(str(root), download=download, **kwargs)
    except (RuntimeError, FileNotFoundError, OSError) as err:
        raise DatasetError(f"{key} ({split}) could not be loaded from {root}: {err}; {how}") from err
    return TorchvisionDataset(base, _torchvision_targets(base, tv_name), getattr(base, "classes", None), transform)


def _imagenet_names(root: Path) -> dict[str, str] | None:
    """wnid -> first synonym from torchvision's ``meta.bin``, if present."""
    if not (root / "meta.bin").is_file():
        return None
    from torchvision.datasets.imagenet import load_meta_file

    try:
        wnid_to_classes = load_meta_file(str(root))[0]
    except (RuntimeError, OSError, pickle.UnpicklingError, EOFError) as err:
        raise DatasetError(f"imagenet: {root / 'meta.bin'} cannot be read ({err}); delete it to use the folder "
                           f"names. {_IMAGENET_HOW}") from None
    return {w: (c[0] if isinstance(c, (tuple, list)) else str(c)) for w, c in wnid_to_classes.items()}


def imagenet(split: str, root: Path, transform) -> Dataset:
    """ImageFolder ``train/`` + ``val/`` (names from ``meta.bin``), else torchvision's archives."""
    if (root / "train").is_dir() or not (root / "ILSVRC2012_devkit_t12.tar.gz").is_file():
        return imagefolder("imagenet", split, root, transform, _IMAGENET_HOW, _imagenet_names(root))
    import torchvision.datasets as tvd

    try:  # extracts the official archives into root/train, root/val and writes meta.bin
        base = tvd.ImageNet(str(root), split="train" if split == "train" else "val")
    except (RuntimeError, FileNotFoundError, OSError) as err:
        raise DatasetError(f"imagenet could not be loaded from {root}: {err}. {_IMAGENET_HOW}") from err
    return TorchvisionDataset(base, _torchvision_targets(base, "ImageNet"),
                              [c[0] if isinstance(c, tuple) else c for c in base.classes], transform)


def _read_index_file(path: Path, what: str) -> list[tuple[str, int]]:
    """Lines ``<name> <index>`` of a Places-365 text file."""
    if not path.is_file():
        raise DatasetError(f"places365: {path} not found ({what}). {_PLACES_HOW}")
    rows = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise DatasetError(f"{path}, line {line_no}: expected '<name> <index>', got {line!r}. {_PLACES_HOW}")
            rows.append((parts[0], int(parts[1])))
    return rows


def _places_categories(root: Path) -> list[str]:
    rows = _read_index_file(root / "categories_places365.txt", "one '<category> <index>' per line")
    classes = [name for name, _ in sorted(rows, key=lambda r: r[1])]
    if sorted(i for _, i in rows) != list(range(len(rows))):
        raise DatasetError(f"places365: the indices of {root / 'categories_places365.txt'} are not "
                           f"0..{len(rows) - 1}. {_PLACES_HOW}")
    return classes


def _places_images_dir(root: Path, split: str, small: bool) -> Path:
    size = "256" if small else "large"
    # torchvision renames the train archive's data_<size>/ to data_<size>_standard/; accept both
    candidates = [f"data_{size}_standard", f"data_{size}"] if split == "train" else [f"val_{size}"]
    for name in candidates:
        if (root / name).is_dir():
            return root / name
    raise DatasetError(f"places365: no image folder {' or '.join(str(root / c) for c in candidates)}. "
                       f"{_PLACES_HOW}")


def places365(split: str, root: Path, download: bool, transform, options: dict) -> Dataset:
    """ImageFolder ``train/`` + ``val/``, else torchvision's Places365 layout (standard
    split; ``small=True``, the default, reads the 256 x 256 images)."""
    unknown = sorted(set(options) - {"small"})
    if unknown:
        raise DatasetError(f"places365: unexpected options {unknown} (only 'small' is accepted)")
    if (root / "train").is_dir() and not options and not download:
        return imagefolder("places365", split, root, transform, _PLACES_HOW)
    small = bool(options.get("small", True))
    tv_split = "train-standard" if split == "train" else "val"
    if download:
        import torchvision.datasets as tvd

        try:  # fetches and verifies the official files if they are not there yet
            tvd.Places365(str(root), split=tv_split, small=small, download=True)
        except (RuntimeError, OSError) as err:
            raise DatasetError(f"places365 could not be downloaded into {root}: {err}") from err
    if not (root / "categories_places365.txt").is_file():
        raise DatasetError(f"places365: {root} holds neither train/ and val/ nor "
                           f"categories_places365.txt. {_PLACES_HOW}")
    classes = _places_categories(root)
    list_name = "places365_train_standard.txt" if split == "train" else "places365_val.txt"
    rows = _read_index_file(root / list_name, "one '<image path> <category index>' per line")
    bad = [(name, i) for name, i in rows if not 0 <= i < len(classes)]
    if bad:
        raise DatasetError(f"places365: {root / list_name} has category indices outside 0..{len(classes) - 1}, "
                           f"e.g. {bad[0]}. {_PLACES_HOW}")
    images = _places_images_dir(root, split, small)
    samples = [(str(images.joinpath(*name.strip("/").split("/"))), i) for name, i in rows]
    return FolderDataset(samples, classes, transform, root)


def num_classes_on_disk(key: str, root: Path) -> int | None:
    """The number of classes the files at ``root`` hold, or None when they are not there.

    Cheap: class folders (stopping at each one's first image), CIFAR's ``meta`` or
    Places' category file, never the images themselves.
    """
    folder_train = root / "train"
    if key == "cifar100":
        folder = root / "cifar-100-python"
        return len(_cifar_names(folder)) if folder.is_dir() else None
    if key in ("tinyimagenet", "imagenet", "imagefolder") or (key == "places365" and folder_train.is_dir()):
        return len(class_folders(folder_train)) if folder_train.is_dir() else None
    if key == "places365" and (root / "categories_places365.txt").is_file():
        return len(_places_categories(root))
    return None
