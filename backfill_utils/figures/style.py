"""Figure style and files: rcParams, deterministic figure and table files, method styles, axis helpers.

Every figure is saved as PNG and PDF with the metadata that would change from
run to run (software version, creation date) removed, and every table as CSV,
Markdown and LaTeX, all written atomically (:func:`backfill_utils.io.atomic_write`).

Line styles and colours come from the method registry (:func:`backfill_utils.backfill.registry.style`;
one colour per method, :data:`backfill_utils.backfill.registry.COLORS`). The figures are in
:mod:`backfill_utils.figures.curve_figures` (curves, AUC bars, flips, distances),
:mod:`backfill_utils.figures.study_plots`, :mod:`backfill_utils.figures.thumbnails` (image
figures, Fig. 1) and :mod:`backfill_utils.figures.animation`.

No matplotlib backend is forced: in Jupyter (JupyterLab, papermill, nbval) the
inline backend shows every figure under the cell that makes it; a headless
script gets a non-interactive backend by matplotlib's own choice.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..io import atomic_write


METRIC_LABEL = {"mAP": "mAP (%)", "top1": "CMC top-1 (%)", "top5": "CMC top-5 (%)",
                "negative_flips": "negative flips (% of queries)"}

SYSTEM_COLOR = {"backward": "#1f77b4", "new": "#ff7f0e"}
AUC_KEY = {"mAP": "auc_map", "top1": "auc_top1", "top5": "auc_top5"}


def style() -> None:
    """The package's figure style (matplotlib rcParams)."""
    plt.rcParams.update({
        "figure.dpi": 100, "savefig.dpi": 150, "font.size": 10, "axes.grid": True,
        "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False,
        "legend.fontsize": 8, "legend.frameon": False,
        "svg.hashsalt": "backfill", "pdf.compression": 6,
    })


def save_figure(fig, out_dir: Path | str, name: str, formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Save ``fig`` as ``out_dir/name.{png,pdf}`` with deterministic metadata."""
    paths = []
    for fmt in formats:
        meta = {"Software": None} if fmt == "png" else {"Creator": None, "Producer": None, "CreationDate": None}
        path = Path(out_dir) / f"{name}.{fmt}"
        atomic_write(path, lambda p, fmt=fmt, meta=meta: fig.savefig(p, format=fmt, metadata=meta, bbox_inches="tight"))
        paths.append(path)
    return paths


def save_table(df: pd.DataFrame, out_dir: Path | str, name: str, *, floatfmt: str = ".2f",
               caption: str | None = None) -> list[Path]:
    """Save ``df`` as CSV (full precision), Markdown and LaTeX (rounded)."""
    out_dir = Path(out_dir)
    paths = [out_dir / f"{name}.csv", out_dir / f"{name}.md", out_dir / f"{name}.tex"]
    atomic_write(paths[0], lambda p: df.to_csv(p, index=False))
    atomic_write(paths[1], lambda p: p.write_text(df.to_markdown(index=False, floatfmt=floatfmt) + "\n"))
    fmt = "{:" + floatfmt + "}"
    atomic_write(paths[2], lambda p: p.write_text(
        df.to_latex(index=False, float_format=fmt.format, caption=caption, escape=True)))
    return paths



def method_style(method: str) -> dict:
    """Line style of a registered method (:func:`backfill_utils.backfill.registry.style`); a
    variant ``"<m> (...)"`` gets ``m``'s colour, dashed; an unknown name none."""
    from ..backfill import registry as MM

    if method in MM.names():
        return MM.style(method)
    base = method.split(" (")[0]
    if base in MM.names():
        return dict(MM.style(base), ls="--", lw=1.6)
    return {}



def tick_number(v: float) -> str:
    """A tick label in plain decimal notation, up to 3 significant digits (no powers of ten).

    >>> [tick_number(v) for v in (0.03, 0.1, 0.121, 0.4, 1.0, 2.0, 16.0, 1000.0, 0.00025)]
    ['0.03', '0.1', '0.121', '0.4', '1', '2', '16', '1000', '0.00025']
    """
    if v == 0 or not np.isfinite(v):
        return f"{v:g}"
    digits = max(0, 2 - int(np.floor(np.log10(abs(v)))))
    return f"{v:.{digits}f}".rstrip("0").rstrip(".") if digits else f"{v:.0f}"


def staggered(fractions: Sequence[float], labels: Sequence[str], min_gap: float = 0.12) -> list[str]:
    """Tick labels on two lines where neighbours would collide: a label closer than
    ``min_gap`` (in axis fractions) to the last label on the first line goes to the second
    line (``"\\n"`` in front), if it is not too close there too (then to the line whose last
    label is farther). ``fractions``: the ticks' positions along the axis, in order.

    >>> staggered([0.0, 0.45, 0.5, 1.0], ["0.03", "0.1", "0.121", "0.3"])
    ['0.03', '0.1', '\\n0.121', '0.3']
    """
    out, last = [], [None, None]  # the last label's position on each line
    for f, lab in zip(fractions, labels):
        free = [i for i in (0, 1) if last[i] is None or f - last[i] >= min_gap]
        line = free[0] if free else min((0, 1), key=lambda i: last[i])  # else the line whose last is farthest
        out.append("\n" * line + lab)
        last[line] = f
    return out


def plain_log_axis(axis) -> None:
    """Plain decimal tick labels (:func:`tick_number`) on a log-scaled axis, major and
    minor alike, instead of matplotlib's mix of ``10^0`` and ``4 x 10^-1``."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: tick_number(v)))
    axis.set_minor_formatter(NullFormatter())


def assign_rows(intervals: Sequence[tuple[float, float]], pad: float = 0.0) -> list[int]:
    """Rows for labels spanning ``intervals`` ``(left, right)`` along one axis, so that no
    two labels of one row overlap (nor come closer than ``pad``): each label, taken from left
    to right, goes to the first row whose last label ends before it starts.

    >>> assign_rows([(0, 2), (1, 3), (2.5, 4), (5, 6)])
    [0, 1, 0, 0]
    """
    ends: list[float] = []
    rows = [0] * len(intervals)
    for i in sorted(range(len(intervals)), key=lambda i: intervals[i][0]):
        left, right = intervals[i]
        row = next((r for r, end in enumerate(ends) if left > end + pad), len(ends))
        if row == len(ends):
            ends.append(right)
        else:
            ends[row] = right
        rows[i] = row
    return rows


def label_strip(ax, xs: Sequence[float], labels: Sequence[str], *, fontsize: float = 7, pad_px: float = 6):
    """Horizontal labels of the x positions ``xs`` in ``ax`` (a strip under a panel, sharing its
    x axis), in as many rows as it takes for no two to overlap (:func:`assign_rows` on the
    labels' drawn extents), each with a thin line up to the top of the strip (behind the
    labels of the rows above); returns the rows."""
    fig = ax.figure
    lo, hi = ax.get_xlim()
    texts = []
    for x, lab in zip(xs, labels):
        frac = (x - lo) / (hi - lo) if hi > lo else 0.5
        ha = "left" if frac < 0.12 else "right" if frac > 0.88 else "center"
        texts.append(ax.text(x, 0, lab, fontsize=fontsize, ha=ha, va="center", color="0.25", clip_on=False,
                             zorder=3, bbox=dict(fc="white", ec="none", pad=0.4)))
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in texts]
    rows = assign_rows([(b.x0, b.x1) for b in boxes], pad=pad_px)
    n = max(rows, default=0) + 1
    for x, t, r in zip(xs, texts, rows):
        t.set_y(r + 0.5)
        ax.plot([x, x], [0, r + 0.3], color="0.6", lw=0.6, clip_on=False, zorder=1)
    ax.set_ylim(n + 0.2, 0)
    ax.set_yticks([])
    ax.tick_params(axis="x", which="both", bottom=False, labelbottom=False)
    ax.grid(False)
    for side in ("left", "right", "bottom", "top"):
        ax.spines[side].set_visible(False)
    return rows



def jpeg_image(fig, *, quality: int = 85, dpi: int | None = None):
    """``fig`` as an ``IPython.display.Image`` in JPEG (for inline display of photo-like figures)."""
    import io as _io

    from IPython.display import Image
    from PIL import Image as PILImage

    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi or plt.rcParams["figure.dpi"], bbox_inches="tight")
    out = _io.BytesIO()
    PILImage.open(buf).convert("RGB").save(out, format="JPEG", quality=quality)
    return Image(data=out.getvalue(), format="jpeg")
