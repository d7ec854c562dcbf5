"""The offline synthetic dataset: class-structured RGB images generated from a seed.

Each class is a seeded random *identity*: a shape (one of five families with
class-specific parameters), a texture (one of five families with a class-specific
frequency, orientation and sharpness) and an ordered pair of colours taken from a
small shared palette. Families and palette colours are shared across classes, so
features learnt on some classes transfer partially to the others, and no single cue
(colour, shape, texture) identifies a class. Each image draws nuisances: position,
scale, rotation, texture phase, colour jitter, a textured background with a
gradient, distractor objects that wear the identities of random classes (some in
front of the object, partially occluding it), and pixel noise.

How an image is made, in reading order:

1. :func:`~backfill_utils.data.synthetic_objects.class_identities` -- the identity of every
   class (from the seed only; shapes, textures and colours live in that module);
2. :func:`_draw_scenes` -- every per-image random draw of a split, made up front;
3. :func:`_render_chunk` -- a chunk of images: :func:`_paint_background`, the
   distractors behind (:func:`_distractor`), the object (:func:`_object_layer`), the
   distractors in front, then :func:`_to_uint8` (photometric jitter, noise, rounding);
4. :func:`make_synthetic` -- checks the arguments and memoises the result.

The same arguments give the same bytes (:data:`SYNTHETIC_VERSION` changes when they
do not); numpy is the only dependency.

>>> images, targets = make_synthetic("train", num_classes=3, per_class=2, image_size=16)
>>> images.shape, images.dtype.name, sorted(targets.tolist())
((6, 16, 16, 3), 'uint8', [0, 0, 1, 1, 2, 2])
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass
import functools
import inspect
import math
import os

import numpy as np

from .registry import DatasetError, canonical_split
from .synthetic_objects import (
    TEXTURES, class_identities, hsv_to_rgb, identity_colours, object_params, render_object, texture)

__all__ = ["SYNTHETIC_VERSION", "make_synthetic", "make_synthetic_draw", "synthetic_defaults", "split_options"]

SYNTHETIC_VERSION = 1
"""Version of the generator's output: part of cache keys; bumped only when the bytes change."""

_SPLIT_CODES = {"train": 1, "test": 2}
_DRAW_CODE = 1000  # split code of make_synthetic_draw's stream d: 1000 + d (never a split's own)
_DRAW: ContextVar[int | None] = ContextVar("synthetic_draw", default=None)
_CHUNK = 512  # images rendered at once; the noise stream is seeded per chunk
_THREADS = min(4, os.cpu_count() or 1)  # chunks rendered in parallel (same bytes for any value)
_DEFAULT_PER_CLASS = {"train": 100, "test": 50}


# ---- Random draws: every per-image number of a split, drawn up front in one fixed order (the
# ---- number of draws depends only on n and the distractors, never on knob values, so a knob
# ---- changes what it controls and nothing else)


def _draw_object(rng, n: int, k: dict) -> dict:
    """Pose and colour jitter of each image's object (coordinates: the image spans [-1, 1])."""
    pj = k["pos_jitter"]
    cx, cy = rng.uniform(-pj, pj, (2, n))
    ls = math.log1p(k["scale_jitter"])
    radius = k["object_size"] * np.exp(rng.uniform(-ls, ls, n))
    theta = np.deg2rad(rng.uniform(-k["rotation"], k["rotation"], n))
    phase = rng.uniform(0, 2 * np.pi, n)
    hue_shift = rng.normal(0, k["hue_jitter"], n)
    sat_scale = rng.uniform(1 - k["saturation_jitter"], 1 + k["saturation_jitter"], n)
    bright = rng.uniform(1 - k["brightness_jitter"], 1 + k["brightness_jitter"], n)
    contrast = rng.uniform(1 - k["contrast_jitter"], 1 + k["contrast_jitter"], n)
    return dict(cx=cx, cy=cy, radius=radius, theta=theta, phase=phase, hue_shift=hue_shift,
                sat_scale=sat_scale, bright=bright, contrast=contrast)


