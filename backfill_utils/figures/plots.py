"""Figure style, deterministic figure and table files, and the curve figures.

Every figure is saved as PNG and PDF with the metadata that would change from
run to run (software version, creation date) removed, and every table as CSV,
Markdown and LaTeX, all written atomically (:func:`io.atomic_write`).

Line styles and colours come from the method registry (:func:`backfill_utils.backfill.registry.style`;
one colour per method, :data:`backfill_utils.backfill.registry.COLORS`);
image figures (thumbnails, Fig. 1) are in :mod:`backfill_utils.figures.thumbnails`, the
backfilling animation in :mod:`backfill_utils.figures.animation`.

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


def training_curves(histories: dict, columns=("loss", "train_acc"), title: str | None = None):
    """One panel per history column, one line per run (``{label: DataFrame with epoch}``)."""
    fig, axes = plt.subplots(1, len(columns), figsize=(4.2 * len(columns), 3.2), squeeze=False)
    for ax, col in zip(axes[0], columns):
        for label, h in histories.items():
            if col in h:
                ax.plot(h["epoch"], h[col], marker=".", label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(col)
    axes[0][0].legend(ncol=1)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


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


def _methods_in(curves: pd.DataFrame, methods) -> list[str]:
    methods = list(methods) if methods is not None else list(dict.fromkeys(curves["method"]))
    missing = [m for m in methods if m not in set(curves["method"])]
    if missing:
        raise KeyError(f"methods {missing} not in the curves table; it has {sorted(set(curves['method']))}")
    return methods


def curve_panel(ax, curves: pd.DataFrame, metric: str, methods=None, *, label_fn=None) -> None:
    """``metric`` vs backfill ratio, one line per method (offline as a step)."""
    for m in _methods_in(curves, methods):
        c = curves[curves["method"] == m].sort_values("ratio")
        label = label_fn(m) if label_fn else m
        kw = method_style(m)
        if m == "offline" and metric in ("mAP", "top1", "top5"):
            # old/old until r = 1: drawn above the old/old line, with open markers, so that it shows on it
            ax.step(c["ratio"], c[metric], where="post", label=label,
                    **{"lw": 1.6, "zorder": 2.5, "marker": "s", "ms": 3.5, "mfc": "white", **kw})
        elif m in ("old", "new"):
            ax.plot(c["ratio"], c[metric], label=label, lw=1.8, zorder=1, **kw)
        else:
            ax.plot(c["ratio"], c[metric], marker="o", ms=3, label=label, **kw)
    ax.set_xlabel("backfill ratio")
    ax.set_ylabel(METRIC_LABEL.get(metric, metric))
    ax.set_xlim(0, 1)


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


def _legend_below(fig, ax, ncol: int, title: str | None = None) -> None:
    """One legend for the whole figure, under the panels (from ``ax``'s handles)."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=ncol, title=title,
               title_fontsize=8)


def _over_seeds(summary: pd.DataFrame | None) -> int:
    """How many seeds the AUCs of ``summary`` average (its ``seeds`` column; 1 without one)."""
    if summary is None or "seeds" not in summary or summary.empty:
        return 1
    return int(summary["seeds"].max())


def auc_text(row, metrics: Sequence[str] = ("mAP", "top1")) -> str:
    """The AUCs of one summary row for a legend, in the order of ``metrics``: ``"33.9 / 49.1"``
    for one seed; over seeds (``seeds`` > 1 and ``auc_*_sd`` columns, as
    :func:`backfill_utils.studies.seeds.seed_stats` gives them) mean and sample sd as Table 1 prints
    them, ``"33.81 ± 0.05 / 49.12 ± 0.22"``.

    >>> auc_text({"auc_map": 33.8112, "auc_top1": 49.1})
    '33.8 / 49.1'
    >>> auc_text({"auc_map": 33.8112, "auc_map_sd": 0.0541, "auc_top1": 49.1, "auc_top1_sd": 0.2, "seeds": 3})
    '33.81 ± 0.05 / 49.10 ± 0.20'
    """
    seeds = int(row.get("seeds", 1) or 1)
    parts = []
    for k in metrics:
        key = AUC_KEY.get(k)
        if key is None or key not in row:
            continue
        sd = row.get(f"{key}_sd")
        if seeds > 1 and sd is not None and np.isfinite(sd):
            parts.append(f"{row[key]:.2f} ± {sd:.2f}")
        else:
            parts.append(f"{row[key]:.1f}")
    return " / ".join(parts)


def _auc_label(summary: pd.DataFrame | None, metrics: Sequence[str]):
    if summary is None:
        return None
    s = summary.drop_duplicates("method").set_index("method")

    def label(m):
        if m not in s.index:
            return m
        return f"{m}: " + auc_text(s.loc[m].to_dict(), metrics)
    return label


