"""The regime map (``make regimes``): when the reverse direction wins, when the forward one.

The paper's method (Ours) maps *queries* into the old space and leaves the old gallery
as it is, so during backfilling it is bounded by what the old embeddings hold; a
forward transformation (FCT, FastFill, BiCT) maps the old *gallery* into the new space,
which works as well as the old embeddings carry the information the new model uses.
Which one wins therefore depends on how much the old model knows. Each **variant**
of the profile's ``regimes.variants`` changes the old model (profile keys
``old_fraction``, ``old_backbone``, ``old_train``; the new model is shared) or the
data (see below), and for
each the methods of ``regimes.methods`` are trained over every seed of the
compatibility stage and evaluated on the test split of ``regimes.setting``.

Outputs (``<run folder>/regimes/``, ``results/regimes/`` for the default profile,
committed; rendered by ``notebooks/53_regimes.ipynb``):

* ``regimes.csv`` -- one row per (variant, method, seed): AUCs, relative gains, and the
  variant's ``m_old`` / ``m_new`` (old/old and new/new mAP), ``old_over_new`` =
  M_old / M_new, ``fct_r0_map`` (FCT's mAP at ratio 0: its transformed old gallery
  searched with new queries) and ``fct_r0_over_new``;
* ``summary.{csv,md}`` -- mean and sd over the seeds (with each variant's ``changes``);
* ``normalisation.{csv,md}`` -- :func:`normalisation_study` (empty without a variant that
  sets ``normalize_embeddings``);
* ``winners.{csv,md}`` -- per variant, the gain of the reverse direction (Ours) minus
  the best forward transformation's, paired over the seeds, with the verdict of
  :func:`backfill_utils.studies.claims.verdict`, and the two terms that decide it: the forward
  method's head start at ratio 0 (FCT's mAP minus Ours' backward system's) and Ours'
  end above new/new (rho), both in % of M_new - M_old; ``crossover.csv``: where that
  difference changes sign along M_old / M_new and FCT's quality at ratio 0, within a
  family of variants of the same data (linear interpolation between neighbours).

A variant may also change the synthetic data (``dataset_options``): a **family** of
variants with their own new model (e.g. 10 classes with 1,000 training images each, the
shape of a real 10-class dataset), drawn apart in the figure. A variant may
also set ``normalize_embeddings`` (raw embeddings for every model and module: the new
system changes too), which likewise makes its own family (:func:`family`);
``normalisation.{csv,md}`` (:func:`normalisation_study`) sets each such variant beside
the variant with the same other changes: rank merge's share of the gain and Ours' margin
over FCT and FastFill under both choices.

``python -m backfill_utils.tools.make_regimes --profile default`` (``make regimes``) runs it.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from .. import cache, io
from .. import config as C
from .. import embed as E
from .. import parallel
from .. import train as TR
from ..backfill import experiments as X
from ..backfill import registry as MM
from . import claims as CL
from . import seeds as SD

__all__ = ["REVERSE", "FORWARD", "regime_config", "variant_cfgs", "family", "run", "summarize", "winners",
           "crossover", "normalisation_study", "out_dir", "read_outputs"]

REVERSE = ("Ours",)
FORWARD = ("FCT", "FastFill", "BiCT")
FILES = ("regimes.csv", "summary.csv", "winners.csv", "crossover.csv")
#: What a variant may change: the old model, the synthetic data or whether embeddings are
#: L2-normalised (the last two change the new model's side too: each makes a family of the map).
OLD_MODEL_KEYS = ("old_fraction", "old_backbone", "old_train")
FAMILY_KEYS = ("dataset_options", "normalize_embeddings")
VARIANT_KEYS = OLD_MODEL_KEYS + FAMILY_KEYS


def regime_config(cfg: dict) -> dict:
    """The profile's ``regimes`` keys, checked: ``setting``, ``methods``, ``variants``."""
    r = dict(cfg.get("regimes") or {})
    missing = sorted({"setting", "methods", "variants"} - set(r))
    if missing:
        raise ValueError(f"profile key regimes lacks {missing}; see params/default.yaml")
    for name, keys in r["variants"].items():
        bad = sorted(set(keys or {}) - set(VARIANT_KEYS))
        if bad:
            raise ValueError(f"regimes.variants[{name!r}] may change only the old model (old_fraction, "
                             f"old_backbone, old_train), the data (dataset_options) or "
                             f"normalize_embeddings, got {bad}")
    for m in r["methods"]:
        MM.get(m)
    return r


def out_dir(cfg: dict) -> Path:
    """``<run folder>/regimes`` (``results/regimes`` for the default profile as it is)."""
    return C.output_dir(cfg) / "regimes"


