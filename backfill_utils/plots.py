"""Figure style, deterministic figure files, backfill-curve plots and the animation.

Every figure is saved as PNG and PDF with the metadata that would change from
run to run (software version, creation date) removed, and every table as CSV,
Markdown and LaTeX, all written atomically (:func:`io.atomic_write`).

No matplotlib backend is forced: in Jupyter (JupyterLab, papermill, nbval) the
inline backend shows every figure under the cell that makes it; a headless
script gets a non-interactive backend by matplotlib's own choice.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .io import atomic_write

METHOD_STYLE = {
    "old": dict(color="#7f7f7f", ls=":"),
    "new": dict(color="#000000", ls=":"),
    "offline": dict(color="#7f7f7f", ls="--"),
    "naive": dict(color="#bcbd22", ls="-"),
    "BCT": dict(color="#9467bd", ls="-"),
    "FCT": dict(color="#8c564b", ls="-"),
    "FastFill": dict(color="#e377c2", ls="-"),
    "RM": dict(color="#1f77b4", ls="-"),
    "RM+psi": dict(color="#17becf", ls="-"),
    "RM+psi+CMCL": dict(color="#ff7f0e", ls="-"),
    "Ours": dict(color="#d62728", ls="-", lw=2.2),
}
METRIC_LABEL = {"mAP": "mAP (%)", "top1": "CMC top-1 (%)", "top5": "CMC top-5 (%)",
                "negative_flips": "negative flips (% of queries)"}


def style() -> None:
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


def plot_curves(ax, curves: pd.DataFrame, metric: str = "mAP", methods: Iterable[str] | None = None,
                summary: pd.DataFrame | None = None, auc_key: str | None = None) -> None:
    """Plot ``metric`` vs backfill ratio for each method of a long curves table.

    ``curves`` has columns ``method, ratio, <metric>``; with ``summary`` (one
    row per method with ``auc_map``/``auc_top1``) the AUC goes in the legend.
    """
    methods = list(methods) if methods is not None else list(dict.fromkeys(curves["method"]))
    for m in methods:
        c = curves[curves["method"] == m]
        if c.empty:
            raise KeyError(f"method {m!r} not in the curves table; it has {sorted(set(curves['method']))}")
        label = m
        if summary is not None and auc_key is not None and m in set(summary["method"]):
            label = f"{m} (AUC {summary.set_index('method').loc[m, auc_key]:.1f})"
        kw = dict(METHOD_STYLE.get(m, {}))
        step = m == "offline"
        if step:
            ax.step(c["ratio"], c[metric], where="post", label=label, **kw)
        else:
            ax.plot(c["ratio"], c[metric], marker="o", ms=3, label=label, **kw)
    ax.set_xlabel("backfill ratio")
    ax.set_ylabel(METRIC_LABEL.get(metric, metric))
    ax.set_xlim(0, 1)


def image_grid(ax, images: np.ndarray, nrow: int, title: str | None = None) -> None:
    """Show uint8 images (N, H, W, 3) as a grid with ``nrow`` rows."""
    n, h, w, c = images.shape
    ncol = int(np.ceil(n / nrow))
    canvas = np.full((nrow * (h + 2), ncol * (w + 2), c), 255, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        canvas[r * (h + 2) + 1:r * (h + 2) + 1 + h, q * (w + 2) + 1:q * (w + 2) + 1 + w] = images[i]
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)


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


# --------------------------------------------------------------------------- render notebooks
# Figure functions of the render notebooks (40-51): each takes data (DataFrames,
# arrays) and returns a Figure (or a FuncAnimation); nothing is read from disk here.
METHOD_STYLE.update({
    "CMCL-single": dict(color="#2ca02c", ls="-."),
    "CMCL-separate": dict(color="#9467bd", ls="--"),
    "CMCL w/o L_rev": dict(color="#8c564b", ls="-."),
})
OLD_COLOR, NEW_COLOR = "#c7c7c7", "#7b3294"  # gallery items holding old / new embeddings
RIGHT, WRONG, QUERY = (44, 160, 44), (214, 39, 40), (31, 119, 180)
SYSTEM_COLOR = {"backward": "#1f77b4", "new": "#ff7f0e"}
AUC_KEY = {"mAP": "auc_map", "top1": "auc_top1", "top5": "auc_top5"}


def method_style(method: str) -> dict:
    """Line style of a method; a variant ``"<m> (...)"`` gets ``m``'s colour, dashed."""
    if method in METHOD_STYLE:
        return dict(METHOD_STYLE[method])
    base = method.split(" (")[0]
    if base in METHOD_STYLE:
        return dict(METHOD_STYLE[base], ls="--", lw=1.6)
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
            ax.step(c["ratio"], c[metric], where="post", label=label, lw=1.3, zorder=1.5, **kw)
        elif m in ("old", "new"):
            ax.plot(c["ratio"], c[metric], label=label, lw=1.8, zorder=1, **kw)
        else:
            ax.plot(c["ratio"], c[metric], marker="o", ms=3, label=label, **kw)
    ax.set_xlabel("backfill ratio")
    ax.set_ylabel(METRIC_LABEL.get(metric, metric))
    ax.set_xlim(0, 1)


