"""On-disk layouts of image folders: ImageFolder and Tiny-ImageNet.

The other layouts: :mod:`backfill_utils.data.layout_cifar` (CIFAR-100's python archive)
and :mod:`backfill_utils.data.layout_torchvision` (ImageNet, Places-365 and torchvision's
other sets); :func:`backfill_utils.data.api.get_dataset` picks the reader. ``root`` is an
absolute folder, ``split`` is ``"train"`` or ``"test"``:

* :func:`imagefolder` -- ``root/train/<class>/**/<image>`` and ``root/val/`` (or
  ``root/test/``) with the same class folders.
* :func:`tinyimagenet` -- ``tiny-imagenet-200``: ``train/<wnid>/images/*.JPEG``,
  ``val/images/*.JPEG`` + ``val/val_annotations.txt`` (or ``val/<wnid>/``); class
  names from ``words.txt`` when present.

No code runs from a dataset folder. Behaviour on imperfect folders: hidden entries
(``.name``) are ignored; a class folder with no image is skipped with a warning naming
it (class indices come from the training folders, so both splits agree; a test-split
class whose training folder is empty is an error); an image that cannot be decoded is
an error naming the file when it is loaded (:func:`backfill_utils.data.datasets.load_rgb`).
"""
from __future__ import annotations

import os
from pathlib import Path
import warnings


from .datasets import FolderDataset
from .registry import DatasetError


IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class EmptyClassFolderWarning(UserWarning):
    """A class folder holds no image and was skipped."""



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
