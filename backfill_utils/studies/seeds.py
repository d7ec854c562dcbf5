"""The compatibility stage over seeds: which seeds, training them, their curves and statistics.

The backbones of a profile are trained once, with the profile's ``seed`` (their specs
hold it); what varies is the **compatibility stage**: psi, rho, h and FastFill's head
are trained with ``compat_seeds`` seeds, ``seed, seed + 1, ...`` (profile key
``compat_seeds``: their number), in the settings listed in ``seed_settings`` (the
others use the profile's seed alone; the default profile seeds the extended setting,
where the paper's claims are asserted, to fit ``make reproduce`` in its budget). The
backfill order is the profile's ``eval.order_seed`` for every seed: only the training
varies, so a difference between seeds is the training's noise.

* :func:`compat_seeds`, :func:`seeds_of` -- the seeds of a profile / a setting;
* :func:`train_jobs` -- train many ``(setting, method, recipe, seed)`` in worker
  processes (:mod:`backfill_utils.parallel`; the cache stores each result);
* :func:`train_seeded` -- every trainable method of the registry over the seeds of
  each setting (notebook 30);
* :func:`prefetch_curves` -- compute the missing curves of every seed in worker processes;
* :func:`evaluate_seeds` -- curves and summaries of every seed, one long table with
  a ``seed`` column (notebooks 31, 44, 50, 51);
* :func:`seed_stats` -- mean and sample standard deviation over the seeds.
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import pandas as pd

from .. import cache
from .. import parallel
from ..backfill import experiments as X
from ..backfill import registry as MM

__all__ = ["compat_seeds", "seeds_of", "seeded", "train_jobs", "train_seeded", "prefetch_curves", "evaluate_seeds",
           "seed_stats", "SUMMARY_METRICS"]

#: The summary numbers whose mean and sd the seed tables report.
SUMMARY_METRICS = ("auc_map", "auc_top1", "mean_map", "mean_top1", "final_map", "final_top1",
                   "rel_gain_map", "rel_gain_top1", "negative_flips_total")


def compat_seeds(cfg: dict) -> list[int]:
    """The seeds of the compatibility stage: ``seed, seed + 1, ..., seed + compat_seeds - 1``.

    >>> compat_seeds({"seed": 5, "compat_seeds": 3})
    [5, 6, 7]
    """
    n = cfg.get("compat_seeds", 1)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"profile key compat_seeds must be an integer >= 1 (the number of seeds), got {n!r}")
    return [int(cfg["seed"]) + i for i in range(int(n))]


def seeds_of(cfg: dict, setting: str) -> list[int]:
    """The seeds of ``setting``: :func:`compat_seeds` if it is one of ``seed_settings``
    (default: every setting), else the profile's seed alone."""
    seeded_ = cfg.get("seed_settings")
    if seeded_ is None or setting in seeded_:
        return compat_seeds(cfg)
    return [int(cfg["seed"])]


def seeded(cfg: dict) -> list[str]:
    """The settings trained over every seed of :func:`compat_seeds`."""
    return [s for s in cfg["settings"] if len(seeds_of(cfg, s)) == len(compat_seeds(cfg))]


def _train_job(cfg: dict, setting: str, name: str, recipe: Any, seed: int | None) -> None:
    X.train_method(cfg, setting, name, recipe=recipe, seed=seed, progress=False)


def _call(fn, *args) -> None:
    fn(*args)


def _job_cost(cfg: dict, name: str, recipe: Any) -> float:
    recipe = recipe if recipe is not None else MM.get(name).default_recipe(cfg)
    weight = {"cmcl_psi_rho": 3.0, "cmcl_psi": 2.2}.get(getattr(recipe, "name", ""), 1.0)
    return weight * float(getattr(recipe, "epochs", 1))


def train_jobs(cfg: dict | None, jobs: Iterable[tuple], *, progress: bool = True,
               n_workers: int | None = None, also: Iterable[tuple] = ()) -> None:
    """Train (or find in the cache) every ``(setting, method, recipe, seed)`` of ``jobs``
    (``recipe=None``: the method's default) for the profile ``cfg``, ``$BACKFILL_WORKERS``
    at a time; a job may also be ``(profile, setting, method, recipe, seed)`` with its own
    profile (``cfg=None``: every job names its profile; the regime map).

    Each training runs alone in its process and is cached by
    :func:`backfill_utils.backfill.experiments.train_method`, so the modules equal a serial run's.
    A method whose registration is not one of the package's (registered in a notebook)
    is trained here, in the calling process. Jobs already in the cache cost nothing.

    ``also``: other cached computations to run in the same worker pool, each
    ``(fn, args, cost, label)`` with ``fn`` a module-level function of the package that
    writes its result to the cache (e.g. :func:`backfill_utils.studies.convergence.compute_job`);
    ``cost`` is in the units of a module's training (its recipe's epochs).
    """
    also = list(also)
    full = [tuple(j) if len(j) == 5 else (cfg, *j) for j in jobs]
    if any(j[0] is None for j in full):
        raise ValueError("train_jobs: a job without its own profile needs cfg")
    remote, local = [], []
    for job in full:
        c, setting, name, recipe, seed = job
        if cache.cache_path("compat", X.compat_key(c, setting, name, recipe, seed)).is_file():
            continue
        (remote if MM.is_builtin(name) else local).append(job)
    if remote or also:
        parallel.run_jobs(_call, [(_train_job, *j) for j in remote] + [(fn, *args) for fn, args, _, _ in also],
                          cost=[_job_cost(j[0], j[2], j[3]) for j in remote] + [float(c) for _, _, c, _ in also],
                          n_workers=n_workers, desc="train modules", progress=progress,
                          labels=[f"{s}/{n}/seed {sd}" for _, s, n, _, sd in remote] + [lb for *_, lb in also])
    for c, setting, name, recipe, seed in local:
        X.train_method(c, setting, name, recipe=recipe, seed=seed, progress=progress)


