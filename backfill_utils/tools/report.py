"""The verdict "What holds, and where", written from the files in ``results/``: in full
(:func:`section`, the block ``VERDICT_FULL`` of docs/fairness.md) and in at most
:data:`MAX_BULLETS` short bullets (:func:`short_section`, the block ``VERDICT`` of README.md).

Every number of the section is read from a results file, and the full section names the file
next to it; the wording follows the numbers (a claim's verdict over the seeds, who wins a
regime, where the crossover is), so both are regenerated, never edited by hand,
whenever ``make reproduce``, ``make tune`` or ``make regimes`` rewrites their inputs
(:func:`update_readme`). A missing input is said in the section, naming the target.

Inputs: ``tables/claims.csv`` and ``tables/table1.csv`` (31/50), ``tables/table2_cost.csv``
(51), ``tuning/test_seeds.csv`` and ``tuning/sensitivity_summary.csv`` (``make tune``),
``regimes/winners.csv`` and ``regimes/crossover.csv`` (``make regimes``). Figures from
outside the project come from :mod:`backfill_utils.studies.outside`, each with its source.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .. import config as C
from ..studies import claims as CL
from ..studies import outside as O
from ..studies.claims import FAILS, HOLDS, WITHIN_NOISE, verdict
from . import blocks

__all__ = ["MAX_BULLETS", "README_BLOCK", "DOC", "DOC_BLOCK", "section", "short_section", "update_readme"]

#: The short verdict in README.md, the full one in docs/fairness.md (:mod:`backfill_utils.tools.blocks`).
README_BLOCK, DOC_BLOCK = "VERDICT", "VERDICT_FULL"
DOC = blocks.DOCS / "fairness.md"
#: The most bullets of the short verdict.
MAX_BULLETS = 12
FORWARD = ("FCT", "FastFill", "BiCT")


def _read(results: Path, rel: str) -> pd.DataFrame | None:
    path = results / rel
    return pd.read_csv(path) if path.is_file() else None


def _v(row) -> str:
    """'holds (> 2 sd): +1.23 +- 0.45 (3 seeds, file)'-style evidence of one claims row."""
    sd = "" if pd.isna(row["diff_sd"]) else f" +- {row['diff_sd']:.2f}"
    return f"**{row['verdict']}** (difference {row['diff']:+.2f}{sd} over {int(row['seeds'])} seed(s))"


def _ours_gt(method: str) -> str:
    """The id of the claim "Ours > ``method`` on auc_map"."""
    return CL.claim(f"ours_gt_{method.lower()}_map").id


def _claim(claims: pd.DataFrame, setting: str, cid: str) -> str:
    """The evidence of the claim with id ``cid`` (:data:`backfill_utils.studies.claims.CLAIMS`)."""
    r = claims[(claims.setting == setting) & (claims.id == CL.claim(cid).id)]
    return "not computed" if r.empty else _v(r.iloc[0])


def _gain(t1: pd.DataFrame, setting: str, method: str) -> str:
    r = t1[(t1.setting == setting) & (t1.method == method)]
    if r.empty:
        return "n/a"
    r = r.iloc[0]
    if pd.isna(r["gain_mAP_%"]):
        return "not applicable (M_new is not above M_old beyond noise)"
    sd = "" if pd.isna(r["gain_mAP_%_sd"]) else f" +- {r['gain_mAP_%_sd']:.1f}"
    return f"{r['gain_mAP_%']:.1f}{sd} %"


def _components(claims, t1, setting) -> list[str]:
    c = lambda name: _claim(claims, setting, name)  # noqa: E731
    return [
        f"- **Rank merge needs no training and runs from old/old to new/new (Fig. 2).** Its curve rises: "
        f"{c('rm_rises')}; its endpoints are old/old and new/new: "
        f"{c('rm_endpoints')}. It delivers {_gain(t1, setting, 'RM')} "
        "of the upgrade's gain (relative gain of AUC_mAP, `tables/table1.csv`); the paper's own figure is "
        "unknown: " + O.PAPER_UNKNOWN + ".",
        f"- **Each component adds (the ablation, Table 2).** psi trained with L_rev over rank merge: "
        f"{c('rm_psi_ge_rm')}; CMCL over L_rev alone: {c('cmcl_gt_rm_psi')}; "
        f"L_rev inside the CMCL objective (lambda_rev 1 against 0): {c('cmcl_gt_no_lrev')}; "
        f"the learnable new embedding rho over psi + CMCL: {c('ours_gt_cmcl')}; Ours ends at "
        f"new/new or above: {c('ours_final_near_new')} (`tables/claims.csv`).",
        f"- **Joint CMCL beats its variants (the same modules on both sides).** Over single-system CMCL, psi "
        f"only (RM+psi+CMCL vs CMCL-single): "
        f"{c('joint_gt_single_cmcl')}; over "
        f"separate CMCL, psi + rho (Ours vs CMCL-separate): "
        f"{c('joint_gt_separate_cmcl')}. Fewer negative flips "
        f"than separate, asserted only where both definitions hold: against old/old "
        f"{c('joint_fewer_flips_vs_old')}; between consecutive backfill steps "
        f"{c('joint_fewer_flips_steps')}.",
    ]


def _auc(rows: pd.DataFrame, method: str) -> str:
    r = rows.loc[method]
    sd = "" if pd.isna(r["AUC_mAP_sd"]) else f" +- {r['AUC_mAP_sd']:.2f}"
    return f"{r['AUC_mAP']:.2f}{sd}"


def _strength(t1: pd.DataFrame, setting: str) -> list[str]:
    """FCT and FastFill with their authors' transformation against the small h (Table 1), and
    each setting's M_old / M_new (the heterogeneous setting upgrades to a larger new model)."""
    rows = t1[t1.setting == setting].set_index("method")
    parts = [f"{full} {_auc(rows, full)} with its authors' transformation and recipe "
             f"({int(rows.loc[full, 'extra_params']):,} trained parameters) against {_auc(rows, small)} with the small h "
             f"({small}, {int(rows.loc[small, 'extra_params']):,})"
             for full, small in (("FCT", "FCT-small"), ("FastFill", "FastFill-small"))
             if {full, small} <= set(rows.index) and "extra_params" in rows]
    lines = []
    if parts:
        lines.append(f"- **The baselines at their authors' strength (Table 1, {setting} setting, AUC_mAP).** "
                     + "; ".join(parts) + " (`tables/table1.csv`).")
    if {"M_old", "M_new"} <= set(t1.columns):
        ends = t1.drop_duplicates("setting")
        lines.append("- **What each setting upgrades (M_old -> M_new, mAP, `tables/table1.csv`).** " + "; ".join(
            f"{r.setting}: {r.M_old:.2f} -> {r.M_new:.2f}" for r in ends.itertuples()) + ".")
    return lines


