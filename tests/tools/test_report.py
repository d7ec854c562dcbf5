"""The verdict "What holds, and where" (report.py) is written from the results files: short in README.md,
in full in docs/fairness.md."""
import pandas as pd
import pytest

from backfill_utils.studies import claims as CL
from backfill_utils.tools import report

ID = {c.claim: c.id for c in CL.CLAIMS}  # the registry's claim texts and ids
FLIPS = CL.FLIPS


def _claims():
    rows = []
    for claim, d, sd, v in (("RM rises: no step down by more than 0.5 mAP", 0.6, 0.0, CL.HOLDS),
                            ("RM+psi >= RM on AUC_mAP", 0.1, 0.2, CL.WITHIN_NOISE),
                            ("Ours > FCT on auc_map", -1.5, 0.1, CL.FAILS),
                            ("Ours > BCT on auc_map", 9.0, 0.1, CL.HOLDS)):
        rows.append({"setting": "extended", "id": ID[claim], "claim": claim, "checked": True, "seeds": 3, "value": 1.0,
                     "reference": 1.0, "diff": d, "diff_sd": sd, "verdict": v})
    rows.append({"setting": "open", "id": "ours_gt_fct_map", "claim": "Ours > FCT on auc_map", "checked": True, "seeds": 1, "value": 1.0,
                 "reference": 2.0, "diff": -1.0, "diff_sd": float("nan"), "verdict": CL.FAILS})
    return pd.DataFrame(rows)


def _table1():
    return pd.DataFrame([{"setting": "extended", "method": m, "gain_mAP_%": g, "gain_mAP_%_sd": 0.5}
                         for m, g in (("RM", 40.0), ("Ours", 70.0), ("FCT", 80.0), ("BCT", 10.0))])


@pytest.fixture
def results(tmp_path):
    (tmp_path / "tables").mkdir()
    _claims().to_csv(tmp_path / "tables" / "claims.csv", index=False)
    _table1().to_csv(tmp_path / "tables" / "table1.csv", index=False)
    return tmp_path


def test_section_follows_the_numbers(results):
    text = report.section(results)
    assert "Ours > FCT on AUC_mAP: default recipes **fails** (difference -1.50 +- 0.10 over 3 seed(s))" in text
    assert "psi trained with L_rev over rank merge: **holds within noise**" in text
    # outside figures only with their source; the paper's own are unknown
    assert "the paper's own tables are not available; only its abstract and introduction are public" in text
    assert ("(mean of 22 points; ml-fct README, FastFill release (public copy AllenWrong/ml-fct)): on CIFAR-100 "
            "(ResNet-50 at 224 px, old model on 50 classes) FCT in random order 63.6 %, FastFill 80.8 %; on "
            "ImageNet-1k FCT in random order 71.4 %, FastFill 97.0 % without side information, FCT in random order "
            "83.9 %, FastFill 105.4 % with it") in text  # (29.1-16.5)/19.8, (32.5-16.5)/19.8, (40.5-28.5)/16.8, ...
    assert "Here (trapezoid AUC, synthetic data, a CPU schedule): FCT 80.0 +- 0.5 %, FastFill n/a." in text
    assert "36-45" not in text and "28 %" not in text and "paper reports" not in text
    assert "1 checked claim(s) of the extended setting fail: Ours > FCT on auc_map" in text
    assert "open: Ours > FCT on auc_map" in text
    # studies not run yet: the section names their targets
    assert "Not run yet: `make regimes`" in text and "not run (`make tune`)" in text