def _draw_background(rng, n: int) -> dict:
    """Two colours, a low-frequency texture mixing them, and a gradient direction."""
    colour_a = hsv_to_rgb(rng.uniform(0, 1, n), rng.uniform(0, 0.6, n), rng.uniform(0.15, 0.9, n))
    colour_b = hsv_to_rgb(rng.uniform(0, 1, n), rng.uniform(0, 0.6, n), rng.uniform(0.15, 0.9, n))
    texture = dict(
        tex=rng.integers(len(TEXTURES), size=n),
        freq=rng.uniform(0.5, 2.0, n),  # cycles per half image
        orient=rng.uniform(0, np.pi, n),
        phase=rng.uniform(0, 2 * np.pi, n),
        sharp=rng.uniform(0.5, 3.0, n),
        wave_amp=rng.uniform(0.5, 2.0, n),
    )
    grad_dir = rng.uniform(0, 2 * np.pi, n)
    return dict(colour_a=colour_a, colour_b=colour_b, texture=texture, grad_dir=grad_dir)


def _draw_clutter(rng, n: int, num_classes: int, k: dict) -> dict:
    """Distractor objects (``(clutter, n)`` arrays), each wearing a random class's identity."""
    nc = int(k["clutter"])
    cls = rng.integers(num_classes, size=(nc, n))
    x, y = rng.uniform(-0.9, 0.9, (2, nc, n))
    radius = k["clutter_size"] * k["object_size"] * rng.uniform(0.6, 1.0, (nc, n))
    theta = rng.uniform(0, 2 * np.pi, (nc, n))
    phase = rng.uniform(0, 2 * np.pi, (nc, n))
    front = rng.uniform(0, 1, (nc, n)) < k["occlusion"]
    hue = rng.normal(0, k["hue_jitter"], (nc, n))
    return dict(cls=cls, x=x, y=y, radius=radius, theta=theta, phase=phase, front=front, hue=hue)


def _draw_identity_jitter(rng, n: int, k: dict) -> dict:
    """Per-image perturbation of the class identity itself (overlapping classes)."""
    ij = k["identity_jitter"]
    return dict(
        freq=np.exp(rng.normal(0, ij, n)),
        orient=rng.normal(0, ij * np.pi / 2, n),
        shape=np.exp(rng.normal(0, ij, n)),
        sharp=np.exp(rng.normal(0, ij, n)),
    )


@dataclass(frozen=True)
class _Scenes:
    """Everything needed to render any chunk of a split: identities, draws and the pixel grid."""

    ident: dict
    targets: np.ndarray  # (n,) int64
    obj: dict  # _draw_object
    background: dict  # _draw_background
    clutter: dict  # _draw_clutter
    jitter: dict  # _draw_identity_jitter
    knobs: dict
    size: int  # S: images are S x S
    grid_u: np.ndarray  # (S, S) float32 x coordinate of each pixel centre (columns)
    grid_v: np.ndarray  # (S, S) float32 y coordinate (rows, pointing down)
    px: float  # the side of one pixel in grid units
    half: int  # distractor window half-width in pixels (also the canvas padding)
    seed: int
    code: int  # split code of the seed sequences


def _draw_scenes(split: str, seed: int, num_classes: int, per_class: int, image_size: int, k: dict,
                 draw: int | None = None) -> _Scenes:
    """Labels and every random draw of a split (of stream ``draw`` when given); class
    identities from the seed alone."""
    ident = class_identities(seed, num_classes, k["num_colours"])
    code = _SPLIT_CODES[split] if draw is None else _DRAW_CODE + draw
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(code,)))
    n = num_classes * per_class
    targets = rng.permutation(np.repeat(np.arange(num_classes, dtype=np.int64), per_class))
    obj = _draw_object(rng, n, k)
    background = _draw_background(rng, n)
    clutter = _draw_clutter(rng, n, num_classes, k)
    jitter = _draw_identity_jitter(rng, n, k)
    S = image_size
    coords = ((np.arange(S, dtype=np.float64) + 0.5) / S * 2 - 1).astype(np.float32)
    grid_v, grid_u = np.meshgrid(coords, coords, indexing="ij")  # v: rows (down), u: columns
    px = 2.0 / S
    # Distractors are small: each is rendered in a W x W window (W = 2 * half) around its
    # centre and composited into a canvas padded by half on every side (windows never fall
    # off it); outlines reach at most 1.45 object radii.
    half = int(math.ceil((1.5 * k["clutter_size"] * k["object_size"] + 2 * px) / px))
    return _Scenes(ident, targets, obj, background, clutter, jitter, k, S, grid_u, grid_v, px, half,
                   seed, code)


