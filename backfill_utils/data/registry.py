"""The dataset registry: names, split names, per-dataset constants and data roots.

Nothing here reads images; :mod:`backfill_utils.data.api` builds datasets from these
entries (``get_dataset``, ``dataset_info``) and :mod:`backfill_utils.data.transforms`
takes its normalisation statistics from them.

>>> check_name("Tiny-ImageNet"), canonical_split("val")
('tinyimagenet', 'test')
"""
from __future__ import annotations

import os
from pathlib import Path

from ..config import data_root

__all__ = [
    "DatasetError",
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


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# name -> (torchvision class, {split: constructor kwargs}, num_classes, image_size, mean, std,
#          downloadable)
_G = (0.5, 0.5, 0.5)
TORCHVISION_DATASETS: dict[str, tuple] = {
    "cifar10": ("CIFAR10", {"train": {"train": True}, "test": {"train": False}}, 10, 32,
                (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True),
    "cifar100": ("CIFAR100", {"train": {"train": True}, "test": {"train": False}}, 100, 32,
                 (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True),
    "mnist": ("MNIST", {"train": {"train": True}, "test": {"train": False}}, 10, 28,
              (0.1307,) * 3, (0.3081,) * 3, True),
    "fashionmnist": ("FashionMNIST", {"train": {"train": True}, "test": {"train": False}}, 10, 28,
                     (0.2860,) * 3, (0.3530,) * 3, True),
    "kmnist": ("KMNIST", {"train": {"train": True}, "test": {"train": False}}, 10, 28,
               (0.1918,) * 3, (0.3483,) * 3, True),
    "usps": ("USPS", {"train": {"train": True}, "test": {"train": False}}, 10, 16, _G, _G, True),
    "svhn": ("SVHN", {"train": {"split": "train"}, "test": {"split": "test"}}, 10, 32,
             (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), True),
    "stl10": ("STL10", {"train": {"split": "train"}, "test": {"split": "test"}}, 10, 96,
              (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713), True),
    "food101": ("Food101", {"train": {"split": "train"}, "test": {"split": "test"}}, 101, 224,
                IMAGENET_MEAN, IMAGENET_STD, True),
    "flowers102": ("Flowers102", {"train": {"split": "train"}, "test": {"split": "test"}}, 102, 224,
                   IMAGENET_MEAN, IMAGENET_STD, True),
    "dtd": ("DTD", {"train": {"split": "train"}, "test": {"split": "test"}}, 47, 224,
            IMAGENET_MEAN, IMAGENET_STD, True),
    "fgvc_aircraft": ("FGVCAircraft", {"train": {"split": "trainval"}, "test": {"split": "test"}}, 100, 224,
                      IMAGENET_MEAN, IMAGENET_STD, True),
    "oxford_pets": ("OxfordIIITPet", {"train": {"split": "trainval"}, "test": {"split": "test"}}, 37, 224,
                    IMAGENET_MEAN, IMAGENET_STD, True),
    "stanford_cars": ("StanfordCars", {"train": {"split": "train"}, "test": {"split": "test"}}, 196, 224,
                      IMAGENET_MEAN, IMAGENET_STD, False),
    "gtsrb": ("GTSRB", {"train": {"split": "train"}, "test": {"split": "test"}}, 43, 32,
              (0.3403, 0.3121, 0.3214), (0.2724, 0.2608, 0.2669), True),
    "country211": ("Country211", {"train": {"split": "train"}, "test": {"split": "test"}}, 211, 224,
                   IMAGENET_MEAN, IMAGENET_STD, True),
    "imagenette": ("Imagenette", {"train": {"split": "train"}, "test": {"split": "val"}}, 10, 224,
                   IMAGENET_MEAN, IMAGENET_STD, True),
}
"""torchvision datasets reached through the generic adapter (``cifar100`` among them).

Splits map to each dataset's own: ``train``/``test`` flags (CIFAR, MNIST family,
USPS), ``trainval``/``test`` (FGVC-Aircraft, Oxford pets), ``train``/``val``
(Imagenette). Flowers-102 and DTD use their ``train`` split (no ``val``). Grey images
are converted to RGB. Extra ``options`` go to the torchvision constructor (e.g.
``partition=2`` for DTD, ``size="320px"`` for Imagenette). ``cifar100`` is read from
its python archive by :func:`backfill_utils.data.layouts.cifar100` (see there).
"""

FOLDER_DATASETS = {
    # name -> (num_classes, image_size, mean, std, default sub-folder of the data root)
    "tinyimagenet": (200, 64, (0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821), "tiny-imagenet-200"),
    "imagenet": (1000, 224, IMAGENET_MEAN, IMAGENET_STD, "imagenet"),
    "places365": (365, 224, IMAGENET_MEAN, IMAGENET_STD, "places365"),
    "imagefolder": (None, 224, IMAGENET_MEAN, IMAGENET_STD, None),
}
"""Datasets read from image files on disk (:mod:`backfill_utils.data.layouts`)."""

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