def test_section_quotes_the_like_with_like_cmcl_claims(results):
    rows = [(FLIPS + ": mean negative flips vs old/old over ratios > 0", 1.11, 0.13, CL.HOLDS),
            (FLIPS + ": total negative flips between consecutive backfill steps", -8.98, 0.86, CL.FAILS),
            ("joint CMCL > separate CMCL (psi + rho: Ours vs CMCL-separate) on AUC_mAP", 4.32, 0.1, CL.HOLDS)]
    extra = pd.DataFrame([{"setting": "extended", "id": ID[c], "claim": c, "checked": True, "seeds": 3, "value": 1.0,
                           "reference": 1.0, "diff": d, "diff_sd": sd, "verdict": v} for c, d, sd, v in rows])
    pd.concat([_claims(), extra]).to_csv(results / "tables" / "claims.csv", index=False)
    text = report.section(results)
    assert ("over separate CMCL, psi + rho (Ours vs CMCL-separate): **holds (> 2 sd)** (difference +4.32 +- 0.10 "
            "over 3 seed(s))") in text
    assert "psi only (RM+psi+CMCL vs CMCL-single): not computed" in text
    assert ("against old/old **holds (> 2 sd)** (difference +1.11 +- 0.13 over 3 seed(s)); between consecutive "
            "backfill steps **fails** (difference -8.98 +- 0.86 over 3 seed(s))") in text


def test_section_reads_the_studies(results):
    (results / "tuning").mkdir()
    (results / "regimes").mkdir()
    pd.DataFrame([{"method": m, "recipe": "tuned", "seed": s, "auc_map": a + s}
                  for s in range(3) for m, a in (("Ours", 30.0), ("FCT", 29.0))]).to_csv(
        results / "tuning" / "test_seeds.csv", index=False)
    pd.DataFrame([{"variant": "weak", "old_over_new": 0.3, "fct_r0_over_new": 0.4, "winner": "reverse",
                   "reverse_gain_%": 80.0, "best_forward": "FCT", "best_forward_gain_%": 50.0},
                  {"variant": "strong", "old_over_new": 0.8, "fct_r0_over_new": 0.9, "winner": "forward",
                   "reverse_gain_%": 60.0, "best_forward": "FastFill", "best_forward_gain_%": 90.0}]).to_csv(
        results / "regimes" / "winners.csv", index=False)
    pd.DataFrame([{"axis": "old_over_new", "data": "profile's", "at": 0.55, "from": "reverse", "to": "forward"},
                  {"axis": "start_gap_minus_end_bonus", "data": "all", "at": 0.4, "from": "reverse",
                   "to": "forward"}]).to_csv(results / "regimes" / "crossover.csv", index=False)
    text = report.section(results)
    # Ours - FCT = 1.0 on every seed: sd 0, holds beyond noise
    assert "tuned with equal budgets **holds (> 2 sd)** (difference +1.00 +- 0.00" in text
    assert "crosses 0.4 points (reverse wins below, forward above)" in text
    assert "weak (M_old/M_new 0.30, FCT at ratio 0 / M_new 0.40): reverse, Ours 80.0 % vs FCT 50.0 %" in text
    assert "forward winning in 1 of 2 regimes (strong)" in text


def test_update_readme_rewrites_only_the_two_blocks(results, tmp_path):
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    readme, doc = root / "README.md", root / "docs" / "fairness.md"
    readme.write_text("head\n<!-- VERDICT:START -->\nold text\n<!-- VERDICT:END -->\ntail\n")
    doc.write_text("# page\n<!-- VERDICT_FULL:START -->\nold\n<!-- VERDICT_FULL:END -->\nend\n")
    report.update_readme(results, root)
    short, full = readme.read_text(), doc.read_text()
    assert short == ("head\n<!-- VERDICT:START -->\n" + report.short_section(results) + "<!-- VERDICT:END -->\ntail\n")
    assert full == ("# page\n<!-- VERDICT_FULL:START -->\n" + report.section(results)
                    + "<!-- VERDICT_FULL:END -->\nend\n")
    assert "Verdict rule" in full and "Verdict rule" not in short
    readme.write_text("no markers")
    with pytest.raises(ValueError, match=r"README\.md needs exactly one <!-- VERDICT:START -->"):
        report.update_readme(results, root)
    assert readme.read_text() == "no markers"