# ---- Rendering: images are float32 (m, 3, S, S) in [0, 1] until _to_uint8 ----


def _float32(d: dict) -> dict:
    """``d`` with its floating-point arrays as float32 (integer arrays unchanged)."""
    return {key: (v.astype(np.float32) if v.dtype.kind == "f" else v) for key, v in d.items()}


def _object_layer(sc: _Scenes, grid_u, grid_v, cls, hue, sat, x0, y0, r, th, ph, jitter=None):
    """Colour ``(m, 3, h, w)`` and mask ``(m, 1, h, w)`` of one object per image (channels first)."""
    f32 = np.float32
    p = _float32(object_params(sc.ident, cls, ph, jitter))
    mask, w = render_object(grid_u, grid_v, sc.px, p, x0.astype(f32), y0.astype(f32), r.astype(f32), th.astype(f32))
    c1, c2 = identity_colours(sc.ident, cls, hue, sat)
    c2 = c2.astype(f32)[:, :, None, None]
    col = (c1.astype(f32)[:, :, None, None] - c2) * w[:, None]
    col += c2
    return col, mask[:, None]


def _composite(img: np.ndarray, col: np.ndarray, mask: np.ndarray) -> None:
    """``img <- img * (1 - mask) + col * mask``, in place (``col`` is overwritten)."""
    col -= img
    col *= mask
    img += col


def _distractor(sc: _Scenes, j: int, idx: slice) -> tuple:
    """Distractor ``j`` of the images ``idx``, rendered in its window.

    Returns its colour and mask, the canvas rows ``(m, W)`` and columns ``(m, W)`` of
    its window, and whether it lies in front of the object.
    """
    cl = sc.clutter
    px, half = sc.px, sc.half
    win = np.arange(2 * half)
    x0, y0 = cl["x"][j, idx], cl["y"][j, idx]
    rows = np.rint((y0 + 1) / px - 0.5).astype(np.int64)[:, None] - half + win  # (m, W)
    cols = np.rint((x0 + 1) / px - 0.5).astype(np.int64)[:, None] - half + win
    gu = ((cols + 0.5) * px - 1).astype(np.float32)[:, None, :]
    gv = ((rows + 0.5) * px - 1).astype(np.float32)[:, :, None]
    col, mask = _object_layer(sc, gu, gv, cl["cls"][j, idx], cl["hue"][j, idx], 1.0, x0, y0,
                              cl["radius"][j, idx], cl["theta"][j, idx], cl["phase"][j, idx])
    return col, mask, rows + half, cols + half, cl["front"][j, idx]


def _composite_window(canvas: np.ndarray, distractor: tuple, in_front: bool) -> None:
    """Composite a :func:`_distractor` into the padded canvas, for the images where it lies
    behind (``in_front=False``) or in front of the object."""
    col, mask, rows, cols, front = distractor
    sel = np.flatnonzero(front == in_front)
    _, _, hp, wp = canvas.shape
    # flat indices of the (image, channel, row, column) window pixels: one gather, one scatter
    lin = ((sel[:, None, None, None] * 3 + np.arange(3)[None, :, None, None]) * hp
           + rows[sel][:, None, :, None]) * wp + cols[sel][:, None, None, :]
    flat = canvas.reshape(-1)
    patch = flat[lin]
    col = col[sel]
    col -= patch
    col *= mask[sel]
    patch += col
    flat[lin] = patch


