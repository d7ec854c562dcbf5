"""Datasets: the offline synthetic set, a registry of real datasets, transforms, class splits.

Everything a notebook or a DataLoader worker needs to get images is defined here
(spawned workers cannot see classes defined in a notebook).

* :func:`make_synthetic` -- the embedded offline default dataset: class-structured
  RGB images generated from a seed in seconds (numpy, vectorised, memoised).
* :func:`get_dataset` / :func:`dataset_info` -- one registry for ``synthetic``,
  ``cifar100``, ``tinyimagenet``, ``imagenet``, ``places365``, ``imagefolder`` and
  torchvision's other classification sets (see :data:`TORCHVISION_DATASETS`).
  Every returned dataset has ``.targets`` (``np.ndarray`` of int64) and ``.classes``.
* :func:`train_transform` / :func:`test_transform` -- torchvision ``transforms.v2``
  pipelines that accept PIL images, HWC arrays and uint8 CHW tensors alike.
* :func:`class_splits`, :func:`subset_by_classes`, :func:`describe_splits` -- the
  class protocol of PAPER.md section 4 (extended-class and open-class settings).
* :func:`sample_grid`, :func:`tile_grid` -- raw images arranged for plotting.

Split names: ``"train"`` and ``"test"``; ``"val"`` is accepted as an alias of
``"test"`` (for ImageNet, Tiny-ImageNet and Places-365 the labelled validation set
is the test set of the retrieval protocol).
"""
from __future__ import annotations

import functools
import inspect
from concurrent.futures import ThreadPoolExecutor
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from .config import data_root

__all__ = [
    "DatasetError",
    "make_synthetic",
    "synthetic_defaults",
    "SyntheticDataset",
    "TensorAugment",
    "FolderDataset",
    "TorchvisionDataset",
    "ClassSubset",
    "available_datasets",
    "TORCHVISION_DATASETS",
    "get_dataset",
    "dataset_info",
    "train_transform",
    "test_transform",
    "class_splits",
    "subset_by_classes",
    "describe_splits",
    "sample_grid",
    "tile_grid",
]


class DatasetError(ValueError):
    """A dataset is unknown, missing or malformed; the message says where and what to do."""


_SPLIT_ALIASES = {"train": "train", "test": "test", "val": "test"}


def _canonical_split(split: str) -> str:
    try:
        return _SPLIT_ALIASES[split]
    except (KeyError, TypeError):
        raise DatasetError(
            f"unknown split {split!r}: use 'train' or 'test' ('val' is an alias of 'test')"
        ) from None


# --------------------------------------------------------------------------------------
# The synthetic dataset
# --------------------------------------------------------------------------------------
#
# Each class is a seeded random *identity*: a shape (one of five families with
# class-specific parameters), a texture (one of five families with a class-specific
# frequency, orientation and sharpness) and an ordered pair of colours taken from a
# small shared palette. Families and palette colours are shared across classes, so
# features learnt on some classes transfer partially to the others, and no single cue
# (colour, shape, texture) identifies a class. Each image draws nuisances: position,
# scale, rotation, texture phase, colour jitter, a textured background with a
# gradient, distractor objects that wear the identities of random classes (some in
# front of the object, partially occluding it), and pixel noise.

# Bump when a change of the generator changes its output (tests/test_versions.py holds a
# golden hash of a small sample and fails until the bump and the new hash are recorded):
# the training specs, and so every cached model and artifact, carry this version.
SYNTHETIC_VERSION = 1
_SHAPES = ("ellipse", "polygon", "star", "ring", "blob")
_TEXTURES = ("stripes", "checker", "rings", "dots", "waves")
_SPLIT_CODES = {"train": 1, "test": 2}
_CHUNK = 512  # images rendered at once; the noise stream is seeded per chunk
_THREADS = min(4, os.cpu_count() or 1)  # chunks rendered in parallel (same bytes for any value)
_DEFAULT_PER_CLASS = {"train": 100, "test": 50}


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB; ``h`` in turns (any real), ``s``, ``v`` in [0, 1]; -> (..., 3)."""
    h = np.mod(h, 1.0) * 6.0
    i = np.floor(h)
    f = h - i
    p = v * (1 - s)
    q = v * (1 - s * f)
    t = v * (1 - s * (1 - f))
    i = i.astype(np.int64) % 6
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    return np.stack([r, g, b], axis=-1)


@functools.lru_cache(maxsize=8)
def _class_identities(seed: int, num_classes: int, num_colours: int) -> dict:
    """Per-class identity parameters; class ``c`` depends only on ``(seed, c, num_colours)``."""
    prng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0, 0)))
    hue0 = prng.uniform(0, 1)
    palette = np.stack(
        [
            (np.arange(num_colours) / num_colours + hue0) % 1.0,  # evenly spread hues
            prng.uniform(0.45, 1.0, num_colours),  # saturation
            prng.uniform(0.45, 1.0, num_colours),  # value
        ],
        axis=1,
    )
    rows = []
    for c in range(num_classes):
        r = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0, 1, c)))
        col = r.choice(num_colours, size=2, replace=False)
        rows.append(
            dict(
                shape=r.integers(len(_SHAPES)),
                k=r.integers(3, 7),  # polygon sides / star lobes
                aspect=r.uniform(0.5, 1.0),  # ellipse / ring aspect ratio
                amp=r.uniform(0.2, 0.45),  # star lobe amplitude
                inner=r.uniform(0.35, 0.6),  # ring hole, fraction of the outline
                harm_a=r.uniform(0.0, 0.15, 3),  # blob outline: harmonics 2..4 (radius <= 1.45)
                harm_b=r.uniform(0.0, 2 * np.pi, 3),
                shape_rot=r.uniform(0.0, 2 * np.pi),
                tex=r.integers(len(_TEXTURES)),
                freq=r.uniform(0.7, 2.0),  # texture cycles per object radius
                orient=r.uniform(0.0, np.pi),
                sharp=r.uniform(0.5, 3.0),  # 0.5: smooth gradient, 3: near-binary
                wave_amp=r.uniform(0.5, 2.0),
                col1=col[0],
                col2=col[1],
            )
        )
    ident = {k: np.asarray([row[k] for row in rows]) for k in rows[0]}
    ident["palette"] = palette
    return ident


def _radius_fn(phi: np.ndarray, p: dict) -> np.ndarray:
    """Outline radius (in object radii) at angle ``phi``; ``p`` holds per-object params."""
    out = np.empty_like(phi)
    shape = p["shape"]
    for s, name in enumerate(_SHAPES):
        m = shape == s
        if not m.any():
            continue
        ph = phi[m] - p["shape_rot"][m, None, None]
        if name in ("ellipse", "ring"):
            a = p["aspect"][m, None, None]
            r = 1.0 / np.sqrt(np.cos(ph) ** 2 + (np.sin(ph) / a) ** 2) / np.sqrt(a)
        elif name == "polygon":
            k = p["k"][m, None, None]
            r = np.cos(np.pi / k) / np.cos(np.mod(ph, 2 * np.pi / k) - np.pi / k)
            r = r / np.sqrt(np.cos(np.pi / k))
        elif name == "star":
            k, a = p["k"][m, None, None], p["amp"][m, None, None]
            r = (1 + a * np.cos(k * ph)) / (1 + 0.25 * a)
        else:  # blob: low-order Fourier outline
            ha, hb = p["harm_a"][m], p["harm_b"][m]
            r = 1.0 + sum(
                ha[:, j, None, None] * np.cos((j + 2) * ph + hb[:, j, None, None]) for j in range(3)
            )
        out[m] = r
    return out


def _texture(x: np.ndarray, y: np.ndarray, p: dict) -> np.ndarray:
    """Texture value in [-1, 1] at object-local coordinates; ``p`` holds per-object params."""
    out = np.empty_like(x)
    tex = p["tex"]
    for t, name in enumerate(_TEXTURES):
        m = tex == t
        if not m.any():
            continue
        xm, ym = x[m], y[m]
        th = p["orient"][m, None, None]
        ph = p["phase"][m, None, None]
        w = 2 * np.pi * p["freq"][m, None, None]
        ca, sa = np.cos(th), np.sin(th)
        u = xm * ca + ym * sa
        v = ym * ca - xm * sa
        if name == "stripes":
            val = np.sin(w * u + ph)
        elif name == "checker":
            val = 1.6 * np.sin(w * u + ph) * np.sin(w * v + 0.7 * ph)
        elif name == "rings":
            val = np.sin(w * np.sqrt(u * u + v * v) + ph)
        elif name == "dots":  # hexagonal lattice of blobs
            acc = np.cos(w * u + ph)
            for a in (2 * np.pi / 3, 4 * np.pi / 3):
                acc = acc + np.cos(w * (u * np.cos(a) + v * np.sin(a)) + ph)
            val = (acc - 0.75) / 2.25
        else:  # waves
            val = np.sin(w * u + p["wave_amp"][m, None, None] * np.sin(0.8 * w * v) + ph)
        out[m] = val
    sharp = p["sharp"][:, None, None]
    return np.tanh(sharp * out) / np.tanh(sharp)


def _render(grid_u, grid_v, px, p, cx, cy, radius, theta):
    """Mask in [0, 1] and texture weight in [0, 1], both (n, H, W), for a batch of objects.

    ``px`` is the size of one pixel in grid units (soft 1-pixel edges).
    """
    cx, cy = cx[:, None, None], cy[:, None, None]
    radius, theta = radius[:, None, None], theta[:, None, None]
    x = (grid_u - cx) / radius
    y = (grid_v - cy) / radius
    c, s = np.cos(theta), np.sin(theta)
    xr = c * x + s * y
    yr = c * y - s * x
    rho = np.sqrt(xr * xr + yr * yr)
    phi = np.arctan2(yr, xr)
    rb = _radius_fn(phi, p)
    mask = np.clip(0.5 + (rb - rho) * radius / px, 0.0, 1.0)
    ring = p["shape"] == _SHAPES.index("ring")
    if ring.any():
        hole = np.clip(0.5 + (rho[ring] - p["inner"][ring, None, None] * rb[ring]) * radius[ring] / px, 0, 1)
        mask[ring] *= hole
    weight = 0.5 + 0.5 * _texture(xr, yr, p)
    return mask, weight


def _identity_colours(ident: dict, cls: np.ndarray, hue_shift, sat_scale) -> tuple[np.ndarray, np.ndarray]:
    pal = ident["palette"]
    out = []
    for key in ("col1", "col2"):
        hsv = pal[ident[key][cls]]
        out.append(
            _hsv_to_rgb(hsv[:, 0] + hue_shift, np.clip(hsv[:, 1] * sat_scale, 0, 1), hsv[:, 2])
        )
    return out[0], out[1]


def _object_params(ident: dict, cls: np.ndarray, phase: np.ndarray, jitter: dict | None = None) -> dict:
    p = {k: v[cls] for k, v in ident.items() if k != "palette"}
    p["phase"] = phase
    if jitter is not None:  # per-image deviations from the class identity
        p["freq"] = p["freq"] * jitter["freq"]
        p["orient"] = p["orient"] + jitter["orient"]
        p["sharp"] = p["sharp"] * jitter["sharp"]
        p["aspect"] = np.minimum(p["aspect"] * jitter["shape"], 1.0)
        p["amp"] = p["amp"] * jitter["shape"]
        p["harm_a"] = p["harm_a"] * jitter["shape"][:, None]
        p["inner"] = np.minimum(p["inner"] * jitter["shape"], 0.8)
    return p


def _generate(split, seed, num_classes, per_class, image_size, k) -> tuple[np.ndarray, np.ndarray]:
    ident = _class_identities(seed, num_classes, k["num_colours"])
    code = _SPLIT_CODES[split]
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(code,)))
    n = num_classes * per_class
    targets = rng.permutation(np.repeat(np.arange(num_classes, dtype=np.int64), per_class))

    # Per-image nuisances, all drawn up front (the number of draws never depends on
    # knob values, only on n and the number of clutter objects).
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
    # background: two colours, a low-frequency texture between them and a gradient
    bg_a = _hsv_to_rgb(rng.uniform(0, 1, n), rng.uniform(0, 0.6, n), rng.uniform(0.15, 0.9, n))
    bg_b = _hsv_to_rgb(rng.uniform(0, 1, n), rng.uniform(0, 0.6, n), rng.uniform(0.15, 0.9, n))
    bg_p = dict(
        tex=rng.integers(len(_TEXTURES), size=n),
        freq=rng.uniform(0.5, 2.0, n),  # cycles per half image
        orient=rng.uniform(0, np.pi, n),
        phase=rng.uniform(0, 2 * np.pi, n),
        sharp=rng.uniform(0.5, 3.0, n),
        wave_amp=rng.uniform(0.5, 2.0, n),
    )
    grad_dir = rng.uniform(0, 2 * np.pi, n)
    # clutter: distractor objects wearing the identity of a random class
    nc = int(k["clutter"])
    cl_cls = rng.integers(num_classes, size=(nc, n))
    cl_x, cl_y = rng.uniform(-0.9, 0.9, (2, nc, n))
    cl_r = k["clutter_size"] * k["object_size"] * rng.uniform(0.6, 1.0, (nc, n))
    cl_theta = rng.uniform(0, 2 * np.pi, (nc, n))
    cl_phase = rng.uniform(0, 2 * np.pi, (nc, n))
    cl_front = rng.uniform(0, 1, (nc, n)) < k["occlusion"]
    cl_hue = rng.normal(0, k["hue_jitter"], (nc, n))
    # per-image perturbation of the class identity itself (overlapping classes)
    ij = k["identity_jitter"]
    id_jit = dict(
        freq=np.exp(rng.normal(0, ij, n)),
        orient=rng.normal(0, ij * np.pi / 2, n),
        shape=np.exp(rng.normal(0, ij, n)),
        sharp=np.exp(rng.normal(0, ij, n)),
    )

    S = image_size
    coords = ((np.arange(S, dtype=np.float64) + 0.5) / S * 2 - 1).astype(np.float32)
    grid_v, grid_u = np.meshgrid(coords, coords, indexing="ij")  # v: rows (down), u: columns
    px = 2.0 / S
    f32 = np.float32
    images = np.empty((n, S, S, 3), dtype=np.uint8)

    def f32s(d: dict) -> dict:
        return {key: (v.astype(f32) if v.dtype.kind == "f" else v) for key, v in d.items()}

    # Distractors are small: each is rendered in a W x W window around its centre and
    # composited into a canvas padded by W / 2 on every side (windows never fall off it);
    # outlines reach at most 1.45 object radii.
    half = int(math.ceil((1.5 * k["clutter_size"] * k["object_size"] + 2 * px) / px))
    W = 2 * half
    win = np.arange(W)

    def layer(grid_u, grid_v, cls, hue, sat, x0, y0, r, th, ph, jitter=None):
        """Colour (m, 3, h, w) and mask (m, 1, h, w) of one object per image (channels first)."""
        p = f32s(_object_params(ident, cls, ph, jitter))
        mask, w = _render(grid_u, grid_v, px, p, x0.astype(f32), y0.astype(f32), r.astype(f32), th.astype(f32))
        c1, c2 = _identity_colours(ident, cls, hue, sat)
        c2 = c2.astype(f32)[:, :, None, None]
        col = (c1.astype(f32)[:, :, None, None] - c2) * w[:, None]
        col += c2
        return col, mask[:, None]

    def composite(img, col, mask):  # img <- img * (1 - mask) + col * mask, in place
        col -= img
        col *= mask
        img += col

    def distractor(j, idx):
        x0, y0 = cl_x[j, idx], cl_y[j, idx]
        rows = np.rint((y0 + 1) / px - 0.5).astype(np.int64)[:, None] - half + win  # (m, W)
        cols = np.rint((x0 + 1) / px - 0.5).astype(np.int64)[:, None] - half + win
        gu = ((cols + 0.5) * px - 1).astype(f32)[:, None, :]
        gv = ((rows + 0.5) * px - 1).astype(f32)[:, :, None]
        col, mask = layer(gu, gv, cl_cls[j, idx], cl_hue[j, idx], 1.0, x0, y0,
                          cl_r[j, idx], cl_theta[j, idx], cl_phase[j, idx])
        front = cl_front[j, idx]
        return col, mask, rows + half, cols + half, front

    def composite_window(canvas, d, in_front):
        col, mask, rows, cols, front = d
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

    def render_chunk(ci: int) -> None:
        lo, hi = ci * _CHUNK, min((ci + 1) * _CHUNK, n)
        idx = slice(lo, hi)
        m = hi - lo
        canvas = np.zeros((m, 3, S + 2 * half, S + 2 * half), dtype=f32)
        img = canvas[:, :, half:half + S, half:half + S]  # a view: in-place ops on img write the canvas
        # background: two colours mixed by a low-frequency texture, times a gradient
        bp = f32s({key: val[idx] for key, val in bg_p.items()})
        wb = _texture(np.broadcast_to(grid_u, (m, S, S)), np.broadcast_to(grid_v, (m, S, S)), bp)
        wb = ((0.5 * k["background"]) * (wb + 1))[:, None]
        a = bg_a[idx, :, None, None].astype(f32)
        np.multiply(bg_b[idx, :, None, None].astype(f32) - a, wb, out=img)
        img += a
        g = np.cos(grad_dir[idx]).astype(f32)[:, None, None] * grid_u
        g += np.sin(grad_dir[idx]).astype(f32)[:, None, None] * grid_v
        g *= f32(0.3 * k["background"])
        g += 1
        img *= g[:, None]
        # distractors behind, the object, distractors in front (partial occlusion)
        distractors = [distractor(j, idx) for j in range(nc)]
        for d in distractors:
            composite_window(canvas, d, False)
        col, mask = layer(grid_u, grid_v, targets[idx], hue_shift[idx], sat_scale[idx], cx[idx], cy[idx],
                          radius[idx], theta[idx], phase[idx], {key: v[idx] for key, v in id_jit.items()})
        composite(img, col, mask)
        for d in distractors:
            composite_window(canvas, d, True)
        # global photometric jitter (contrast about the image mean, brightness), sensor noise,
        # then round to uint8: out = clip(255 * (b * (c * img + (1 - c) * mean) + noise))
        img = np.ascontiguousarray(img)
        mean = img.mean(axis=(1, 2, 3), keepdims=True, dtype=np.float64)
        c_ = contrast[idx, None, None, None]
        b_ = bright[idx, None, None, None]
        img *= (255 * b_ * c_).astype(f32)
        img += (255 * b_ * (1 - c_) * mean + 0.5).astype(f32)  # +0.5: truncation rounds
        if k["noise"] > 0:
            nrng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(code, 1, ci)))
            # Irwin-Hall: the sum of 4 uniform bytes is near-Gaussian (mean 510, std 147.8)
            # and ~5x cheaper to draw than standard_normal.
            u = np.frombuffer(nrng.bytes(4 * img.size), dtype=np.uint8).reshape(4, *img.shape)
            noise = u.sum(axis=0, dtype=np.int16).astype(f32)
            noise -= 510
            noise *= f32(255 * k["noise"] / 147.80)
            img += noise
        np.clip(img, 0.0, 255.49, out=img)
        images[idx] = img.astype(np.uint8).transpose(0, 2, 3, 1)

    # Chunks are independent (every random draw is made above or seeded per chunk), so
    # threads (numpy releases the GIL) give the same bytes in any schedule.
    n_chunks = -(-n // _CHUNK)
    workers = max(1, min(n_chunks, _THREADS))
    if workers == 1:
        for ci in range(n_chunks):
            render_chunk(ci)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(render_chunk, range(n_chunks)))
    return images, targets


def make_synthetic(
    split: str = "train",
    *,
    seed: int = 0,
    num_classes: int = 100,
    per_class: int | None = None,
    image_size: int = 32,
    object_size: float = 0.5,
    pos_jitter: float = 0.3,
    scale_jitter: float = 0.3,
    rotation: float = 45.0,
    hue_jitter: float = 0.03,
    saturation_jitter: float = 0.3,
    brightness_jitter: float = 0.3,
    contrast_jitter: float = 0.3,
    background: float = 0.6,
    clutter: int = 2,
    clutter_size: float = 0.6,
    occlusion: float = 0.3,
    noise: float = 0.05,
    num_colours: int = 12,
    identity_jitter: float = 0.1,
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
    split = _canonical_split(split)
    if per_class is None:
        per_class = _DEFAULT_PER_CLASS[split]
    for name, val, lo in (("num_classes", num_classes, 1), ("per_class", per_class, 1),
                          ("image_size", image_size, 8), ("clutter", clutter, 0),
                          ("num_colours", num_colours, 2)):
        if not isinstance(val, (int, np.integer)) or isinstance(val, bool) or val < lo:
            raise ValueError(f"make_synthetic: {name} must be an integer >= {lo}, got {val!r}")
    knobs = dict(
        object_size=object_size, pos_jitter=pos_jitter, scale_jitter=scale_jitter,
        rotation=rotation, hue_jitter=hue_jitter, saturation_jitter=saturation_jitter,
        brightness_jitter=brightness_jitter, contrast_jitter=contrast_jitter,
        background=background, clutter_size=clutter_size, occlusion=occlusion, noise=noise,
        identity_jitter=identity_jitter,
    )
    for name, val in knobs.items():
        if not isinstance(val, (int, float, np.integer, np.floating)) or not math.isfinite(val) or val < 0:
            raise ValueError(f"make_synthetic: {name} must be a finite number >= 0, got {val!r}")
    for name in ("saturation_jitter", "brightness_jitter", "contrast_jitter", "occlusion"):
        if knobs[name] > 1:
            raise ValueError(f"make_synthetic: {name} must be in [0, 1], got {knobs[name]!r}")
    if object_size == 0:
        raise ValueError("make_synthetic: object_size must be > 0")
    knobs = {key: float(val) for key, val in knobs.items()}
    knobs.update(clutter=int(clutter), num_colours=int(num_colours))
    return _make_synthetic_cached(split, int(seed), int(num_classes), int(per_class),
                                  int(image_size), tuple(sorted(knobs.items())))


@functools.lru_cache(maxsize=8)
def _make_synthetic_cached(split, seed, num_classes, per_class, image_size, knobs):
    images, targets = _generate(split, seed, num_classes, per_class, image_size, dict(knobs))
    images.setflags(write=False)
    targets.setflags(write=False)
    return images, targets


def synthetic_defaults() -> dict:
    """The default keyword arguments of :func:`make_synthetic` (sizes and knobs)."""
    sig = inspect.signature(make_synthetic)
    return {n: p.default for n, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY}


# --------------------------------------------------------------------------------------
# Dataset classes
# --------------------------------------------------------------------------------------


def _to_rgb_array(img: Any) -> np.ndarray:
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


class TensorAugment:
    """Random crop (zero padding) + horizontal flip + normalisation of uint8 CHW tensors.

    The same augmentation as torchvision's ``RandomCrop(size, padding)`` +
    ``RandomHorizontalFlip`` + ``ToDtype`` + ``Normalize``, with a batched path
    (:meth:`batch`) that draws an independent crop offset and flip per image.
    :class:`SyntheticDataset` uses it through ``__getitems__``, so a DataLoader
    augments a whole batch in a few tensor operations instead of one
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


