"""Figures of the fairness studies: the tuning trials, the sensitivity of the paper's
method and the regime map (``notebooks/52_tuning.ipynb``, ``notebooks/53_regimes.ipynb``).

Each takes the tables written by :mod:`backfill_utils.studies.tuning`,
:mod:`backfill_utils.studies.sensitivity` and :mod:`backfill_utils.studies.regimes` and returns a
matplotlib figure (saved by the notebook with :meth:`backfill_utils.session.Run.figure`);
line styles come from the method registry. Error bars are one sample standard deviation
over the seeds of the compatibility stage.
"""
from __future__ import annotations

import json

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .style import label_strip, method_style, staggered, tick_number

__all__ = ["tuning_trials", "sensitivity", "family_label", "regime_map", "regime_decider"]


def tuning_trials(trials: pd.DataFrame, title: str | None = None):
    """Validation AUC_mAP of every trial of every method (dots), the best so far (line) and
    the default recipe (trial 0, open marker)."""
    names = list(dict.fromkeys(trials["method"]))
    fig, ax = plt.subplots(figsize=(7.0, 3.6))
    for m in names:
        g = trials[trials.method == m].sort_values("trial")
        st = method_style(m)
        color = st.get("color")
        ax.plot(g["trial"], g["val_auc_map"], ".", color=color, alpha=0.6)
        ax.plot(g["trial"], g["val_auc_map"].cummax(), "-", color=color, lw=st.get("lw", 1.5), label=m)
        d = g[g["default"].astype(bool)]
        ax.plot(d["trial"], d["val_auc_map"], "o", mfc="none", color=color, ms=8)
    ax.set_xlabel("trial (0 = the default recipe)")
    ax.set_ylabel("validation AUC_mAP (%)")
    ax.legend(ncol=3, loc="lower right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def _xpos(values: pd.Series) -> tuple[np.ndarray, list[str]]:
    """Positions of knob values on a log axis ("all" negatives placed one step to the right)."""
    labels = list(values)
    nums = [float(v) for v in labels if v != "all"]
    pos = []
    for v in labels:
        if v == "all":
            pos.append(max(nums) * 4 if nums else 1.0)
        else:
            pos.append(float(v))
    return np.asarray(pos, float), [str(v) if v == "all" else tick_number(float(v)) for v in labels]


def sensitivity(summary: pd.DataFrame, knobs=("tau", "hard_negatives", "lambda_rev"), title: str | None = None):
    """Two rows (AUC_mAP, final mAP) by one column per knob: the test split with seed error
    bars (solid) and the validation split (dashed); the tuned value marked by a star."""
    fig, axes = plt.subplots(2, len(knobs), figsize=(3.6 * len(knobs), 5.4), squeeze=False)
    color = method_style("Ours").get("color", "C3")
    for j, knob in enumerate(knobs):
        for i, (metric, label) in enumerate((("auc_map", "AUC_mAP (%)"), ("final_map", "final mAP (%)"))):
            ax = axes[i][j]
            for split, ls in (("test", "-"), ("val", "--")):
                g = summary[(summary.knob == knob) & (summary.split == split)].copy()
                if g.empty:
                    continue
                x, ticks = _xpos(g["value"])
                o = np.argsort(x)
                ax.errorbar(x[o], g[metric].to_numpy()[o], yerr=g[f"{metric}_sd"].fillna(0).to_numpy()[o],
                            fmt="o" + ls, color=color, alpha=1.0 if split == "test" else 0.5, capsize=3,
                            label=f"{split} split")
                tuned = g["is_tuned"].astype(str).str.lower().eq("true").to_numpy()
                ax.plot(x[tuned], g[metric].to_numpy()[tuned], "*", color="k", ms=11,
                        label="tuned value" if split == "test" else None)
                ax.set_xscale("log")
                lx = np.log10(x[o])
                span = max(float(lx.max() - lx.min()), 1e-9)
                ax.set_xticks(x[o], staggered((lx - lx.min()) / span, [ticks[k] for k in o]))
                ax.minorticks_off()
            ax.set_xlabel(knob)
            ax.set_ylabel(label)
    axes[0][0].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def family_label(family) -> str:
    """A readable name of a family of variants (column ``data``, :func:`backfill_utils.studies.regimes.family`).

    >>> family_label("profile's"), family_label("normalize_embeddings: false")
    ("profile's data", 'unnormalised embeddings')
    >>> family_label('{"num_classes": 10, "test_per_class": 100, "train_per_class": 1000}')
    '10 classes, 1000 train / 100 test images per class'
    """
    if family is None or family == "profile's":
        return "profile's data"
    parts = []
    for part in str(family).split("; "):
        if part.startswith("{"):
            opts = dict(json.loads(part))
            words = []
            if "num_classes" in opts:
                words.append(f"{opts.pop('num_classes')} classes")
            if "train_per_class" in opts and "test_per_class" in opts:
                words.append(f"{opts.pop('train_per_class')} train / {opts.pop('test_per_class')} test images per class")
            words += [f"{k} {v}" for k, v in opts.items()]
            parts.append(", ".join(words))
        elif part == "normalize_embeddings: false":
            parts.append("unnormalised embeddings")
        else:
            parts.append(part)
    return "; ".join(parts)


def regime_map(summary: pd.DataFrame, crossover: pd.DataFrame | None = None, title: str | None = None):
    """Relative gain (mAP, %) of each method against M_old / M_new (left) and against FCT's
    quality at ratio 0 relative to new/new (right), one point per variant with seed error
    bars (each family of variants, column ``data``, its own marker; families other than the
    profile's data dotted); dotted verticals where the reverse direction and the best forward
    transformation cross. Under each panel the variants' names, in rows where they would
    overlap; one legend under the figure: the methods, then the families."""
    from matplotlib.lines import Line2D

    axes_def = (("old_over_new", "M_old / M_new (old/old over new/new mAP)"),
                ("fct_r0_over_new", "FCT mAP at ratio 0 / M_new"))
    fig = plt.figure(figsize=(11.0, 5.6))
    gs = fig.add_gridspec(2, 2, height_ratios=[4.2, 1.1], hspace=0.26, wspace=0.18,
                          left=0.07, right=0.99, top=0.9, bottom=0.12)
    families = list(dict.fromkeys(summary["data"])) if "data" in summary else [None]
    markers = "osD^v"
    for j, (axis, xlabel) in enumerate(axes_def):
        ax = fig.add_subplot(gs[0, j])
        for k, fam in enumerate(families):
            part = summary if fam is None else summary[summary["data"] == fam]
            for m in dict.fromkeys(part["method"]):
                g = part[part.method == m].sort_values(axis)
                st = method_style(m)
                ax.errorbar(g[axis], 100 * g["rel_gain_map"], yerr=100 * g["rel_gain_map_sd"].fillna(0),
                            color=st.get("color"), ls=st.get("ls", "-") if k == 0 else ":", lw=st.get("lw", 1.5),
                            marker=markers[k % len(markers)], capsize=3, label=m if k == 0 else None)
        if crossover is not None:
            for at in crossover[crossover["axis"] == axis]["at"]:
                ax.axvline(at, color="k", ls=":", lw=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("relative gain of AUC_mAP (%)")
        strip = fig.add_subplot(gs[1, j], sharex=ax)
        first = summary.drop_duplicates("variant")
        label_strip(strip, first[axis].to_numpy(float), list(first["variant"]))
        if j == 0:
            handles, labels = ax.get_legend_handles_labels()
    fam_handles = [Line2D([], [], color="0.3", ls="-" if k == 0 else ":", marker=markers[k % len(markers)])
                   for k in range(len(families))]
    fig.legend(handles + fam_handles, labels + [family_label(f) for f in families], loc="lower center",
               bbox_to_anchor=(0.5, 0.0), ncol=len(handles), fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def regime_decider(winners: pd.DataFrame, crossover: pd.DataFrame | None = None, title: str | None = None):
    """Ours minus the best forward transformation (relative gain, points, seed error bars)
    against the forward method's head start at ratio 0 minus Ours' end above new/new (both in
    % of M_new - M_old), one point per variant, labelled; zero lines and the crossover."""
    fig, ax = plt.subplots(figsize=(6.4, 4.9))
    families = list(dict.fromkeys(winners["data"])) if "data" in winners else [None]
    for k, fam in enumerate(families):
        w = winners if fam is None else winners[winners["data"] == fam]
        ax.errorbar(w["start_gap_minus_end_bonus"], w["reverse_minus_forward"], yerr=w["sd"].fillna(0),
                    fmt="osD^v"[k % 5], color=f"C{k}", capsize=3,
                    label=family_label(fam))
        for _, r in w.iterrows():
            ax.annotate(r["variant"], (r["start_gap_minus_end_bonus"], r["reverse_minus_forward"]),
                        textcoords="offset points", xytext=(4, 3), fontsize=7, color="0.35")
    ax.axhline(0, color="k", lw=0.8)
    ax.axvline(0, color="k", lw=0.8, ls="--")
    if crossover is not None:
        for i, at in enumerate(crossover[crossover["axis"] == "start_gap_minus_end_bonus"]["at"]):
            ax.axvline(at, color="k", ls=":", lw=1, label="crossover" if i == 0 else None)
    ax.set_xlabel("forward head start at ratio 0 - Ours' end above new/new (% of the gap)")
    ax.set_ylabel("Ours - best forward: relative gain (points)")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig
