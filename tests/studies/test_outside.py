"""Sourced outside figures (outside.py) and their relative gains beside the package's."""
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest

from backfill_utils.studies import outside as O


def test_sourced_relative_gains():
    ref = O.references()
    assert set(ref["source"]) == {O.FASTFILL_README}
    auc = ref[(ref.metric == "mAP") & ref["protocol"].str.startswith("backfilling AUC")]
    got = {(r["dataset"], r["method"], r["side_information"]): r["gain_%"] for r in auc.to_dict("records")}
    # (AUC - old) / (new - old), by hand in fractions of tenths
    expected = {("CIFAR-100", "FCT", False): Fraction(291 - 165, 363 - 165),        # 63.6 %
                ("CIFAR-100", "FastFill", False): Fraction(325 - 165, 363 - 165),   # 80.8 %
                ("ImageNet-1k", "FCT", False): Fraction(405 - 285, 453 - 285),      # 71.4 %
                ("ImageNet-1k", "FCT", True): Fraction(426 - 285, 453 - 285),       # 83.9 %
                ("ImageNet-1k", "FastFill", False): Fraction(448 - 285, 453 - 285),  # 97.0 %
                ("ImageNet-1k", "FastFill", True): Fraction(462 - 285, 453 - 285)}   # 105.4 %
    assert set(got) == set(expected)
    for key, f in expected.items():
        assert got[key] == pytest.approx(float(100 * f), abs=1e-9), key
    assert round(float(100 * expected[("CIFAR-100", "FCT", False)]), 1) == 63.6
    assert round(float(100 * expected[("CIFAR-100", "FastFill", False)]), 1) == 80.8
    # the CIFAR-100 table: old/old, new/new and FCT with the whole gallery transformed, per metric
    cifar = ref[(ref.dataset == "CIFAR-100") & (ref["protocol"] == "whole gallery transformed")].set_index("metric")
    assert cifar.loc[["top-1", "top-5", "mAP"], ["old", "new", "value"]].to_numpy().tolist() == [
        [34.2, 56.5, 47.2], [60.6, 77.0, 72.6], [16.5, 36.3, 25.8]]
    with pytest.raises(ValueError, match="new != old"):
        O.relative_gain(1.0, 2.0, 2.0)


def _table1():
    # old/old mean mAP 10, new/new 30: FCT's mean 25 is 75 % of the gain; no FastFill row
    return pd.DataFrame([{"dataset": "synthetic", "setting": "extended", "method": m, "gain_mAP_%": g,
                          "gain_mAP_%_sd": sd, "mean_mAP": mean}
                         for m, g, sd, mean in (("old", 0.0, 0.0, 10.0), ("new", 100.0, 0.0, 30.0),
                                                ("FCT", 70.0, 0.5, 25.0))])


def test_comparison_puts_the_package_beside_the_source():
    t = O.comparison(_table1())
    assert len(t) == 6 and set(t["source"]) == {O.FASTFILL_README} and (t["setting"] == "extended").all()
    fct = t[(t.dataset == "CIFAR-100") & (t.method == "FCT")].iloc[0]
    assert fct["source_gain_mAP_%"] == pytest.approx(100 * 12.6 / 19.8)
    assert (fct["gain_mAP_%"], fct["gain_mAP_%_sd"]) == (70.0, 0.5)
    assert fct["mean_gain_mAP_%"] == pytest.approx(75.0)
    assert "synthetic, 100 classes at 32 px vs CIFAR-100" in fct["differs"]
    assert "ResNet-18 width 16 vs ResNet-50 at 224 px" in fct["differs"] and "mean of 22 points" in fct["differs"]
    assert "side information" not in fct["differs"]
    side = t[(t.dataset == "ImageNet-1k") & t.side_information]
    assert len(side) == 2 and side["differs"].str.contains("side information: used by the source").all()
    # a method the package's table lacks: its gains are empty, the source's stays
    fastfill = t[(t.dataset == "CIFAR-100") & (t.method == "FastFill")].iloc[0]
    assert np.isnan(fastfill["gain_mAP_%"]) and np.isnan(fastfill["mean_gain_mAP_%"])
    assert fastfill["source_gain_mAP_%"] == pytest.approx(100 * 16.0 / 19.8)


def test_comparison_names_a_wrong_input():
    with pytest.raises(ValueError, match="lacks.*mean_mAP"):
        O.comparison(_table1().drop(columns="mean_mAP"))
    with pytest.raises(ValueError, match="'open'.*extended"):
        O.comparison(_table1(), "open")
