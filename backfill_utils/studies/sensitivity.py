"""Sensitivity of the paper's method to its loss knobs, one at a time around the tuned point.

Starting from the recipe of Ours chosen by the equal-budget search
(:mod:`backfill_utils.studies.tuning`), each knob of ``tune.sensitivity`` (``tau``,
``hard_negatives``, ``lambda_rev``) is set to each of its listed values (and the tuned
value) while every other field keeps its tuned value; each point is trained over
every seed of the compatibility stage and evaluated on the test split and on the
validation split. No choice is made from these numbers: they show how far the
method's quality moves when a knob is mis-set. Part of ``make tune``; files
``sensitivity.csv`` (one row per knob, value, seed and split) and
``sensitivity_summary.{csv,md}`` (mean and sd over the seeds), rendered by
``notebooks/52_tuning.ipynb``.
"""
from __future__ import annotations

import pandas as pd

from .. import cache, io
from ..backfill import experiments as X
from ..compat.recipes import recipe_from_dict
from . import seeds as SD
from .tuning import out_dir, tune_config

__all__ = ["KNOBS", "points", "study", "summarize", "write_outputs", "read_outputs"]

#: The knobs of the study, in the order of the figure's panels.
KNOBS = ("tau", "hard_negatives", "lambda_rev")
METHOD = "Ours"
FILES = ("sensitivity.csv", "sensitivity_summary.csv")


def points(cfg: dict, tuned: dict) -> list[tuple[str, object]]:
    """``(knob, value)`` of the study: the values of ``tune.sensitivity[knob]`` and the tuned
    value, sorted (``None`` = all negatives, placed last); ``tuned`` is the recipe dict."""
    grid = tune_config(cfg).get("sensitivity") or {}
    unknown = sorted(set(grid) - set(KNOBS))
    if unknown:
        raise ValueError(f"tune.sensitivity: unknown knob(s) {unknown}; knobs: {list(KNOBS)}")
    out = []
    for knob in KNOBS:
        values = list(grid.get(knob, [])) + [tuned[knob]]
        uniq = list(dict.fromkeys(values))
        uniq.sort(key=lambda v: (v is None, v if v is not None else 0))
        out += [(knob, v) for v in uniq]
    return out


def study(cfg: dict, tuned: dict, *, progress: bool = True) -> pd.DataFrame:
    """Every point of :func:`points` over every compat seed: trained in worker processes,
    evaluated on the test and validation splits; one row per (knob, value, seed, split) with
    ``is_tuned`` (the tuned value of that knob) and the summary numbers."""
    setting = tune_config(cfg)["setting"]
    base = recipe_from_dict(tuned)
    plan = [(knob, value, base.replace(**{knob: value}), seed)
            for knob, value in points(cfg, tuned) for seed in SD.compat_seeds(cfg)]
    SD.train_jobs(cfg, [(setting, METHOD, r, seed) for _, _, r, seed in plan], progress=progress)
    rows = []
    for knob, value, recipe, seed in plan:
        for split in ("test", "val"):
            _, row = X.method_curve(cfg, setting, METHOD, recipe=recipe, seed=seed, split=split, progress=False)
            rows.append({"knob": knob, "value": "all" if value is None else value,
                         "is_tuned": value == tuned[knob], "seed": seed, "split": split,
                         **{k: row[k] for k in ("auc_map", "auc_top1", "final_map", "rel_gain_map")}})
    return pd.DataFrame(rows)


def summarize(raw: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample sd over the seeds per (split, knob, value)."""
    stats = SD.seed_stats(raw.assign(value=raw["value"].astype(str)), ["auc_map", "final_map", "auc_top1"],
                          by=("split", "knob", "value"))
    tuned = raw.assign(value=raw["value"].astype(str)).groupby(["split", "knob", "value"], sort=False)["is_tuned"].first()
    return stats.merge(tuned.reset_index(), on=["split", "knob", "value"])


def write_outputs(cfg: dict, raw: pd.DataFrame) -> None:
    """``sensitivity.csv`` and ``sensitivity_summary.{csv,md,tex}`` in the tuning folder."""
    from ..figures import style as ST

    d = out_dir(cfg)
    io.atomic_write(d / "sensitivity.csv", lambda p: raw.to_csv(p, index=False))
    ST.save_table(summarize(raw), d, "sensitivity_summary",
                     caption="Sensitivity of Ours to tau, hard negatives and lambda_rev around its tuned recipe: "
                             "mean and sd over the seeds (backbones fixed at the profile's seed).")


def read_outputs(cfg: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(raw, summary)``; a missing file is an error naming ``make tune``."""
    d = out_dir(cfg)
    missing = [d / f for f in FILES if not (d / f).is_file()]
    if missing:
        raise cache.missing_target("the sensitivity study of Ours", "make tune", missing, cfg)
    return pd.read_csv(d / "sensitivity.csv"), pd.read_csv(d / "sensitivity_summary.csv")