def _normalisation(study: pd.DataFrame | None) -> list[str]:
    if study is None or study.empty:
        return ["- **Normalised or raw embeddings.** Not run yet: `make regimes`."]
    parts = [f"{'L2-normalised' if str(r['normalize_embeddings']) == 'True' else 'raw'} ({r['variant']}): rank "
             f"merge delivers {r['rm_gain_%']:.1f} % of the gain, Ours {r['ours_gain_%']:.1f} %, Ours minus FCT "
             f"{r['ours_minus_fct_auc_map']:+.2f} and minus FastFill {r['ours_minus_fastfill_auc_map']:+.2f} AUC_mAP points"
             for _, r in study.iterrows()]
    return ["- **Normalised or raw embeddings (`regimes/normalisation.csv`, means over the seeds).** "
            + "; ".join(parts) + "."]


def _tuned_pairs(test: pd.DataFrame, a: str, b: str) -> tuple[float, float, str] | None:
    t = test[test.recipe == "tuned"].pivot_table(index="seed", columns="method", values="auc_map")
    if a not in t or b not in t:
        return None
    return verdict((t[a] - t[b]).to_numpy(), ">")


def _baselines(claims, t1, test, setting) -> list[str]:
    lines = []
    for b in ("BCT", *FORWARD):
        default = _claim(claims, setting, _ours_gt(b))
        tuned = _tuned_pairs(test, "Ours", b) if test is not None else None
        tuned_txt = ("not run (`make tune`)" if test is None else "not tuned" if tuned is None else
                     f"**{tuned[2]}** (difference {tuned[0]:+.2f} +- {tuned[1]:.2f}, `tuning/test_seeds.csv`)")
        lines.append(f"  - Ours > {b} on AUC_mAP: default recipes {default}; tuned with equal budgets {tuned_txt}. "
                     f"Relative gains: Ours {_gain(t1, setting, 'Ours')}, {b} {_gain(t1, setting, b)}.")
    return ["- **The paper's method beats the compatible-training baselines (Table 1).** In the "
            f"{setting} setting:"] + lines


