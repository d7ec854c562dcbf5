"""Equal-budget tuning of every trainable method on the validation split (``make tune``).

Musgrave, Belongie and Lim (*A Metric Learning Reality Check*, ECCV 2020): the same
data, the same tuning budget for every method, choices made on a validation split,
the test split touched once, seeds reported. Here:

1. **Search** (:func:`search`): for each method of the profile's ``tune.methods``
   (the trainable methods of Table 1: RM+psi, RM+psi+CMCL, Ours, FCT, FastFill, BiCT),
   ``tune.trials`` trials of its own hyperparameters (:func:`suggest`; the shared
   knobs epochs, learning rate, weight decay, width and depth of the trained MLP, and
   each method's loss knobs), each trained with the profile's seed on the train split
   of ``tune.setting`` and scored by **AUC_mAP on the validation split** (images held
   out of every training, searched leave-one-out like the test split). The search is
   optuna's TPE sampler, seeded (``tune.sampler_seed``), its trials sequential: each
   proposal depends on every earlier result, so the same seed gives the same trials
   (and, with the cache, a second run costs nothing). The first trial of every method
   is its default recipe, so the budget is the same and no method can end below its
   default on validation. Methods are searched in parallel worker processes.
2. **Selection**: the trial with the highest validation AUC_mAP (the earliest on a tie),
   written to ``chosen.yaml``.
3. **Test** (:func:`evaluate_test`): the default and the chosen recipe of each method,
   trained over every seed of the compatibility stage (:func:`backfill_utils.studies.seeds.compat_seeds`)
   and evaluated once on the test split.

Every trial is cached (modules by recipe and seed, curves by split), and the files go
to ``<run folder>/tuning/`` (``results/tuning/`` for the default profile, committed):
``trials.csv``, ``chosen.yaml``, ``test_seeds.csv``, ``tuned_vs_default.{csv,md}``,
``runtime.csv``; :mod:`backfill_utils.studies.sensitivity` adds the sensitivity study of the
paper's method. ``python -m backfill_utils.tools.make_tune --profile default`` (``make tune``) runs it all.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from .. import cache, io
from .. import config as C
from .. import embed as E
from .. import parallel
from .. import train as TR
from ..backfill import experiments as X
from ..backfill import registry as MM
from ..compat.recipes import recipe_from_dict
from . import seeds as SD

__all__ = ["tune_config", "out_dir", "suggest", "default_params", "prepare", "search", "select", "evaluate_test",
           "tuned_vs_default", "read_outputs", "missing_outputs", "write_outputs"]

TARGET = "make tune"
SCORE = "auc_map"


def tune_config(cfg: dict) -> dict:
    """The profile's ``tune`` keys, checked: ``setting``, ``trials`` (>= 1), ``startup_trials``,
    ``sampler_seed``, ``methods`` (trainable registered methods) and ``sensitivity``."""
    t = dict(cfg.get("tune") or {})
    missing = sorted({"setting", "trials", "startup_trials", "sampler_seed", "methods"} - set(t))
    if missing:
        raise ValueError(f"profile key tune lacks {missing}; see params/default.yaml")
    if t["setting"] not in cfg["settings"]:
        raise ValueError(f"tune.setting {t['setting']!r} is not one of the profile's settings {cfg['settings']}")
    if int(t["trials"]) < 1:
        raise ValueError(f"tune.trials must be >= 1, got {t['trials']!r}")
    for m in t["methods"]:
        if not MM.get(m).trainable:
            raise ValueError(f"tune.methods: {m!r} has nothing to train; trainable methods: "
                             f"{[n for n in MM.names() if MM.get(n).trainable]}")
    return t


def out_dir(cfg: dict) -> Path:
    """``<run folder>/tuning`` (``results/tuning`` for the default profile as it is)."""
    return C.output_dir(cfg) / "tuning"


# --------------------------------------------------------------------------- search spaces
def _epochs(base: Any) -> list[int]:
    e = int(base.epochs)
    return sorted({max(1 + base.warmup_epochs, e // 2), e, 2 * e})


def _weight_decays(base: Any) -> list[float]:
    return sorted({0.0, 1e-5, 1e-4, float(base.weight_decay)})


def _width_x(hidden: int | None, d: int) -> int:
    return 2 if hidden is None else hidden // d


def _widths(base: Any, d: int) -> list[int]:
    """Hidden width as a multiple of the embedding dimension ``d``: 1, 2 or 4; FCT and FastFill
    also 16 (their authors' inner width, 2048 at 128 dimensions); and the default recipe's."""
    return sorted({1, 2, 4, _width_x(base.hidden, d)} | ({16} if hasattr(base, "arch") else set()))


def default_params(cfg: dict, name: str) -> dict:
    """The trial parameters of a method's default recipe (its first trial)."""
    r = MM.get(name).default_recipe(cfg)
    p = {"epochs": r.epochs, "lr": r.lr, "weight_decay": r.weight_decay,
         "width_x": _width_x(r.hidden, int(cfg["embedding_dim"])), "depth": r.depth}
    if hasattr(r, "arch"):
        p.update(arch=r.arch, regression=r.regression)
    if hasattr(r, "tau"):
        p.update(tau=r.tau, hard_negatives=r.hard_negatives, lambda_rev=r.lambda_rev)
    if hasattr(r, "rho_depth"):
        p.update(rho_width_x=_width_x(r.rho_hidden, int(cfg["embedding_dim"])),
                 rho_depth=r.rho_depth)
    if hasattr(r, "mu_uncertainty"):
        p.update(mu=r.mu, mu_uncertainty=r.mu_uncertainty)
    if hasattr(r, "ce_weight"):
        p.update(ce_weight=r.ce_weight, feature_weight=r.feature_weight)
    return p


def suggest(trial, cfg: dict, name: str) -> Any:
    """The recipe of one trial of ``name``: its default recipe with the knobs the trial draws.

    Shared knobs: ``epochs`` (half, once or twice the default recipe's), ``lr`` (log-uniform
    1e-4..1e-2), ``weight_decay`` (0, 1e-5, 1e-4 and the default recipe's), ``width_x``
    (hidden width = 1, 2 or 4 x the embedding dimension; 16 x too for FCT and FastFill),
    ``depth`` (1 or 2 hidden layers). FCT and FastFill add ``arch`` (their authors' side
    projection or the small MLP) and ``regression`` (mean or sum). CMCL methods add ``tau``
    (log-uniform 0.02..0.5), ``hard_negatives`` (all, 16, 64, 128) and ``lambda_rev``
    (log-uniform 0.1..10); Ours adds rho's ``rho_width_x`` and ``rho_depth``; FastFill its
    classification weight ``mu`` (0, 0.3, 1, 3) and ``mu_uncertainty`` (log-uniform 0.1..2);
    BiCT its ``ce_weight`` and ``feature_weight`` (log-uniform 0.1..10 each).
    """
    base = MM.get(name).default_recipe(cfg)
    d = int(cfg["embedding_dim"])
    f = dict(epochs=trial.suggest_categorical("epochs", _epochs(base)),
             lr=trial.suggest_float("lr", 1e-4, 1e-2, log=True),
             weight_decay=trial.suggest_categorical("weight_decay", _weight_decays(base)),
             hidden=d * trial.suggest_categorical("width_x", _widths(base, d)),
             depth=trial.suggest_int("depth", 1, 2))
    if hasattr(base, "arch"):
        f.update(arch=trial.suggest_categorical("arch", ["side_projection", "mlp"]),
                 regression=trial.suggest_categorical("regression", ["mean", "sum"]))
    if hasattr(base, "tau"):
        f.update(tau=trial.suggest_float("tau", 0.02, 0.5, log=True),
                 hard_negatives=trial.suggest_categorical("hard_negatives", [None, 16, 64, 128]),
                 lambda_rev=trial.suggest_float("lambda_rev", 0.1, 10.0, log=True))
    if hasattr(base, "rho_depth"):
        f.update(rho_hidden=d * trial.suggest_categorical("rho_width_x", [1, 2, 4]),
                 rho_depth=trial.suggest_int("rho_depth", 1, 2))
    if hasattr(base, "mu_uncertainty"):
        f.update(mu=trial.suggest_categorical("mu", [0.0, 0.3, 1.0, 3.0]),
                 mu_uncertainty=trial.suggest_float("mu_uncertainty", 0.1, 2.0, log=True))
    if hasattr(base, "ce_weight"):
        f.update(ce_weight=trial.suggest_float("ce_weight", 0.1, 10.0, log=True),
                 feature_weight=trial.suggest_float("feature_weight", 0.1, 10.0, log=True))
    return base.replace(**f)


def prepare(cfg: dict, *, progress: bool = True) -> None:
    """The backbones of the tuning setting (in worker processes), their train-split and
    validation embeddings (here, before the searches share them)."""
    setting = tune_config(cfg)["setting"]
    TR.train_many([TR.model_spec(cfg, setting, r) for r in MM.BACKBONES], data_root=cfg.get("data_root"),
                  download=bool(cfg.get("download")), progress=progress)
    X.cache_train_embeddings(cfg, setting, progress=progress)
    for role in MM.BACKBONES:
        E.get_embeddings(cfg, setting, role, "val", progress=progress)


def _score(cfg: dict, setting: str, name: str, recipe: Any, seed: int) -> dict:
    _, row = X.method_curve(cfg, setting, name, recipe=recipe, seed=seed, split="val", progress=False)
    return row


def _search_method(cfg: dict, name: str) -> list[dict]:
    """One method's study (run in a worker process): the rows of its trials."""
    import optuna

    t = tune_config(cfg)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=int(t["sampler_seed"]), n_startup_trials=int(t["startup_trials"]))
    study = optuna.create_study(direction="maximize", sampler=sampler, study_name=name)
    study.enqueue_trial(default_params(cfg, name))
    seed, rows = int(cfg["seed"]), []

    def objective(trial):
        recipe = suggest(trial, cfg, name)
        t0, c0 = time.perf_counter(), time.process_time()
        row = _score(cfg, t["setting"], name, recipe, seed)
        rows.append({"method": name, "trial": trial.number, "default": trial.number == 0,
                     "val_auc_map": row["auc_map"], "val_auc_top1": row["auc_top1"],
                     "val_final_map": row["final_map"], "seconds": time.perf_counter() - t0,
                     "cpu_seconds": time.process_time() - c0, "params": json.dumps(trial.params, sort_keys=True),
                     "recipe": json.dumps(MM.recipe_key(recipe), sort_keys=True)})
        return row[SCORE]

    study.optimize(objective, n_trials=int(t["trials"]))
    return rows


