"""The paper's claims: each defined once, by id, checked per seed and judged over the seeds.

A claim compares two numbers of one setting (e.g. ``Ours > FCT on auc_map``). Each is one
:class:`Claim` of :data:`CLAIMS`: an ``id`` (``ours_gt_fct_map``), the ``methods`` it
compares, the ``metric`` (a summary column or a measure of the curves), the ``relation``,
its tolerance ``tol`` and the template of its text; :func:`seed_claims` evaluates them on
one setting and seed, and every table, notebook, the runner and the report name a claim
by its id (the text follows the tolerance). Its **verdict** over the seeds
``s = 1..n`` of :func:`backfill_utils.studies.seeds.seeds_of`:

* the per-seed difference ``d_s = value_s - reference_s`` (``reference_s - value_s``
  for a claim ``value < reference``), so that ``d_s > 0`` means the claim holds on
  seed ``s``; both sides come from the same seed, so the difference is paired;
* its mean ``d`` and sample standard deviation ``sd`` (ddof 1) over the seeds;
* **holds (> 2 sd)**: ``d > 0`` and ``d > 2 sd``;
  **holds within noise**: the claim holds on average (``d > 0``; ``d >= 0`` for a
  claim ``>=``) but not by two standard deviations;
  **fails**: otherwise.

A claim between methods without training (RM, old/old, new/new) does not depend on
the seed: its ``sd`` is 0. With one seed (a setting outside ``seed_settings``) the
noise of a trained method is unknown, so such a claim can at best hold within noise.

A statement with several definitions (e.g. "joint flips less than separate", counted
against old/old and between consecutive backfill steps) is one **group** of rows
(column ``group`` of :func:`seed_claims`, named by a group id of :data:`GROUPS`; a claim
with one definition is its own group). A group holds by more than two standard deviations
only where every one of its rows does (:func:`groups`), and asserting a group asserts all
its rows.

On the reference run of the default profile the claims and groups whose ids are in
:data:`ASSERTED` are asserted (in the :data:`ASSERTED_SETTING` setting) to hold by more than
two standard deviations (a regression fails ``make reproduce`` and nbval); every other claim
is reported with its verdict. An id of :data:`ASSERTED` that names no claim is an error.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .. import tables as TB
from ..backfill import registry as MM
from . import seeds as SD

__all__ = ["Claim", "CLAIMS", "GROUPS", "FLIPS", "ids", "claim", "seed_claims", "check_asserted",
           "HOLDS", "WITHIN_NOISE", "FAILS", "VERDICTS", "ASSERTED", "ASSERTED_SETTING", "verdict",
           "over_seeds", "groups", "claims_from", "claims_table", "asserted_mask"]

HOLDS, WITHIN_NOISE, FAILS = "holds (> 2 sd)", "holds within noise", "fails"
VERDICTS = (HOLDS, WITHIN_NOISE, FAILS)

# --------------------------------------------------------------------------- the registry
#: The statement with two definitions (two rows, one group): the group's text, by group id.
FLIPS = "joint CMCL flips less than separate CMCL (psi + rho: Ours vs CMCL-separate)"
GROUPS: dict[str, str] = {"joint_fewer_flips": FLIPS}


@dataclass(frozen=True)
class Claim:
    """One claim: ``id``; ``text`` (its row's text; ``{tol}`` is replaced by ``tol`` written with
    the format ``fmt``, a trailing exponent without its leading zero: ``1e-6``); ``metric`` (a
    summary column such as ``auc_map``, or a measure of :data:`MEASURES`); ``relation`` (``>``,
    ``>=``, ``<``); ``methods`` (value side first, then the reference side); ``tol`` (loosens the
    claim: the reference minus ``tol`` for ``>``/``>=``, plus ``tol`` for ``<``); ``group`` (a
    group id of :data:`GROUPS`, or ``None``: its own group). It is made where every one of its
    ``methods`` is in the summary."""

    id: str
    text: str
    metric: str
    relation: str
    methods: tuple[str, ...]
    tol: float = 0.0
    group: str | None = None
    fmt: str = ".1f"

    def __post_init__(self) -> None:
        if self.relation not in (">", ">=", "<"):
            raise ValueError(f"claim {self.id!r}: relation must be '>', '>=' or '<', got {self.relation!r}")
        if self.group is not None and self.group not in GROUPS:
            raise ValueError(f"claim {self.id!r}: unknown group {self.group!r}; groups: {sorted(GROUPS)}")

    @property
    def claim(self) -> str:
        """The row's text, with the tolerance written in."""
        tol = re.sub(r"e([+-])0*(\d)", r"e\1\2", format(self.tol, self.fmt))
        return self.text.format(tol=tol)

    @property
    def group_text(self) -> str:
        return GROUPS[self.group] if self.group is not None else self.claim