def _paint_background(sc: _Scenes, img: np.ndarray, idx: slice) -> None:
    """Two colours mixed by a low-frequency texture, times a gradient; written into ``img``."""
    f32 = np.float32
    bg, S, k = sc.background, sc.size, sc.knobs
    m = img.shape[0]
    bp = _float32({key: val[idx] for key, val in bg["texture"].items()})
    wb = texture(np.broadcast_to(sc.grid_u, (m, S, S)), np.broadcast_to(sc.grid_v, (m, S, S)), bp)
    wb = ((0.5 * k["background"]) * (wb + 1))[:, None]
    a = bg["colour_a"][idx, :, None, None].astype(f32)
    np.multiply(bg["colour_b"][idx, :, None, None].astype(f32) - a, wb, out=img)
    img += a
    g = np.cos(bg["grad_dir"][idx]).astype(f32)[:, None, None] * sc.grid_u
    g += np.sin(bg["grad_dir"][idx]).astype(f32)[:, None, None] * sc.grid_v
    g *= f32(0.3 * k["background"])
    g += 1
    img *= g[:, None]


def _to_uint8(sc: _Scenes, img: np.ndarray, idx: slice, ci: int) -> np.ndarray:
    """Global photometric jitter (contrast about the image mean, brightness), sensor noise,
    then rounding: ``clip(255 * (b * (c * img + (1 - c) * mean) + noise))`` as uint8 HWC."""
    f32 = np.float32
    img = np.ascontiguousarray(img)
    mean = img.mean(axis=(1, 2, 3), keepdims=True, dtype=np.float64)
    c_ = sc.obj["contrast"][idx, None, None, None]
    b_ = sc.obj["bright"][idx, None, None, None]
    img *= (255 * b_ * c_).astype(f32)
    img += (255 * b_ * (1 - c_) * mean + 0.5).astype(f32)  # +0.5: truncation rounds
    if sc.knobs["noise"] > 0:
        nrng = np.random.default_rng(np.random.SeedSequence(sc.seed, spawn_key=(sc.code, 1, ci)))
        # Irwin-Hall: the sum of 4 uniform bytes is near-Gaussian (mean 510, std 147.8)
        # and ~5x cheaper to draw than standard_normal.
        u = np.frombuffer(nrng.bytes(4 * img.size), dtype=np.uint8).reshape(4, *img.shape)
        noise = u.sum(axis=0, dtype=np.int16).astype(f32)
        noise -= 510
        noise *= f32(255 * sc.knobs["noise"] / 147.80)
        img += noise
    np.clip(img, 0.0, 255.49, out=img)
    return img.astype(np.uint8).transpose(0, 2, 3, 1)


def _render_chunk(sc: _Scenes, images: np.ndarray, ci: int) -> None:
    """Render images ``ci * _CHUNK ...`` into ``images`` (uint8 ``(n, S, S, 3)``)."""
    n, S, half = len(sc.targets), sc.size, sc.half
    lo, hi = ci * _CHUNK, min((ci + 1) * _CHUNK, n)
    idx = slice(lo, hi)
    canvas = np.zeros((hi - lo, 3, S + 2 * half, S + 2 * half), dtype=np.float32)
    img = canvas[:, :, half:half + S, half:half + S]  # a view: in-place ops on img write the canvas
    _paint_background(sc, img, idx)
    # distractors behind, the object, distractors in front (partial occlusion)
    distractors = [_distractor(sc, j, idx) for j in range(sc.clutter["cls"].shape[0])]
    for d in distractors:
        _composite_window(canvas, d, False)
    o = sc.obj
    col, mask = _object_layer(sc, sc.grid_u, sc.grid_v, sc.targets[idx], o["hue_shift"][idx],
                              o["sat_scale"][idx], o["cx"][idx], o["cy"][idx], o["radius"][idx],
                              o["theta"][idx], o["phase"][idx], {key: v[idx] for key, v in sc.jitter.items()})
    _composite(img, col, mask)
    for d in distractors:
        _composite_window(canvas, d, True)
    images[idx] = _to_uint8(sc, img, idx, ci)


def _generate(split, seed, num_classes, per_class, image_size, k, draw=None) -> tuple[np.ndarray, np.ndarray]:
    """``(images, targets)`` of a split, freshly rendered (``k``: the knobs, checked)."""
    sc = _draw_scenes(split, seed, num_classes, per_class, image_size, k, draw)
    n = len(sc.targets)
    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    # Chunks are independent (every random draw is made up front or seeded per chunk), so
    # threads (numpy releases the GIL) give the same bytes in any schedule.
    n_chunks = -(-n // _CHUNK)
    workers = max(1, min(n_chunks, _THREADS))
    if workers == 1:
        for ci in range(n_chunks):
            _render_chunk(sc, images, ci)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(functools.partial(_render_chunk, sc, images), range(n_chunks)))
    return images, sc.targets