def search(cfg: dict, *, progress: bool = True) -> pd.DataFrame:
    """Every method's trials (:func:`_search_method`), methods in parallel worker processes;
    one row per trial (``method, trial, default, val_auc_map, ..., seconds, cpu_seconds,
    params, recipe``)."""
    t = tune_config(cfg)
    names = list(t["methods"])
    weight = {"Ours": 3.0, "RM+psi+CMCL": 2.2}
    results = parallel.run_jobs(_search_method, [(cfg, n) for n in names], cost=[weight.get(n, 1.0) for n in names],
                                desc="tune", progress=progress, labels=names)
    return pd.DataFrame([r for rows in results for r in rows])


def select(trials: pd.DataFrame) -> dict:
    """The chosen trial of each method: the highest validation AUC_mAP, the earliest on a tie.
    ``{method: {"trial", "val_auc_map", "default_val_auc_map", "recipe"}}``."""
    chosen = {}
    for name, g in trials.groupby("method", sort=False):
        g = g.sort_values("trial", kind="stable")
        best = g.loc[g["val_auc_map"].idxmax()]
        chosen[name] = {"trial": int(best["trial"]), "val_auc_map": float(best["val_auc_map"]),
                        "default_val_auc_map": float(g[g["default"]]["val_auc_map"].iloc[0]),
                        "recipe": json.loads(best["recipe"])}
    return chosen


