"""Tables and claims (tables.py) from a summary, rows from the registry."""
import numpy as np
import pandas as pd
import pytest

from backfill_utils import config as C
from backfill_utils import tables as TB
from backfill_utils.backfill import registry as MM
from backfill_utils.studies import claims as CL


def fake_summary(settings=("extended", "open")):
    rows = []
    for s in settings:
        for i, m in enumerate(MM.names()):
            rows.append({"dataset": "synthetic", "setting": s, "method": m, "query_passes": MM.get(m).query_passes,
                         "auc_map": 10.0 + i, "auc_top1": 20.0 + i, "mean_map": 10.0 + i,
                         "mean_top1": 20.0 + i, "final_map": 30.0 + i, "final_top1": 40.0 + i,
                         "rel_gain_map": 0.1 * i, "rel_gain_top1": 0.2 * i, "negative_flips_total": float(i)})
    return pd.DataFrame(rows)


def test_table1_rows_are_the_main_group():
    summary = fake_summary()
    t1 = TB.table1(summary)
    assert len(t1) == 2 * len(MM.names("main"))
    assert list(t1.method[:len(MM.names("main"))]) == MM.names("main")
    assert list(t1.setting.unique()) == ["extended", "open"]
    assert t1.set_index(["setting", "method"]).loc[("extended", "new"), "gain_mAP_%"] == pytest.approx(10.0)
    # every row names its setting's old/old and new/new mAP (the registry's old and new rows)
    names = MM.names()
    assert (t1["M_old"] == 10.0 + names.index("old")).all() and (t1["M_new"] == 10.0 + names.index("new")).all()
    with_params = TB.table1(summary.assign(extra_params=7))
    assert (with_params["extra_params"] == 7).all()
    wide = TB.table1(summary, layout="wide")
    assert list(wide.method) == MM.names("main") and "open AUC_mAP" in wide.columns
    with pytest.raises(ValueError, match="layout"):
        TB.table1(summary, layout="tall")
    main = TB.main_comparison(summary)
    assert list(main.columns) == TB.MAIN_COLUMNS and set(main.method) == set(MM.names("main"))


def test_table2_marks_the_components():
    cfg = C.load_profile("smoke")
    t2 = TB.table2_ablation(fake_summary(), cfg)
    assert list(t2.method[:5]) == MM.names("ablation") and set(t2["rho"]) == {"yes", "-"}
    marks = t2.set_index("method").iloc[:5]
    assert marks.loc["RM", ["psi", "CMCL", "L_rev", "rho"]].tolist() == ["-"] * 4
    assert marks.loc["RM+psi", ["psi", "CMCL", "L_rev", "rho"]].tolist() == ["yes", "-", "yes", "-"]
    assert marks.loc["CMCL w/o L_rev", ["CMCL", "L_rev"]].tolist() == ["yes", "-"]
    assert marks.loc["Ours", ["psi", "CMCL", "L_rev", "rho"]].tolist() == ["yes"] * 4


def test_claims_compare_the_named_methods():
    summary = fake_summary(("extended",))
    r = np.linspace(0, 1, 11)
    curves = pd.concat([pd.DataFrame({"method": m, "ratio": r, "mAP": 10.0 + 20 * r,
                                      "negative_flips_vs_old": 1.0}) for m in MM.names()])
    s = summary.set_index("method")
    curves.loc[curves.method == "RM", "mAP"] = np.linspace(s.loc["old", "final_map"], s.loc["new", "final_map"], 11)
    cl = CL.seed_claims(curves, summary).set_index("claim")
    # Ours is registered last, so it has the highest fake AUC: every "Ours > baseline" claim holds
    for b in TB.BASELINES:
        assert cl.loc[f"Ours > {b} on auc_map", "holds"] and cl.loc[f"Ours > {b} on auc_top1", "holds"]
    assert cl.loc["RM endpoints equal old/old and new/new (mAP, within 1e-6)", "holds"]
    assert cl["checked"].all() and (cl.loc["Ours > FCT on auc_map", "group"] == "Ours > FCT on auc_map")
    # a baseline that is not in the summary is left out, not an error
    cl2 = CL.seed_claims(curves[curves.method != "BiCT"], summary[summary.method != "BiCT"])
    assert not cl2["claim"].str.contains("BiCT").any()