def variant_cfgs(cfg: dict) -> dict[str, dict]:
    """``{variant: profile}``: the run's profile with the variant's keys and only the
    regime setting (``settings: [setting]``)."""
    r = regime_config(cfg)
    out = {}
    for name, keys in r["variants"].items():
        changes = C.deep_update(cfg["run_changes"], dict(keys or {}), strict=False)
        changes["settings"] = [r["setting"]]
        out[name] = C.load_profile(cfg["profile"], overrides=changes, data_root=cfg.get("data_root"),
                                   download=cfg.get("download", False))
        n_old = TR.model_spec(out[name], r["setting"], "old")["num_classes"]
        if n_old < 2:
            raise ValueError(f"regimes.variants[{name!r}]: the old model would train on {n_old} class(es); "
                             "raise its old_fraction (at least 2 classes)")
    return out


def family(keys: dict | None) -> str:
    """The family of a variant (column ``data``): what it changes besides the old model,
    ``"profile's"`` if nothing. Variants of one family share the new model's side; the
    crossover looks for neighbours only within a family.

    >>> family({"old_fraction": 0.2, "dataset_options": {"num_classes": 10}})
    '{"num_classes": 10}'
    >>> family({"normalize_embeddings": False}), family({})
    ('normalize_embeddings: false', "profile's")
    """
    keys = keys or {}
    parts = [json.dumps(keys["dataset_options"], sort_keys=True)] if keys.get("dataset_options") else []
    if "normalize_embeddings" in keys:
        parts.append(f"normalize_embeddings: {str(keys['normalize_embeddings']).lower()}")
    return "; ".join(parts) or "profile's"


def _embed_job(cfg: dict, setting: str, role: str) -> None:
    E.get_embeddings(cfg, setting, role, "test", progress=False)
    E.get_embeddings(cfg, setting, role, "train", passes=int(cfg["embed"]["train_passes"]), progress=False)


def _prepare(cfgs: dict[str, dict], setting: str, methods: list[str], progress: bool) -> None:
    """Backbones, embeddings and modules of every variant, in worker processes."""
    roles = sorted({"old", "new"} | {r for m in methods for r in MM.get(m).train_roles}
                   | {MM.get(m).backbone for m in methods if MM.get(m).reference is None})
    TR.train_many([TR.model_spec(c, setting, r) for c in cfgs.values() for r in roles], progress=progress,
                 data_root=next(iter(cfgs.values())).get("data_root"))
    jobs = {C.config_hash(E.embedding_spec(c, setting, r)): (c, setting, r) for c in cfgs.values() for r in roles}
    parallel.run_jobs(_embed_job, list(jobs.values()), desc="embed", progress=progress,
                      labels=[f"{r} {TR.model_dir(TR.model_spec(c, s, r)).name}" for c, s, r in jobs.values()])
    trainable = [m for m in methods if MM.get(m).trainable]
    SD.train_jobs(None, [(c, setting, m, None, seed) for c in cfgs.values() for seed in SD.compat_seeds(c)
                         for m in trainable], progress=progress)


def run(cfg: dict, *, progress: bool = True) -> pd.DataFrame:
    """Every variant's methods over the seeds (:mod:`backfill_utils.studies.regimes`): the rows of
    ``regimes.csv``."""
    r = regime_config(cfg)
    setting, methods = r["setting"], list(r["methods"])
    cfgs = variant_cfgs(cfg)
    _prepare(cfgs, setting, methods, progress)
    rows = []
    for name, c in cfgs.items():
        for seed in SD.compat_seeds(c):
            curves, summary = X.evaluate_setting(c, setting, ["old", "new", *methods], seed=seed, progress=False)
            s = summary.set_index("method")
            m_old, m_new = float(s.loc["old", "final_map"]), float(s.loc["new", "final_map"])
            fct = curves[curves.method == "FCT"].sort_values("ratio")
            fct_r0 = float(fct["mAP"].iloc[0]) if len(fct) else float("nan")
            ours = curves[curves.method == "Ours"].sort_values("ratio")
            ours_r0 = float(ours["mAP"].iloc[0]) if len(ours) else float("nan")
            for m in methods:
                rows.append({"variant": name, "changes": json.dumps(r["variants"][name] or {}, sort_keys=True),
                             "data": family(r["variants"][name]),
                             "method": m, "seed": seed, **{k: float(s.loc[m, k]) for k in SD.SUMMARY_METRICS},
                             "m_old": m_old, "m_new": m_new, "old_over_new": m_old / m_new,
                             "fct_r0_map": fct_r0, "fct_r0_over_new": fct_r0 / m_new, "ours_r0_map": ours_r0})
    return pd.DataFrame(rows)


