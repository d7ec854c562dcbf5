"""The backfilling animation: the gallery filling up, the curves growing, top results
changing; written as a GIF with Pillow (no ffmpeg) and shown inline as an HTML ``<img>`` of that GIF.

Which gallery items hold new embeddings at each frame is the system's own rule
(:meth:`backfill_utils.backfill.systems.BackfillSystem.backfilled`), the one the curves and
the top-k lists use.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..io import atomic_write
from .style import METRIC_LABEL, method_style
from .thumbnails import NEW_COLOR, OLD_COLOR, hex_rgb, lookup, thumbnail_strip, upscale

__all__ = ["backfill_animation", "save_animation", "gif_html", "show_animation"]


def _gallery_grid_shape(n: int) -> tuple[int, int]:
    cols = int(np.ceil(np.sqrt(2 * n)))
    return int(np.ceil(n / cols)), cols


class _Frames:
    """What frame ``i`` shows: the gallery cells and the result strips at ratio ``r_i``."""

    def __init__(self, system, ratios, topk, images, labels, queries, thumb):
        self.ratios, self.labels, self.queries = ratios, np.asarray(labels), np.asarray(queries)
        self.idx, self.from_new = np.asarray(topk["indices"]), np.asarray(topk["from_new"])
        if self.idx.shape[:2] != (len(ratios), len(self.queries)):
            raise ValueError(f"topk['indices'] has shape {self.idx.shape}; expected ({len(ratios)}, "
                             f"{len(self.queries)}, k): one list per ratio of the curves and per query")
        self.masks = np.stack([system.backfilled(r) for r in ratios])
        self.n = system.n_gallery
        self.shape = _gallery_grid_shape(self.n)
        get = lookup(images)
        shown = np.unique(np.r_[self.queries, self.idx[self.idx >= 0]])
        self.thumbs = {int(j): upscale(get(j), thumb) for j in shown}
        self.blank = np.full_like(next(iter(self.thumbs.values())), 255)

    def gallery(self, i: int) -> np.ndarray:
        gr, gc = self.shape
        cells = np.full((gr * gc, 3), 255, np.uint8)
        cells[:self.n] = np.where(self.masks[i][:, None], np.array(hex_rgb(NEW_COLOR)),
                                  np.array(hex_rgb(OLD_COLOR)))
        return cells.reshape(gr, gc, 3)

    def strip(self, i: int, q: int) -> np.ndarray:
        res = self.idx[i, q]
        ok = (self.labels[np.clip(res, 0, None)] == self.labels[self.queries[q]]) & (res >= 0)
        imgs = np.stack([self.thumbs[int(j)] if j >= 0 else self.blank for j in res])
        return thumbnail_strip(self.thumbs[int(self.queries[q])], imgs, ok, self.from_new[i, q])


def _gallery_axes(fig, cell, frames: _Frames):
    from matplotlib.patches import Patch

    ax = fig.add_subplot(cell)
    im = ax.imshow(frames.gallery(0), interpolation="nearest", aspect="equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    ax.legend(handles=[Patch(color=OLD_COLOR, label="old embedding"), Patch(color=NEW_COLOR, label="new embedding")],
              loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=2, fontsize=10, handlelength=1)
    return ax, im


def _curve_axes(fig, cells, curves: pd.DataFrame, methods, refs) -> dict:
    """The mAP and top-1 panels with ``refs`` as flat lines; empty lines of ``methods``."""
    lines, axes = {}, []
    for cell, metric in zip(cells, ("mAP", "top1")):
        ax = fig.add_subplot(cell)
        axes.append(ax)
        sub = curves[curves["method"].isin(list(methods) + list(refs))]
        lo, hi = sub[metric].min(), sub[metric].max()
        ax.set_ylim(lo - 0.08 * (hi - lo + 1e-9), hi + 0.12 * (hi - lo + 1e-9))
        ax.set_xlim(-0.02, 1.02)
        for m in refs:
            v = curves.loc[curves["method"] == m, metric].iloc[0]
            ax.axhline(v, label=f"{m}/{m}", **{k: w for k, w in method_style(m).items() if k in ("color", "ls")})
        for m in methods:
            (lines[(m, metric)],) = ax.plot([], [], marker="o", ms=3, label=m, **method_style(m))
        ax.set_xlabel("backfill ratio", fontsize=10)
        ax.set_title(METRIC_LABEL[metric], fontsize=10)
        ax.tick_params(labelsize=10)
    axes[-1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=10)
    return lines


def _strip_axes(fig, cell, frames: _Frames, list_method: str) -> list:
    nq = len(frames.queries)
    sgs = cell.subgridspec(nq, 1, hspace=0.12)
    ims = []
    for q in range(nq):
        ax = fig.add_subplot(sgs[q, 0])
        ims.append(ax.imshow(frames.strip(0, q), interpolation="nearest"))
        ax.set_axis_off()
        ax.text(-0.02, 0.5, f"query {frames.queries[q]}\n(class {frames.labels[frames.queries[q]]})",
                transform=ax.transAxes, ha="right", va="center", fontsize=10)
        if q == 0:
            ax.set_title(f"top-{frames.idx.shape[2]} of {list_method}   (frame: green correct, red wrong;  "
                         "bar under a result: grey = from the old part, purple = from the new part)", fontsize=10)
    return ims


def backfill_animation(curves: pd.DataFrame, system, topk: dict, images, labels, queries, *,
                       methods: Sequence[str] = ("RM", "Ours"), refs: Sequence[str] = ("old", "new"),
                       list_method: str = "Ours", hold: int = 2, dpi: int = 80, interval: int = 600,
                       thumb: int = 40, title: str | None = None):
    """An animation of online backfilling (``matplotlib.animation.FuncAnimation``).

    Frame ``i`` shows the ratio ``r_i`` (the sorted ratios of ``curves``): the gallery
    as a grid of cells, one per item by gallery index, grey while it holds its old
    embedding and purple once backfilled (``system.backfilled(r_i)``, ``system`` a
    :class:`~backfill_utils.backfill.systems.BackfillSystem`); the mAP and top-1 curves of
    ``methods`` drawn up to ``r_i`` with ``refs`` as flat lines; and, per query in
    ``queries``, its top-k list of ``list_method`` at ``r_i`` from ``topk``
    (:func:`backfill_utils.figures.illustrate.retrieve_topk_over_ratios` at the same ratios:
    ``indices`` and ``from_new``, (R, Q, k)), framed green/red for correct/wrong.
    ``images``: (N, H, W, 3) uint8 or a dict ``{gallery index: image}`` holding the
    queries and every listed item. The last frame is held ``hold`` more frames.
    """
    from matplotlib.animation import FuncAnimation

    ratios = np.sort(curves["ratio"].unique())
    frames = _Frames(system, ratios, topk, images, labels, queries, thumb)
    nq = len(frames.queries)
    fig = plt.figure(figsize=(10.0, 3.2 + 1.3 * nq), dpi=dpi)
    gs = fig.add_gridspec(2, 3, height_ratios=[3.0, 1.3 * nq], width_ratios=[1.0, 1.1, 1.1],
                          hspace=0.3, wspace=0.3, left=0.06, right=0.88, top=0.9, bottom=0.02)
    ax_g, im_g = _gallery_axes(fig, gs[0, 0], frames)
    lines = _curve_axes(fig, (gs[0, 1], gs[0, 2]), curves, methods, refs)
    strip_ims = _strip_axes(fig, gs[1, :], frames, list_method)
    suptitle = fig.suptitle("", fontsize=12)
    series = {(m, metric): curves[curves["method"] == m].sort_values("ratio")[metric].to_numpy()
              for m, metric in lines}

    def update(frame):
        i = min(frame, len(ratios) - 1)
        im_g.set_data(frames.gallery(i))
        ax_g.set_title(f"gallery: {int(frames.masks[i].sum())}/{frames.n} backfilled", fontsize=10)
        for key, line in lines.items():
            line.set_data(ratios[:i + 1], series[key][:i + 1])
        for q, im in enumerate(strip_ims):
            im.set_data(frames.strip(i, q))
        suptitle.set_text((title + "  |  " if title else "") + f"backfill ratio r = {ratios[i]:.2f}")
        return [im_g, *lines.values(), *strip_ims, suptitle]

    update(0)
    return FuncAnimation(fig, update, frames=len(ratios) + int(hold), interval=interval, blit=False)


def save_animation(anim, path: Path | str, *, fps: int = 2, dpi: int | None = None) -> Path:
    """Write ``anim`` as a GIF with Pillow (no ffmpeg), via a temporary file."""
    from matplotlib.animation import PillowWriter

    path = Path(path)
    atomic_write(path, lambda p: anim.save(p, writer=PillowWriter(fps=fps), dpi=dpi or anim._fig.dpi))
    return path


def gif_html(data: bytes, *, alt: str = "animation", width: int | None = None):
    """A GIF as an HTML ``<img>`` with the bytes inline (``data:image/gif;base64``), for a
    notebook (``IPython.display.HTML``): unlike an ``image/gif`` output, which JupyterLab shows
    but ``jupyter nbconvert --to html`` (and so a notebook viewer on the web) does not, HTML
    is shown everywhere. ``width``: the displayed width in px (default: the GIF's own)."""
    import base64
    import html

    from IPython.display import HTML

    if data[:6] not in (b"GIF87a", b"GIF89a"):
        raise ValueError("gif_html takes the bytes of a GIF file")
    size = f' width="{int(width)}"' if width else ""
    return HTML(f'<img src="data:image/gif;base64,{base64.b64encode(data).decode("ascii")}" '
                f'alt="{html.escape(alt)}"{size} style="max-width: 100%; height: auto">')


def show_animation(anim, *, fps: int = 2, dpi: int | None = None, close: bool = True, alt: str = "animation"):
    """``anim`` as an inline GIF for a notebook (:func:`gif_html`: an HTML ``<img>``).

    The GIF is rendered at ``dpi`` (default: the figure's) into memory, so the
    executed notebook stores one GIF instead of every frame as HTML/PNG.
    ``close``: close the figure, so Jupyter does not show its last frame again
    as a still image.
    """
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        data = save_animation(anim, Path(tmp) / "inline.gif", fps=fps, dpi=dpi).read_bytes()
    if close:
        plt.close(anim._fig)
    return gif_html(data, alt=alt)