class SyntheticDataset(Dataset):
    """In-memory images as a uint8 ``(N, 3, H, W)`` tensor; items are ``(image, label)``.

    ``image`` is ``transform(uint8 CHW tensor)`` (the raw tensor when ``transform`` is
    None), so ``transforms.v2`` pipelines run on tensors with no PIL round trip; a
    transform with a ``batch`` method (:class:`TensorAugment`) is applied to a whole
    DataLoader batch at once.
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


def _pil_loader(path: str):
    from PIL import Image

    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


class FolderDataset(Dataset):
    """Images listed as ``(path, label)`` pairs, loaded as RGB PIL images."""

    def __init__(self, samples: list[tuple[str, int]], classes: list[str], transform: Callable | None = None,
                 root: str | os.PathLike | None = None):
        self.samples = list(samples)
        self.classes = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.targets = np.asarray([t for _, t in self.samples], dtype=np.int64)
        self.transform = transform
        self.root = None if root is None else str(root)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        img = _pil_loader(self.samples[i][0])
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[i])

    def raw_image(self, i: int) -> np.ndarray:
        return _to_rgb_array(_pil_loader(self.samples[i][0]))


class TorchvisionDataset(Dataset):
    """A torchvision classification dataset with int64 ``.targets`` and RGB images."""

    def __init__(self, base: Dataset, targets: np.ndarray, classes: Sequence[str] | None,
                 transform: Callable | None = None):
        self.base = base
        self.targets = np.asarray(targets, dtype=np.int64)
        n_cls = int(self.targets.max()) + 1 if len(self.targets) else 0
        self.classes = list(classes) if classes is not None else [str(c) for c in range(n_cls)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def _raw(self, i: int):
        img = self.base[i][0]
        if hasattr(img, "mode") and img.mode != "RGB":
            img = img.convert("RGB")
        return img

    def __getitem__(self, i: int):
        img = self._raw(i)
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[i])

    def raw_image(self, i: int) -> np.ndarray:
        return _to_rgb_array(self._raw(i))


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
        return _raw_image(self.dataset, int(self.indices[i]))

    @property
    def transform(self):
        return getattr(self.dataset, "transform", None)


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

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
``partition=2`` for DTD, ``size="320px"`` for Imagenette).
"""

_FOLDER_DATASETS = {
    # name -> (num_classes, image_size, mean, std, default sub-folder of the data root)
    "tinyimagenet": (200, 64, (0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821), "tiny-imagenet-200"),
    "imagenet": (1000, 224, IMAGENET_MEAN, IMAGENET_STD, "imagenet"),
    "places365": (365, 224, IMAGENET_MEAN, IMAGENET_STD, "places365"),
    "imagefolder": (None, 224, IMAGENET_MEAN, IMAGENET_STD, None),
}


def available_datasets() -> list[str]:
    """Every name :func:`get_dataset` accepts."""
    return ["synthetic", *sorted(set(TORCHVISION_DATASETS) | set(_FOLDER_DATASETS))]


def _check_name(name: str) -> str:
    key = str(name).lower().replace("-", "").replace(" ", "")
    key = {"tinyimagenet200": "tinyimagenet", "places": "places365", "imagenet1k": "imagenet"}.get(key, key)
    if key not in available_datasets():
        raise DatasetError(f"unknown dataset {name!r}; known datasets: {', '.join(available_datasets())}")
    return key


def _images_under(folder: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames)
                   if f.lower().endswith(IMG_EXTENSIONS))
    return out


def _scan_image_folder(folder: Path, how_to: str, class_to_idx: dict[str, int] | None = None
                       ) -> tuple[list[tuple[str, int]], list[str]]:
    """``folder/<class>/**/<image>`` -> samples; classes sorted by name unless given."""
    if not folder.is_dir():
        raise DatasetError(f"{folder} does not exist or is not a directory; expected one sub-folder of "
                           f"images per class ({folder}/<class>/<image>.jpg). {how_to}")
    class_dirs = sorted(d.name for d in os.scandir(folder) if d.is_dir())
    if not class_dirs:
        raise DatasetError(f"{folder} has no class sub-folders; expected {folder}/<class>/<image>.jpg. {how_to}")
    if class_to_idx is None:
        classes = class_dirs
        class_to_idx = {c: i for i, c in enumerate(classes)}
    else:
        classes = sorted(class_to_idx, key=class_to_idx.get)
        unknown = [c for c in class_dirs if c not in class_to_idx]
        if unknown:
            raise DatasetError(f"{folder} has class folders that the training split lacks: "
                               f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''}. {how_to}")
    samples, empty = [], []
    for c in class_dirs:
        files = _images_under(os.path.join(folder, c))
        if not files:
            empty.append(c)
        samples.extend((f, class_to_idx[c]) for f in files)
    if empty:
        raise DatasetError(f"{folder}: no images ({', '.join(IMG_EXTENSIONS)}) in class folder(s) "
                           f"{empty[:5]}{' ...' if len(empty) > 5 else ''}. {how_to}")
    return samples, classes