def _regimes(win: pd.DataFrame | None, cross: pd.DataFrame | None) -> list[str]:
    if win is None:
        return ["- **Where the reverse direction wins (regime map).** Not run yet: `make regimes`."]
    parts = [f"{r.variant} (M_old/M_new {r.old_over_new:.2f}, FCT at ratio 0 / M_new {r.fct_r0_over_new:.2f}): "
             f"{r.winner}, Ours {r['reverse_gain_%']:.1f} % vs {r.best_forward} {r['best_forward_gain_%']:.1f} %"
             + (f", forward head start {r['start_gap_%']:.1f} % vs Ours' end bonus {r['end_bonus_%']:.1f} %"
                if "start_gap_%" in win else "")
             for _, r in win.iterrows()]
    c = cross[cross["axis"] == "start_gap_minus_end_bonus"] if cross is not None and "axis" in cross else pd.DataFrame()
    where = ("the winner changes where the forward head start minus Ours' end bonus crosses "
             + ", ".join(f"{a:.1f} points ({f} wins below, {t} above)" for a, f, t in zip(c["at"], c["from"], c["to"]))
             if len(c) else "no crossover along the forward head start minus Ours' end bonus")
    return ["- **Where the reverse direction wins (the regime map, `regimes/winners.csv`).** Relative gain of "
            "AUC_mAP of Ours against the best forward transformation of the gallery (FCT, FastFill, BiCT) as "
            "the old model, or the data, changes: " + "; ".join(parts) + f"; {where} (`regimes/crossover.csv`)."]


def _sensitivity(sens: pd.DataFrame | None) -> list[str]:
    if sens is None:
        return ["- **Sensitivity of the paper's method.** Not run yet: `make tune`."]
    t = sens[sens.split == "test"]
    parts = []
    for knob, g in t.groupby("knob", sort=False):
        parts.append(f"{knob} moves the test AUC_mAP over {g['auc_map'].min():.2f}-{g['auc_map'].max():.2f} "
                     f"(seed sd up to {g['auc_map_sd'].max():.2f})")
    return ["- **Sensitivity of the paper's method (one knob at a time around its tuned recipe, "
            "`tuning/sensitivity_summary.csv`).** " + "; ".join(parts) + "."]


def _costs(cost: pd.DataFrame | None, setting: str) -> list[str]:
    if cost is None:
        return []
    c = cost[cost.setting == setting].set_index("method")
    fwd = [m for m in FORWARD if m in c.index]
    per = ", ".join(f"{m} {c.loc[m, 's_per_million_items']:.2f} s" for m in fwd)
    return [f"- **What it costs (Table 2, `tables/table2_cost.csv`).** Ours embeds a query once "
            f"({int(c.loc['Ours', 'query_passes'])} pass) and transforms no gallery item; rank merge needs "
            f"{int(c.loc['RM', 'query_passes'])} passes; FCT, FastFill and BiCT transform every old gallery item "
            f"once before serving ({int(c.loc[fwd[0], 'gallery_transforms'])} here), measured per million items "
            f"on this machine with {int(c.loc[fwd[0], 'threads'])} thread(s): {per}."]


