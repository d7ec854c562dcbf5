"""Tables from the summaries of the registered methods.

* :func:`main_comparison` -- one row per (setting, method) of the ``main`` group;
* :func:`table1` -- Table 1: AUC_mAP and AUC_CMC (trapezoid and plain mean) and the
  relative gains, long or one row per method with the settings side by side;
* :func:`table2_ablation` -- Table 2 (a): each ``ablation`` method's components
  (from its registration and the profile's recipe) with its AUCs;

The paper's claims (each defined once, by id) are in :mod:`backfill_utils.studies.claims`.

Summaries with a ``seed`` column (the compatibility stage trained over several seeds)
give means, sample standard deviations (``*_sd``) and the number of ``seeds``.

The rows of every table are the registry's methods in registration order
(:func:`backfill_utils.backfill.registry.names`); a method registered in the ``main`` group is a
row of Table 1 without any change here.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .backfill import curves as BC
from .backfill import registry as MM

__all__ = ["MAIN_COLUMNS", "main_comparison", "table1", "table2_ablation", "BASELINES"]

MAIN_COLUMNS = ["dataset", "setting", "method", "query_passes", "auc_map", "auc_top1",
                "final_map", "final_top1", "rel_gain_map", "rel_gain_top1", "negative_flips_total"]
#: The compatible-training baselines the paper's method is claimed to beat (Table 1).
BASELINES = ("BCT", "FCT", "FastFill", "BiCT")


def _ordered(summary: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """Rows of ``names`` in that order, settings in order of appearance."""
    t = summary[summary["method"].isin(names)].copy()
    t["_o"] = t["method"].map({m: i for i, m in enumerate(names)})
    t["_s"] = t["setting"].map({s: i for i, s in enumerate(dict.fromkeys(summary["setting"]))})
    by = ["dataset", "_s", "_o"] if "dataset" in t else ["_s", "_o"]
    return t.sort_values(by, kind="stable").drop(columns=["_o", "_s"])




def main_comparison(summary: pd.DataFrame, names=None) -> pd.DataFrame:
    """The ``main_comparison.csv`` table: one row per (setting, method) of ``names``
    (default: the ``main`` group), columns :data:`MAIN_COLUMNS`."""
    names = list(names or MM.names("main"))
    t = summary[summary["method"].isin(names)].copy()
    t["order"] = t["method"].map({m: i for i, m in enumerate(names)})
    return t.sort_values(["setting", "order"], kind="stable")[MAIN_COLUMNS].reset_index(drop=True)


def _over_seeds(summary: pd.DataFrame) -> pd.DataFrame:
    """``summary`` with one row per (dataset, setting, method): the mean over its ``seed``
    column, ``<metric>_sd`` and ``seeds`` added (:func:`backfill_utils.studies.seeds.seed_stats`);
    a summary without ``seed`` gets ``seeds`` 1 and NaN standard deviations."""
    from .studies.seeds import SUMMARY_METRICS, seed_stats

    if "seed" not in summary.columns:
        summary = summary.assign(seed=0)
    keys = [k for k in ("dataset", "setting", "method") if k in summary.columns]
    stats = seed_stats(summary, SUMMARY_METRICS, by=keys)
    rest = summary.drop_duplicates(keys)[keys + [c for c in ("query_passes", "extra_params")
                                                 if c in summary.columns]]
    return stats.merge(rest, on=keys, how="left")


def table1(summary: pd.DataFrame, names=None, *, layout: str = "long") -> pd.DataFrame:
    """Table 1: per (dataset, setting, method) AUC_mAP, AUC_CMC top-1 (trapezoid and
    plain mean of the points) and the relative gains in percent; rows: ``names``
    (default: the ``main`` group). Each row also gives the method's ``extra_params``
    (trained modules) and its setting's ``M_old`` / ``M_new`` (mAP of old/old and new/new,
    which the gains are relative to).

    Over seeds: a ``summary`` with a ``seed`` column (:func:`backfill_utils.studies.seeds.evaluate_seeds`)
    gives the mean over the seeds, the sample standard deviations ``AUC_mAP_sd``,
    ``AUC_top1_sd``, ``gain_mAP_%_sd``, ``gain_top1_%_sd`` and the number of ``seeds``
    (NaN standard deviations for one seed).

    ``layout="wide"``: one row per (dataset, method) with the (mean) trapezoid AUCs and
    gains of each setting side by side (columns ``"<setting> AUC_mAP"``, ...).
    """
    if layout not in ("long", "wide"):
        raise ValueError(f"layout must be 'long' or 'wide', got {layout!r}")
    names = list(names or MM.names("main"))
    if layout == "wide":
        t = table1(summary, names)
        settings = list(dict.fromkeys(t["setting"]))
        cols = ["AUC_mAP", "AUC_top1", "gain_mAP_%", "gain_top1_%"]
        wide = t.pivot_table(index=["dataset", "method"], columns="setting", values=cols, sort=False,
                             dropna=False)  # keep an undefined gain (NaN) of one setting
        wide.columns = [f"{s} {c}" for c, s in wide.columns]
        wide = wide[[f"{s} {c}" for s in settings for c in cols]].reset_index()
        wide["_o"] = wide["method"].map({m: i for i, m in enumerate(names)})
        return wide.sort_values(["dataset", "_o"], kind="stable").drop(columns="_o").reset_index(drop=True)
    t = _ordered(_over_seeds(summary), names)
    ref = _over_seeds(summary).set_index(["dataset", "setting", "method"])["auc_map"] \
        if "dataset" in summary.columns else None

    def endpoint(which: str) -> list[float]:
        if ref is None:
            return [float("nan")] * len(t)
        return [float(ref.get((d, s, which), float("nan"))) for d, s in zip(t["dataset"], t["setting"])]

    out = pd.DataFrame({
        "dataset": t["dataset"], "setting": t["setting"], "method": t["method"],
        "query_passes": t["query_passes"],
        "extra_params": t["extra_params"] if "extra_params" in t.columns else np.nan,
        "M_old": endpoint("old"), "M_new": endpoint("new"), "seeds": t["seeds"],
        "AUC_mAP": t["auc_map"], "AUC_mAP_sd": t["auc_map_sd"],
        "AUC_top1": t["auc_top1"], "AUC_top1_sd": t["auc_top1_sd"],
        "mean_mAP": t["mean_map"], "mean_top1": t["mean_top1"],
        "gain_mAP_%": 100.0 * t["rel_gain_map"], "gain_mAP_%_sd": 100.0 * t["rel_gain_map_sd"],
        "gain_top1_%": 100.0 * t["rel_gain_top1"], "gain_top1_%_sd": 100.0 * t["rel_gain_top1_sd"],
    })
    if out["gain_mAP_%"].isna().any():  # say why a gain is missing (backfill.gain_not_applicable)
        out["gain_note"] = [BC.gain_not_applicable(o, n) if pd.isna(g) and np.isfinite([o, n]).all()
                            else "" for g, o, n in zip(out["gain_mAP_%"], out["M_old"], out["M_new"])]
    return out.reset_index(drop=True)


def table2_ablation(summary: pd.DataFrame, cfg: dict, names=None) -> pd.DataFrame:
    """Table 2 (ablation): the components each method uses ("yes"/"-": psi, CMCL,
    L_rev, rho, from :func:`backfill_utils.backfill.registry.components` under the profile
    ``cfg``) and its AUCs, per setting; rows: ``names`` (default: the ``ablation`` group).
    Over seeds (a ``seed`` column): means, ``*_sd`` and ``seeds`` as in :func:`table1`."""
    names = list(names or MM.names("ablation"))
    marks = {n: {k: ("yes" if v else "-") for k, v in MM.components(n, cfg).items()} for n in names}
    rows = []
    for _, r in _ordered(_over_seeds(summary), names).iterrows():
        rows.append({"dataset": r["dataset"], "setting": r["setting"], "method": r["method"],
                     **marks[r["method"]], "seeds": r["seeds"], "AUC_mAP": r["auc_map"],
                     "AUC_mAP_sd": r["auc_map_sd"], "AUC_top1": r["auc_top1"], "AUC_top1_sd": r["auc_top1_sd"],
                     "gain_mAP_%": 100.0 * r["rel_gain_map"], "flips_total": r["negative_flips_total"]})
    return pd.DataFrame(rows)
