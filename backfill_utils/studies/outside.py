"""Figures from outside this project, each with its source, beside the package's own.

The paper's own tables are not available: only its abstract and introduction are
public (arXiv 2301.03767; CVF WACV 2025, pp. 1537-1545), so no figure of the paper is
quoted anywhere in the package. The only outside figures are the published results of
FCT and FastFill, from the README of the FastFill release of ml-fct (public copy
AllenWrong/ml-fct), in :data:`REFERENCES`:

* CIFAR-100, ResNet-50 at 224 px, 128-d embeddings, old model on 50 classes: CMC
  top-1 / top-5 / mAP of old/old, new/new, FCT without side information (the whole
  gallery transformed), and the backfilling AUC (mean of 22 points) of FCT in random
  order and of FastFill;
* ImageNet-1k: the backfilling AUC_mAP of FCT in random order and of FastFill, without
  and with side information.

:func:`relative_gain` computes the relative gain (AUC - old) / (new - old) from them;
:func:`comparison` puts the sourced gains of AUC_mAP next to the package's own
(:func:`backfill_utils.tables.table1`) and says what differs.
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

__all__ = ["FASTFILL_README", "PAPER_UNKNOWN", "Reference", "REFERENCES", "relative_gain", "references",
           "comparison"]

#: The source of every figure of :data:`REFERENCES`.
FASTFILL_README = "ml-fct README, FastFill release (public copy AllenWrong/ml-fct)"
#: What is known of the paper's own figures.
PAPER_UNKNOWN = ("the paper's own tables are not available; only its abstract and introduction are public "
                 "(arXiv 2301.03767)")
_CIFAR_MODEL = "ResNet-50 at 224 px, 128-d, old model on 50 classes"
_IMAGENET_MODEL = "the source's ImageNet-1k model"
_MEAN22 = "backfilling AUC, mean of 22 points"


@dataclass(frozen=True)
class Reference:
    """One published figure: ``value`` of ``method`` in ``metric`` (percent), with the
    old/old and new/new figures of the same table."""
    source: str
    dataset: str
    model: str
    metric: str
    method: str
    side_information: bool
    protocol: str
    old: float
    new: float
    value: float


def _cifar(metric: str, old: float, new: float, fct_full: float, fct: float, fastfill: float) -> tuple:
    row = dict(source=FASTFILL_README, dataset="CIFAR-100", model=_CIFAR_MODEL, metric=metric, old=old, new=new)
    return (Reference(method="FCT", side_information=False, protocol="whole gallery transformed", value=fct_full,
                      **row),
            Reference(method="FCT", side_information=False, protocol=_MEAN22 + ", random order", value=fct, **row),
            Reference(method="FastFill", side_information=False, protocol=_MEAN22, value=fastfill, **row))


def _imagenet(method: str, side: bool, value: float, order: str = "") -> Reference:
    return Reference(FASTFILL_README, "ImageNet-1k", _IMAGENET_MODEL, "mAP", method, side, _MEAN22 + order,
                     28.5, 45.3, value)


#: The sourced figures (percent).
REFERENCES: tuple[Reference, ...] = (
    *_cifar("top-1", 34.2, 56.5, 47.2, 49.1, 53.6),
    *_cifar("top-5", 60.6, 77.0, 72.6, 73.6, 75.3),
    *_cifar("mAP", 16.5, 36.3, 25.8, 29.1, 32.5),
    _imagenet("FCT", False, 40.5, ", random order"), _imagenet("FCT", True, 42.6, ", random order"),
    _imagenet("FastFill", False, 44.8), _imagenet("FastFill", True, 46.2),
)


def relative_gain(value: float, old: float, new: float) -> float:
    """(value - old) / (new - old) in percent: the fraction of the upgrade's gain."""
    if new == old:
        raise ValueError(f"relative_gain needs new != old, got old = new = {old}")
    return 100.0 * (value - old) / (new - old)


def references() -> pd.DataFrame:
    """:data:`REFERENCES` as a table with the relative gain ``gain_%`` of each figure."""
    t = pd.DataFrame([vars(r) for r in REFERENCES])
    t["gain_%"] = [relative_gain(r.value, r.old, r.new) for r in REFERENCES]
    return t


def _package_gain(t1: pd.DataFrame, method: str, column: str) -> float:
    rows = t1.set_index("method")
    if method not in rows.index or not {"old", "new"} <= set(rows.index):
        return float("nan")
    return relative_gain(rows.loc[method, column], rows.loc["old", column], rows.loc["new", column])


def comparison(table1: pd.DataFrame, setting: str = "extended", *, data: str = "synthetic, 100 classes at 32 px",
               backbone: str = "ResNet-18 width 16") -> pd.DataFrame:
    """The sourced relative gains of AUC_mAP (backfilling, :data:`REFERENCES`) next to the
    package's own, from ``table1`` (:func:`backfill_utils.tables.table1`, long layout) of
    ``setting``: one row per (package dataset, sourced figure).

    ``gain_mAP_%`` and ``gain_mAP_%_sd`` are the package's gains of the trapezoid AUC over
    its ratios; ``mean_gain_mAP_%`` the gain of the plain mean of its points, the
    protocol the source uses. ``differs`` says what differs; ``data`` and ``backbone``
    describe the package's run (defaults: the default profile)."""
    need = {"dataset", "setting", "method", "gain_mAP_%", "gain_mAP_%_sd", "mean_mAP"}
    if missing := sorted(need - set(table1.columns)):
        raise ValueError(f"comparison needs table1 of tables.table1; the table lacks {missing}")
    t1 = table1[table1["setting"] == setting]
    if t1.empty:
        raise ValueError(f"comparison: table1 has no rows of setting {setting!r} "
                         f"(settings: {sorted(set(table1['setting']))})")
    ref = references()
    ref = ref[(ref["metric"] == "mAP") & ref["protocol"].str.startswith(_MEAN22)].rename(columns={"gain_%": "gain"})
    rows = []
    for dataset, ours in t1.groupby("dataset", sort=False):
        by = ours.set_index("method")
        for r in ref.itertuples(index=False):
            mine = by.loc[r.method] if r.method in by.index else None
            differs = (f"data: {data} vs {r.dataset}; backbone: {backbone} vs {r.model}; schedule scaled for a CPU; "
                       "AUC: trapezoid over the package's ratios vs the source's mean of 22 points "
                       "(mean_gain_mAP_% uses the plain mean of the package's points)")
            if r.side_information:
                differs += "; side information: used by the source, not by the package"
            rows.append({"source": r.source, "dataset": r.dataset, "model": r.model, "method": r.method,
                         "side_information": r.side_information, "protocol": r.protocol, "old": r.old,
                         "new": r.new, "AUC_mAP": r.value, "source_gain_mAP_%": r.gain,
                         "package_dataset": dataset, "setting": setting,
                         "gain_mAP_%": float("nan") if mine is None else float(mine["gain_mAP_%"]),
                         "gain_mAP_%_sd": float("nan") if mine is None else float(mine["gain_mAP_%_sd"]),
                         "mean_gain_mAP_%": _package_gain(ours, r.method, "mean_mAP"), "differs": differs})
    return pd.DataFrame(rows)