def _auc_title(summary: pd.DataFrame | None, metrics: Sequence[str]) -> str | None:
    if summary is None:
        return None
    title = "AUC " + " / ".join("CMC top-1" if m == "top1" else m for m in metrics)
    n = _over_seeds(summary)
    return title + (f"\nmean ± sd over {n} seeds (as Table 1)" if n > 1 else "")


def curve_grid(curves: pd.DataFrame, summary: pd.DataFrame | None = None, methods=None, *,
               metrics: Sequence[str] = ("mAP", "top1"), row: str | None = None, rows=None,
               title: str | None = None, panel_size=(3.6, 2.8)):
    """Backfilling curves: one panel per metric, one row per value of column ``row``
    (e.g. ``"setting"``), one legend per row with each method's AUCs (trapezoid
    over [0, 1]) for the metrics of the row, in the order of ``metrics``.

    ``summary``: one row per method (and ``row`` value) with ``auc_map``, ``auc_top1``; a
    summary over seeds (``seeds``, ``auc_*_sd``: :func:`backfill_utils.studies.seeds.seed_stats`) gives
    the legend mean ± sd, as Table 1, while the curves are those of ``curves``."""
    if row is None:
        rows, groups = [None], {None: (curves, summary)}
    else:
        rows = list(rows) if rows is not None else list(dict.fromkeys(curves[row]))
        groups = {r: (curves[curves[row] == r],
                      None if summary is None else summary[summary[row] == r]) for r in rows}
    nr, nc = len(rows), len(metrics)
    fig, axes = plt.subplots(nr, nc, figsize=(panel_size[0] * nc + 2.4, panel_size[1] * nr + 0.5),
                             squeeze=False)
    for i, r in enumerate(rows):
        c, s = groups[r]
        if c.empty:
            raise KeyError(f"no curves for {row}={r!r}")
        label_fn = _auc_label(s, metrics)
        for j, metric in enumerate(metrics):
            ax = axes[i][j]
            curve_panel(ax, c, metric, methods, label_fn=label_fn)
            ax.set_title(f"{r}: {METRIC_LABEL.get(metric, metric)}" if r is not None else METRIC_LABEL.get(metric, metric),
                         fontsize=9)
            if i < nr - 1:
                ax.set_xlabel("")
        handles, labels = axes[i][-1].get_legend_handles_labels()
        leg_title = _auc_title(s, metrics)
        axes[i][-1].legend(handles, labels, loc="center left", bbox_to_anchor=(1.02, 0.5), title=leg_title,
                           title_fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def auc_bars(ax, summary: pd.DataFrame, methods, keys: Sequence[str] = ("auc_map", "auc_top1"),
             labels: Sequence[str] = ("AUC mAP", "AUC top-1")) -> None:
    """Grouped bars of the AUCs of ``methods`` (one group per method), values on top."""
    s = summary.drop_duplicates("method").set_index("method")
    missing = [m for m in methods if m not in s.index]
    if missing:
        raise KeyError(f"methods {missing} not in the summary")
    x = np.arange(len(methods))
    w = 0.8 / len(keys)
    shades = ["#4c72b0", "#dd8452", "#55a868"]
    for i, (k, lab) in enumerate(zip(keys, labels)):
        vals = s.loc[list(methods), k].to_numpy(dtype=float)
        bars = ax.bar(x + (i - (len(keys) - 1) / 2) * w, vals, w, label=lab, color=shades[i % 3])
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    ax.set_xticks(x, methods, rotation=30, ha="right")
    ax.set_ylabel("AUC (%)")
    ax.set_ylim(0, 1.3 * max(float(np.nanmax(s.loc[list(methods), k].to_numpy(dtype=float))) for k in keys))
    ax.legend(loc="upper center", ncol=len(keys))
    ax.grid(axis="x", visible=False)


def ablation_figure(curves: pd.DataFrame, summary: pd.DataFrame, methods, title: str | None = None):
    """Ablation: mAP and top-1 curves of ``methods`` and a bar chart of their AUCs."""
    fig, axes = plt.subplots(1, 3, figsize=(13.5, 3.6), gridspec_kw={"width_ratios": [1, 1, 1.15]})
    for ax, metric in zip(axes[:2], ("mAP", "top1")):
        curve_panel(ax, curves, metric, methods)
        ax.set_title(METRIC_LABEL[metric], fontsize=9)
    auc_bars(axes[2], summary, methods)
    axes[2].set_title("area under the backfilling curve", fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _legend_below(fig, axes[0], ncol=len(methods))
    return fig


def flips_figure(curves: pd.DataFrame, summary: pd.DataFrame, methods, title: str | None = None):
    """Negative flips: per step (top-1 correct at r_i, wrong at r_{i+1}), against old/old
    (correct with old/old, wrong at r), and their totals over the backfill."""
    methods = _methods_in(curves, methods)
    has_vs_old = "negative_flips_vs_old" in curves
    fig, axes = plt.subplots(1, 3 if has_vs_old else 2, figsize=(14 if has_vs_old else 9.5, 3.6))
    curve_panel(axes[0], curves, "negative_flips", methods)
    axes[0].set_title("per backfill step", fontsize=9)
    axes[0].set_ylabel("negative flips (% of queries)")
    if has_vs_old:
        c = curves[curves["method"].isin(methods)].fillna({"negative_flips_vs_old": 0.0})
        curve_panel(axes[1], c, "negative_flips_vs_old", methods)
        axes[1].set_title("against old/old", fontsize=9)
        axes[1].set_ylabel("flips vs old/old (% of queries)")
    s = summary.drop_duplicates("method").set_index("method")
    ax = axes[-1]
    vals = s.loc[methods, "negative_flips_total"].to_numpy(dtype=float)
    bars = ax.bar(np.arange(len(methods)), vals, color=[method_style(m).get("color", "#333333") for m in methods])
    ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    ax.set_xticks(np.arange(len(methods)), methods, rotation=30, ha="right")
    ax.set_ylabel("sum of per-step flips (%)")
    ax.set_title("total over the backfill", fontsize=9)
    ax.margins(y=0.15)
    ax.grid(axis="x", visible=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _legend_below(fig, axes[0], ncol=min(len(methods), 9))
    return fig


def curves_and_flips(curves: pd.DataFrame, summary: pd.DataFrame, methods, title: str | None = None):
    """mAP and top-1 curves and negative flips per step; one legend under the panels
    with each method's AUCs (mAP / top-1) and its total of per-step flips."""
    methods = _methods_in(curves, methods)
    s = summary.drop_duplicates("method").set_index("method")

    def label(m):
        if m not in s.index:
            return m
        return (f"{m}: AUC {s.loc[m, 'auc_map']:.1f} / {s.loc[m, 'auc_top1']:.1f}, "
                f"flips {s.loc[m, 'negative_flips_total']:.1f}")

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for ax, metric in zip(axes, ("mAP", "top1", "negative_flips")):
        curve_panel(ax, curves, metric, methods, label_fn=label)
        ax.set_title(METRIC_LABEL[metric], fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _legend_below(fig, axes[0], ncol=min(len(methods), 4))
    return fig


def distance_histograms(pairs: pd.DataFrame, methods=None, calibration: pd.DataFrame | None = None, *,
                        titles: dict | None = None, bins: int = 50, suptitle: str | None = None):
    """Histograms (densities) of positive and negative pair distances of the backward
    and the new system of each method (one panel per method, shared axes).

    ``pairs``: :func:`illustrate.system_pair_distances` output; ``calibration``:
    :func:`methods.calibration_summary` (AUCs in the panel titles)."""
    methods = list(methods) if methods is not None else list(dict.fromkeys(pairs["method"]))
    fig, axes = plt.subplots(1, len(methods), figsize=(3.7 * len(methods), 3.3), sharex=True, sharey=True,
                             squeeze=False)
    lo, hi = float(pairs["distance"].min()), float(pairs["distance"].max())
    pad = 0.02 * (hi - lo) + 1e-6
    edges = np.linspace(max(0.0, lo - pad), hi + pad, bins + 1)
    cal = calibration.set_index("method") if calibration is not None else None
    for ax, m in zip(axes[0], methods):
        df = pairs[pairs["method"] == m]
        if df.empty:
            raise KeyError(f"method {m!r} not in pairs")
        for system in ("backward", "new"):
            for pair, ls in (("positive", "-"), ("negative", "--")):
                d = df.loc[(df.system == system) & (df.pair == pair), "distance"]
                ax.hist(d, bins=edges, density=True, histtype="step", ls=ls, lw=1.5,
                        color=SYSTEM_COLOR[system], label=f"{system} system, {pair}")
        t = (titles or {}).get(m, m)
        if cal is not None and m in cal.index:
            t += f"\npooled AUC {cal.loc[m, 'pooled_auc']:.3f}, cross AUC {cal.loc[m, 'cross_auc']:.3f}"
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("Euclidean distance")
    axes[0][0].set_ylabel("density")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    # below the panels, so it never covers a histogram
    fig.legend(handles, labels, loc="upper center", ncol=4, fontsize=8, bbox_to_anchor=(0.5, 0.0))
    return fig


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