def _resolve_root(root, default_sub: str | None, name: str) -> Path:
    if root is not None:
        return Path(root).expanduser().resolve()
    if default_sub is None:
        raise DatasetError(f"dataset {name!r} needs root=<folder with train/ and val/ (or test/) "
                           "sub-folders in ImageFolder layout>")
    return data_root() / default_sub


def _build_imagefolder(name: str, split: str, root: Path, transform, how_to: str) -> FolderDataset:
    if not root.is_dir():
        raise DatasetError(f"{name}: root {root} does not exist. {how_to}")
    train_dir = root / "train"
    train_samples, classes = _scan_image_folder(train_dir, how_to)
    if split == "train":
        return FolderDataset(train_samples, classes, transform, root)
    for sub in ("val", "test"):
        if (root / sub).is_dir():
            samples, _ = _scan_image_folder(root / sub, how_to, {c: i for i, c in enumerate(classes)})
            return FolderDataset(samples, classes, transform, root)
    raise DatasetError(f"{name}: {root} has no val/ or test/ sub-folder for the test split. {how_to}")


_TINY_HOW = ("Get Tiny-ImageNet-200 from http://cs231n.stanford.edu/tiny-imagenet-200.zip and unzip it; "
             "root is the tiny-imagenet-200 folder holding train/<wnid>/images/*.JPEG and "
             "val/images/*.JPEG + val/val_annotations.txt (or val/<wnid>/*.JPEG).")


