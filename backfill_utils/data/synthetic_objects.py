"""What a synthetic class looks like, and how one object is drawn.

A class *identity* (:func:`class_identities`) is a shape family with its parameters,
a texture family with its frequency, orientation and sharpness, and an ordered pair
of palette colours. :func:`render_object` draws a batch of objects (one per image)
as a soft mask and a texture weight on a pixel grid; :func:`identity_colours` gives
the two colours the weight mixes. :mod:`backfill_utils.data.synthetic` composes objects,
backgrounds and distractors into images.

All functions are vectorised over a batch of objects: ``p`` holds one entry per
object (:func:`object_params`), and grids broadcast as ``(n, H, W)``.

>>> a, b = class_identities(0, 3, 12), class_identities(0, 5, 12)
>>> bool((a["shape"] == b["shape"][:3]).all())  # class c's identity ignores num_classes
True
"""
from __future__ import annotations

import functools

import numpy as np

__all__ = ["SHAPES", "TEXTURES", "hsv_to_rgb", "class_identities", "outline_radius", "texture",
           "render_object", "identity_colours", "object_params"]

SHAPES = ("ellipse", "polygon", "star", "ring", "blob")
TEXTURES = ("stripes", "checker", "rings", "dots", "waves")


def hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
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
def class_identities(seed: int, num_classes: int, num_colours: int) -> dict:
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
                shape=r.integers(len(SHAPES)),
                k=r.integers(3, 7),  # polygon sides / star lobes
                aspect=r.uniform(0.5, 1.0),  # ellipse / ring aspect ratio
                amp=r.uniform(0.2, 0.45),  # star lobe amplitude
                inner=r.uniform(0.35, 0.6),  # ring hole, fraction of the outline
                harm_a=r.uniform(0.0, 0.15, 3),  # blob outline: harmonics 2..4 (radius <= 1.45)
                harm_b=r.uniform(0.0, 2 * np.pi, 3),
                shape_rot=r.uniform(0.0, 2 * np.pi),
                tex=r.integers(len(TEXTURES)),
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


def outline_radius(phi: np.ndarray, p: dict) -> np.ndarray:
    """Outline radius (in object radii) at angle ``phi``; ``p`` holds per-object params."""
    out = np.empty_like(phi)
    shape = p["shape"]
    for s, name in enumerate(SHAPES):
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


def texture(x: np.ndarray, y: np.ndarray, p: dict) -> np.ndarray:
    """Texture value in [-1, 1] at object-local coordinates; ``p`` holds per-object params."""
    out = np.empty_like(x)
    tex = p["tex"]
    for t, name in enumerate(TEXTURES):
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


def render_object(grid_u, grid_v, px, p, cx, cy, radius, theta):
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
    rb = outline_radius(phi, p)
    mask = np.clip(0.5 + (rb - rho) * radius / px, 0.0, 1.0)
    ring = p["shape"] == SHAPES.index("ring")
    if ring.any():
        hole = np.clip(0.5 + (rho[ring] - p["inner"][ring, None, None] * rb[ring]) * radius[ring] / px, 0, 1)
        mask[ring] *= hole
    weight = 0.5 + 0.5 * texture(xr, yr, p)
    return mask, weight


def identity_colours(ident: dict, cls: np.ndarray, hue_shift, sat_scale) -> tuple[np.ndarray, np.ndarray]:
    pal = ident["palette"]
    out = []
    for key in ("col1", "col2"):
        hsv = pal[ident[key][cls]]
        out.append(
            hsv_to_rgb(hsv[:, 0] + hue_shift, np.clip(hsv[:, 1] * sat_scale, 0, 1), hsv[:, 2])
        )
    return out[0], out[1]


def object_params(ident: dict, cls: np.ndarray, phase: np.ndarray, jitter: dict | None = None) -> dict:
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