def summarize(raw: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample sd over the seeds per (variant, method), with the variant's axes."""
    stats = SD.seed_stats(raw, ["rel_gain_map", "rel_gain_top1", "auc_map", "auc_top1", "final_map"],
                          by=("variant", "method"))
    axes = raw.groupby("variant", sort=False)[["m_old", "m_new", "old_over_new", "fct_r0_map",
                                               "fct_r0_over_new"]].mean().reset_index()
    labels = [c for c in ("data", "changes") if c in raw]
    out = stats.merge(axes, on="variant")
    return out.merge(raw.groupby("variant", sort=False)[labels].first().reset_index(), on="variant") if labels else out


def winners(raw: pd.DataFrame) -> pd.DataFrame:
    """Per variant: the relative gain (mAP) of the reverse direction (Ours) minus the best
    forward transformation's (per seed, the best of FCT/FastFill/BiCT present), paired over
    the seeds, its verdict (> 0: reverse wins), and which side wins."""
    rows = []
    for name, g in raw.groupby("variant", sort=False):
        gains = g.pivot_table(index="seed", columns="method", values="rel_gain_map")
        fwd = [m for m in FORWARD if m in gains]
        rev = [m for m in REVERSE if m in gains]
        if not fwd or not rev:
            raise ValueError(f"regimes.methods must include {REVERSE} and one of {FORWARD}")
        d = 100 * (gains[rev].max(axis=1) - gains[fwd].max(axis=1))
        mean, sd, verdict = CL.verdict(d.to_numpy(), ">")
        if verdict == CL.FAILS:
            winner = "forward" + ("" if CL.verdict(-d.to_numpy(), ">")[2] == CL.HOLDS else " (within noise)")
        else:
            winner = "reverse" + ("" if verdict == CL.HOLDS else " (within noise)")
        ours = g[g.method == rev[0]]
        gap = g["m_new"].mean() - g["m_old"].mean()
        rows.append({"variant": name, "data": g["data"].iloc[0] if "data" in g else "profile's",
                     "old_over_new": g["old_over_new"].mean(),
                     "fct_r0_over_new": g["fct_r0_over_new"].mean(), "seeds": len(d),
                     "reverse_gain_%": 100 * gains[rev].max(axis=1).mean(),
                     "best_forward": gains[fwd].mean().idxmax(),
                     "best_forward_gain_%": 100 * gains[fwd].max(axis=1).mean(),
                     "reverse_minus_forward": mean, "sd": sd, "winner": winner,
                     # why: a forward transformation's head start at ratio 0 over Ours' backward system, and
                     # Ours' end above new/new (rho), both in % of the upgrade's gap M_new - M_old
                     "start_gap_%": 100 * (g["fct_r0_map"].mean() - ours["ours_r0_map"].mean()) / gap
                     if "ours_r0_map" in g else float("nan"),
                     "end_bonus_%": 100 * (ours["final_map"].mean() - g["m_new"].mean()) / gap})
    out = pd.DataFrame(rows)
    out["start_gap_minus_end_bonus"] = out["start_gap_%"] - out["end_bonus_%"]
    return out.sort_values("old_over_new", kind="stable").reset_index(drop=True)


def crossover(win: pd.DataFrame, axis: str = "old_over_new", by_family: bool = True) -> pd.DataFrame:
    """Where the reverse-minus-forward difference changes sign along ``axis``, within each data
    family (column ``data``; variants of other data are not neighbours): linear
    interpolation between neighbouring variants sorted by ``axis``; no row where it keeps its
    sign over the family's range. ``by_family=False``: all variants on one axis (for an axis
    that places every family, such as ``start_gap_minus_end_bonus``).

    >>> w = pd.DataFrame({"old_over_new": [0.2, 0.4, 0.6], "reverse_minus_forward": [10.0, 2.0, -6.0]})
    >>> crossover(w)[["axis", "at"]].round(3).to_dict("records")
    [{'axis': 'old_over_new', 'at': 0.45}]
    """
    rows = []
    fams = win.groupby("data", sort=False) if "data" in win and by_family else [("all", win)]
    for fam, w in fams:
        w = w.sort_values(axis, kind="stable")
        x, d = w[axis].to_numpy(float), w["reverse_minus_forward"].to_numpy(float)
        for i in range(len(x) - 1):
            if d[i] == 0 or np.sign(d[i]) != np.sign(d[i + 1]):
                at = x[i] if d[i] == 0 else x[i] + (x[i + 1] - x[i]) * d[i] / (d[i] - d[i + 1])
                rows.append({"axis": axis, "data": fam, "at": float(at), "from": "reverse" if d[i] > 0 else "forward",
                             "to": "forward" if d[i] > 0 else "reverse"})
    return pd.DataFrame(rows, columns=["axis", "data", "at", "from", "to"])


#: Columns of :func:`normalisation_study`.
STUDY_COLUMNS = ("study", "variant", "normalize_embeddings", "seeds", "m_old", "m_new", "rm_gain_%", "ours_gain_%",
                 "ours_minus_fct_auc_map", "ours_minus_fastfill_auc_map")


def _study_row(summary: pd.DataFrame, study: str, variant: str, normalized: bool) -> dict:
    s = summary[summary.variant == variant].set_index("method")

    def get(method: str, col: str) -> float:
        return float(s.loc[method, col]) if method in s.index else float("nan")

    return {"study": study, "variant": variant, "normalize_embeddings": normalized, "seeds": int(s["seeds"].min()),
            "m_old": float(s["m_old"].iloc[0]), "m_new": float(s["m_new"].iloc[0]),
            "rm_gain_%": 100 * get("RM", "rel_gain_map"), "ours_gain_%": 100 * get("Ours", "rel_gain_map"),
            "ours_minus_fct_auc_map": get("Ours", "auc_map") - get("FCT", "auc_map"),
            "ours_minus_fastfill_auc_map": get("Ours", "auc_map") - get("FastFill", "auc_map")}


def normalisation_study(summary: pd.DataFrame) -> pd.DataFrame:
    """L2-normalised against raw embeddings, from the regimes summary (:func:`summarize`):
    each variant that sets ``normalize_embeddings`` beside the variant with the same other
    changes (e.g. ``{}``, the default), one row per choice (``study`` names the pair by
    the first variant): M_old, M_new, the relative gain of AUC_mAP of RM (rank merge's share
    of the gain) and of Ours, in %, and Ours' AUC_mAP minus FCT's and FastFill's, in points
    (means over the seeds; NaN for a method the map did not run). No pair: no rows."""
    if "changes" not in summary:
        raise ValueError("the regimes summary has no column 'changes' (it was written before normalisation "
                         "became a variant key); run make regimes again")
    changes = {v: json.loads(c) for v, c in summary.groupby("variant", sort=False)["changes"].first().items()}
    by_changes = {json.dumps(c, sort_keys=True): v for v, c in changes.items()}
    rows = []
    for variant, c in changes.items():
        if "normalize_embeddings" not in c:
            continue
        base = by_changes.get(json.dumps({k: x for k, x in c.items() if k != "normalize_embeddings"}, sort_keys=True))
        if base is not None:
            flag = bool(c["normalize_embeddings"])
            rows += [_study_row(summary, variant, base, not flag), _study_row(summary, variant, variant, flag)]
    return pd.DataFrame(rows, columns=list(STUDY_COLUMNS))


def write_outputs(cfg: dict, raw: pd.DataFrame) -> Path:
    """Write the regime files (atomically); returns the folder."""
    from ..figures import style as ST

    d = out_dir(cfg)
    io.atomic_write(d / "regimes.csv", lambda p: raw.to_csv(p, index=False))
    summary = summarize(raw)
    ST.save_table(summary, d, "summary", caption="Relative gain per regime of the old model: mean and "
                     "sd over the seeds of the compatibility stage (backbones fixed at the profile's seed).")
    ST.save_table(normalisation_study(summary), d, "normalisation", caption="L2-normalised against raw "
                     "embeddings: relative gain of AUC_mAP of RM and Ours (%), Ours' AUC_mAP minus FCT's and "
                     "FastFill's (points); means over the seeds.")
    win = winners(raw)
    ST.save_table(win, d, "winners", caption="Reverse (Ours) minus the best forward transformation, relative "
                     "gain in points, paired over the seeds.")
    cross = pd.concat([crossover(win, "old_over_new"), crossover(win, "fct_r0_over_new"),
                       crossover(win, "start_gap_minus_end_bonus", by_family=False)], ignore_index=True)
    io.atomic_write(d / "crossover.csv", lambda p: cross.to_csv(p, index=False))
    return d


def read_outputs(cfg: dict) -> dict:
    """``{"raw", "summary", "winners", "crossover"}``; a missing file is an error naming
    ``make regimes``."""
    d = out_dir(cfg)
    missing = [d / f for f in FILES if not (d / f).is_file()]
    if missing:
        raise cache.missing_target("the regime map", "make regimes", missing, cfg)
    return {k: pd.read_csv(d / f) for k, f in zip(("raw", "summary", "winners", "crossover"), FILES)}