def _build_tinyimagenet(split, root: Path, transform) -> FolderDataset:
    if not root.is_dir():
        raise DatasetError(f"tinyimagenet: root {root} does not exist. {_TINY_HOW}")
    train_samples, classes = _scan_image_folder(root / "train", _TINY_HOW)
    if split == "train":
        return FolderDataset(train_samples, classes, transform, root)
    val = root / "val"
    ann = val / "val_annotations.txt"
    if ann.is_file():
        idx = {c: i for i, c in enumerate(classes)}
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
            raise DatasetError(f"{ann} names classes absent from {root / 'train'}: {sorted(set(unknown))[:5]}. "
                               f"{_TINY_HOW}")
        if missing:
            raise DatasetError(f"{ann} lists {len(missing)} images that do not exist, e.g. {missing[0]}. "
                               f"{_TINY_HOW}")
        if not samples:
            raise DatasetError(f"{ann} lists no images. {_TINY_HOW}")
        samples.sort()
        return FolderDataset(samples, classes, transform, root)
    if val.is_dir():
        samples, _ = _scan_image_folder(val, _TINY_HOW, {c: i for i, c in enumerate(classes)})
        return FolderDataset(samples, classes, transform, root)
    raise DatasetError(f"tinyimagenet: {val} not found (expected val/images + val/val_annotations.txt "
                       f"or val/<wnid>/). {_TINY_HOW}")


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


def _build_torchvision(key: str, split: str, root: Path, download: bool, transform, options) -> TorchvisionDataset:
    import torchvision.datasets as tvd

    tv_name, split_kwargs, *_rest, downloadable = TORCHVISION_DATASETS[key]
    how = ("pass download=True to fetch it" if downloadable else
           f"download it by hand as described in torchvision.datasets.{tv_name}'s documentation")
    if key == "cifar100" and not download and not (root / "cifar-100-python").is_dir():
        raise DatasetError(f"cifar100: {root / 'cifar-100-python'} not found (expected the extracted "
                           f"CIFAR-100 python archive: train, test, meta); {how} (root={root}), or extract "
                           "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz into root")
    if not download and not root.is_dir():
        raise DatasetError(f"{key}: root {root} does not exist; {how}")
    kwargs = {**split_kwargs[split], **options}
    try:
        base = getattr(tvd, tv_name)(str(root), download=download, **kwargs)
    except (RuntimeError, FileNotFoundError, OSError) as err:
        raise DatasetError(f"{key} ({split}) could not be loaded from {root}: {err}; {how}") from err
    return TorchvisionDataset(base, _torchvision_targets(base, tv_name), getattr(base, "classes", None), transform)


_IMAGENET_HOW = ("Prepare either root/train/<wnid>/*.JPEG and root/val/<wnid>/*.JPEG (ImageFolder layout), "
                 "or the official ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar and "
                 "ILSVRC2012_devkit_t12.tar.gz in root for torchvision.datasets.ImageNet "
                 "(https://image-net.org, registration needed).")
