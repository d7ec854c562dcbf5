"""The dataset registry: names, split names, per-dataset constants and data roots.

Nothing here reads images; :mod:`backfill_utils.data.api` builds datasets from these
entries (``get_dataset``, ``dataset_info``) and :mod:`backfill_utils.data.transforms`
takes its normalisation statistics from them.

>>> check_name("Tiny-ImageNet"), canonical_split("val")
('tinyimagenet', 'test')
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..config import data_root

__all__ = [
    "DatasetError",
    "DatasetEntry",
    "canonical_split",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TORCHVISION_DATASETS",
    "FOLDER_DATASETS",
    "available_datasets",
    "check_name",
    "resolve_root",
]


class DatasetError(ValueError):
    """A dataset is unknown, missing or malformed; the message says where and what to do."""


_SPLIT_ALIASES = {"train": "train", "test": "test", "val": "test"}


def canonical_split(split: str) -> str:
    """``"train"`` or ``"test"``; ``"val"`` is an alias of ``"test"``."""
    try:
        return _SPLIT_ALIASES[split]
    except (KeyError, TypeError):
        raise DatasetError(
            f"unknown split {split!r}: use 'train' or 'test' ('val' is an alias of 'test')"
        ) from None


@dataclass(frozen=True)
class DatasetEntry:
    """One dataset of the registry: what the package needs to know before reading a file.

    ``num_classes`` (``None``: counted from the class folders, ``imagefolder``), ``image_size``
    (the protocol's training resolution), the normalisation ``mean`` and ``std``; for a
    torchvision set its class name (``torchvision_class``), the constructor arguments of each
    split (``split_kwargs``) and whether torchvision can download it (``downloadable``); for a
    set read from image files the default sub-folder of the data root (``folder``).

    >>> FOLDER_DATASETS["tinyimagenet"].folder, TORCHVISION_DATASETS["cifar100"].image_size
    ('tiny-imagenet-200', 32)
    """

    num_classes: int | None
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    torchvision_class: str | None = None
    split_kwargs: Mapping[str, Mapping[str, Any]] | None = None
    downloadable: bool = True
    folder: str | None = None


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_G = (0.5, 0.5, 0.5)
TORCHVISION_DATASETS: dict[str, DatasetEntry] = {
    "cifar10": DatasetEntry(10, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), torchvision_class="CIFAR10",
        split_kwargs={"train": {"train": True}, "test": {"train": False}}),
    "cifar100": DatasetEntry(100, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
        torchvision_class="CIFAR100", split_kwargs={"train": {"train": True}, "test": {"train": False}}),
    "mnist": DatasetEntry(10, 28, (0.1307,) * 3, (0.3081,) * 3, torchvision_class="MNIST",
        split_kwargs={"train": {"train": True}, "test": {"train": False}}),
    "fashionmnist": DatasetEntry(10, 28, (0.2860,) * 3, (0.3530,) * 3, torchvision_class="FashionMNIST",
        split_kwargs={"train": {"train": True}, "test": {"train": False}}),
    "kmnist": DatasetEntry(10, 28, (0.1918,) * 3, (0.3483,) * 3, torchvision_class="KMNIST",
        split_kwargs={"train": {"train": True}, "test": {"train": False}}),
    "usps": DatasetEntry(10, 16, _G, _G, torchvision_class="USPS",
        split_kwargs={"train": {"train": True}, "test": {"train": False}}),
    "svhn": DatasetEntry(10, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), torchvision_class="SVHN",
        split_kwargs={"train": {"split": "train"}, "test": {"split": "test"}}),
    "stl10": DatasetEntry(10, 96, (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713), torchvision_class="STL10",
        split_kwargs={"train": {"split": "train"}, "test": {"split": "test"}}),
    "food101": DatasetEntry(101, 224, IMAGENET_MEAN, IMAGENET_STD, torchvision_class="Food101",
        split_kwargs={"train": {"split": "train"}, "test": {"split": "test"}}),
    "flowers102": DatasetEntry(102, 224, IMAGENET_MEAN, IMAGENET_STD, torchvision_class="Flowers102",
        split_kwargs={"train": {"split": "train"}, "test": {"split": "test"}}),
    "dtd": DatasetEntry(47, 224, IMAGENET_MEAN, IMAGENET_STD, torchvision_class="DTD",
        split_kwargs={"train": {"split": "train"}, "test": {"split": "test"}}),
    "fgvc_aircraft": DatasetEntry(100, 224, IMAGENET_MEAN, IMAGENET_STD, torchvision_class="FGVCAircraft",
        split_kwargs={"train": {"split": "trainval"}, "test": {"split": "test"}}),
    "oxford_pets": DatasetEntry(37, 224, IMAGENET_MEAN, IMAGENET_STD, torchvision_class="OxfordIIITPet",
        split_kwargs={"train": {"split": "trainval"}, "test": {"split": "test"}}),
    "stanford_cars": DatasetEntry(196, 224, IMAGENET_MEAN, IMAGENET_STD, torchvision_class="StanfordCars",
        split_kwargs={"train": {"split": "train"}, "test": {"split": "test"}}, downloadable=False),
    "gtsrb": DatasetEntry(43, 32, (0.3403, 0.3121, 0.3214), (0.2724, 0.2608, 0.2669), torchvision_class="GTSRB",
        split_kwargs={"train": {"split": "train"}, "test": {"split": "test"}}),
    "country211": DatasetEntry(211, 224, IMAGENET_MEAN, IMAGENET_STD, torchvision_class="Country211",
        split_kwargs={"train": {"split": "train"}, "test": {"split": "test"}}),
    "imagenette": DatasetEntry(10, 224, IMAGENET_MEAN, IMAGENET_STD, torchvision_class="Imagenette",
        split_kwargs={"train": {"split": "train"}, "test": {"split": "val"}}),
}
"""torchvision datasets reached through the generic adapter (``cifar100`` among them).

Splits map to each dataset's own: ``train``/``test`` flags (CIFAR, MNIST family,
USPS), ``trainval``/``test`` (FGVC-Aircraft, Oxford pets), ``train``/``val``
(Imagenette). Flowers-102 and DTD use their ``train`` split (no ``val``). Grey images
are converted to RGB. Extra ``options`` go to the torchvision constructor (e.g.
``partition=2`` for DTD, ``size="320px"`` for Imagenette). ``cifar100`` is read from
its python archive by :func:`backfill_utils.data.layout_cifar.cifar100` (see there).
"""

FOLDER_DATASETS: dict[str, DatasetEntry] = {
    "tinyimagenet": DatasetEntry(200, 64, (0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821),
                                 folder="tiny-imagenet-200"),
    "imagenet": DatasetEntry(1000, 224, IMAGENET_MEAN, IMAGENET_STD, folder="imagenet"),
    "places365": DatasetEntry(365, 224, IMAGENET_MEAN, IMAGENET_STD, folder="places365"),
    "imagefolder": DatasetEntry(None, 224, IMAGENET_MEAN, IMAGENET_STD),
}
"""Datasets read from image files on disk (:mod:`backfill_utils.data.layout_folders`)."""

_ALIASES = {"tinyimagenet200": "tinyimagenet", "places": "places365", "imagenet1k": "imagenet"}


def available_datasets() -> list[str]:
    """Every name :func:`backfill_utils.data.api.get_dataset` accepts."""
    return ["synthetic", *sorted(set(TORCHVISION_DATASETS) | set(FOLDER_DATASETS))]


def check_name(name: str) -> str:
    """The registry key of ``name`` (case, ``-`` and spaces ignored; a few aliases)."""
    key = str(name).lower().replace("-", "").replace(" ", "")
    key = _ALIASES.get(key, key)
    if key not in available_datasets():
        raise DatasetError(f"unknown dataset {name!r}; known datasets: {', '.join(available_datasets())}")
    return key


def resolve_root(root: str | os.PathLike | None, default_sub: str | None, name: str) -> Path:
    """``root`` as an absolute path; ``None``: ``config.data_root() / default_sub``."""
    if root is not None:
        return Path(root).expanduser().resolve()
    if default_sub is None:
        raise DatasetError(f"dataset {name!r} needs root=<folder with train/ and val/ (or test/) "
                           "sub-folders in ImageFolder layout>")
    return data_root() / default_sub
