"""Figure style, deterministic figure files, backfill-curve plots and the animation.

Every figure is saved as PNG and PDF with the metadata that would change from
run to run (software version, creation date) removed, and every table as CSV,
Markdown and LaTeX, all written to a temporary name and moved into place.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

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


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_figure(fig, out_dir: Path | str, name: str, formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Save ``fig`` as ``out_dir/name.{png,pdf}`` with deterministic metadata."""
    paths = []
    for fmt in formats:
        meta = {"Software": None} if fmt == "png" else {"Creator": None, "Producer": None, "CreationDate": None}
        path = Path(out_dir) / f"{name}.{fmt}"
        _atomic(path, lambda p, fmt=fmt, meta=meta: fig.savefig(p, format=fmt, metadata=meta, bbox_inches="tight"))
        paths.append(path)
    return paths


def save_table(df: pd.DataFrame, out_dir: Path | str, name: str, *, floatfmt: str = ".2f",
               caption: str | None = None) -> list[Path]:
    """Save ``df`` as CSV (full precision), Markdown and LaTeX (rounded)."""
    out_dir = Path(out_dir)
    paths = [out_dir / f"{name}.csv", out_dir / f"{name}.md", out_dir / f"{name}.tex"]
    _atomic(paths[0], lambda p: df.to_csv(p, index=False))
    _atomic(paths[1], lambda p: p.write_text(df.to_markdown(index=False, floatfmt=floatfmt) + "\n"))
    fmt = "{:" + floatfmt + "}"
    _atomic(paths[2], lambda p: p.write_text(
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