_PLACES_HOW = ("Prepare either root/train/<category>/*.jpg and root/val/<category>/*.jpg (ImageFolder layout), "
               "or the torchvision.datasets.Places365 layout (pass download=True to fetch it).")


def get_dataset(name: str, split: str = "train", *, root: str | os.PathLike | None = None,
                download: bool = False, transform: Callable | None = None, **options) -> Dataset:
    """A dataset by name; items are ``(transform(image), label)``, ``.targets`` is int64.

    Names (see :func:`available_datasets`):

    * ``synthetic`` -- :func:`make_synthetic` (``options`` go to it); no files, so
      ``root`` and ``download`` are ignored.
    * ``cifar100`` and the other torchvision sets in :data:`TORCHVISION_DATASETS`
      (cifar10, mnist, fashionmnist, kmnist, usps, svhn, stl10, food101, flowers102,
      dtd, fgvc_aircraft, oxford_pets, stanford_cars, gtsrb, country211, imagenette);
      ``root`` is torchvision's root; files are fetched only with ``download=True``.
    * ``tinyimagenet`` -- root = the ``tiny-imagenet-200`` folder; ``test`` = its
      labelled val set (``val_annotations.txt`` or ImageFolder layout).
    * ``imagenet`` -- ImageFolder ``train/`` and ``val/``, else torchvision ImageNet.
    * ``places365`` -- ImageFolder ``train/`` and ``val/``, else torchvision Places365
      (``options`` such as ``small=True`` go to it).
    * ``imagefolder`` -- any root with ``train/`` and ``val/`` (or ``test/``).

    ``root=None`` means ``config.data_root()`` (``$BACKFILL_DATA_ROOT`` or
    ``<repo>/data``), with a per-dataset sub-folder for the folder datasets.
    Raises :class:`DatasetError` naming the path, what was expected and how to get it.
    """
    key = _check_name(name)
    split = _canonical_split(split)
    if key == "synthetic":  # generated in memory: root and download are ignored
        images, targets = make_synthetic(split, **_synthetic_split_options(split, options))
        return SyntheticDataset(images, targets, transform)
    if key in TORCHVISION_DATASETS:
        return _build_torchvision(key, split, _resolve_root(root, "", key), download, transform, options)
    if options and key != "places365":
        raise DatasetError(f"{key}: unexpected options {sorted(options)}")
    folder_root = _resolve_root(root, _FOLDER_DATASETS[key][4], key)
    if key == "tinyimagenet":
        return _build_tinyimagenet(split, folder_root, transform)
    if key == "imagefolder":
        return _build_imagefolder(key, split, folder_root,  transform,
                                  "Prepare root/train/<class>/*.jpg and root/val/<class>/*.jpg (or test/).")
    if key == "imagenet":
        if (folder_root / "train").is_dir() or not (folder_root / "ILSVRC2012_devkit_t12.tar.gz").is_file():
            return _build_imagefolder(key, split, folder_root, transform, _IMAGENET_HOW)
        import torchvision.datasets as tvd

        try:
            base = tvd.ImageNet(str(folder_root), split="train" if split == "train" else "val")
        except (RuntimeError, FileNotFoundError, OSError) as err:
            raise DatasetError(f"imagenet could not be loaded from {folder_root}: {err}. {_IMAGENET_HOW}") from err
        return TorchvisionDataset(base, _torchvision_targets(base, "ImageNet"),
                                  [c[0] if isinstance(c, tuple) else c for c in base.classes], transform)
    # places365
    if (folder_root / "train").is_dir() and not options and not download:
        return _build_imagefolder(key, split, folder_root, transform, _PLACES_HOW)
    if not download and not (folder_root / "categories_places365.txt").is_file():
        raise DatasetError(f"places365: {folder_root} holds neither train/ and val/ nor "
                           f"categories_places365.txt. {_PLACES_HOW}")
    import torchvision.datasets as tvd

    try:
        base = tvd.Places365(str(folder_root), split="train-standard" if split == "train" else "val",
                             download=download, **{"small": True, **options})
    except (RuntimeError, FileNotFoundError, OSError) as err:
        raise DatasetError(f"places365 could not be loaded from {folder_root}: {err}. {_PLACES_HOW}") from err
    return TorchvisionDataset(base, _torchvision_targets(base, "Places365"), base.classes, transform)


def _synthetic_split_options(split: str, options: dict) -> dict:
    """Map the profile's ``train_per_class`` / ``test_per_class`` to ``per_class`` of ``split``."""
    options = dict(options)
    sizes = {s: options.pop(f"{s}_per_class", None) for s in ("train", "test")}
    if sizes[split] is not None:
        if options.get("per_class") is not None:
            raise DatasetError(f"synthetic: pass either per_class or {split}_per_class, not both")
        options["per_class"] = sizes[split]
    return options


@functools.lru_cache(maxsize=16)
def _synthetic_stats(options: tuple) -> tuple[tuple, tuple]:
    images, _ = make_synthetic("train", **_synthetic_split_options("train", dict(options)))
    x = images.reshape(-1, 3).astype(np.float64) / 255.0
    return tuple(round(float(v), 4) for v in x.mean(0)), tuple(round(float(v), 4) for v in x.std(0))


