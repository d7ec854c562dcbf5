"""The sensitivity grid of the paper's method around its tuned recipe (studies/sensitivity.py)."""
import pytest

from backfill_utils import config as C
from backfill_utils.studies import sensitivity as SE


def test_sensitivity_points_add_the_tuned_value():
    cfg = C.load_profile("smoke", overrides={"tune": {"sensitivity": {"tau": [0.3, 0.05], "hard_negatives": [16],
                                                                      "lambda_rev": [1.0]}}})
    tuned = {"tau": 0.1, "hard_negatives": None, "lambda_rev": 1.0}
    pts = SE.points(cfg, tuned)
    assert [v for k, v in pts if k == "tau"] == [0.05, 0.1, 0.3]
    assert [v for k, v in pts if k == "hard_negatives"] == [16, None]
    assert [v for k, v in pts if k == "lambda_rev"] == [1.0]
    bad = C.load_profile("smoke", overrides={"tune": {"sensitivity": {"tau": [0.1], "hard_negatives": [],
                                                                      "lambda_rev": [], }}})
    bad["tune"]["sensitivity"]["temperature"] = [1.0]
    with pytest.raises(ValueError, match="temperature"):
        SE.points(bad, tuned)
