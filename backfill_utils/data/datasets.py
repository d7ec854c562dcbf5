"""Dataset classes: in-memory arrays, image files, torchvision wrappers; raw images for plots.

Every dataset the registry returns is one of these (or a
:class:`~backfill_utils.data.splits.ClassSubset` of one): items are
``(transform(image), label)``, ``.targets`` is an int64 array and ``.classes`` a list
of names. They live in the package so that spawned DataLoader workers can unpickle
them.

Images read from files are decoded by :func:`load_rgb`: every PIL mode (greyscale
``L``, ``LA``, palette ``P``, ``CMYK``, ...) becomes RGB, and a file that cannot be
decoded (truncated, not an image) raises :class:`~backfill_utils.data.registry.DatasetError`
naming the file.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .registry import DatasetError

__all__ = ["load_rgb", "to_rgb_array", "raw_image", "ArrayDataset", "SyntheticDataset", "FolderDataset",
           "TorchvisionDataset", "sample_grid", "tile_grid"]

# What PIL raises on a file it cannot decode: truncated data (OSError), not an image
# (UnidentifiedImageError, an OSError), a broken PNG chunk (SyntaxError), bad header
# values (ValueError), a file that ends early (EOFError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError)


def _unreadable(path: str, err: BaseException) -> DatasetError:
    if isinstance(err, FileNotFoundError):
        return DatasetError(f"image {path} does not exist (it is listed by the dataset's folders or file list): "
                            "restore it (extract the dataset's archive again) or remove its entry")
    return DatasetError(f"cannot read image {path}: {type(err).__name__}: {err}. The file is truncated, "
                        "corrupt or not an image: replace it with a good copy (extract the dataset's "
                        "archive again) or delete it (and its line in the dataset's file list, if any)")


def load_rgb(path: str | os.PathLike):
    """The image file ``path`` as an RGB PIL image (fully decoded).

    Any mode is converted (``L``/``LA``/``P``/``CMYK`` -> ``RGB``; alpha is dropped;
    16-bit grey is scaled to 8 bits rather than clipped).
    Raises :class:`DatasetError` naming the file when it cannot be decoded.
    """
    from PIL import Image

    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            if img.mode.startswith("I;16"):  # 16-bit grey: PIL would clip it to 8 bits (white)
                img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257).round().astype(np.uint8))
            return img.convert("RGB")  # convert() decodes the pixels inside the with-block
    except (*_DECODE_ERRORS, Image.DecompressionBombError) as err:
        raise _unreadable(str(path), err) from None


def to_rgb_array(img: Any) -> np.ndarray:
    """A raw image (PIL, HWC array, CHW uint8 tensor) as an HWC uint8 RGB array."""
    from PIL import Image

    if isinstance(img, Image.Image):
        return np.asarray(img.convert("RGB"))
    if isinstance(img, torch.Tensor):
        img = img.detach().cpu()
        if img.dtype != torch.uint8:
            img = img.float()
            img = ((img - img.min()) / (img.max() - img.min() + 1e-12) * 255).round().to(torch.uint8)
        arr = img.numpy()
        if arr.ndim == 3 and arr.shape[0] in (1, 3):
            arr = arr.transpose(1, 2, 0)
    else:
        arr = np.asarray(img)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return np.ascontiguousarray(arr.astype(np.uint8, copy=False))


def raw_image(dataset: Dataset, i: int) -> np.ndarray:
    """Item ``i`` of ``dataset`` before its transform, as an HWC uint8 RGB array."""
    if hasattr(dataset, "raw_image"):
        return dataset.raw_image(i)
    return to_rgb_array(dataset[i][0])


class ArrayDataset(Dataset):
    """In-memory images as a uint8 ``(N, 3, H, W)`` tensor; items are ``(image, label)``.

    ``image`` is ``transform(uint8 CHW tensor)`` (the raw tensor when ``transform`` is
    None), so ``transforms.v2`` pipelines run on tensors with no PIL round trip; a
    transform with a ``batch`` method (:class:`~backfill_utils.data.transforms.TensorAugment`)
    is applied to a whole DataLoader batch at once. ``images`` is ``(N, H, W, 3)`` uint8
    (kept as ``.data``, like CIFAR's).
    """

    def __init__(self, images: np.ndarray, targets: np.ndarray, transform: Callable | None = None,
                 classes: Sequence[str] | None = None):
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be (N, H, W, 3) uint8, got {images.shape} {images.dtype}")
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self.data = images  # HWC, read-only when it comes from make_synthetic
        self.images = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)).copy())
        self.targets = np.asarray(targets, dtype=np.int64)
        self.transform = transform
        n_cls = int(self.targets.max()) + 1 if len(self.targets) else 0
        self.classes = list(classes) if classes is not None else [f"class_{c:03d}" for c in range(n_cls)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        img = self.images[i]
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[i])

    def __getitems__(self, indices):
        """Batched fetch used by DataLoader: one augmentation call for the whole batch."""
        if not hasattr(self.transform, "batch"):
            return [self[i] for i in indices]
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        x = self.transform.batch(self.images[idx])
        return list(zip(x, self.targets[idx.numpy()].tolist()))

    def raw_image(self, i: int) -> np.ndarray:
        return np.asarray(self.data[i])


class SyntheticDataset(ArrayDataset):
    """The synthetic dataset (:func:`~backfill_utils.data.synthetic.make_synthetic`) in memory."""


class FolderDataset(Dataset):
    """Images listed as ``(path, label)`` pairs, loaded as RGB PIL images by :func:`load_rgb`.

    ``classes`` are the class names; ``folders`` the class folders on disk when they
    differ (ImageNet wnids named from ``meta.bin``), else the same list.
    """

    def __init__(self, samples: list[tuple[str, int]], classes: list[str], transform: Callable | None = None,
                 root: str | os.PathLike | None = None, folders: Sequence[str] | None = None):
        self.samples = list(samples)
        self.classes = list(classes)
        self.folders = list(folders) if folders is not None else list(self.classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.targets = np.asarray([t for _, t in self.samples], dtype=np.int64)
        self.transform = transform
        self.root = None if root is None else str(root)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        img = load_rgb(self.samples[i][0])
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[i])

    def raw_image(self, i: int) -> np.ndarray:
        return to_rgb_array(load_rgb(self.samples[i][0]))


class TorchvisionDataset(Dataset):
    """A torchvision classification dataset with int64 ``.targets`` and RGB images.

    A file that cannot be decoded raises :class:`DatasetError` naming it (when the
    torchvision dataset lists its files in ``samples`` / ``imgs`` / ``_samples``).
    """

    def __init__(self, base: Dataset, targets: np.ndarray, classes: Sequence[str] | None,
                 transform: Callable | None = None):
        self.base = base
        self.targets = np.asarray(targets, dtype=np.int64)
        n_cls = int(self.targets.max()) + 1 if len(self.targets) else 0
        self.classes = list(classes) if classes is not None else [str(c) for c in range(n_cls)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def _file(self, i: int) -> str:
        for attr in ("samples", "imgs", "_samples", "_image_files"):
            files = getattr(self.base, attr, None)
            if files is not None:
                entry = files[i]
                return str(entry[0] if isinstance(entry, tuple) else entry)
        return f"item {i} of {type(self.base).__name__}"

    def _raw(self, i: int):
        from PIL import Image

        try:
            img = self.base[i][0]
        except (*_DECODE_ERRORS, Image.DecompressionBombError) as err:
            raise _unreadable(self._file(i), err) from None
        if hasattr(img, "mode") and img.mode != "RGB":
            img = img.convert("RGB")
        return img

    def __getitem__(self, i: int):
        img = self._raw(i)
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[i])

    def raw_image(self, i: int) -> np.ndarray:
        return to_rgb_array(self._raw(i))


# --------------------------------------------------------------------------------------
# Raw images arranged for plotting (arrays only; no matplotlib here)
# --------------------------------------------------------------------------------------


def sample_grid(dataset: Dataset, classes: Sequence[int], per_class: int, seed: int = 0, *,
                size: int | None = None) -> np.ndarray:
    """Raw images for a class-by-example grid: ``(len(classes), per_class, H, W, 3)`` uint8.

    Row ``r`` holds ``per_class`` images of class ``classes[r]``, drawn without
    replacement with ``seed`` (untransformed where the dataset allows). Images are
    resized to ``size`` x ``size`` if given, or if their sizes differ (to the first
    image's size). Plot with ``plt.imshow(tile_grid(grid))``.
    """
    from PIL import Image

    targets = np.asarray(dataset.targets, dtype=np.int64)
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    rng = np.random.default_rng(seed)
    rows = []
    for c in classes:
        idx = np.flatnonzero(targets == c)
        if len(idx) < per_class:
            raise ValueError(f"class {c} has {len(idx)} images, fewer than per_class={per_class}")
        chosen = np.sort(rng.choice(idx, size=per_class, replace=False))
        rows.append([raw_image(dataset, int(i)) for i in chosen])
    target = (size, size) if size is not None else rows[0][0].shape[:2]
    out = np.empty((len(rows), per_class, target[0], target[1], 3), dtype=np.uint8)
    for r, row in enumerate(rows):
        for j, img in enumerate(row):
            if img.shape[:2] != tuple(target):
                img = np.asarray(Image.fromarray(img).resize((target[1], target[0]), Image.BILINEAR))
            out[r, j] = img
    return out


def tile_grid(grid: np.ndarray, pad: int = 1, pad_value: int = 255) -> np.ndarray:
    """``(rows, cols, H, W, 3)`` -> one ``(rows*(H+pad)-pad, cols*(W+pad)-pad, 3)`` image.

    >>> tile_grid(np.zeros((2, 3, 4, 4, 3), np.uint8), pad=1).shape
    (9, 14, 3)
    """
    rows, cols, h, w, c = grid.shape
    out = np.full((rows * (h + pad) - pad, cols * (w + pad) - pad, c), pad_value, dtype=grid.dtype)
    for r in range(rows):
        for j in range(cols):
            out[r * (h + pad): r * (h + pad) + h, j * (w + pad): j * (w + pad) + w] = grid[r, j]
    return out
