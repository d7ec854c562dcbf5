"""Fixture writers: tiny datasets in every on-disk layout the project reads.

Each ``write_*`` function writes a small, deterministic dataset in the real format of
one layout (the files, names and keys the real archives have) and returns a
:class:`Written` record: the registry name and root to give ``get_dataset`` /
``dataset_info`` (or a profile's ``dataset`` / ``data_root``), and what a reader must
find there. Every image is its class's colour plus a zero-mean pattern and noise, so
the label of any image read back is the class whose colour is nearest to the
image's mean colour (:meth:`Written.label_of`): a test can check every label
without trusting the reader's bookkeeping.

    w = write_cifar100(tmp_path, classes=4, per_class=6)
    ds = data.get_dataset(w.name, "train", root=w.root)

Writers (each a few milliseconds per image):

* :func:`write_cifar100` -- ``<root>/cifar-100-python/{train,test,meta}`` pickles.
* :func:`write_tinyimagenet` -- ``<root>/tiny-imagenet-200/`` (wnids, words, train
  folders with boxes, val images + annotations, unlabelled test images).
* :func:`write_imagenet` -- torchvision ImageNet's ``meta.bin`` + ``train/<wnid>/``, ``val/<wnid>/``.
* :func:`write_places365` -- torchvision Places365's category and file-list text files,
  ``data_256_standard/`` and ``val_256/`` (the small, standard split).
* :func:`write_imagefolder` -- ``train/<class>/`` + ``val/<class>/``.
* :func:`save_image` -- one image in any PIL mode (``L``, ``LA``, ``P``, ``CMYK``, ...),
  for edge cases.
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass
import os
from pathlib import Path
import pickle
import struct

import numpy as np
from PIL import Image

__all__ = ["Written", "class_colours", "make_image", "save_image", "write_cifar100", "write_tinyimagenet",
           "write_imagenet", "write_places365", "write_imagefolder"]

_CIFAR_NAMES = ("apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle")
_IMAGENET_WORDS = (("tench", "Tinca tinca"), ("goldfish", "Carassius auratus"), ("great white shark",),
                   ("tiger shark", "Galeocerdo cuvieri"), ("hammerhead", "hammerhead shark"),
                   ("electric ray", "crampfish"), ("stingray",), ("cock",))
_PLACES_NAMES = ("/a/airfield", "/a/airplane_cabin", "/a/airport_terminal", "/a/alcove", "/a/alley",
                 "/a/amphitheater", "/a/amusement_arcade", "/a/amusement_park")


@dataclass
class Written:
    """What a writer wrote: give ``name`` and ``root`` to ``get_dataset``.

    ``classes`` are the class names in label order as a reader must report them;
    ``train_counts`` / ``test_counts`` the images per class; ``colours`` the class
    colours (``(classes, 3)``, 0..255).
    """

    name: str
    root: Path
    classes: list[str]
    train_counts: list[int]
    test_counts: list[int]
    colours: np.ndarray

    def label_of(self, image) -> int:
        """The class whose colour is nearest to the mean colour of ``image`` (PIL, HWC
        uint8 array or CHW uint8 tensor)."""
        arr = np.asarray(image, dtype=np.float64)
        if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
            arr = arr.transpose(1, 2, 0)
        mean = arr.reshape(-1, 3).mean(0)
        return int(np.argmin(((self.colours - mean) ** 2).sum(1)))


def class_colours(classes: int) -> np.ndarray:
    """``(classes, 3)`` uint8 colours with evenly spaced hues (two lightness levels past 8)."""
    out = []
    for c in range(classes):
        value = 0.85 if (c // 8) % 2 == 0 else 0.5
        out.append(colorsys.hsv_to_rgb((c % 8) / 8 + (c // 16) / 32, 0.8, value))
    return np.rint(np.asarray(out) * 255).astype(np.uint8)


def make_image(colour, size, rng: np.random.Generator) -> np.ndarray:
    """An ``(h, w, 3)`` uint8 image: ``colour`` plus a zero-mean gradient and noise.

    ``size`` is a side or ``(w, h)``.
    """
    w, h = (size, size) if np.isscalar(size) else size
    v, u = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    angle = rng.uniform(0, 2 * np.pi)
    pattern = 20 * (np.cos(angle) * u + np.sin(angle) * v)[..., None]
    noise = rng.integers(-8, 9, (h, w, 3))
    return np.clip(np.asarray(colour, dtype=np.float64) + pattern + noise, 0, 255).astype(np.uint8)


def save_image(path, rgb: np.ndarray, mode: str = "RGB", **save_kwargs) -> Path:
    """Save an RGB array as ``mode`` (``L``, ``LA``, ``P``, ``CMYK``, ``RGBA``, ...);
    the format follows the extension. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(np.asarray(rgb, dtype=np.uint8), "RGB")
    if mode == "P":
        img = img.quantize(colors=16)
    elif mode != "RGB":
        img = img.convert(mode)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        save_kwargs.setdefault("quality", 95)
    img.save(path, **save_kwargs)
    return path