def _outside_numbers(t1: pd.DataFrame, setting: str) -> str:
    """The sourced relative gains of FCT and FastFill (:mod:`backfill_utils.studies.outside`) beside ours."""
    ref = O.references()
    auc = ref[(ref["metric"] == "mAP") & ~ref["protocol"].str.startswith("whole")]

    def sourced(dataset, side):
        g = auc[(auc["dataset"] == dataset) & (auc["side_information"] == side)].set_index("method")["gain_%"]
        return f"FCT in random order {g['FCT']:.1f} %, FastFill {g['FastFill']:.1f} %"

    return (f"{O.PAPER_UNKNOWN}. Published relative gains of the backfilling AUC_mAP (mean of 22 points; "
            f"{O.FASTFILL_README}): on CIFAR-100 (ResNet-50 at 224 px, old model on 50 classes) "
            f"{sourced('CIFAR-100', False)}; on ImageNet-1k {sourced('ImageNet-1k', False)} without side "
            f"information, {sourced('ImageNet-1k', True)} with it. Here (trapezoid AUC, synthetic data, "
            f"a CPU schedule): FCT {_gain(t1, setting, 'FCT')}, FastFill {_gain(t1, setting, 'FastFill')}")


def _disagreements(claims: pd.DataFrame, t1: pd.DataFrame, win: pd.DataFrame | None, setting: str) -> list[str]:
    checked = claims[claims["checked"].astype(bool)]
    main = checked[checked.setting == setting]
    fails, weak = main[main.verdict == FAILS], main[main.verdict == WITHIN_NOISE]
    other_fails = checked[(checked.setting != setting) & (checked.verdict == FAILS)]
    text = (f"{len(fails)} checked claim(s) of the {setting} setting fail" + (": " + "; ".join(fails.claim) if len(fails) else "")
            + f"; {len(weak)} hold only within the noise of the seeds" + (": " + "; ".join(weak.claim) if len(weak) else "")
            + f". In the settings with one seed, {len(other_fails)} claim(s) fail"
            + (": " + "; ".join(f"{r.setting}: {r.claim}" for r in other_fails.itertuples()) if len(other_fails) else "")
            + f". Against figures from outside: {_outside_numbers(t1, setting)}.")
    lines = ["- **Where our results disagree with the paper.** " + text]
    reason = ("  The most likely reason where a forward transformation matches or beats the paper's method is how much "
              "the old embeddings hold: the reverse direction is bounded by the old gallery until it is backfilled, "
              "while a forward transformation upgrades the whole gallery at once and is as good as what it recovers "
              "from the old embeddings (FCT's quality at ratio 0). ")
    if win is not None and len(win):
        fwd_wins = win[win.winner.str.startswith("forward")]
        reason += (f"The regime map finds forward winning in {len(fwd_wins)} of {len(win)} regimes "
                   f"({', '.join(fwd_wins.variant) or 'none'}). ")
    return lines + [reason.rstrip()]


def section(results: Path | None = None) -> str:
    """The markdown of "What holds, and where" from the files under ``results``."""
    results = Path(results or C.RESULTS_DIR)
    claims, t1 = _read(results, "tables/claims.csv"), _read(results, "tables/table1.csv")
    if claims is None or t1 is None:
        return "Not computed yet: run `make reproduce` (then `make tune` and `make regimes`).\n"
    if "verdict" not in claims.columns or "id" not in claims.columns or "gain_mAP_%_sd" not in t1.columns:
        return ("`results/tables/claims.csv` and `table1.csv` predate the verdicts over seeds: run "
                "`make reproduce`.\n")
    setting = "extended" if (claims.setting == "extended").any() else claims.setting.iloc[0]
    test = _read(results, "tuning/test_seeds.csv")
    lines = [f"Verdict rule (`backfill_utils/studies/claims.py`): per seed of the compatibility stage the difference "
             f"between the two compared numbers; **{HOLDS}** when their mean exceeds twice their sample standard "
             f"deviation, **holds within noise** when it holds on average only, **{FAILS}** otherwise. Backbones "
             "are fixed at the profile's seed; the extended setting is the one over several seeds "
             "(`seed_settings`).", ""]
    lines += _components(claims, t1, setting)
    lines += _strength(t1, setting)
    lines += _baselines(claims, t1, test, setting)
    lines += _regimes(_read(results, "regimes/winners.csv"), _read(results, "regimes/crossover.csv"))
    lines += _normalisation(_read(results, "regimes/normalisation.csv"))
    lines += _sensitivity(_read(results, "tuning/sensitivity_summary.csv"))
    lines += _costs(_read(results, "tables/table2_cost.csv"), setting)
    others = [s for s in dict.fromkeys(claims.setting) if s != setting]
    if others:
        lines.append("- **Other settings (the profile's seed only: at best within noise).** " + "; ".join(
            f"{s}: Ours > FCT {_claim(claims, s, 'ours_gt_fct_map')}, Ours > BCT "
            f"{_claim(claims, s, 'ours_gt_bct_map')}" for s in others) + ".")
    lines += _disagreements(claims, t1, _read(results, "regimes/winners.csv"), setting)
    return "\n".join(lines) + "\n"