# ---- The public generator ----

_SIZE_MINIMA = dict(num_classes=1, per_class=1, image_size=8, clutter=0, num_colours=2)
_UNIT_KNOBS = ("saturation_jitter", "brightness_jitter", "contrast_jitter", "occlusion")


def _checked_arguments(sizes: dict, knobs: dict) -> dict:
    """The knobs as floats (``clutter``, ``num_colours`` as ints) after checking every value."""
    for name, lo in _SIZE_MINIMA.items():
        val = sizes[name]
        if not isinstance(val, (int, np.integer)) or isinstance(val, bool) or val < lo:
            raise ValueError(f"make_synthetic: {name} must be an integer >= {lo}, got {val!r}")
    for name, val in knobs.items():
        if not isinstance(val, (int, float, np.integer, np.floating)) or not math.isfinite(val) or val < 0:
            raise ValueError(f"make_synthetic: {name} must be a finite number >= 0, got {val!r}")
    for name in _UNIT_KNOBS:
        if knobs[name] > 1:
            raise ValueError(f"make_synthetic: {name} must be in [0, 1], got {knobs[name]!r}")
    if knobs["object_size"] == 0:
        raise ValueError("make_synthetic: object_size must be > 0")
    checked = {key: float(val) for key, val in knobs.items()}
    checked.update(clutter=int(sizes["clutter"]), num_colours=int(sizes["num_colours"]))
    return checked


def make_synthetic(
    split: str = "train", *, seed: int = 0, num_classes: int = 100, per_class: int | None = None,
    image_size: int = 32, object_size: float = 0.5, pos_jitter: float = 0.3, scale_jitter: float = 0.3,
    rotation: float = 45.0, hue_jitter: float = 0.03, saturation_jitter: float = 0.3,
    brightness_jitter: float = 0.3, contrast_jitter: float = 0.3, background: float = 0.6,
    clutter: int = 2, clutter_size: float = 0.6, occlusion: float = 0.3, noise: float = 0.05,
    num_colours: int = 12, identity_jitter: float = 0.1,
) -> tuple[np.ndarray, np.ndarray]:
    """Generate the synthetic retrieval dataset: ``(images, targets)``.

    ``images`` is ``(N, image_size, image_size, 3)`` uint8 (HWC, like CIFAR's ``.data``),
    ``targets`` is ``(N,)`` int64 with ``per_class`` images of each class in a seeded
    random order. Both arrays are read-only and memoised in-process: repeated calls
    with the same arguments return the same objects for free. The same arguments give
    bit-identical arrays on every run (with one numpy build on one kind of CPU; float32
    sin/cos may differ in the last bit across SIMD code paths, which can flip a rare
    pixel by one grey level elsewhere).

    Class identities (shape, texture, colours) depend only on ``seed`` (and
    ``num_colours``); the train and test splits share them and differ in every
    per-image nuisance draw. Class ``c``'s identity does not depend on ``num_classes``.

    Size arguments:
        split: ``"train"`` or ``"test"`` (``"val"`` = ``"test"``).
        seed: seeds identities and nuisances.
        num_classes: number of classes (default 100).
        per_class: images per class (default 100 for train, 50 for test).
        image_size: side in pixels (default 32).

    Difficulty knobs (coordinates: the image spans [-1, 1]); with the defaults, the default
    profile's ResNet-18 (width 16, 20 epochs) reaches 19.4 mAP on all 100 test classes when
    trained on the first 50 classes and 37.8 when trained on all 100 (measured; the same
    regime as CIFAR-100 in FCT: 16.5 / 36.3 with ResNet-50):
        object_size=0.5: mean object radius (half the image's half-width).
        pos_jitter=0.3: object centre uniform in [-pos_jitter, pos_jitter]^2.
        scale_jitter=0.3: radius scaled by a log-uniform factor in [1/1.3, 1.3].
        rotation=45.0: object (outline and texture) rotated uniformly in +-rotation degrees.
        hue_jitter=0.03: std of the per-image hue shift of the class colours (turns).
        saturation_jitter=0.3: class colour saturation scaled in [1-s, 1+s].
        brightness_jitter=0.3, contrast_jitter=0.3: global factors in [1-b, 1+b].
        background=0.6: strength of the textured, graded background (0 = flat colour).
        clutter=2: distractor objects per image, each wearing a random class's identity.
        clutter_size=0.6: distractor radius relative to ``object_size`` (times U[0.6, 1]).
        occlusion=0.3: probability that a distractor lies in front of the object.
        noise=0.05: std of additive, near-Gaussian pixel noise (intensities in [0, 1]).
        num_colours=12: palette size; fewer colours = more colour sharing across classes.
        identity_jitter=0.1: per-image deviation of the class identity: texture frequency,
            sharpness and outline parameters scaled by exp(N(0, j)), texture orientation
            shifted by N(0, j * 90 degrees); larger values make classes overlap.
    """
    split = canonical_split(split)
    per_class = _DEFAULT_PER_CLASS[split] if per_class is None else per_class
    knobs = _checked_arguments(
        dict(num_classes=num_classes, per_class=per_class, image_size=image_size, clutter=clutter,
             num_colours=num_colours),
        dict(object_size=object_size, pos_jitter=pos_jitter, scale_jitter=scale_jitter, rotation=rotation,
             hue_jitter=hue_jitter, saturation_jitter=saturation_jitter, brightness_jitter=brightness_jitter,
             contrast_jitter=contrast_jitter, background=background, clutter_size=clutter_size,
             occlusion=occlusion, noise=noise, identity_jitter=identity_jitter))
    return _make_synthetic_cached(split, int(seed), int(num_classes), int(per_class),
                                  int(image_size), tuple(sorted(knobs.items())), _DRAW.get())