def _curve(curves: pd.DataFrame, method: str) -> pd.DataFrame:
    return curves[curves["method"] == method].sort_values("ratio")


def _min_step(curves, s, methods):
    """The largest step down of ``methods[0]``'s mAP curve, as the smallest step (reference 0)."""
    return np.diff(_curve(curves, methods[0])["mAP"].to_numpy()).min(), 0.0


def _endpoint_gap(curves, s, methods):
    """How far ``methods[0]``'s curve starts from ``methods[1]``'s and ends from ``methods[2]``'s
    final mAP (reference 0)."""
    c = _curve(curves, methods[0])
    return max(abs(c["mAP"].iloc[0] - s.loc[methods[1], "final_map"]),
               abs(c["mAP"].iloc[-1] - s.loc[methods[2], "final_map"])), 0.0


def _flips_vs_old(curves, s, methods):
    """Mean negative flips against old/old over the ratios r > 0, of each of the two methods."""
    def vs_old(m):
        return float(curves[(curves["method"] == m) & (curves["ratio"] > 0)]["negative_flips_vs_old"].mean())
    return vs_old(methods[0]), vs_old(methods[1])


#: Measures of the curves a claim's ``metric`` may name (any other metric is a summary column,
#: of the value's method against the reference's).
MEASURES = {"min_step_mAP": _min_step, "endpoint_gap_mAP": _endpoint_gap, "mean_flips_vs_old": _flips_vs_old}


def _auc(a: str, rel: str, b: str, cid: str) -> Claim:
    return Claim(cid, f"{a} {rel} {b} on AUC_mAP", "auc_map", rel, (a, b))


def _slug(method: str) -> str:
    return method.lower().replace("+", "_")


#: Every claim, in the order of the claims tables.
CLAIMS: tuple[Claim, ...] = (
    Claim("rm_rises", "RM rises: no step down by more than {tol} mAP", "min_step_mAP", ">=", ("RM",), tol=0.5),
    Claim("rm_endpoints", "RM endpoints equal old/old and new/new (mAP, within {tol})", "endpoint_gap_mAP", "<",
          ("RM", "old", "new"), tol=1e-6, fmt=".0e"),
    _auc("RM+psi", ">=", "RM", "rm_psi_ge_rm"),
    _auc("RM+psi+CMCL", ">", "RM+psi", "cmcl_gt_rm_psi"),
    _auc("RM+psi+CMCL", ">", "CMCL w/o L_rev", "cmcl_gt_no_lrev"),
    _auc("Ours", ">", "RM+psi+CMCL", "ours_gt_cmcl"),
    *(Claim(f"ours_gt_{_slug(b)}_{k.split('_')[1]}", f"Ours > {b} on {k}", k, ">", ("Ours", b))
      for b in ("RM", *TB.BASELINES) for k in ("auc_map", "auc_top1")),
    Claim("ours_final_near_new", "Ours final mAP >= new/new - {tol}", "final_map", ">=", ("Ours", "new"), tol=0.5),
    Claim("joint_gt_single_cmcl", "joint CMCL > single-system CMCL (psi only: RM+psi+CMCL vs CMCL-single) on AUC_mAP",
          "auc_map", ">", ("RM+psi+CMCL", "CMCL-single")),
    Claim("joint_gt_separate_cmcl", "joint CMCL > separate CMCL (psi + rho: Ours vs CMCL-separate) on AUC_mAP",
          "auc_map", ">", ("Ours", "CMCL-separate")),
    Claim("joint_fewer_flips_vs_old", f"{FLIPS}: mean negative flips vs old/old over ratios > 0", "mean_flips_vs_old",
          "<", ("Ours", "CMCL-separate"), group="joint_fewer_flips"),
    Claim("joint_fewer_flips_steps", f"{FLIPS}: total negative flips between consecutive backfill steps",
          "negative_flips_total", "<", ("Ours", "CMCL-separate"), group="joint_fewer_flips"),
)