def test_short_verdict_is_at_most_twelve_short_bullets(results):
    (results / "regimes").mkdir()
    pd.DataFrame([{"variant": "strong", "old_over_new": 0.8, "fct_r0_over_new": 0.9, "winner": "forward",
                   "reverse_gain_%": 60.0, "best_forward": "FastFill", "best_forward_gain_%": 90.0}]).to_csv(
        results / "regimes" / "winners.csv", index=False)
    text = report.short_section(results)
    bullets = text.splitlines()
    assert 1 <= len(bullets) <= report.MAX_BULLETS and all(b.startswith("- **") for b in bullets)
    assert all(len(b) <= 250 for b in bullets), max(bullets, key=len)
    assert "**Ours ahead of the baselines** (AUC_mAP, default recipes): **fails** against FCT (-1.50); " \
           "**holds (> 2 sd)** against BCT (+9.00)" not in text  # grouped in the order of the baselines
    assert "**holds (> 2 sd)** against BCT (+9.00); **fails** against FCT (-1.50)" in text
    assert "a forward transformation wins 1 of 1 regimes (strong)" in text
    assert "**Tuned with equal budgets:** not run yet (`make tune`)." in text
    assert "1 of 4 checked claims of the extended setting fail, 1 in the settings with one seed" in text


def test_missing_main_results_say_what_to_run(tmp_path):
    assert "make reproduce" in report.section(tmp_path)


def test_section_states_baseline_strength_settings_and_normalisation(results):
    rows = [("extended", "old", 10.0, 0.0, 0), ("extended", "new", 30.0, 0.0, 0),
            ("extended", "FCT", 25.0, 0.25, 5_712_000), ("extended", "FCT-small", 22.5, 0.5, 66_432),
            ("extended", "FastFill", 26.0, 0.1, 5_712_017), ("extended", "FastFill-small", 23.0, 0.2, 99_457),
            ("heterogeneous", "old", 10.0, float("nan"), 0), ("heterogeneous", "new", 40.0, float("nan"), 0)]
    t1 = pd.DataFrame([{"setting": s, "method": m, "AUC_mAP": a, "AUC_mAP_sd": sd, "extra_params": p,
                        "gain_mAP_%": 0.0, "gain_mAP_%_sd": 0.0, "M_old": 10.0, "M_new": 30.0 if s == "extended" else 40.0}
                       for s, m, a, sd, p in rows])
    t1.to_csv(results / "tables" / "table1.csv", index=False)
    (results / "regimes").mkdir()
    pd.DataFrame([{"study": "raw", "variant": "default", "normalize_embeddings": True, "seeds": 3, "m_old": 10.0,
                   "m_new": 30.0, "rm_gain_%": 18.75, "ours_gain_%": 70.0, "ours_minus_fct_auc_map": 1.5,
                   "ours_minus_fastfill_auc_map": -0.25},
                  {"study": "raw", "variant": "raw", "normalize_embeddings": False, "seeds": 3, "m_old": 9.0,
                   "m_new": 29.0, "rm_gain_%": 30.0, "ours_gain_%": 60.0, "ours_minus_fct_auc_map": -2.0,
                   "ours_minus_fastfill_auc_map": 0.5}]).to_csv(results / "regimes" / "normalisation.csv", index=False)
    text = report.section(results)
    assert ("FCT 25.00 +- 0.25 with its authors' transformation and recipe (5,712,000 trained parameters) against "
            "22.50 +- 0.50 with the small h (FCT-small, 66,432)") in text
    assert "FastFill 26.00 +- 0.10 with its authors'" in text and "(FastFill-small, 99,457)" in text
    assert "extended: 10.00 -> 30.00; heterogeneous: 10.00 -> 40.00." in text
    assert ("L2-normalised (default): rank merge delivers 18.8 % of the gain, Ours 70.0 %, Ours minus FCT +1.50 "
            "and minus FastFill -0.25 AUC_mAP points; raw (raw): rank merge delivers 30.0 %") in text


def test_claims_are_quoted_by_id_whatever_their_text(results):
    """A claim whose text changed (e.g. another tolerance) is still found by its id."""
    claims = _claims()
    claims.loc[claims.id == "rm_rises", "claim"] = "RM rises: no step down by more than 1.0 mAP"
    claims.loc[claims.id == "rm_rises", "diff"] = 0.123
    claims.to_csv(results / "tables" / "claims.csv", index=False)
    assert "+0.12" in report.section(results) and "+0.12" in report.short_section(results)
