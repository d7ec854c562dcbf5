"""Datasets: one entry point for every dataset the project reads, and the names it re-exports.

* :func:`get_dataset` / :func:`dataset_info` -- one registry for ``synthetic``,
  ``cifar100``, ``tinyimagenet``, ``imagenet``, ``places365``, ``imagefolder`` and
  torchvision's other classification sets (see :data:`TORCHVISION_DATASETS`).
  Every returned dataset has ``.targets`` (``np.ndarray`` of int64) and ``.classes``.

The concepts live in their own modules; their public names are importable from here:

* :mod:`~backfill_utils.data.synthetic` -- :func:`make_synthetic`, the offline generator
  (:data:`SYNTHETIC_VERSION`, :func:`synthetic_defaults`);
* :mod:`~backfill_utils.data.registry` -- names, split names, :class:`DatasetError`;
* :mod:`~backfill_utils.data.layout_folders` -- the on-disk layouts and their edge cases;
* :mod:`~backfill_utils.data.datasets` -- the Dataset classes, :func:`sample_grid`, :func:`tile_grid`;
* :mod:`~backfill_utils.data.transforms` -- :func:`train_transform`, :func:`test_transform`,
  :class:`TensorAugment`;
* :mod:`~backfill_utils.data.splits` -- :func:`class_splits`, :func:`subset_by_classes`,
  :func:`describe_splits` (the class protocol of PAPER.md section 4), and the
  validation split carved from the training images: :func:`validation_mask`,
  :func:`training_part` (parts ``"fit"`` and ``"val"``, :data:`PARTS`).

Split names: ``"train"`` and ``"test"``; ``"val"`` is accepted as an alias of
``"test"`` (for ImageNet, Tiny-ImageNet and Places-365 the labelled validation set
is the test set of the retrieval protocol).

>>> info = dataset_info("cifar100", root="/nonexistent")  # no files: the registry's numbers
>>> info["num_classes"], info["image_size"]
(100, 32)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from torch.utils.data import Dataset

from . import layout_cifar as LC, layout_folders as LF, layout_torchvision as LT
from .datasets import ArrayDataset, FolderDataset, SyntheticDataset, TorchvisionDataset, sample_grid, tile_grid
from .layout_folders import IMG_EXTENSIONS, EmptyClassFolderWarning
from .registry import (
    FOLDER_DATASETS, IMAGENET_MEAN, IMAGENET_STD, TORCHVISION_DATASETS, DatasetError, available_datasets,
    canonical_split, check_name, resolve_root)
from .splits import (
    PARTS, ClassSubset, class_splits, describe_splits, subset_by_classes, training_part, validation_mask)
from .synthetic import SYNTHETIC_VERSION, make_synthetic, make_synthetic_draw, split_options, synthetic_defaults
from .transforms import TensorAugment, nominal_stats, test_transform, train_transform

__all__ = [
    "DatasetError",
    "EmptyClassFolderWarning",
    "SYNTHETIC_VERSION",
    "make_synthetic",
    "make_synthetic_draw",
    "synthetic_defaults",
    "ArrayDataset",
    "SyntheticDataset",
    "TensorAugment",
    "FolderDataset",
    "TorchvisionDataset",
    "ClassSubset",
    "available_datasets",
    "TORCHVISION_DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMG_EXTENSIONS",
    "get_dataset",
    "dataset_info",
    "dataset_identity",
    "train_transform",
    "test_transform",
    "class_splits",
    "subset_by_classes",
    "PARTS",
    "validation_mask",
    "training_part",
    "describe_splits",
    "sample_grid",
    "tile_grid",
]


def _dataset_root(key: str, root: str | os.PathLike | None):
    default_sub = "" if key in TORCHVISION_DATASETS else FOLDER_DATASETS[key].folder
    return resolve_root(root, default_sub, key)


def check_dataset_options(name: str, options: dict | None) -> None:
    """Raise :class:`DatasetError` before anything runs if ``options`` (a profile's
    ``dataset_options``) cannot be right for dataset ``name``: an unknown key of the
    synthetic generator, or any option for a dataset that takes none (cifar100,
    tinyimagenet, imagenet, imagefolder). The torchvision sets and places365 pass
    their options to torchvision, which checks them.

    >>> try:
    ...     check_dataset_options("synthetic", {"num_classes": 4, "test_per_clas": 2})
    ... except DatasetError as err:
    ...     print(str(err).split(";")[0])
    synthetic: unknown dataset_options key(s) ['test_per_clas']
    """
    key, options = check_name(name), dict(options or {})
    if key == "synthetic":
        split_options("train", options)
    elif options and (key == "cifar100" or key not in TORCHVISION_DATASETS and key != "places365"):
        raise DatasetError(f"{key}: unexpected dataset_options {sorted(options)} (this dataset takes none)")


def get_dataset(name: str, split: str = "train", *, root: str | os.PathLike | None = None,
                download: bool = False, transform: Callable | None = None, **options) -> Dataset:
    """A dataset by name; items are ``(transform(image), label)``, ``.targets`` is int64.

    Names (see :func:`available_datasets`):

    * ``synthetic`` -- :func:`make_synthetic` (``options`` go to it); no files, so
      ``root`` and ``download`` are ignored.
    * ``cifar100`` -- the python archive ``root/cifar-100-python/{train,test,meta}``
      (fine labels, read in memory; any copy in that format, not only the official one).
    * the other torchvision sets in :data:`TORCHVISION_DATASETS` (cifar10, mnist,
      fashionmnist, kmnist, usps, svhn, stl10, food101, flowers102, dtd, fgvc_aircraft,
      oxford_pets, stanford_cars, gtsrb, country211, imagenette); ``root`` is
      torchvision's root. Files are fetched only with ``download=True``.
    * ``tinyimagenet`` -- root = the ``tiny-imagenet-200`` folder; ``test`` = its
      labelled val set (``val_annotations.txt`` or ImageFolder layout).
    * ``imagenet`` -- ImageFolder ``train/`` and ``val/`` (class names from
      ``meta.bin`` if present), else torchvision's ImageNet archives.
    * ``places365`` -- ImageFolder ``train/`` and ``val/``, else torchvision's
      Places365 layout (``small=True`` by default: the 256 x 256 images).
    * ``imagefolder`` -- any root with ``train/`` and ``val/`` (or ``test/``).

    ``root=None`` means ``config.data_root()`` (``$BACKFILL_DATA_ROOT`` or
    ``<repo>/data``), with a per-dataset sub-folder for the folder datasets.
    Raises :class:`DatasetError` naming the path, what was expected and how to get it.
    Class folders without images are skipped with an :class:`EmptyClassFolderWarning`;
    see :mod:`backfill_utils.data.layout_folders` for every layout's rules.
    """
    key = check_name(name)
    split = canonical_split(split)
    check_dataset_options(key, options)
    if key == "synthetic":  # generated in memory: root and download are ignored
        images, targets = make_synthetic(split, **split_options(split, options))
        return SyntheticDataset(images, targets, transform)
    root_path = _dataset_root(key, root)
    if key == "cifar100":
        return LC.cifar100(split, root_path, download, transform)
    if key in TORCHVISION_DATASETS:
        return LT.torchvision_dataset(key, split, root_path, download, transform, options)
    if key == "places365":
        return LT.places365(split, root_path, download, transform, options)
    if key == "tinyimagenet":
        return LF.tinyimagenet(split, root_path, transform)
    if key == "imagenet":
        return LT.imagenet(split, root_path, transform)
    return LF.imagefolder(key, split, root_path, transform,
                               "Prepare root/train/<class>/*.jpg and root/val/<class>/*.jpg (or test/).")


def dataset_info(name: str, root: str | os.PathLike | None = None, **options) -> dict:
    """``dict(num_classes, image_size, mean, std)`` of a dataset.

    ``num_classes`` is what the files at ``root`` hold when they are there (a subset
    of CIFAR-100 or of ImageNet's classes, class folders without images not counted),
    else the full dataset's; ``imagefolder`` needs its files. ``image_size`` is the
    training resolution of the protocol (native size for small images, 224 for
    ImageNet-like ones); mean and std are the full dataset's. For ``synthetic``,
    ``options`` are the :func:`make_synthetic` arguments and mean/std are measured on
    its train split.
    """
    key = check_name(name)
    n, size, mean, std = nominal_stats(key, options if key == "synthetic" else {})
    if key == "imagefolder":
        n = len(LF.class_folders(_dataset_root(key, root) / "train",
                                      "Prepare root/train/<class>/*.jpg."))
    elif key != "synthetic" and (key == "cifar100" or key in FOLDER_DATASETS):
        n = num_classes_on_disk(key, _dataset_root(key, root)) or n
    return dict(num_classes=n, image_size=size, mean=tuple(mean), std=tuple(std))


def dataset_identity(name: str, root: str | os.PathLike | None = None, **options) -> dict:
    """What tells two copies of a dataset apart in cache keys: for ``synthetic``
    nothing beyond its options (it is generated); otherwise the resolved data root
    and the number of classes found there.

    Two copies of one dataset name in different folders (a CIFAR-100 subset and the
    full set, Places-365 in torchvision's layout and as an ImageFolder) thus never
    share trained models; moving a dataset to another folder retrains. Replacing the
    files of a folder in place is not detected: give such a copy its own folder.

    >>> dataset_identity("synthetic", num_classes=4)
    {}
    """
    key = check_name(name)
    if key == "synthetic":
        return {}
    root_path = _dataset_root(key, root)
    return {"root": str(root_path), "num_classes": dataset_info(key, root, **options)["num_classes"]}


def num_classes_on_disk(key: str, root: Path) -> int | None:
    """The number of classes the files at ``root`` hold, or None when they are not there.

    Cheap: class folders (stopping at each one's first image), CIFAR's ``meta`` or
    Places' category file, never the images themselves.
    """
    folder_train = root / "train"
    if key == "cifar100":
        folder = root / "cifar-100-python"
        return len(LC.cifar_names(folder)) if folder.is_dir() else None
    if key in ("tinyimagenet", "imagenet", "imagefolder") or (key == "places365" and folder_train.is_dir()):
        return len(LF.class_folders(folder_train)) if folder_train.is_dir() else None
    if key == "places365" and (root / "categories_places365.txt").is_file():
        return len(LT.places_categories(root))
    return None
