"""The regime map (studies/regimes.py): variants, the normalisation study, paired winners, overrides."""
import json

import numpy as np
import pandas as pd
import pytest

from backfill_utils import config as C
from backfill_utils import embed as E
from backfill_utils import train as TR
from backfill_utils.studies import regimes as RG


@pytest.mark.slow
def test_variants_change_only_the_old_model_or_a_family():
    cfg = C.load_profile("default")
    cfgs = RG.variant_cfgs(cfg)
    assert set(cfgs) == set(cfg["regimes"]["variants"])
    families = {}
    for name, c in cfgs.items():
        families.setdefault(RG.family(cfg["regimes"]["variants"][name]), []).append(c)
    for members in families.values():  # one new model's side per family, one old model's per variant
        news = {json.dumps(E.embedding_spec(c, "extended", "new"), sort_keys=True) for c in members}
        olds = {json.dumps(E.embedding_spec(c, "extended", "old"), sort_keys=True) for c in members}
        assert len(news) == 1 and len(olds) == len(members)
    assert len(families) == 3 and "normalize_embeddings: false" in families
    assert all(c["settings"] == ["extended"] for c in cfgs.values())
    assert TR.model_spec(cfgs["50% of classes (default)"], "extended", "old") == TR.model_spec(cfg, "extended", "old")
    cfg["regimes"]["variants"]["bigger new"] = {"new_backbone": {"width": 64}}
    with pytest.raises(ValueError, match="only the old model"):
        RG.regime_config(cfg)


def test_normalisation_study_sets_each_raw_variant_beside_its_normalised_twin():
    rows = []
    for variant, changes, m_old, m_new, auc in (
            ("default", {}, 20.0, 40.0, {"RM": 25.0, "Ours": 35.0, "FCT": 30.0, "FastFill": 32.0}),
            ("raw", {"normalize_embeddings": False}, 15.0, 35.0, {"RM": 20.0, "Ours": 26.0, "FCT": 27.0,
                                                                  "FastFill": 29.0}),
            ("weak", {"old_fraction": 0.1}, 10.0, 40.0, {"RM": 12.0, "Ours": 30.0, "FCT": 20.0, "FastFill": 21.0})):
        for method, a in auc.items():
            rows.append({"variant": variant, "method": method, "seeds": 2, "auc_map": a,
                         "rel_gain_map": (a - m_old) / (m_new - m_old), "m_old": m_old, "m_new": m_new,
                         "data": RG.family(changes), "changes": json.dumps(changes, sort_keys=True)})
    study = RG.normalisation_study(pd.DataFrame(rows))
    assert study["variant"].tolist() == ["default", "raw"] and study["study"].tolist() == ["raw", "raw"]
    assert study["normalize_embeddings"].tolist() == [True, False]
    np.testing.assert_allclose(study["rm_gain_%"], [25.0, 25.0])
    np.testing.assert_allclose(study["ours_minus_fct_auc_map"], [5.0, -1.0])
    np.testing.assert_allclose(study["ours_minus_fastfill_auc_map"], [3.0, -3.0])
    assert RG.normalisation_study(pd.DataFrame(rows[:4])).empty  # no raw variant: no rows
    with pytest.raises(ValueError, match="make regimes"):
        RG.normalisation_study(pd.DataFrame(rows).drop(columns="changes"))
    cfg = C.load_profile("smoke", overrides={"regimes": {"variants": {"raw": {"normalize_embeddings": 0}}}})
    with pytest.raises(ValueError, match="normalize_embeddings must be true or false"):
        RG.variant_cfgs(cfg)


def test_winners_pair_the_seeds():
    rows = []
    for v, x, (ours, fct, ff) in (("weak", 0.3, ([0.8, 0.82], [0.5, 0.52], [0.4, 0.45])),
                                  ("strong", 0.9, ([0.6, 0.58], [0.9, 0.93], [0.95, 0.91]))):
        for seed in (0, 1):
            for m, g in (("Ours", ours), ("FCT", fct), ("FastFill", ff)):
                rows.append({"variant": v, "method": m, "seed": seed, "rel_gain_map": g[seed],
                             "old_over_new": x, "fct_r0_over_new": x, "m_old": 10.0, "m_new": 30.0,
                             "fct_r0_map": 20.0 if v == "strong" else 12.0, "ours_r0_map": 11.0,
                             "final_map": 34.0 if v == "weak" else 30.0})
    win = RG.winners(pd.DataFrame(rows)).set_index("variant")
    # weak: Ours - best forward per seed = [0.3, 0.3] points x 100; strong: [0.6 - 0.95, 0.58 - 0.93]
    assert win.loc["weak", "reverse_minus_forward"] == pytest.approx(30.0)
    assert win.loc["weak", "winner"] == "reverse" and win.loc["strong", "winner"] == "forward"
    assert win.loc["strong", "reverse_minus_forward"] == pytest.approx(-35.0)
    cross = RG.crossover(win.reset_index())
    assert cross["at"].tolist() == pytest.approx([0.3 + 0.6 * 30 / 65])
    # what decides it: the forward head start at ratio 0 and Ours' end above new/new, in % of the gap of 20
    assert win.loc["strong", "start_gap_%"] == pytest.approx(100 * 9 / 20) and win.loc["strong", "end_bonus_%"] == 0
    assert win.loc["weak", "start_gap_%"] == pytest.approx(5.0) and win.loc["weak", "end_bonus_%"] == pytest.approx(20.0)
    # two data families are not neighbours on the axes of the map, but one on the decider's axis
    fam = win.reset_index().assign(data=["a", "b"])
    assert RG.crossover(fam).empty and len(RG.crossover(fam, "start_gap_minus_end_bonus", by_family=False)) == 1


def test_variants_are_replaced_whole_by_an_override_and_checked():
    cfg = C.load_profile("default", overrides={"regimes": {"variants": {"only": {"old_fraction": 0.3}}}})
    assert list(cfg["regimes"]["variants"]) == ["only"]
    few = C.load_profile("default", overrides={"regimes": {"variants": {"one class": {
        "old_fraction": 0.1, "dataset_options": {"num_classes": 10}}}}})
    with pytest.raises(ValueError, match="one class.*1 class"):
        RG.variant_cfgs(few)
    # a data family: the new model changes with the data, the variant names its data
    fam = C.load_profile("default", overrides={"regimes": {"variants": {
        "a": {}, "b": {"dataset_options": {"num_classes": 10}}}}})
    cfgs = RG.variant_cfgs(fam)
    assert TR.model_spec(cfgs["a"], "extended", "new") != TR.model_spec(cfgs["b"], "extended", "new")