def evaluate_test(cfg: dict, chosen: dict, *, progress: bool = True) -> pd.DataFrame:
    """The default and the chosen recipe of each method over every compat seed, trained in
    worker processes and evaluated once on the test split: one row per (method, recipe, seed)."""
    setting = tune_config(cfg)["setting"]
    seeds = SD.compat_seeds(cfg)
    plan = [(name, label, None if label == "default" else recipe_from_dict(c["recipe"]), seed)
            for name, c in chosen.items() for label in ("default", "tuned") for seed in seeds]
    SD.train_jobs(cfg, [(setting, name, recipe, seed) for name, _, recipe, seed in plan], progress=progress)
    rows = []
    for name, label, recipe, seed in plan:
        _, row = X.method_curve(cfg, setting, name, recipe=recipe, seed=seed, split="test", progress=False)
        rows.append({"method": name, "recipe": label, "seed": seed,
                     **{k: row[k] for k in SD.SUMMARY_METRICS}})
    return pd.DataFrame(rows)


def tuned_vs_default(test: pd.DataFrame, chosen: dict) -> pd.DataFrame:
    """Table 1's second block: per method, the default and the tuned recipe on the test
    split (mean and sample sd over the seeds) with their validation scores."""
    stats = SD.seed_stats(test, ["auc_map", "auc_top1", "rel_gain_map", "final_map"], by=("method", "recipe"))
    rows = []
    for name, c in chosen.items():
        s = stats[stats.method == name].set_index("recipe")
        rows.append({"method": name, "seeds": int(s.loc["tuned", "seeds"]),
                     "default AUC_mAP": s.loc["default", "auc_map"], "default AUC_mAP_sd": s.loc["default", "auc_map_sd"],
                     "tuned AUC_mAP": s.loc["tuned", "auc_map"], "tuned AUC_mAP_sd": s.loc["tuned", "auc_map_sd"],
                     "default gain_mAP_%": 100 * s.loc["default", "rel_gain_map"],
                     "tuned gain_mAP_%": 100 * s.loc["tuned", "rel_gain_map"],
                     "tuned gain_mAP_%_sd": 100 * s.loc["tuned", "rel_gain_map_sd"],
                     "default AUC_top1": s.loc["default", "auc_top1"], "tuned AUC_top1": s.loc["tuned", "auc_top1"],
                     "val default": c["default_val_auc_map"], "val tuned": c["val_auc_map"],
                     "chosen trial": c["trial"]})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- files