def _variants(auc: dict, flips_total: dict, vs_old: dict):
    """A summary and curves of one setting and seed with the given AUC_mAP, total per-step
    negative flips and negative flips vs old/old (at every ratio r > 0; 99 at r = 0)."""
    summary = fake_summary(("extended",))
    for col, values in (("auc_map", auc), ("negative_flips_total", flips_total)):
        for m, v in values.items():
            summary.loc[summary.method == m, col] = v
    r = np.linspace(0, 1, 11)
    curves = pd.concat([pd.DataFrame({"method": m, "ratio": r, "mAP": 10.0 + 20 * r,
                                      "negative_flips_vs_old": np.where(r > 0, vs_old.get(m, 1.0), 99.0)})
                        for m in MM.names()])
    return curves, summary


def test_cmcl_variants_are_compared_like_with_like():
    # psi only: joint 30 vs single 31 (fails); psi + rho: joint 34 vs separate 29 (holds)
    curves, summary = _variants({"RM+psi+CMCL": 30.0, "CMCL-single": 31.0, "Ours": 34.0, "CMCL-separate": 29.0},
                                {"Ours": 36.0, "CMCL-separate": 27.0}, {"Ours": 2.0, "CMCL-separate": 3.0})
    cl = CL.seed_claims(curves, summary).set_index("claim")
    single = cl.loc["joint CMCL > single-system CMCL (psi only: RM+psi+CMCL vs CMCL-single) on AUC_mAP"]
    assert (single["value"], single["reference"], single["methods"], single["holds"]) == (
        30.0, 31.0, "RM+psi+CMCL|CMCL-single", False)
    separate = cl.loc["joint CMCL > separate CMCL (psi + rho: Ours vs CMCL-separate) on AUC_mAP"]
    assert (separate["value"], separate["reference"], separate["methods"], separate["holds"]) == (
        34.0, 29.0, "Ours|CMCL-separate", True)
    assert not cl.index.str.contains(r"joint CMCL \(Ours\)").any()


def test_both_definitions_of_fewer_flips_are_checked_claims_of_one_group():
    # vs old/old: mean over r > 0 is 2 against 3 (the 99 at r = 0 is left out): holds;
    # between consecutive steps: 36 against 27: fails
    curves, summary = _variants({}, {"Ours": 36.0, "CMCL-separate": 27.0}, {"Ours": 2.0, "CMCL-separate": 3.0})
    cl = CL.seed_claims(curves, summary)
    flips = cl[cl["group"] == CL.FLIPS].set_index("claim")
    assert list(flips.index) == [f"{CL.FLIPS}: mean negative flips vs old/old over ratios > 0",
                                 f"{CL.FLIPS}: total negative flips between consecutive backfill steps"]
    assert flips["checked"].all() and list(flips["relation"]) == ["<", "<"]
    assert list(flips["value"]) == [2.0, 36.0] and list(flips["reference"]) == [3.0, 27.0]
    assert list(flips["holds"]) == [True, False]
    # every other claim is its own group
    rest = cl[cl["group"] != CL.FLIPS]
    assert (rest["group"] == rest["claim"]).all()
    # without CMCL-separate neither the flips nor the psi + rho comparison is made
    kept = CL.seed_claims(curves[curves.method != "CMCL-separate"], summary[summary.method != "CMCL-separate"])
    assert not kept["claim"].str.contains("CMCL-separate").any()


def test_table1_over_seeds_gives_mean_and_sample_sd():
    a, b = fake_summary(("extended",)), fake_summary(("extended",))
    b["auc_map"] = b["auc_map"] + 2.0  # seed 1: every AUC_mAP 2 points higher
    b.loc[b.method.isin(["old", "new", "offline"]), "auc_map"] -= 2.0  # references do not depend on the seed
    t1 = TB.table1(pd.concat([a.assign(seed=0), b.assign(seed=1)])).set_index("method")
    assert (t1["seeds"] == 2).all()
    assert t1.loc["Ours", "AUC_mAP"] == pytest.approx(a.set_index("method").loc["Ours", "auc_map"] + 1.0)
    assert t1.loc["Ours", "AUC_mAP_sd"] == pytest.approx(np.std([0.0, 2.0], ddof=1))
    assert t1.loc["old", "AUC_mAP_sd"] == 0.0
    single = TB.table1(a)  # no seed column: one seed, sd undefined
    assert (single["seeds"] == 1).all() and single["AUC_mAP_sd"].isna().all()
    t2 = TB.table2_ablation(pd.concat([a.assign(seed=0), b.assign(seed=1)]), C.load_profile("smoke"))
    assert t2.set_index("method").loc["Ours", "AUC_mAP_sd"] == pytest.approx(np.sqrt(2.0))