def _stats(key: str, options: dict) -> tuple[int | None, int, tuple, tuple]:
    """num_classes (None if it needs a root), image_size, mean, std."""
    if key == "synthetic":
        mean, std = _synthetic_stats(tuple(sorted(options.items())))
        defaults = synthetic_defaults()
        return (options.get("num_classes", defaults["num_classes"]),
                options.get("image_size", defaults["image_size"]), mean, std)
    if key in TORCHVISION_DATASETS:
        _, _, n, size, mean, std, _ = TORCHVISION_DATASETS[key]
        return n, size, mean, std
    n, size, mean, std, _ = _FOLDER_DATASETS[key]
    return n, size, mean, std


def dataset_info(name: str, root: str | os.PathLike | None = None, **options) -> dict:
    """``dict(num_classes, image_size, mean, std)`` of a dataset.

    ``image_size`` is the training resolution of the protocol (native size for small
    images, 224 for ImageNet-like ones). For ``synthetic``, ``options`` are the
    :func:`make_synthetic` arguments and mean/std are measured on its train split.
    For ``imagefolder``, ``num_classes`` is the number of class folders in ``root/train``.
    """
    key = _check_name(name)
    n, size, mean, std = _stats(key, options if key == "synthetic" else {})
    if key == "imagefolder":
        r = _resolve_root(root, None, key)
        _, classes = _scan_image_folder(r / "train", "Prepare root/train/<class>/*.jpg.")
        n = len(classes)
    return dict(num_classes=n, image_size=size, mean=tuple(mean), std=tuple(std))


# --------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------


def _norm_stats(name, mean, std, options):
    key = _check_name(name)
    if key == "synthetic" and mean is not None and std is not None:  # no need to generate the data
        return key, options.get("image_size", synthetic_defaults()["image_size"]), tuple(mean), tuple(std)
    _, native, m, s = _stats(key, options if key == "synthetic" else {})
    return key, native, tuple(mean if mean is not None else m), tuple(std if std is not None else s)


def _check_size(image_size):
    if not isinstance(image_size, (int, np.integer)) or isinstance(image_size, bool) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    return int(image_size)


def train_transform(name: str, image_size: int | None = None, *, mean=None, std=None, **options):
    """Training augmentation for dataset ``name`` at ``image_size`` (default: the dataset's).

    Small images (``image_size <= 64``): resize if needed, random crop with
    ``image_size // 8`` padding, horizontal flip. Large: ``RandomResizedCrop`` + flip.
    Then float32 in [0, 1] and ``Normalize(mean, std)`` (the dataset's unless given).
    Works on PIL images, HWC arrays and uint8 CHW tensors (``transforms.v2``).
    For ``synthetic`` at its native size it is a :class:`TensorAugment` (same
    augmentation, batched on uint8 tensors through ``SyntheticDataset.__getitems__``).
    """
    from torchvision.transforms import v2

    key, native, mean, std = _norm_stats(name, mean, std, options)
    size = _check_size(image_size if image_size is not None else native)
    if key == "synthetic":
        return TensorAugment(max(1, size // 8), mean, std, train=True, size=size)
    ops: list = [v2.ToImage()]
    if size <= 64:
        if native != size or key == "imagefolder":
            ops += [v2.Resize(size, antialias=True), v2.CenterCrop(size)]
        ops += [v2.RandomCrop(size, padding=max(1, size // 8)), v2.RandomHorizontalFlip()]
    else:
        ops += [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(ops)


def test_transform(name: str, image_size: int | None = None, *, mean=None, std=None, **options):
    """Evaluation transform: small images resized only if needed; large ones resized
    to ``image_size / 0.875`` and centre-cropped. Then float32 and ``Normalize``
    (a batched :class:`TensorAugment` without augmentation for ``synthetic``)."""
    from torchvision.transforms import v2

    key, native, mean, std = _norm_stats(name, mean, std, options)
    size = _check_size(image_size if image_size is not None else native)
    if key == "synthetic":
        return TensorAugment(0, mean, std, train=False, size=size)
    ops: list = [v2.ToImage()]
    if size <= 64:
        if native != size or key == "imagefolder":
            ops += [v2.Resize(size, antialias=True), v2.CenterCrop(size)]
    else:
        ops += [v2.Resize(int(round(size / 0.875)), antialias=True), v2.CenterCrop(size)]
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(ops)


# --------------------------------------------------------------------------------------
# Class splits (PAPER.md section 4)
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Plotting helpers (arrays only; no matplotlib here)
# --------------------------------------------------------------------------------------


def _raw_image(dataset: Dataset, i: int) -> np.ndarray:
    if hasattr(dataset, "raw_image"):
        return dataset.raw_image(i)
    return _to_rgb_array(dataset[i][0])


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
        rows.append([_raw_image(dataset, int(i)) for i in chosen])
    target = (size, size) if size is not None else rows[0][0].shape[:2]
    out = np.empty((len(rows), per_class, target[0], target[1], 3), dtype=np.uint8)
    for r, row in enumerate(rows):
        for j, img in enumerate(row):
            if img.shape[:2] != tuple(target):
                img = np.asarray(Image.fromarray(img).resize((target[1], target[0]), Image.BILINEAR))
            out[r, j] = img
    return out


def tile_grid(grid: np.ndarray, pad: int = 1, pad_value: int = 255) -> np.ndarray:
    """``(rows, cols, H, W, 3)`` -> one ``(rows*(H+pad)-pad, cols*(W+pad)-pad, 3)`` image."""
    rows, cols, h, w, c = grid.shape
    out = np.full((rows * (h + pad) - pad, cols * (w + pad) - pad, c), pad_value, dtype=grid.dtype)
    for r in range(rows):
        for j in range(cols):
            out[r * (h + pad): r * (h + pad) + h, j * (w + pad): j * (w + pad) + w] = grid[r, j]
    return out
