"""Class splits of the retrieval protocol (PAPER.md section 4), the validation split,
and class subsets of a dataset.

:func:`class_splits` says which classes the old and new models train on and which
classes are tested; :func:`subset_by_classes` takes the items of those classes from
a dataset (labels unchanged); :func:`describe_splits` tabulates both.

**The validation split** (:func:`validation_mask`, :func:`training_part`) is the one
rule that carves validation images out of the *training* split (never the test
split): per class, a seeded ``fraction`` of its training images. Everything that reads
training images goes through :func:`training_part`: the backbones train on the
``"fit"`` part only (``train.build_train_dataset``), the compatibility modules train on
embeddings of the ``"fit"`` part, and hyperparameters are chosen on the ``"val"`` part
(embedded clean, searched leave-one-out like the test split; ``embed.get_embeddings``).
The choice of an item depends only on the seed, its class and the class's items, so a
model trained on a subset of the classes (the old model) sees exactly the same split.
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import pandas as pd
from torch.utils.data import Dataset

from .datasets import raw_image
from .registry import DatasetError

__all__ = ["ClassSubset", "class_splits", "subset_by_classes", "describe_splits", "PARTS",
           "validation_mask", "training_part"]

#: The two parts of the training split: what models train on, and the validation images.
PARTS = ("fit", "val")


class ClassSubset(Dataset):
    """The items of ``dataset`` whose label is in a class list; labels are unchanged."""

    def __init__(self, dataset: Dataset, indices: np.ndarray, classes: np.ndarray):
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        self.targets = np.asarray(dataset.targets, dtype=np.int64)[self.indices]
        self.subset_classes = np.asarray(classes, dtype=np.int64)
        self.classes = getattr(dataset, "classes", None)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.dataset[int(self.indices[i])]

    def __getitems__(self, indices):
        inner = self.indices[np.asarray(indices, dtype=np.int64)].tolist()
        if hasattr(self.dataset, "__getitems__"):
            return self.dataset.__getitems__(inner)
        return [self.dataset[i] for i in inner]

    def raw_image(self, i: int) -> np.ndarray:
        return raw_image(self.dataset, int(self.indices[i]))

    @property
    def transform(self):
        return getattr(self.dataset, "transform", None)


def _check_fraction(name: str, f) -> float:
    if not isinstance(f, (int, float, np.integer, np.floating)) or isinstance(f, bool) or not 0 < f < 1:
        raise ValueError(f"{name} must be a number with 0 < {name} < 1, got {f!r}")
    return float(f)


def class_splits(num_classes: int, *, setting: str = "extended", old_fraction: float = 0.5,
                 open_fraction: float = 0.2) -> dict:
    """The classes each model trains on and the classes tested, as int64 arrays.

    * ``extended`` (default): training classes = all classes; ``old_classes`` = the
      first ``floor(old_fraction * num_classes)``; ``new_classes`` = all; test on all.
    * ``open``: the last ``floor(open_fraction * num_classes)`` classes are test-only
      (``test_classes``, disjoint from every training class); ``new_classes`` = the
      rest; ``old_classes`` = the first ``floor(old_fraction * len(new_classes))``.

    ``old_classes`` and ``new_classes`` are always prefixes ``0..k-1`` so a classifier
    over them has ``k`` outputs with the dataset's own labels. (The homogeneous and
    heterogeneous settings differ in architectures, not classes: use ``extended``.)

    >>> s = class_splits(10, setting="open", old_fraction=0.5, open_fraction=0.2)
    >>> s["old_classes"].tolist(), s["new_classes"].tolist(), s["test_classes"].tolist()
    ([0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 7], [8, 9])
    """
    if not isinstance(num_classes, (int, np.integer)) or isinstance(num_classes, bool) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    num_classes = int(num_classes)
    old_fraction = _check_fraction("old_fraction", old_fraction)
    if setting == "extended":
        n_train, test = num_classes, np.arange(num_classes)
    elif setting == "open":
        open_fraction = _check_fraction("open_fraction", open_fraction)
        n_test = int(math.floor(open_fraction * num_classes + 1e-9))
        n_train = num_classes - n_test
        if n_test < 1 or n_train < 2:
            raise ValueError(f"open setting: open_fraction={open_fraction} of {num_classes} classes leaves "
                             f"{n_test} test-only and {n_train} training classes; need >= 1 and >= 2")
        test = np.arange(n_train, num_classes)
    else:
        raise ValueError(f"unknown setting {setting!r}: use 'extended' or 'open' (homogeneous/heterogeneous "
                         "are architecture choices with the extended class split)")
    n_old = int(math.floor(old_fraction * n_train + 1e-9))
    if not 1 <= n_old < n_train:
        raise ValueError(f"old_fraction={old_fraction} of {n_train} training classes gives {n_old} old "
                         "classes; need at least 1 and fewer than all")
    return dict(setting=setting, num_classes=num_classes,
                old_classes=np.arange(n_old, dtype=np.int64),
                new_classes=np.arange(n_train, dtype=np.int64),
                test_classes=test.astype(np.int64))


def subset_by_classes(dataset: Dataset, classes: Iterable[int], *, require_prefix: bool = True) -> ClassSubset:
    """The items of ``dataset`` whose label is in ``classes``; labels are unchanged.

    With ``require_prefix=True`` (for training sets) ``classes`` must be ``0..k-1``, so
    a classifier with ``k`` outputs fits the labels. Pass ``require_prefix=False`` for
    the open setting's test-only classes. Every class must have at least one item.
    """
    targets = getattr(dataset, "targets", None)
    if targets is None:
        raise DatasetError(f"{type(dataset).__name__} has no .targets; use a dataset from get_dataset()")
    targets = np.asarray(targets, dtype=np.int64)
    cls = np.asarray(list(classes) if not isinstance(classes, np.ndarray) else classes)
    if cls.ndim != 1 or cls.size == 0 or cls.dtype.kind not in "iu":
        raise ValueError(f"classes must be a non-empty 1-d list of integers, got {classes!r}")
    cls = cls.astype(np.int64)
    if len(np.unique(cls)) != len(cls):
        raise ValueError("classes contain duplicates")
    if require_prefix and not np.array_equal(cls, np.arange(len(cls))):
        raise ValueError(f"classes must be the prefix 0..{len(cls) - 1} (so a classifier with {len(cls)} "
                         f"outputs fits the labels), got {cls[:8].tolist()}{' ...' if len(cls) > 8 else ''}; "
                         "pass require_prefix=False for test-only classes")
    present = np.isin(cls, targets)
    if not present.all():
        raise ValueError(f"classes without any item in the dataset: {cls[~present][:8].tolist()}")
    indices = np.flatnonzero(np.isin(targets, cls))
    return ClassSubset(dataset, indices, np.sort(cls))


def validation_mask(targets, fraction: float, seed: int) -> np.ndarray:
    """Which items of a training split are validation items: a boolean mask (True = held out).

    Per class with ``n`` items: ``floor(fraction * n)`` of them, at least one when
    ``fraction > 0`` and ``n >= 2`` and never all, chosen uniformly by a generator seeded
    with ``(seed, class)``. ``fraction = 0``: no item is held out.

    >>> y = np.array([0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 2])
    >>> m = validation_mask(y, 0.25, seed=0)
    >>> np.bincount(y[m], minlength=3).tolist()   # 5 items -> 1; the single item of class 2 stays
    [1, 1, 0]
    >>> bool((validation_mask(y[y < 1], 0.25, 0) == m[y < 1]).all())   # class 0 alone: the same items
    True
    """
    targets = np.asarray(targets, dtype=np.int64)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.integer, np.floating)) \
            or not 0 <= fraction < 1:
        raise ValueError(f"val_fraction must be a number with 0 <= val_fraction < 1, got {fraction!r}")
    mask = np.zeros(len(targets), dtype=bool)
    if fraction == 0:
        return mask
    for c in np.unique(targets):
        members = np.flatnonzero(targets == c)
        n = len(members)
        k = min(max(int(math.floor(fraction * n + 1e-9)), 1), n - 1)
        if k <= 0:
            continue
        rng = np.random.default_rng([int(seed), 0x5A1, int(c)])
        mask[members[rng.permutation(n)[:k]]] = True
    return mask


def training_part(dataset: Dataset, classes: Iterable[int], part: str, *, fraction: float,
                  seed: int) -> ClassSubset:
    """The ``"fit"`` or ``"val"`` part (:data:`PARTS`) of a *training* split, restricted
    to ``classes`` (a prefix ``0..k-1``, see :func:`subset_by_classes`), by
    :func:`validation_mask` with ``fraction`` and ``seed``. Labels are unchanged."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    subset = subset_by_classes(dataset, classes)
    if part == "val" and fraction == 0:
        raise ValueError("the validation split is empty (val_fraction = 0): set the profile key "
                         "val_fraction > 0, e.g. 0.1")
    mask = validation_mask(np.asarray(dataset.targets, dtype=np.int64), fraction, seed)[subset.indices]
    keep = subset.indices[mask if part == "val" else ~mask]
    return ClassSubset(dataset, keep, subset.subset_classes)


def describe_splits(splits: dict, train_targets=None, test_targets=None) -> pd.DataFrame:
    """A small table of a :func:`class_splits` result: classes and image counts per group.

    ``train_targets`` / ``test_targets`` are label arrays or datasets with ``.targets``;
    the image columns count the images of each group's classes in that split.
    """
    def labels(t):
        if t is None:
            return None
        return np.asarray(getattr(t, "targets", t), dtype=np.int64)

    tr, te = labels(train_targets), labels(test_targets)
    groups = [("old", "phi_old trains on", splits["old_classes"]),
              ("new", "phi_new trains on", splits["new_classes"]),
              ("test", "queries = gallery", splits["test_classes"])]
    rows = []
    for group, role, cls in groups:
        cls = np.asarray(cls)
        row = dict(group=group, role=role, classes=len(cls), first=int(cls.min()), last=int(cls.max()))
        if tr is not None:
            row["train_images"] = int(np.isin(tr, cls).sum())
        if te is not None:
            row["test_images"] = int(np.isin(te, cls).sum())
        rows.append(row)
    return pd.DataFrame(rows).set_index("group")
