"""Image figures: framed thumbnails, result strips, Fig. 1 (a query and its ranked
lists) and the grid of sample images.

Frames: green = same class as the query, red = another class, blue = the query; the
bar under a result says which part of the gallery it came from (grey: an old
embedding, purple: a new one).
"""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np

__all__ = ["OLD_COLOR", "NEW_COLOR", "RIGHT", "WRONG", "QUERY", "framed", "hex_rgb", "thumbnail_strip",
           "upscale", "lookup", "retrieval_figure", "sample_images_figure"]

OLD_COLOR, NEW_COLOR = "#c7c7c7", "#7b3294"  # gallery items holding old / new embeddings
RIGHT, WRONG, QUERY = (44, 160, 44), (214, 39, 40), (31, 119, 180)


def framed(img: np.ndarray, color, border: int = 3, bar=None, bar_height: int = 0) -> np.ndarray:
    """``img`` (H, W, 3) uint8 inside a ``border``-pixel frame of ``color`` (RGB 0-255),
    with an optional bar of colour ``bar`` under it (``bar_height`` pixels, after a
    2-pixel white gap)."""
    h, w, _ = img.shape
    gap = 2 if bar_height else 0
    out = np.full((h + 2 * border + gap + bar_height, w + 2 * border, 3), 255, dtype=np.uint8)
    out[:h + 2 * border] = np.asarray(color, dtype=np.uint8)
    out[border:border + h, border:border + w] = img
    if bar_height:
        out[h + 2 * border + gap:] = np.asarray(bar if bar is not None else (255, 255, 255), dtype=np.uint8)
    return out


def hex_rgb(c: str) -> tuple:
    """``"#rrggbb"`` as an RGB tuple of 0-255 ints."""
    c = c.lstrip("#")
    return tuple(int(c[i:i + 2], 16) for i in (0, 2, 4))


def thumbnail_strip(query_img: np.ndarray, result_imgs: np.ndarray, correct, from_new=None, *,
                    gap: int = 8, border: int = 3, bar_height: int = 5) -> np.ndarray:
    """One row: the query (blue frame), a gap, and the results framed green (correct)
    or red (wrong); under each result a bar: grey = old embedding, purple = new."""
    k = len(result_imgs)
    from_new = np.zeros(k, bool) if from_new is None else np.asarray(from_new, bool)
    tiles = [framed(query_img, QUERY, border, (255, 255, 255), bar_height)]
    tiles.append(np.full((tiles[0].shape[0], gap, 3), 255, np.uint8))
    for i in range(k):
        tiles.append(framed(result_imgs[i], RIGHT if correct[i] else WRONG, border,
                            hex_rgb(NEW_COLOR) if from_new[i] else hex_rgb(OLD_COLOR), bar_height))
        if i < k - 1:
            tiles.append(np.full((tiles[0].shape[0], 2, 3), 255, np.uint8))
    return np.concatenate(tiles, axis=1)


def upscale(images: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of (..., H, W, 3) uint8 images to ``size`` x ``size``."""
    h, w = images.shape[-3:-1]
    ri = (np.arange(size) * h // size)
    ci = (np.arange(size) * w // size)
    return images[..., ri[:, None], ci[None, :], :]


def lookup(images):
    """``images[i]`` for an (N, H, W, 3) array or a mapping ``{gallery index: image}``."""
    return (lambda i: images[int(i)]) if isinstance(images, dict) else (lambda i: np.asarray(images)[int(i)])


def retrieval_figure(query_img: np.ndarray, rows: Sequence[dict], images, labels, query_label,
                     *, title: str | None = None, thumb: int = 64):
    """Fig. 1: a query and ranked lists, one row per search.

    ``rows``: dicts with ``title``, ``indices`` (k,), ``distances`` (k,, Euclidean)
    and optionally ``from_new`` (k,) bool; ``images``: (N, H, W, 3) uint8 of the
    gallery or a dict ``{gallery index: image}`` holding at least the listed
    items; ``labels`` (N,). Frames: green = same class as the query, red =
    not; the tag under a result names the part of the gallery it came from.
    """
    labels = np.asarray(labels)
    get = lookup(images)
    k = max(len(r["indices"]) for r in rows)
    fig, axes = plt.subplots(len(rows), k + 1, figsize=(1.25 * (k + 1) + 0.6, 1.75 * len(rows) + 0.4),
                             squeeze=False, gridspec_kw={"width_ratios": [1.15] + [1] * k})
    q = upscale(query_img, thumb)
    for i, r in enumerate(rows):
        ax = axes[i][0]
        ax.imshow(framed(q, QUERY, 4), interpolation="nearest")
        ax.set_title("query" if i == 0 else "", fontsize=8)
        ax.text(-0.15, 0.5, r["title"], transform=ax.transAxes, rotation=90, ha="right", va="center",
                fontsize=8)
        ax.set_axis_off()
        fn = r.get("from_new")
        for j in range(k):
            ax = axes[i][j + 1]
            ax.set_axis_off()
            if j >= len(r["indices"]) or r["indices"][j] < 0:
                continue
            g = int(r["indices"][j])
            ok = labels[g] == query_label
            ax.imshow(framed(upscale(get(g), thumb), RIGHT if ok else WRONG, 4), interpolation="nearest")
            text = f"#{j + 1}  d={r['distances'][j]:.3f}"
            ax.set_title(text, fontsize=7)
            if fn is not None:
                ax.text(0.5, -0.08, "new part" if fn[j] else "old part", transform=ax.transAxes, ha="center",
                        va="top", fontsize=7, color=NEW_COLOR if fn[j] else "#555555",
                        fontweight="bold" if fn[j] else "normal")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.text(0.5, -0.01, "frame: green = same class as the query, red = another class; d = Euclidean distance",
             ha="center", va="top", fontsize=8, color="#444444")
    return fig


def sample_images_figure(grid: np.ndarray, row_labels: Sequence[str], title: str | None = None, thumb: int = 40):
    """A class-by-example grid ``(rows, cols, H, W, 3)`` with one label per row."""
    rows, cols = grid.shape[:2]
    tiles = upscale(grid, thumb) if grid.shape[2] < thumb else grid
    h = tiles.shape[2]
    pad = 2
    img = np.full((rows * (h + pad) - pad, cols * (h + pad) - pad, 3), 255, np.uint8)
    for r in range(rows):
        for c in range(cols):
            img[r * (h + pad):r * (h + pad) + h, c * (h + pad):c * (h + pad) + h] = tiles[r, c]
    fig, ax = plt.subplots(figsize=(0.55 * cols + 1.4, 0.55 * rows + 0.5))
    ax.imshow(img, interpolation="nearest")
    ax.set_yticks([r * (h + pad) + h / 2 for r in range(rows)], list(row_labels), fontsize=7)
    ax.set_xticks([])
    ax.grid(False)
    for sp in ax.spines.values():
        sp.set_visible(False)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig
