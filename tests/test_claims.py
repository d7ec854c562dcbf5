"""Verdicts of the paper's claims over seeds (claims.py): the paired-difference rule."""
import numpy as np
import pandas as pd
import pytest

from backfill_utils import claims as CL


@pytest.mark.parametrize("diffs, relation, expected", [
    ([1.0, 1.2, 0.8], ">", CL.HOLDS),            # mean 1.0, sd 0.2: 1.0 > 0.4
    ([1.0, -0.5, 2.0], ">", CL.WITHIN_NOISE),    # mean 0.83, sd 1.26
    ([-0.1, -0.2, 0.05], ">", CL.FAILS),
    ([0.0, 0.0, 0.0], ">", CL.FAILS),            # a strict claim needs a positive margin
    ([0.0, 0.0, 0.0], ">=", CL.WITHIN_NOISE),    # equality satisfies >=, with no margin
    ([0.5], ">", CL.WITHIN_NOISE),               # one seed: noise unknown
])
def test_verdict_rule(diffs, relation, expected):
    mean, sd, v = CL.verdict(diffs, relation)
    assert v == expected
    assert mean == pytest.approx(np.mean(diffs))
    if len(diffs) > 1:
        assert sd == pytest.approx(np.std(diffs, ddof=1))
    else:
        assert np.isnan(sd)


def test_verdict_boundary_is_strictly_two_sd():
    # d = [1, 3]: mean 2, sd sqrt(2) = 1.414: 2 < 2.83 -> within noise; d = [2, 2.5]: mean 2.25 > 2 * 0.354
    assert CL.verdict([1.0, 3.0], ">")[2] == CL.WITHIN_NOISE
    assert CL.verdict([2.0, 2.5], ">")[2] == CL.HOLDS
    assert CL.verdict([0.1], ">", deterministic=True)[2] == CL.HOLDS
    with pytest.raises(ValueError, match="seed"):
        CL.verdict([], ">")


def test_over_seeds_pairs_the_seeds_and_orients_less_than():
    rows = []
    for seed, (a, b, fa, fb) in enumerate([(10.0, 9.0, 1.0, 2.0), (11.0, 9.5, 1.5, 2.0), (10.5, 9.2, 1.2, 2.2)]):
        rows += [{"setting": "extended", "seed": seed, "claim": "Ours > FCT on auc_map", "checked": True,
                  "value": a, "relation": ">", "reference": b, "methods": "Ours|FCT", "holds": a > b},
                 {"setting": "extended", "seed": seed, "claim": "flips", "checked": True,
                  "value": fa, "relation": "<", "reference": fb, "methods": "Ours|CMCL-separate", "holds": fa < fb}]
    t = CL.over_seeds(pd.DataFrame(rows)).set_index("claim")
    d = np.array([1.0, 1.5, 1.3])
    assert t.loc["Ours > FCT on auc_map", "diff"] == pytest.approx(d.mean())
    assert t.loc["Ours > FCT on auc_map", "diff_sd"] == pytest.approx(d.std(ddof=1))
    assert t.loc["Ours > FCT on auc_map", "verdict"] == CL.HOLDS and t.loc["flips", "diff"] == pytest.approx(np.mean([1.0, 0.5, 1.0]))
    assert (t["seeds"] == 3).all() and t["holds"].all()
    assert t.loc["Ours > FCT on auc_map", "value"] == pytest.approx(10.5)


def test_claims_between_untrained_methods_have_no_noise():
    rows = [{"setting": "open", "seed": 0, "claim": "RM rises", "checked": True, "value": -0.1,
             "relation": ">=", "reference": -0.5, "methods": "RM", "holds": True}]
    t = CL.over_seeds(pd.DataFrame(rows))
    assert t["diff_sd"].iloc[0] == 0.0 and t["verdict"].iloc[0] == CL.HOLDS
    trained = CL.over_seeds(pd.DataFrame(rows).assign(methods="Ours|RM"))
    assert trained["verdict"].iloc[0] == CL.WITHIN_NOISE


def test_asserted_claims_are_checked_ones_of_the_registry():
    # every asserted claim is a row the claims table produces for the default profile's methods
    from backfill_utils import methods as MM
    from test_tables import fake_summary
    from backfill_utils import tables as T
    summary = fake_summary(("extended",))
    r = np.linspace(0, 1, 11)
    curves = pd.concat([pd.DataFrame({"method": m, "ratio": r, "mAP": 10.0 + 20 * r,
                                      "negative_flips_vs_old": 1.0}) for m in MM.names()])
    names = set(T.claims(curves, summary)["claim"])
    assert {c for _, c in CL.ASSERTED} <= names