def ids() -> list[str]:
    """The claim ids of :data:`CLAIMS`, in order."""
    return [c.id for c in CLAIMS]


def claim(cid: str) -> Claim:
    """The claim with id ``cid``; an unknown id is an error listing the known ones."""
    for c in CLAIMS:
        if c.id == cid:
            return c
    raise KeyError(f"no claim with id {cid!r}; claim ids: {ids()}")


def seed_claims(curves: pd.DataFrame, summary: pd.DataFrame) -> pd.DataFrame:
    """Every claim of :data:`CLAIMS` whose methods are in ``summary``, checked on one setting
    and one seed (``curves`` and ``summary`` of that setting,
    :func:`backfill_utils.backfill.experiments.evaluate_setting`).

    Rank merge rises and runs from old/old to new/new; each component of the
    paper's method adds (RM+psi >= RM, CMCL > L_rev only, L_rev in the CMCL objective >
    none, rho > no rho); the paper's method beats rank merge and the compatible-training
    baselines (:data:`backfill_utils.tables.BASELINES`) on both AUCs and ends near new/new;
    joint CMCL beats the single-system and separate variants and flips less than separate.

    The CMCL variants are compared like with like, with the same modules on both sides:
    psi only (RM+psi+CMCL, joint, against CMCL-single) and psi + rho (Ours, joint,
    against CMCL-separate). These are the two pairs the registry can form: a
    single-system loss gives rho no gradient, and the separate loss with a frozen new
    model gives psi exactly the gradient of the single-system one.

    "Joint flips less than separate" has two definitions, one group (:data:`FLIPS`):
    negative flips against old/old (mean of ``negative_flips_vs_old`` over the ratios
    r > 0) and between consecutive backfill steps (the summary's ``negative_flips_total``).

    Returns one row per claim: ``id``, ``claim`` (its text), ``checked`` (rows starting with
    ``(reported)`` are context, not claims), ``group`` (the statement the row is a
    definition of; the claim itself when it has one definition), ``value``,
    ``relation`` (``>``, ``>=``, ``<``), ``reference`` (the tolerance applied), ``methods``
    (the methods it compares, ``|``-separated) and ``holds`` (``value relation reference``).
    :func:`over_seeds` turns the rows of several seeds into verdicts.
    """
    s = summary.set_index("method")
    rows = []
    for c in CLAIMS:
        if not all(m in s.index for m in c.methods):
            continue
        measure = MEASURES.get(c.metric)
        value, base = (measure(curves, s, c.methods) if measure is not None
                       else (s.loc[c.methods[0], c.metric], s.loc[c.methods[1], c.metric]))
        value, reference = float(value), float(base + c.tol if c.relation == "<" else base - c.tol)
        holds = {">": value > reference, ">=": value >= reference, "<": value < reference}[c.relation]
        rows.append((c.id, c.claim, c.group_text, value, c.relation, reference, "|".join(c.methods), bool(holds)))
    out = pd.DataFrame(rows, columns=["id", "claim", "group", "value", "relation", "reference", "methods", "holds"])
    out.insert(2, "checked", ~out["claim"].str.startswith("(reported)"))
    return out


