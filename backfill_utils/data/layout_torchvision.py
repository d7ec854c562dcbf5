"""On-disk layouts read through (or beside) torchvision: ImageNet, Places-365, the other sets.

* :func:`imagenet` -- ImageFolder ``train/`` + ``val/`` (class names from
  torchvision's ``meta.bin`` when present), else the official archives through
  ``torchvision.datasets.ImageNet``.
* :func:`places365` -- ImageFolder ``train/`` + ``val/``, else torchvision's
  Places365 layout (category and file-list text files, image folders), read here
  (torchvision's class checks the md5 of the official files and refuses other copies).
* :func:`torchvision_dataset` -- the other sets of
  :data:`backfill_utils.data.registry.TORCHVISION_DATASETS`.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .datasets import FolderDataset, TorchvisionDataset
from .registry import TORCHVISION_DATASETS, DatasetError

from .layout_folders import imagefolder


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
    """A set of ``registry.TORCHVISION_DATASETS`` through its torchvision class."""
    import torchvision.datasets as tvd

    entry = TORCHVISION_DATASETS[key]
    tv_name, split_kwargs, downloadable = entry.torchvision_class, entry.split_kwargs, entry.downloadable
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


def places_categories(root: Path) -> list[str]:
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
    classes = places_categories(root)
    list_name = "places365_train_standard.txt" if split == "train" else "places365_val.txt"
    rows = _read_index_file(root / list_name, "one '<image path> <category index>' per line")
    bad = [(name, i) for name, i in rows if not 0 <= i < len(classes)]
    if bad:
        raise DatasetError(f"places365: {root / list_name} has category indices outside 0..{len(classes) - 1}, "
                           f"e.g. {bad[0]}. {_PLACES_HOW}")
    images = _places_images_dir(root, split, small)
    samples = [(str(images.joinpath(*name.strip("/").split("/"))), i) for name, i in rows]
    return FolderDataset(samples, classes, transform, root)