def _sizes(size, vary_size: bool, n: int, rng: np.random.Generator) -> list:
    if not vary_size:
        return [size] * n
    side = size if np.isscalar(size) else min(size)
    return [tuple(int(s) for s in rng.integers(max(8, side // 2), side * 3 // 2 + 1, 2)) for _ in range(n)]


def _images(colours, counts, size, vary_size, rng) -> list[list[np.ndarray]]:
    """Per class, ``counts[c]`` images of class ``c``."""
    out = []
    for c, n in enumerate(counts):
        out.append([make_image(colours[c], s, rng) for s in _sizes(size, vary_size, n, rng)])
    return out


def _counts(classes: int, per_class: int, test_per_class: int | None) -> tuple[list[int], list[int]]:
    if classes < 1 or per_class < 1:
        raise ValueError(f"classes and per_class must be >= 1, got {classes}, {per_class}")
    test = max(1, per_class // 2) if test_per_class is None else test_per_class
    return [per_class] * classes, [test] * classes


def _wnids(classes: int) -> list[str]:
    return [f"n{1440764 + 37 * c:08d}" for c in range(classes)]


def _write_text(path: Path, lines) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))


# --------------------------------------------------------------------------------------
# CIFAR-100
# --------------------------------------------------------------------------------------


class _Python2Pickler(pickle._Pickler):
    """Writes ``bytes`` as Python 2 ``str`` (``SHORT_BINSTRING`` / ``BINSTRING``), as the
    real archive, pickled by Python 2, holds its keys, names and array data: they load as
    ``str`` with ``encoding="latin1"`` (torchvision) and as ``bytes`` with
    ``encoding="bytes"`` (the dataset page's recipe: ``b'data'``)."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_python2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_python2_str


def _dump_python2(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        _Python2Pickler(f, protocol=2).dump(obj)
    os.replace(tmp, path)


def _cifar_batch(images, label: str) -> dict:
    rows, fine, files = [], [], []
    for c, imgs in enumerate(images):
        for j, img in enumerate(imgs):
            rows.append(img.transpose(2, 0, 1).reshape(-1))  # R plane, G plane, B plane
            fine.append(c)
            files.append(f"class{c}_s_{j:06d}.png".encode())
    order = np.random.default_rng(len(rows)).permutation(len(rows))  # the archive is not sorted by class
    return {b"filenames": [files[i] for i in order], b"batch_label": label.encode(),
            b"fine_labels": [fine[i] for i in order], b"coarse_labels": [fine[i] // 5 for i in order],
            b"data": np.stack(rows)[order].astype(np.uint8)}


def write_cifar100(root, classes: int = 4, per_class: int = 6, test_per_class: int | None = None,
                   size: int = 32, seed: int = 0) -> Written:
    """``<root>/cifar-100-python/{train,test,meta}`` as the real archive has them.

    Python 2 pickles (protocol 2, strings as Python 2 ``str``) of dicts with the keys
    ``b'data'`` (N, 3072) uint8 (rows:
    1024 red, 1024 green, 1024 blue values), ``b'fine_labels'``, ``b'coarse_labels'``,
    ``b'filenames'``, ``b'batch_label'``; ``meta``: ``b'fine_label_names'``,
    ``b'coarse_label_names'``. CIFAR images are 32 x 32: ``size`` must be 32.
    """
    if size != 32:
        raise ValueError(f"CIFAR-100's archive holds 32 x 32 images; size={size}")
    root = Path(root)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    train_counts, test_counts = _counts(classes, per_class, test_per_class)
    colours = class_colours(classes)
    names = [_CIFAR_NAMES[c] if c < len(_CIFAR_NAMES) else f"fine_{c:02d}" for c in range(classes)]
    for split, counts, label in (("train", train_counts, "training batch 1 of 1"),
                                 ("test", test_counts, "testing batch 1 of 1")):
        _dump_python2(_cifar_batch(_images(colours, counts, 32, False, rng), label), folder / split)
    meta = {b"fine_label_names": [n.encode() for n in names],
            b"coarse_label_names": [f"superclass_{k}".encode() for k in range((classes + 4) // 5)]}
    _dump_python2(meta, folder / "meta")
    return Written("cifar100", root, names, train_counts, test_counts, colours)


# --------------------------------------------------------------------------------------
# Tiny-ImageNet
# --------------------------------------------------------------------------------------


def write_tinyimagenet(root, classes: int = 4, per_class: int = 6, test_per_class: int | None = None,
                       size=64, seed: int = 0, vary_size: bool = False) -> Written:
    """``<root>/tiny-imagenet-200/`` as the real zip has it; returns its root (that folder).

    ``wnids.txt`` (not sorted), ``words.txt`` (``<wnid>\\t<names>``, with wnids of other
    classes too), ``train/<wnid>/images/<wnid>_<i>.JPEG`` + ``train/<wnid>/<wnid>_boxes.txt``,
    ``val/images/val_<k>.JPEG`` + ``val/val_annotations.txt``, unlabelled ``test/images/``.
    Class names are the first synonym of ``words.txt``.
    """
    base = Path(root) / "tiny-imagenet-200"
    rng = np.random.default_rng(seed)
    train_counts, test_counts = _counts(classes, per_class, test_per_class)
    colours = class_colours(classes)
    wnids = _wnids(classes)
    words = [f"thing {c}, object {c}" for c in range(classes)]
    _write_text(base / "wnids.txt", wnids[::-1])
    _write_text(base / "words.txt", ["n00001740\tentity", *(f"{w}\t{t}" for w, t in zip(wnids, words)),
                                     "n99999999\tunused class"])
    for c, imgs in enumerate(_images(colours, train_counts, size, vary_size, rng)):
        folder = base / "train" / wnids[c]
        boxes = []
        for j, img in enumerate(imgs):
            name = f"{wnids[c]}_{j}.JPEG"
            save_image(folder / "images" / name, img, format="JPEG")
            boxes.append(f"{name}\t0\t0\t{img.shape[1] - 1}\t{img.shape[0] - 1}")
        _write_text(folder / f"{wnids[c]}_boxes.txt", boxes)
    val = [(c, img) for c, imgs in enumerate(_images(colours, test_counts, size, vary_size, rng)) for img in imgs]
    order = rng.permutation(len(val))  # val images are not grouped by class
    lines = []
    for k, i in enumerate(order):
        c, img = val[i]
        save_image(base / "val" / "images" / f"val_{k}.JPEG", img, format="JPEG")
        lines.append(f"val_{k}.JPEG\t{wnids[c]}\t0\t0\t{img.shape[1] - 1}\t{img.shape[0] - 1}")
    _write_text(base / "val" / "val_annotations.txt", lines)
    for k in range(2):
        save_image(base / "test" / "images" / f"test_{k}.JPEG", make_image((128, 128, 128), size, rng),
                   format="JPEG")
    return Written("tinyimagenet", base, [w.split(",")[0] for w in words], train_counts, test_counts, colours)


# --------------------------------------------------------------------------------------
# ImageNet, Places-365, ImageFolder
# --------------------------------------------------------------------------------------


def _write_class_folders(split_dir: Path, folders, images, ext: str, prefix=lambda c, j: f"{j:05d}") -> None:
    for c, imgs in enumerate(images):
        for j, img in enumerate(imgs):
            save_image(split_dir / folders[c] / f"{prefix(c, j)}{ext}", img)


def write_imagenet(root, classes: int = 4, per_class: int = 6, test_per_class: int | None = None,
                   size=48, seed: int = 0, vary_size: bool = False, meta: bool = True) -> Written:
    """torchvision ImageNet's prepared layout: ``meta.bin`` + ``train/<wnid>/*.JPEG``,
    ``val/<wnid>/ILSVRC2012_val_*.JPEG``.

    ``meta.bin`` is ``torch.save((wnid_to_classes, val_wnids))`` as torchvision writes it
    (``wnid -> tuple of synonyms``; the wnid of each val image in file order).
    ``meta=False``: the plain ImageFolder layout (class names are then the wnids).
    """
    import torch

    root = Path(root)
    rng = np.random.default_rng(seed)
    train_counts, test_counts = _counts(classes, per_class, test_per_class)
    colours = class_colours(classes)
    wnids = _wnids(classes)
    synonyms = [_IMAGENET_WORDS[c] if c < len(_IMAGENET_WORDS) else (f"class {c}",) for c in range(classes)]
    _write_class_folders(root / "train", wnids, _images(colours, train_counts, size, vary_size, rng), ".JPEG",
                         lambda c, j: f"{wnids[c]}_{j}")
    val_images = _images(colours, test_counts, size, vary_size, rng)
    offsets = np.cumsum([0, *test_counts])
    _write_class_folders(root / "val", wnids, val_images, ".JPEG",
                         lambda c, j: f"ILSVRC2012_val_{offsets[c] + j + 1:08d}")
    if meta:
        val_wnids = [wnids[c] for c in range(classes) for _ in range(test_counts[c])]
        tmp = root / "meta.bin.tmp"
        torch.save(({w: s for w, s in zip(wnids, synonyms)}, val_wnids), tmp)
        os.replace(tmp, root / "meta.bin")
    names = [s[0] for s in synonyms] if meta else wnids
    return Written("imagenet", root, names, train_counts, test_counts, colours)


def write_places365(root, classes: int = 4, per_class: int = 6, test_per_class: int | None = None,
                    size=48, seed: int = 0, vary_size: bool = False) -> Written:
    """torchvision Places365's small, standard layout.

    ``categories_places365.txt`` (``/a/airfield 0``), ``places365_train_standard.txt``
    (``/a/airfield/00000001.jpg 0``), ``places365_val.txt``
    (``Places365_val_00000001.jpg 3``), images in ``data_256_standard/a/airfield/`` and
    ``val_256/`` (real ones are 256 x 256; any ``size`` here).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    train_counts, test_counts = _counts(classes, per_class, test_per_class)
    colours = class_colours(classes)
    cats = [_PLACES_NAMES[c] if c < len(_PLACES_NAMES) else f"/z/zone_{c:03d}" for c in range(classes)]
    _write_text(root / "categories_places365.txt", [f"{name} {c}" for c, name in enumerate(cats)])
    train_lines = []
    for c, imgs in enumerate(_images(colours, train_counts, size, vary_size, rng)):
        for j, img in enumerate(imgs):
            rel = f"{cats[c]}/{j + 1:08d}.jpg"
            save_image(root / "data_256_standard" / rel.lstrip("/"), img)
            train_lines.append(f"{rel} {c}")
    _write_text(root / "places365_train_standard.txt", train_lines)
    val = [(c, img) for c, imgs in enumerate(_images(colours, test_counts, size, vary_size, rng)) for img in imgs]
    val_lines = []
    for k, i in enumerate(rng.permutation(len(val))):
        c, img = val[i]
        name = f"Places365_val_{k + 1:08d}.jpg"
        save_image(root / "val_256" / name, img)
        val_lines.append(f"{name} {c}")
    _write_text(root / "places365_val.txt", val_lines)
    return Written("places365", root, cats, train_counts, test_counts, colours)


def write_imagefolder(root, classes: int = 4, per_class: int = 6, test_per_class: int | None = None,
                      size=48, seed: int = 0, vary_size: bool = False, ext: str = ".png",
                      name: str = "imagefolder", test_dir: str = "val") -> Written:
    """``train/<class>/*`` + ``val/<class>/*`` (or ``test_dir``) with classes ``class_00``, ...

    ``name`` is the registry name recorded (``imagefolder``, ``imagenet`` or ``places365``
    all read this layout).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    train_counts, test_counts = _counts(classes, per_class, test_per_class)
    colours = class_colours(classes)
    folders = [f"class_{c:02d}" for c in range(classes)]
    _write_class_folders(root / "train", folders, _images(colours, train_counts, size, vary_size, rng), ext)
    _write_class_folders(root / test_dir, folders, _images(colours, test_counts, size, vary_size, rng), ext)
    return Written(name, root, folders, train_counts, test_counts, colours)