#: The setting whose claims are asserted on the reference run of the default profile.
ASSERTED_SETTING = "extended"
#: Ids (of claims, or of groups of :data:`GROUPS`) asserted on the reference run of the default
#: profile in :data:`ASSERTED_SETTING`: the checked claims of the extended setting, each of which
#: held by more than two standard deviations over the three seeds of the default run measured when
#: the rule was introduced (margins: ``diff`` and ``diff_sd`` of ``results/tables/claims.csv``).
#: "Joint CMCL flips less than separate" (``joint_fewer_flips``) is not asserted: it holds against
#: old/old but fails between consecutive backfill steps. The heterogeneous and open settings have
#: one seed: reported, never asserted.
ASSERTED: frozenset[str] = frozenset((
    "rm_rises", "rm_endpoints", "rm_psi_ge_rm", "cmcl_gt_rm_psi", "ours_gt_cmcl",
    "ours_gt_rm_map", "ours_gt_rm_top1", "ours_gt_bct_map", "ours_gt_bct_top1",
    "ours_gt_fct_map", "ours_gt_fct_top1", "ours_gt_fastfill_map", "ours_gt_fastfill_top1",
    "ours_gt_bict_map", "ours_gt_bict_top1", "ours_final_near_new",
    "joint_gt_single_cmcl", "joint_gt_separate_cmcl",
))


def check_asserted(asserted=None) -> frozenset[str]:
    """``asserted`` (default :data:`ASSERTED`) checked: every id names a claim of
    :data:`CLAIMS` or a group of :data:`GROUPS`, else an error naming the unknown ids."""
    asserted = frozenset(ASSERTED if asserted is None else asserted)
    unknown = sorted(asserted - set(ids()) - set(GROUPS))
    if unknown:
        raise ValueError(f"claims.ASSERTED names unknown claim id(s) {unknown}; claim ids: {ids()}; "
                         f"group ids: {sorted(GROUPS)}")
    return asserted


check_asserted()


def _asserted(setting: str, cid: str, asserted: frozenset[str]) -> bool:
    if setting != ASSERTED_SETTING:
        return False
    group = next((c.group for c in CLAIMS if c.id == cid), None)
    return cid in asserted or (group is not None and group in asserted)


def verdict(diffs, relation: str, deterministic: bool = False) -> tuple[float, float, str]:
    """``(mean, sd, verdict)`` of the per-seed differences ``diffs`` (oriented: > 0 means
    the claim holds on that seed) of a claim with ``relation`` (``>``, ``>=``, ``<``).

    ``deterministic``: the compared numbers do not depend on the seed (sd 0, even
    from one seed); otherwise one seed gives sd NaN.

    >>> verdict([1.0, 1.2, 0.8], ">")[2], verdict([1.0, -0.5, 2.0], ">")[2], verdict([-1.0, -1.0], ">")[2]
    ('holds (> 2 sd)', 'holds within noise', 'fails')
    >>> verdict([0.3], ">")[2], verdict([0.3], ">", deterministic=True)[2], verdict([0.0, 0.0], ">=")[2]
    ('holds within noise', 'holds (> 2 sd)', 'holds within noise')
    """
    d = np.asarray(diffs, dtype=float)
    if d.size == 0:
        raise ValueError("verdict needs at least one seed")
    mean = float(d.mean())
    if deterministic:
        sd = 0.0
    else:
        sd = float(d.std(ddof=1)) if d.size > 1 else float("nan")
    holds = mean >= 0 if relation == ">=" else mean > 0
    if not holds:
        return mean, sd, FAILS
    if mean > 0 and not np.isnan(sd) and mean > 2 * sd:
        return mean, sd, HOLDS
    return mean, sd, WITHIN_NOISE


def _deterministic(methods: str) -> bool:
    names = [m for m in methods.split("|") if m]
    return all(not (m in MM.names() and MM.get(m).trainable) for m in names)


