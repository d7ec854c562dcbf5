"""Has a scaled schedule converged? FCT's training loss and validation AUC over its epochs.

FCT's authors train its transformation for 80 epochs; on a CPU the profile may scale that
(``compat.fct_epochs``). :func:`fct_convergence` trains FCT with the profile's default
recipe and, after every epoch, evaluates the method's backfilling curve on the validation
split (held out of every training) with the module as it is at that epoch: one row per
epoch with the training loss (``loss``), the learning rate and ``val_auc_map`` /
``val_auc_top1`` (over the validation queries that have a relevant item: a class with a
single validation image is left out). A curve that is flat over the last epochs says the schedule has
converged; the notebook ``30_compat`` draws it (:func:`plot`).

The run is cached (kind ``"convergence"``) under the recipe, the backbones and the
evaluation keys, like every trained artifact.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .. import cache, io
from .. import train as TR
from ..backfill import curves as BC, orders
from ..backfill import experiments as X
from ..backfill import registry as MM
from ..compat.fit import fit_fct

__all__ = ["fct_convergence", "pool_job", "describe", "plot"]


def _key(cfg: dict, setting: str) -> dict:
    recipe = MM.get("FCT").default_recipe(cfg)
    return {"setting": setting, "recipe": MM.recipe_key(recipe), "eval": cfg["eval"],
            "models": {r: TR.model_spec(cfg, setting, r) for r in ("old", "new")}}


def pool_job(cfg: dict, setting: str = "extended") -> list[tuple]:
    """:func:`fct_convergence` as a job for the compatibility stage's worker pool
    (``seeds.train_seeded(..., also=...)``): ``[(fn, args, cost, label)]``, or ``[]``
    when the history is already cached. It runs beside the modules' trainings; the
    notebook then reads it from the cache."""
    if cache.cache_path("convergence", _key(cfg, setting)).is_file():
        return []
    epochs = float(MM.get("FCT").default_recipe(cfg).epochs)
    # a training of FCT plus one validation curve per epoch: about 1.5 trainings
    return [(_compute, (cfg, setting), 1.5 * epochs, f"{setting}/FCT convergence")]


def _compute(cfg: dict, setting: str) -> None:
    fct_convergence(cfg, setting, progress=False)


def fct_convergence(cfg: dict, setting: str = "extended", *, progress: bool = True) -> pd.DataFrame:
    """FCT's history with the validation AUCs after each epoch (see the module docstring)."""
    method = MM.get("FCT")
    recipe = method.default_recipe(cfg)
    key = _key(cfg, setting)

    def compute() -> dict:
        train = X.SettingData(cfg, setting, progress=progress)
        val = X.SettingData(cfg, setting, progress=progress, split="val")
        old, new, labels = val.test("old"), val.test("new"), val.test_labels
        seed, r = int(cfg["eval"]["order_seed"]), X.ratios(cfg)

        def on_epoch(epoch: int, modules) -> dict:
            trained = MM.Trained(h=modules[0])
            system = X.make_system(method, old, new, trained, orders.method_order(method, trained, old, seed))
            # a validation class with a single image has no relevant item left out of it: skipped
            curve = BC.backfill_curve(system, labels, labels, ratios=r, exclude_self=True, on_no_relevant="skip")
            return {f"val_auc_{k}": float(np.trapezoid(curve[m].to_numpy(), r))
                    for k, m in (("map", "mAP"), ("top1", "top1"))}

        _, history = fit_fct(recipe, train.embeddings("old"), train.embeddings("new"),
                             disable=not progress, on_epoch=on_epoch)
        return io.frame_to_arrays(history, "history::")

    arrays = cache.cached_arrays("convergence", key, compute,
                              what=f"FCT's training history with validation AUCs ({setting} setting)")
    return io.arrays_to_frame(arrays, "history::")


def describe(history: pd.DataFrame, last: int = 5) -> str:
    """One line on the end of the curve: the validation AUC_mAP over the ``last`` epochs and
    the best epoch.

    >>> describe(pd.DataFrame({"epoch": [0, 1, 2], "val_auc_map": [10.0, 12.5, 12.25]}), last=2)
    'validation AUC_mAP over the last 2 of 3 epochs: 12.25 .. 12.50 (best 12.50 at epoch 2)'
    >>> describe(pd.DataFrame({"epoch": [0], "val_auc_map": [float("nan")]}))
    'validation AUC_mAP undefined: no validation query has a relevant item (every class has one image)'
    """
    auc = history["val_auc_map"]
    if auc.isna().all():
        return "validation AUC_mAP undefined: no validation query has a relevant item (every class has one image)"
    tail = auc.tail(last)
    return (f"validation AUC_mAP over the last {len(tail)} of {len(history)} epochs: {tail.min():.2f} .. "
            f"{tail.max():.2f} (best {auc.max():.2f} at epoch {int(history['epoch'][auc.idxmax()]) + 1})")


def plot(history: pd.DataFrame, *, recipe=None, ax=None, title: str = "FCT: convergence of the scaled schedule"):
    """Training loss (left axis, log scale) and validation AUC_mAP (right axis) per epoch;
    with the ``recipe`` that trained it, a dotted line where its BatchNorm layers freeze
    (``bn_eval_half``: from epoch ``epochs / 2`` on the loss is that of the eval-mode network)."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 3.6))
    epochs = np.asarray(history["epoch"]) + 1
    if recipe is not None and getattr(recipe, "bn_eval_half", False):
        first = int(np.ceil(recipe.epochs / 2)) + 1  # the first epoch (1-based) trained in eval mode
        ax.axvline(first - 0.5, color="#7f7f7f", ls=":", lw=1, label="BatchNorm frozen")
    ax.plot(epochs, history["loss"], color="#8c564b", label="training loss")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss (MSE)")
    right = ax.twinx()
    right.plot(epochs, history["val_auc_map"], color="#1f77b4", marker="o", ms=3, label="validation AUC_mAP")
    right.set_ylabel("validation AUC_mAP (%)")
    lines = ax.get_lines() + right.get_lines()
    ax.legend(lines, [ln.get_label() for ln in lines], loc="center right", fontsize=8)
    ax.set_title(title, fontsize=10)
    return ax
