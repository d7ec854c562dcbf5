"""Verdicts of the paper's claims over seeds (claims.py): the paired-difference rule."""
import numpy as np
import pandas as pd
import pytest

from backfill_utils.studies import claims as CL


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
        rows += [{"setting": "extended", "seed": seed, "id": "ours_gt_fct_map", "claim": "Ours > FCT on auc_map",
                  "checked": True,
                  "value": a, "relation": ">", "reference": b, "methods": "Ours|FCT", "holds": a > b},
                 {"setting": "extended", "seed": seed, "id": "flips", "claim": "flips", "checked": True,
                  "value": fa, "relation": "<", "reference": fb, "methods": "Ours|CMCL-separate", "holds": fa < fb}]
    t = CL.over_seeds(pd.DataFrame(rows)).set_index("claim")
    d = np.array([1.0, 1.5, 1.3])
    assert t.loc["Ours > FCT on auc_map", "diff"] == pytest.approx(d.mean())
    assert t.loc["Ours > FCT on auc_map", "diff_sd"] == pytest.approx(d.std(ddof=1))
    assert t.loc["Ours > FCT on auc_map", "verdict"] == CL.HOLDS and t.loc["flips", "diff"] == pytest.approx(np.mean([1.0, 0.5, 1.0]))
    assert (t["seeds"] == 3).all() and t["holds"].all()
    assert t.loc["Ours > FCT on auc_map", "value"] == pytest.approx(10.5)


def test_claims_between_untrained_methods_have_no_noise():
    rows = [{"setting": "open", "seed": 0, "id": "rm_rises", "claim": "RM rises", "checked": True, "value": -0.1,
             "relation": ">=", "reference": -0.5, "methods": "RM", "holds": True}]
    t = CL.over_seeds(pd.DataFrame(rows))
    assert t["diff_sd"].iloc[0] == 0.0 and t["verdict"].iloc[0] == CL.HOLDS
    trained = CL.over_seeds(pd.DataFrame(rows).assign(methods="Ours|RM"))
    assert trained["verdict"].iloc[0] == CL.WITHIN_NOISE


def _fake_run():
    from backfill_utils.backfill import registry as MM
    from test_tables import fake_summary
    summary = fake_summary(("extended",))
    r = np.linspace(0, 1, 11)
    curves = pd.concat([pd.DataFrame({"method": m, "ratio": r, "mAP": 10.0 + 20 * r,
                                      "negative_flips_vs_old": 1.0}) for m in MM.names()])
    return curves, summary


def test_asserted_ids_are_checked_claims_of_the_registry():
    # every asserted id is a claim the table makes for the default profile's methods (or a group of them)
    table = CL.seed_claims(*_fake_run())
    assert list(table["id"]) == CL.ids() and len(set(CL.ids())) == len(CL.CLAIMS)
    assert CL.ASSERTED <= set(table.loc[table["checked"], "id"]) | set(CL.GROUPS)
    # the flips statement is not asserted: one of its two definitions fails on the reference run
    assert "joint_fewer_flips" not in CL.ASSERTED
    assert not {c.id for c in CL.CLAIMS if c.group == "joint_fewer_flips"} & CL.ASSERTED
    assert list(table.columns[:3]) == ["id", "claim", "checked"]


def _over_seeds(curves, summary, settings=("extended", "open")):
    parts = [CL.seed_claims(curves, summary).assign(setting=s, seed=seed) for s in settings for seed in (0, 1)]
    return CL.over_seeds(pd.concat(parts, ignore_index=True)).set_index(["setting", "id"])