def _legend_below(fig, ax, ncol: int, title: str | None = None) -> None:
    """One legend for the whole figure, under the panels (from ``ax``'s handles)."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=ncol, title=title,
               title_fontsize=8)


def _auc_label(summary: pd.DataFrame | None, metrics: Sequence[str]):
    if summary is None:
        return None
    s = summary.drop_duplicates("method").set_index("method")

    def label(m):
        if m not in s.index:
            return m
        return f"{m}: " + " / ".join(f"{s.loc[m, AUC_KEY[k]]:.1f}" for k in metrics if AUC_KEY.get(k) in s)
    return label


def curve_grid(curves: pd.DataFrame, summary: pd.DataFrame | None = None, methods=None, *,
               metrics: Sequence[str] = ("mAP", "top1"), row: str | None = None, rows=None,
               title: str | None = None, panel_size=(3.6, 2.8)):
    """Backfilling curves: one panel per metric, one row per value of column ``row``
    (e.g. ``"setting"``), one legend per row with each method's AUCs (trapezoid
    over [0, 1]) for the metrics of the row, in the order of ``metrics``."""
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
        leg_title = "AUC " + " / ".join("CMC top-1" if m == "top1" else m for m in metrics) if s is not None else None
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

    ``pairs``: :func:`methods.system_pair_distances` output; ``calibration``:
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


# ---- thumbnails, Fig. 1 and the animation
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


def _hex_rgb(c: str) -> tuple:
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
                            _hex_rgb(NEW_COLOR) if from_new[i] else _hex_rgb(OLD_COLOR), bar_height))
        if i < k - 1:
            tiles.append(np.full((tiles[0].shape[0], 2, 3), 255, np.uint8))
    return np.concatenate(tiles, axis=1)


def upscale(images: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of (..., H, W, 3) uint8 images to ``size`` x ``size``."""
    h, w = images.shape[-3:-1]
    ri = (np.arange(size) * h // size)
    ci = (np.arange(size) * w // size)
    return images[..., ri[:, None], ci[None, :], :]


def _lookup(images):
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
    get = _lookup(images)
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


def _gallery_grid_shape(n: int) -> tuple[int, int]:
    cols = int(np.ceil(np.sqrt(2 * n)))
    return int(np.ceil(n / cols)), cols


def backfill_animation(curves: pd.DataFrame, order: np.ndarray, topk: dict, images, labels,
                       queries, *, methods: Sequence[str] = ("RM", "Ours"), refs: Sequence[str] = ("old", "new"),
                       list_method: str = "Ours", hold: int = 2, dpi: int = 80, interval: int = 600,
                       thumb: int = 40, title: str | None = None):
    """An animation of online backfilling (``matplotlib.animation.FuncAnimation``).

    Frame ``i`` shows the ratio ``r_i`` (the sorted ratios of ``curves``): the gallery
    as a grid of cells, one per item by gallery index, grey while it holds its old
    embedding and purple once backfilled (``order``: the backfill order); the
    ``metrics`` curves of ``methods`` drawn up to ``r_i`` with ``refs`` as flat
    lines; and, per query in ``queries``, its top-k list of ``list_method`` at
    ``r_i`` from ``topk`` (:func:`methods.retrieve_topk_over_ratios` at the same
    ratios: ``indices`` and ``from_new``, (R, Q, k)), framed green/red for
    correct/wrong. ``images``: (N, H, W, 3) uint8 or a dict ``{gallery index:
    image}`` holding the queries and every listed item. The last frame is held
    ``hold`` more frames.
    """
    from matplotlib.animation import FuncAnimation

    labels = np.asarray(labels)
    queries = np.asarray(queries)
    ratios = np.sort(curves["ratio"].unique())
    idx, from_new = np.asarray(topk["indices"]), np.asarray(topk["from_new"])
    if idx.shape[:2] != (len(ratios), len(queries)):
        raise ValueError(f"topk['indices'] has shape {idx.shape}; expected ({len(ratios)}, {len(queries)}, k): "
                         "one list per ratio of the curves and per query")
    n = len(order)
    pos = np.empty(n, dtype=np.int64)
    pos[np.asarray(order)] = np.arange(n)
    gr, gc = _gallery_grid_shape(n)
    counts = [int(np.floor(r * n + 1e-9)) for r in ratios]
    old_rgb, new_rgb = np.array(_hex_rgb(OLD_COLOR)), np.array(_hex_rgb(NEW_COLOR))

    def gallery_image(i):
        cells = np.full((gr * gc, 3), 255, np.uint8)
        cells[:n] = np.where((pos < counts[i])[:, None], new_rgb, old_rgb)
        return cells.reshape(gr, gc, 3)

    get = _lookup(images)
    shown = np.unique(np.r_[queries, idx[idx >= 0]])
    thumbs = {int(j): upscale(get(j), thumb) for j in shown}
    blank = np.full_like(next(iter(thumbs.values())), 255)

    def strip(i, q):
        res = idx[i, q]
        ok = (labels[np.clip(res, 0, None)] == labels[queries[q]]) & (res >= 0)
        imgs = np.stack([thumbs[int(j)] if j >= 0 else blank for j in res])
        return thumbnail_strip(thumbs[int(queries[q])], imgs, ok, from_new[i, q])

    nq = len(queries)
    fig = plt.figure(figsize=(10.0, 3.2 + 1.3 * nq), dpi=dpi)
    gs = fig.add_gridspec(2, 3, height_ratios=[3.0, 1.3 * nq], width_ratios=[1.0, 1.1, 1.1],
                          hspace=0.3, wspace=0.3, left=0.03, right=0.88, top=0.9, bottom=0.02)
    ax_g = fig.add_subplot(gs[0, 0])
    im_g = ax_g.imshow(gallery_image(0), interpolation="nearest", aspect="equal")
    ax_g.set_xticks([])
    ax_g.set_yticks([])
    ax_g.grid(False)
    from matplotlib.patches import Patch
    ax_g.legend(handles=[Patch(color=OLD_COLOR, label="old embedding"), Patch(color=NEW_COLOR, label="new embedding")],
                loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=2, fontsize=8, handlelength=1)
    lines = {}
    metric_axes = []
    for j, metric in enumerate(("mAP", "top1")):
        ax = fig.add_subplot(gs[0, 1 + j])
        metric_axes.append(ax)
        sub = curves[curves["method"].isin(list(methods) + list(refs))]
        lo, hi = sub[metric].min(), sub[metric].max()
        ax.set_ylim(lo - 0.08 * (hi - lo + 1e-9), hi + 0.12 * (hi - lo + 1e-9))
        ax.set_xlim(-0.02, 1.02)
        for m in refs:
            v = curves.loc[curves["method"] == m, metric].iloc[0]
            ax.axhline(v, label=f"{m}/{m}", **{k: w for k, w in method_style(m).items() if k in ("color", "ls")})
        for m in methods:
            (lines[(m, metric)],) = ax.plot([], [], marker="o", ms=3, label=m, **method_style(m))
        ax.set_xlabel("backfill ratio", fontsize=8)
        ax.set_title(METRIC_LABEL[metric], fontsize=9)
        ax.tick_params(labelsize=8)
    metric_axes[-1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    strip_axes, strip_ims = [], []
    sgs = gs[1, :].subgridspec(nq, 1, hspace=0.12)
    for q in range(nq):
        ax = fig.add_subplot(sgs[q, 0])
        strip_ims.append(ax.imshow(strip(0, q), interpolation="nearest"))
        ax.set_axis_off()
        ax.text(-0.02, 0.5, f"query {queries[q]}\n(class {labels[queries[q]]})", transform=ax.transAxes,
                ha="right", va="center", fontsize=9)
        strip_axes.append(ax)
    strip_axes[0].set_title(f"top-{idx.shape[2]} of {list_method}   (frame: green correct, red wrong;  "
                            "bar under a result: grey = from the old part, purple = from the new part)", fontsize=9)
    suptitle = fig.suptitle("", fontsize=11)

    def values(m, metric):
        return curves[curves["method"] == m].sort_values("ratio")[metric].to_numpy()

    series = {(m, metric): values(m, metric) for m in methods for metric in ("mAP", "top1")}

    def update(frame):
        i = min(frame, len(ratios) - 1)
        im_g.set_data(gallery_image(i))
        ax_g.set_title(f"gallery: {counts[i]}/{n} backfilled", fontsize=9)
        for (m, metric), line in lines.items():
            line.set_data(ratios[:i + 1], series[(m, metric)][:i + 1])
        for q, im in enumerate(strip_ims):
            im.set_data(strip(i, q))
        suptitle.set_text((title + "  |  " if title else "") + f"backfill ratio r = {ratios[i]:.2f}")
        return [im_g, *lines.values(), *strip_ims, suptitle]

    update(0)
    anim = FuncAnimation(fig, update, frames=len(ratios) + int(hold), interval=interval, blit=False)
    return anim


def save_animation(anim, path: Path | str, *, fps: int = 2, dpi: int | None = None) -> Path:
    """Write ``anim`` as a GIF with Pillow (no ffmpeg), via a temporary file."""
    from matplotlib.animation import PillowWriter

    path = Path(path)
    atomic_write(path, lambda p: anim.save(p, writer=PillowWriter(fps=fps), dpi=dpi or anim._fig.dpi))
    return path


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


def show_animation(anim, *, fps: int = 2, dpi: int | None = None, close: bool = True):
    """``anim`` as an inline GIF for a notebook (``IPython.display.Image``).

    The GIF is rendered at ``dpi`` (default: the figure's) into memory, so the
    executed notebook stores one small GIF instead of every frame as HTML/PNG.
    ``close``: close the figure, so Jupyter does not show its last frame again
    as a still image.
    """
    import tempfile

    from IPython.display import Image

    with tempfile.TemporaryDirectory() as tmp:
        data = save_animation(anim, Path(tmp) / "inline.gif", fps=fps, dpi=dpi).read_bytes()
    if close:
        plt.close(anim._fig)
    return Image(data=data, format="gif")