def _short_v(claims: pd.DataFrame, setting: str, cid: str) -> str:
    """'**holds (> 2 sd)** (+0.67 +- 0.05)': one claim's verdict and paired difference (by id), compact."""
    r = claims[(claims.setting == setting) & (claims.id == CL.claim(cid).id)]
    if r.empty:
        return "not computed"
    r = r.iloc[0]
    sd = "" if pd.isna(r["diff_sd"]) else f" +- {r['diff_sd']:.2f}"
    return f"**{r['verdict']}** ({r['diff']:+.2f}{sd})"


def _grouped(items: list[tuple[str, str, float]]) -> str:
    """'**holds (> 2 sd)** against A (+1.00), B (+2.00); **fails** against C (-0.50)'."""
    by: dict[str, list[str]] = {}
    for name, v, d in items:
        by.setdefault(v, []).append(f"{name} ({d:+.2f})")
    return "; ".join(f"**{v}** against {', '.join(names)}" for v, names in by.items())


def short_section(results: Path | None = None) -> str:
    """The verdict in at most :data:`MAX_BULLETS` short bullets (README.md), from the same files
    as :func:`section`; the full text, with every file named, is in docs/fairness.md."""
    results = Path(results or C.RESULTS_DIR)
    claims, t1 = _read(results, "tables/claims.csv"), _read(results, "tables/table1.csv")
    if claims is None or t1 is None:
        return "Not computed yet: run `make reproduce` (then `make tune` and `make regimes`).\n"
    if "verdict" not in claims.columns or "id" not in claims.columns or "gain_mAP_%_sd" not in t1.columns:
        return "`results/tables/claims.csv` and `table1.csv` predate the verdicts over seeds: run `make reproduce`.\n"
    setting = "extended" if (claims.setting == "extended").any() else claims.setting.iloc[0]
    c = lambda name: _short_v(claims, setting, name)  # noqa: E731
    b = [f"**Rank merge** (no training): its curve rises {c('rm_rises')} and "
         f"runs from old/old to new/new {c('rm_endpoints')}; it delivers {_gain(t1, setting, 'RM')} "
         "of the upgrade's gain.",
         f"**Ablation:** psi over RM {c('rm_psi_ge_rm')}; CMCL over L_rev "
         f"{c('cmcl_gt_rm_psi')}; L_rev inside CMCL {c('cmcl_gt_no_lrev')}; "
         f"rho {c('ours_gt_cmcl')}.",
         "**Joint CMCL** over single "
         f"{c('joint_gt_single_cmcl')}, over separate "
         f"{c('joint_gt_separate_cmcl')}; fewer negative flips "
         f"than separate: vs old/old {c('joint_fewer_flips_vs_old')}, per step "
         f"{c('joint_fewer_flips_steps')}."]
    rows = claims[(claims.setting == setting)].set_index("id")
    default = [(m, rows.loc[_ours_gt(m), "verdict"], rows.loc[_ours_gt(m), "diff"])
               for m in ("BCT", *FORWARD) if _ours_gt(m) in rows.index]
    if default:
        b.append(f"**Ours ahead of the baselines** (AUC_mAP, default recipes): {_grouped(default)}.")
    test = _read(results, "tuning/test_seeds.csv")
    if test is None:
        b.append("**Tuned with equal budgets:** not run yet (`make tune`).")
    else:
        tuned = [(m, v[2], v[0]) for m in ("BCT", *FORWARD) if (v := _tuned_pairs(test, "Ours", m)) is not None]
        b.append(f"**Tuned with equal budgets** (`make tune`), Ours ahead: {_grouped(tuned) or 'not tuned'}.")
    win, cross = _read(results, "regimes/winners.csv"), _read(results, "regimes/crossover.csv")
    if win is None:
        b.append("**Regime map:** not run yet (`make regimes`).")
    else:
        fwd = win[win.winner.str.startswith("forward")]
        cr = cross[cross["axis"] == "start_gap_minus_end_bonus"] if cross is not None and "axis" in cross else pd.DataFrame()
        where = (f"; the winner changes where the forward head start minus Ours' end bonus crosses {cr['at'].iloc[0]:.1f} "
                 "points" if len(cr) else "")
        b.append(f"**Regime map:** a forward transformation wins {len(fwd)} of {len(win)} regimes "
                 f"({', '.join(fwd.variant) or 'none'}){where}.")
    norm = _read(results, "regimes/normalisation.csv")
    if norm is not None and len(norm):
        raw = norm[norm["normalize_embeddings"].astype(str) != "True"]
        unit = norm[norm["normalize_embeddings"].astype(str) == "True"]
        if len(raw) and len(unit):
            r, u = raw.iloc[0], unit.iloc[0]
            b.append(f"**Raw embeddings:** Ours delivers {r['ours_gain_%']:.1f} % of the gain ({u['ours_gain_%']:.1f} % "
                     f"normalised); Ours minus FCT {r['ours_minus_fct_auc_map']:+.2f}, minus FastFill "
                     f"{r['ours_minus_fastfill_auc_map']:+.2f} AUC_mAP points.")
    sens = _read(results, "tuning/sensitivity_summary.csv")
    if sens is not None:
        t = sens[sens.split == "test"]
        span = t.groupby("knob", sort=False)["auc_map"].agg(["min", "max"])
        if len(span):
            k = (span["max"] - span["min"]).idxmax()
            b.append(f"**Sensitivity** of Ours around its tuned recipe: {k} moves the test AUC_mAP most, "
                     f"{span.loc[k, 'min']:.2f}-{span.loc[k, 'max']:.2f}.")
    cost = _read(results, "tables/table2_cost.csv")
    if cost is not None:
        cc = cost[cost.setting == setting].set_index("method")
        fwd_m = [m for m in FORWARD if m in cc.index]
        if "Ours" in cc.index and fwd_m:
            b.append(f"**Cost:** Ours {int(cc.loc['Ours', 'query_passes'])} query pass, no gallery transform; "
                     + ", ".join(f"{m} {cc.loc[m, 's_per_million_items']:.1f} s" for m in fwd_m)
                     + " per million old gallery items.")
    others = [s for s in dict.fromkeys(claims.setting) if s != setting]
    if others:
        b.append("**Other settings** (one seed): " + "; ".join(
            f"{s}: Ours > FCT {_claim(claims, s, 'ours_gt_fct_map').split(' (')[0]}" for s in others) + ".")
    checked = claims[claims["checked"].astype(bool)]
    main = checked[checked.setting == setting]
    n_fail = int((main.verdict == FAILS).sum())
    n_other = int(((checked.setting != setting) & (checked.verdict == FAILS)).sum())
    b.append(f"**Disagreements:** {n_fail} of {len(main)} checked claims of the {setting} setting fail, "
             f"{n_other} in the settings with one seed; the paper's own tables are not public.")
    assert len(b) <= MAX_BULLETS, f"the short verdict has {len(b)} bullets, more than {MAX_BULLETS}"
    return "\n".join(f"- {x}" for x in b) + "\n"


def update_readme(results: Path | None = None, root: Path | None = None) -> None:
    """Rewrite the short verdict (block ``VERDICT`` of README.md) and the full one (block
    ``VERDICT_FULL`` of docs/fairness.md) from the files in ``results``. ``root``: the folder
    holding README.md and docs/ (default: the repository)."""
    readme, doc = (blocks.README, DOC) if root is None else (Path(root) / "README.md", Path(root) / "docs" / "fairness.md")
    blocks.write_block(readme, README_BLOCK, lambda: short_section(results))
    blocks.write_block(doc, DOC_BLOCK, lambda: section(results))