FILES = ("trials.csv", "chosen.yaml", "test_seeds.csv", "tuned_vs_default.csv")


def missing_outputs(cfg: dict) -> list[Path]:
    """The output files of ``make tune`` that this run's folder lacks."""
    return [out_dir(cfg) / f for f in FILES if not (out_dir(cfg) / f).is_file()]


def read_outputs(cfg: dict) -> dict:
    """``{"trials", "chosen", "test", "table"}`` from this run's tuning folder; a missing
    file is :class:`~backfill_utils.cache.MissingArtifactError` naming ``make tune``."""
    missing = missing_outputs(cfg)
    if missing:
        raise cache.missing_target("the results of the equal-budget tuning", TARGET, missing, cfg)
    d = out_dir(cfg)
    return {"trials": pd.read_csv(d / "trials.csv"), "chosen": yaml.safe_load((d / "chosen.yaml").read_text()),
            "test": pd.read_csv(d / "test_seeds.csv"), "table": pd.read_csv(d / "tuned_vs_default.csv")}


def write_outputs(cfg: dict, trials: pd.DataFrame, chosen: dict, test: pd.DataFrame) -> Path:
    """Write the tuning files (atomically) and return the folder."""
    from ..figures import style as ST

    d = out_dir(cfg)
    io.atomic_write(d / "trials.csv", lambda p: trials.to_csv(p, index=False))
    io.atomic_write_text(d / "chosen.yaml", yaml.safe_dump(chosen, sort_keys=False))
    io.atomic_write(d / "test_seeds.csv", lambda p: test.to_csv(p, index=False))
    ST.save_table(tuned_vs_default(test, chosen), d, "tuned_vs_default",
                     caption="Default recipe and tuned recipe (equal budget, chosen on the validation split), "
                             "test split, mean and sd over the seeds of the compatibility stage (backbones fixed at "
                             "the profile's seed).")
    return d