def test_changing_a_claims_tolerance_keeps_it_asserted(monkeypatch):
    """The text follows the tolerance; the claim stays asserted, found by its id."""
    import dataclasses
    curves, summary = _fake_run()
    before = _over_seeds(curves, summary)
    assert before.loc[("extended", "rm_rises"), "claim"] == "RM rises: no step down by more than 0.5 mAP"
    looser = tuple(dataclasses.replace(c, tol=1.0) if c.id == "rm_rises" else c for c in CL.CLAIMS)
    monkeypatch.setattr(CL, "CLAIMS", looser)
    after = _over_seeds(curves, summary)
    row = after.loc[("extended", "rm_rises")]
    assert row["claim"] == "RM rises: no step down by more than 1.0 mAP" and row["reference"] == -1.0
    assert row["asserted"] and not after.loc[("open", "rm_rises"), "asserted"]
    assert list(after["asserted"]) == list(before["asserted"])
    assert CL.claim("rm_endpoints").claim == "RM endpoints equal old/old and new/new (mAP, within 1e-6)"


def test_an_unknown_id_in_asserted_is_an_error(monkeypatch):
    with pytest.raises(ValueError, match=r"unknown claim id\(s\) \['ours_gt_fct'\]"):
        CL.check_asserted({"ours_gt_fct", "ours_gt_fct_map"})
    monkeypatch.setattr(CL, "ASSERTED", CL.ASSERTED | {"ours_gt_fct"})
    with pytest.raises(ValueError, match="ours_gt_fct"):
        _over_seeds(*_fake_run())
    with pytest.raises(KeyError, match="no claim with id 'nope'"):
        CL.claim("nope")


#: ``a`` and ``b``: the two definitions of the group ``joint_fewer_flips``; ``c``: a claim of its own
_IDS = {"a": "joint_fewer_flips_vs_old", "b": "joint_fewer_flips_steps", "c": "ours_gt_fct_map"}


def _grouped_rows(a_diffs, b_diffs, c_diffs):
    """Per-seed rows of three claims: ``a`` and ``b`` are two definitions of group ``G``,
    ``c`` is its own group; the value minus the reference of seed s is ``*_diffs[s]``."""
    rows = []
    for seed, diffs in enumerate(zip(a_diffs, b_diffs, c_diffs)):
        for claim, group, d in zip(("a", "b", "c"), ("G", "G", "c"), diffs):
            rows.append({"setting": "extended", "seed": seed, "id": _IDS[claim], "claim": claim, "group": group, "checked": True,
                         "value": 10.0 + d, "relation": ">", "reference": 10.0, "methods": "Ours|CMCL-separate",
                         "holds": d > 0})
    return pd.DataFrame(rows)


def test_a_group_holds_beyond_noise_only_where_every_definition_does(monkeypatch):
    # a: d = [1, 1.2, 0.8] (mean 1, sd 0.2): holds; b: d = [1, -0.5, 2] (mean 0.83, sd 1.26): within noise;
    # c: d = [-1, -1, -1]: fails
    per_seed = _grouped_rows([1.0, 1.2, 0.8], [1.0, -0.5, 2.0], [-1.0, -1.0, -1.0])
    monkeypatch.setattr(CL, "ASSERTED", frozenset({"joint_fewer_flips"}))  # the group's id
    t = CL.over_seeds(per_seed).set_index("claim")
    assert list(t["group"]) == ["G", "G", "c"]
    assert list(t["verdict"]) == [CL.HOLDS, CL.WITHIN_NOISE, CL.FAILS]
    # asserting the group asserts each of its definitions
    assert list(t["asserted"]) == [True, True, False]
    g = CL.groups(t.reset_index()).set_index("group")
    assert list(g.index) == ["G", "c"] and list(g["definitions"]) == [2, 1]
    assert list(g["verdict"]) == [CL.WITHIN_NOISE, CL.FAILS] and list(g["holds"]) == [True, False]
    assert list(g["asserted"]) == [True, False]
    both = CL.groups(CL.over_seeds(_grouped_rows([1.0, 1.2, 0.8], [2.0, 2.1, 1.9], [1.0, 1.0, 1.0])))
    assert list(both["verdict"]) == [CL.HOLDS, CL.HOLDS]


def test_rows_without_a_group_are_their_own_group_and_groups_names_a_wrong_input():
    per_seed = _grouped_rows([1.0], [1.0], [1.0]).drop(columns="group")
    assert list(CL.over_seeds(per_seed)["group"]) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="lacks.*group"):
        CL.groups(per_seed.drop(columns="claim"))