def train_seeded(cfg: dict, names=None, *, progress: bool = True, also: Iterable[tuple] = ()) -> list[tuple]:
    """Every trainable method of ``names`` (default: the registry) with its default recipe,
    over :func:`seeds_of` each setting of the profile (and the computations ``also``, in
    the same worker pool: :func:`train_jobs`); returns the training jobs."""
    names = [n for n in (names or MM.names()) if MM.get(n).trainable]
    jobs = [(s, n, None, seed) for s in cfg["settings"] for seed in seeds_of(cfg, s) for n in names]
    train_jobs(cfg, jobs, progress=progress, also=also)
    return jobs


def _curves_job(cfg: dict, setting: str, names: list[str], seed: int) -> None:
    X.evaluate_setting(cfg, setting, names, seed=seed, progress=False)


def prefetch_curves(cfg: dict, names=None, *, progress: bool = True, n_workers: int | None = None) -> int:
    """Compute the missing test curves of ``names`` (default: the registry) for every
    seed of every setting (:func:`seeds_of`) in worker processes, one job per
    (setting, seed) with the methods it lacks (a method without training once per
    setting); :func:`evaluate_seeds` and ``experiments.evaluate_all`` then read them
    from the cache. Returns the number of curves computed."""
    names = list(names or MM.names())
    jobs, costs, labels, seen = [], [], [], set()
    for s in cfg["settings"]:
        for seed in seeds_of(cfg, s):
            todo = []
            for n in names:
                path = cache.cache_path("curves", X._curve_key(cfg, s, n, None, seed if MM.get(n).trainable else None,
                                                             "test"))
                if path not in seen and not path.is_file():
                    seen.add(path)
                    todo.append(n)
            if todo:
                jobs.append((cfg, s, todo, seed))
                costs.append(float(len(todo)))
                labels.append(f"{s}/seed {seed}: {len(todo)} curves")
    if jobs:
        parallel.run_jobs(_curves_job, jobs, cost=costs, n_workers=n_workers, desc="curves",
                          progress=progress, labels=labels)
    return len(seen)


def evaluate_seeds(cfg: dict, names=None, *, settings=None, progress: bool = True):
    """Curves and summaries of every seed of each setting (:func:`seeds_of`).

    Returns ``(curves, summary)``: ``curves[(setting, seed)]`` as
    :func:`~backfill_utils.backfill.experiments.evaluate_setting` gives them, and one long summary
    with the columns ``dataset``, ``setting`` and ``seed`` added (methods without
    training repeat their one curve for every seed: their sd is 0).
    """
    curves, rows = {}, []
    for s in settings or cfg["settings"]:
        for seed in seeds_of(cfg, s):
            c, summ = X.evaluate_setting(cfg, s, names, seed=seed, progress=progress)
            curves[(s, seed)] = c
            rows.append(summ.assign(dataset=cfg["dataset"], setting=s, seed=seed))
    return curves, pd.concat(rows, ignore_index=True)


def seed_stats(summary: pd.DataFrame, metrics=SUMMARY_METRICS,
               by=("dataset", "setting", "method")) -> pd.DataFrame:
    """Mean, sample standard deviation (``<metric>_sd``, ddof 1; NaN for one seed) and the
    number of seeds (``seeds``) of each metric per ``by`` group, groups in order of appearance.

    >>> t = pd.DataFrame({"method": ["a", "a", "b"], "seed": [0, 1, 0], "auc_map": [1.0, 3.0, 2.0]})
    >>> seed_stats(t, ["auc_map"], by=["method"]).to_dict("records")
    [{'method': 'a', 'seeds': 2, 'auc_map': 2.0, 'auc_map_sd': 1.4142135623730951}, {'method': 'b', 'seeds': 1, 'auc_map': 2.0, 'auc_map_sd': nan}]
    """
    by = [b for b in by if b in summary.columns]
    metrics = [m for m in metrics if m in summary.columns]
    g = summary.groupby(by, sort=False)
    out = g.size().rename("seeds").reset_index()
    for m in metrics:
        out[m] = g[m].mean().to_numpy()
        out[f"{m}_sd"] = g[m].std(ddof=1).to_numpy()
    return out