def over_seeds(per_seed: pd.DataFrame) -> pd.DataFrame:
    """One row per ``(setting, id)`` from the rows of :func:`seed_claims` of every seed
    (columns ``setting`` and ``seed`` added): ``id``, ``claim``, ``seeds``, the means ``value``
    and ``reference`` with their ``value_sd`` / ``reference_sd``, the paired difference
    ``diff`` / ``diff_sd``, the ``verdict`` (:func:`verdict`), ``holds`` (verdict is not
    ``fails``), ``group`` (the claim itself where the rows have no ``group``) and
    ``asserted`` (in :data:`ASSERTED_SETTING`, its id or its group's id is in :data:`ASSERTED`:
    every row of an asserted group is asserted); claims in order of appearance."""
    if "id" not in per_seed.columns:
        raise ValueError("over_seeds needs the claims' ids (column 'id' of claims.seed_claims)")
    asserted = check_asserted()
    if "group" not in per_seed.columns:
        per_seed = per_seed.assign(group=per_seed["claim"])
    rows = []
    for (setting, cid), g in per_seed.groupby(["setting", "id"], sort=False):
        claim = g["claim"].iloc[0]
        group = g["group"].iloc[0]
        rel, methods = g["relation"].iloc[0], g["methods"].iloc[0]
        d = (g["reference"] - g["value"]) if rel == "<" else (g["value"] - g["reference"])
        mean, sd, v = verdict(d.to_numpy(), rel, _deterministic(methods))
        sd_of = (lambda x: float(x.std(ddof=1))) if len(g) > 1 else (lambda x: float("nan"))
        rows.append({"setting": setting, "id": cid, "claim": claim, "checked": bool(g["checked"].iloc[0]),
                     "seeds": len(g), "value": float(g["value"].mean()), "value_sd": sd_of(g["value"]),
                     "relation": rel, "reference": float(g["reference"].mean()),
                     "reference_sd": sd_of(g["reference"]), "diff": mean, "diff_sd": sd,
                     "verdict": v if g["checked"].iloc[0] else f"(reported) {v}", "holds": v != FAILS,
                     "group": group, "asserted": _asserted(setting, cid, asserted), "methods": methods})
    return pd.DataFrame(rows)


def groups(table: pd.DataFrame) -> pd.DataFrame:
    """One row per ``(setting, group)`` of a table of :func:`over_seeds` (checked rows only):
    ``definitions`` (its number of rows), ``verdict`` (the weakest verdict of its rows:
    :data:`HOLDS` only where every definition holds by more than two standard deviations),
    ``holds`` and ``asserted``; groups in order of appearance."""
    missing = [c for c in ("setting", "group", "verdict", "asserted", "checked") if c not in table.columns]
    if missing:
        raise ValueError(f"groups needs a table of claims.over_seeds; the table lacks {missing}")
    rank = {v: i for i, v in enumerate(VERDICTS)}
    rows = []
    for (setting, group), g in table[table["checked"].astype(bool)].groupby(["setting", "group"], sort=False):
        v = max(g["verdict"], key=rank.__getitem__)
        rows.append({"setting": setting, "group": group, "definitions": len(g), "verdict": v, "holds": v != FAILS,
                     "asserted": bool(g["asserted"].all())})
    return pd.DataFrame(rows, columns=["setting", "group", "definitions", "verdict", "holds", "asserted"])


def claims_from(curves: dict, summary: pd.DataFrame) -> pd.DataFrame:
    """:func:`over_seeds` of the claims of every ``(setting, seed)`` of
    :func:`backfill_utils.studies.seeds.evaluate_seeds`'s ``curves`` and ``summary``."""
    parts = [seed_claims(c, summary[(summary.setting == s) & (summary.seed == seed)]).assign(setting=s, seed=seed)
             for (s, seed), c in curves.items()]
    return over_seeds(pd.concat(parts, ignore_index=True))


def claims_table(cfg: dict, names=None, *, progress: bool = False) -> pd.DataFrame:
    """The claims of every setting over its seeds, from the cached curves (:func:`claims_from`)."""
    return claims_from(*SD.evaluate_seeds(cfg, names, progress=progress))


def asserted_mask(table: pd.DataFrame, strict: bool) -> pd.Series:
    """Rows of a claims table to assert: the :data:`ASSERTED` ones (column ``asserted``, from
    the ids) on the reference run (``strict``), none elsewhere."""
    return table["asserted"].astype(bool) & bool(strict)
