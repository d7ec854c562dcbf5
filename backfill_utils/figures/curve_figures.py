"""The curve figures: backfilling curves per metric, AUC bars, the ablation, negative flips,
pair-distance histograms and training curves (styled by :mod:`backfill_utils.figures.style`).
"""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd


from .style import AUC_KEY, METRIC_LABEL, SYSTEM_COLOR, method_style


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