def make_synthetic_draw(draw: int, split: str = "test", **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """More images of the same classes: :func:`make_synthetic` ``(split, **kwargs)`` with every
    per-image draw (order, nuisances, noise) from stream ``draw`` (an integer >= 0) instead of
    the split's own. Identities depend on ``seed`` alone, so the classes are the split's;
    each stream gives new images, the same for the same arguments (memoised like it).
    """
    if isinstance(draw, bool) or not isinstance(draw, (int, np.integer)) or draw < 0:
        raise ValueError(f"make_synthetic_draw: draw must be an integer >= 0, got {draw!r}")
    token = _DRAW.set(int(draw))
    try:
        return make_synthetic(split, **kwargs)
    finally:
        _DRAW.reset(token)


@functools.lru_cache(maxsize=8)
def _make_synthetic_cached(split, seed, num_classes, per_class, image_size, knobs, draw=None):
    images, targets = _generate(split, seed, num_classes, per_class, image_size, dict(knobs), draw)
    images.setflags(write=False)
    targets.setflags(write=False)
    return images, targets


def synthetic_defaults() -> dict:
    """The default keyword arguments of :func:`make_synthetic` (sizes and knobs).

    >>> d = synthetic_defaults()
    >>> d["num_classes"], d["image_size"], d["per_class"]
    (100, 32, None)
    """
    sig = inspect.signature(make_synthetic)
    return {n: p.default for n, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY}


def split_options(split: str, options: dict) -> dict:
    """Map a profile's ``train_per_class`` / ``test_per_class`` to ``per_class`` of ``split``.

    >>> split_options("test", {"num_classes": 4, "train_per_class": 12, "test_per_class": 4})
    {'num_classes': 4, 'per_class': 4}
    """
    options = dict(options)
    sizes = {s: options.pop(f"{s}_per_class", None) for s in ("train", "test")}
    known = [k for k in inspect.signature(make_synthetic).parameters if k != "split"]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise DatasetError(f"synthetic: unknown dataset_options key(s) {unknown}; known: "
                           f"{sorted(known + ['train_per_class', 'test_per_class'])}")
    if sizes[split] is not None:
        if options.get("per_class") is not None:
            raise DatasetError(f"synthetic: pass either per_class or {split}_per_class, not both")
        options["per_class"] = sizes[split]
    return options
