"""Image transforms: training augmentation, evaluation preprocessing, normalisation statistics.

:func:`train_transform` and :func:`test_transform` return torchvision ``transforms.v2``
pipelines that accept PIL images, HWC arrays and uint8 CHW tensors alike, and end in
float32 ``(3, image_size, image_size)`` tensors whatever the input's size (small
images are resized and centre-cropped, large ones cropped as in the ImageNet
recipe). For ``synthetic`` they are a :class:`TensorAugment`, which augments a whole
batch of uint8 tensors at once.

>>> import numpy as np
>>> test_transform("cifar100")(np.zeros((40, 24, 3), np.uint8)).shape  # any size in, 32 x 32 out
torch.Size([3, 32, 32])
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from .registry import FOLDER_DATASETS, TORCHVISION_DATASETS, check_name
from .synthetic import make_synthetic, split_options, synthetic_defaults

__all__ = ["TensorAugment", "nominal_stats", "train_transform", "test_transform"]


class TensorAugment:
    """Random crop (zero padding) + horizontal flip + normalisation of uint8 CHW tensors.

    The same augmentation as torchvision's ``RandomCrop(size, padding)`` +
    ``RandomHorizontalFlip`` + ``ToDtype`` + ``Normalize``, with a batched path
    (:meth:`batch`) that draws an independent crop offset and flip per image.
    :class:`~backfill_utils.data.datasets.ArrayDataset` uses it through ``__getitems__``, so a
    DataLoader augments a whole batch in a few tensor operations instead of one
    transform pipeline per image (about 20x faster on a CPU). Random numbers
    come from the global torch generator. ``train=False``: normalisation only.
    ``size``: images of another size are first resized (bilinear, antialiased) to
    ``size`` x ``size``.
    """

    def __init__(self, padding: int, mean, std, train: bool = True, size: int | None = None):
        self.padding = int(padding)
        self.train = bool(train)
        self.size = None if size is None else int(size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __repr__(self) -> str:
        return f"TensorAugment(padding={self.padding}, train={self.train}, size={self.size})"

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return self.batch(img[None])[0]

    def batch(self, imgs: torch.Tensor) -> torch.Tensor:
        """Augment and normalise a uint8 ``(B, C, H, W)`` batch -> float32 ``(B, C, size, size)``."""
        if imgs.dtype != torch.uint8 or imgs.ndim != 4:
            raise ValueError(f"TensorAugment expects a uint8 (B, C, H, W) tensor, got {imgs.dtype} {tuple(imgs.shape)}")
        x = imgs
        if self.size is not None and tuple(x.shape[-2:]) != (self.size, self.size):
            x = torch.nn.functional.interpolate(x.float(), size=(self.size, self.size), mode="bilinear",
                                                align_corners=False, antialias=True)
            x = x.round().clamp(0, 255).to(torch.uint8)
        if self.train:
            b, c, h, w = x.shape
            p = self.padding
            if p > 0:
                padded = torch.nn.functional.pad(x, (p, p, p, p))
                oy = torch.randint(0, 2 * p + 1, (b,)).tolist()
                ox = torch.randint(0, 2 * p + 1, (b,)).tolist()
                x = torch.stack([padded[i, :, y:y + h, z:z + w] for i, (y, z) in enumerate(zip(oy, ox))])
            flip = torch.rand(b) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return (x.float() / 255.0 - self.mean) / self.std


# --------------------------------------------------------------------------------------
# Normalisation statistics
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _synthetic_stats(options: tuple) -> tuple[tuple, tuple]:
    images, _ = make_synthetic("train", **split_options("train", dict(options)))
    x = images.reshape(-1, 3).astype(np.float64) / 255.0
    return tuple(round(float(v), 4) for v in x.mean(0)), tuple(round(float(v), 4) for v in x.std(0))


def nominal_stats(key: str, options: dict) -> tuple[int | None, int, tuple, tuple]:
    """``(num_classes, image_size, mean, std)`` of registry dataset ``key`` without reading files.

    ``num_classes`` is the full dataset's (``None`` for ``imagefolder``); ``image_size``
    is the protocol's training resolution. For ``synthetic``, ``options`` are the
    generator's and mean/std are measured on its train split (memoised).
    """
    if key == "synthetic":
        mean, std = _synthetic_stats(tuple(sorted(options.items())))
        defaults = synthetic_defaults()
        return (options.get("num_classes", defaults["num_classes"]),
                options.get("image_size", defaults["image_size"]), mean, std)
    entry = TORCHVISION_DATASETS[key] if key in TORCHVISION_DATASETS else FOLDER_DATASETS[key]
    return entry.num_classes, entry.image_size, entry.mean, entry.std


def _norm_stats(name, mean, std, options):
    key = check_name(name)
    if key == "synthetic" and mean is not None and std is not None:  # no need to generate the data
        return key, options.get("image_size", synthetic_defaults()["image_size"]), tuple(mean), tuple(std)
    _, native, m, s = nominal_stats(key, options if key == "synthetic" else {})
    return key, native, tuple(mean if mean is not None else m), tuple(std if std is not None else s)


def _check_size(image_size):
    if not isinstance(image_size, (int, np.integer)) or isinstance(image_size, bool) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    return int(image_size)


# --------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------


def train_transform(name: str, image_size: int | None = None, *, mean=None, std=None, **options):
    """Training augmentation for dataset ``name`` at ``image_size`` (default: the dataset's).

    Small images (``image_size <= 64``): resize (shorter side) and centre-crop to
    ``image_size`` (a no-op for images of that size), random crop with
    ``image_size // 8`` padding, horizontal flip. Large: ``RandomResizedCrop`` + flip.
    Then float32 in [0, 1] and ``Normalize(mean, std)`` (the dataset's unless given).
    Works on PIL images, HWC arrays and uint8 CHW tensors (``transforms.v2``).
    For ``synthetic`` it is a :class:`TensorAugment` (same augmentation, batched on
    uint8 tensors through ``ArrayDataset.__getitems__``).
    """
    from torchvision.transforms import v2

    key, native, mean, std = _norm_stats(name, mean, std, options)
    size = _check_size(image_size if image_size is not None else native)
    if key == "synthetic":
        return TensorAugment(max(1, size // 8), mean, std, train=True, size=size)
    ops: list = [v2.ToImage()]
    if size <= 64:
        ops += [v2.Resize(size, antialias=True), v2.CenterCrop(size),
                v2.RandomCrop(size, padding=max(1, size // 8)), v2.RandomHorizontalFlip()]
    else:
        ops += [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(ops)


def test_transform(name: str, image_size: int | None = None, *, mean=None, std=None, **options):
    """Evaluation transform: small images resized (shorter side) and centre-cropped to
    ``image_size`` (a no-op for images of that size); large ones resized to
    ``image_size / 0.875`` and centre-cropped. Then float32 and ``Normalize``
    (a batched :class:`TensorAugment` without augmentation for ``synthetic``)."""
    from torchvision.transforms import v2

    key, native, mean, std = _norm_stats(name, mean, std, options)
    size = _check_size(image_size if image_size is not None else native)
    if key == "synthetic":
        return TensorAugment(0, mean, std, train=False, size=size)
    resize = size if size <= 64 else int(round(size / 0.875))
    ops: list = [v2.ToImage(), v2.Resize(resize, antialias=True), v2.CenterCrop(size),
                 v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(ops)
