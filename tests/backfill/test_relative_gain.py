"""The relative gain where the new model is not better than the old one: NaN with a reason."""
import numpy as np
import pandas as pd
import pytest

from backfill_utils import tables as TB
from backfill_utils.backfill import curves as BC
from backfill_utils.tools import report


def _curve(lo, hi):
    r = np.linspace(0, 1, 11)
    y = lo + (hi - lo) * r
    return pd.DataFrame({"ratio": r, "mAP": y, "top1": y, "top5": y, "negative_flips": np.zeros(11)})


@pytest.mark.parametrize("m_old, m_new, match", [
    (43.44, 30.72, "below M_old"),           # the new model is worse: no sign-flipped gain
    (40.0, 40.3, "no more than the noise"),  # a difference within noise
])
def test_relative_gain_is_nan_with_a_reason_when_new_is_not_better(m_old, m_new, match):
    refs = ({k: m_old for k in ("mAP", "top1", "top5")}, {k: m_new for k in ("mAP", "top1", "top5")})
    with pytest.warns(RuntimeWarning, match=match):
        s = BC.summarize_curve(_curve(29.0, 31.0), *refs)
    assert np.isnan(s["rel_gain_map"]) and np.isnan(s["rel_gain_top1"])
    summary = pd.DataFrame([{"dataset": "d", "setting": "open", "method": m, "query_passes": 1, "auc_map": a,
                             "auc_top1": a, "mean_map": a, "mean_top1": a, "final_map": a, "final_top1": a,
                             "rel_gain_map": np.nan, "rel_gain_top1": np.nan, "negative_flips_total": 0.0}
                            for m, a in (("old", m_old), ("new", m_new), ("Ours", 29.89))])
    t1 = TB.table1(summary, ["old", "new", "Ours"])
    assert t1["gain_mAP_%"].isna().all() and t1["gain_note"].str.contains(match).all()
    assert report._gain(t1, "open", "Ours").startswith("not applicable")


def test_relative_gain_unchanged_where_the_new_model_is_better():
    s = BC.summarize_curve(_curve(10.0, 20.0), {"mAP": 10.0, "top1": 10.0, "top5": 10.0},
                           {"mAP": 20.0, "top1": 20.0, "top5": 20.0})
    assert s["rel_gain_map"] == pytest.approx(0.5)
    assert BC.gain_not_applicable(17.12, 38.62) == ""
