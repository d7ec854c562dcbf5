"""The backfill-order study: the random order against a method's own order.

FastFill backfills the items its transformation finds hardest first (descending
predicted uncertainty, its ``order``); every other method uses the seeded random
order. The study evaluates, in one setting, the method that defines the order in its
own order and in the random order, and every method of the registry's
``order_study`` group in the random order and in that method's order (names
``"<method> (<order_name> order)"``, e.g. ``"RM (sigma order)"``). Cached (kind
``"experiments"``); rendered by ``notebooks/49_backfill_order.ipynb``.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from .. import cache, io
from .. import embed as E
from ..backfill import curves as BC, orders
from ..backfill import experiments as X
from ..backfill import registry as MM
from ..retrieval import metrics as MT

__all__ = ["order_owner", "order_comparison"]


def order_owner() -> str:
    """The first registered method that defines its own backfill order (FastFill)."""
    owners = [n for n in MM.names() if MM.get(n).order is not None]
    if not owners:
        raise ValueError("no registered method defines a backfill order (Method.order)")
    return owners[0]


def order_comparison(cfg: dict, setting: str, names=None, *, owner: str | None = None,
                     progress: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Curves and summary (like :func:`experiments.evaluate_setting`, plus a column
    ``order``: ``"random"`` or the owner's ``order_name``) of the order study.

    ``names``: the methods run under both orders (default: the ``order_study`` group);
    ``owner``: the method whose order is compared (default: :func:`order_owner`).
    """
    owner = owner or order_owner()
    names = [n for n in (names or MM.names("order_study")) if n != owner]
    trained = [n for n in (owner, *names) if MM.get(n).trainable]
    key = {"study": "order", "setting": setting, "owner": owner, "methods": names, "eval": cfg["eval"],
           "compat": [X.compat_key(cfg, setting, n) for n in trained],
           "test": {r: E.embedding_spec(cfg, setting, r) for r in MM.BACKBONES}}

    def compute():
        curves, summary = _order_comparison(cfg, setting, owner, names, progress=progress)
        return {**io.frame_to_arrays(curves, "curves::"), **io.frame_to_arrays(summary, "summary::")}

    arrays = cache.cached_arrays("experiments", key, compute,
                              what=f"the backfill-order study of the {setting} setting")
    return io.arrays_to_frame(arrays, "curves::"), io.arrays_to_frame(arrays, "summary::")


def _order_comparison(cfg: dict, setting: str, owner: str, names: list[str], *, progress: bool):
    data = X.SettingData(cfg, setting, progress=progress)
    systems = {n: X.build_system(cfg, setting, n, data=data, progress=progress) for n in (owner, *names)}
    labels = data.test_labels
    own_order = systems[owner].order
    label = MM.get(owner).order_name
    random = orders.random_order(len(labels), int(cfg["eval"]["order_seed"]))
    variants = {owner: systems[owner],
                f"{owner} (random order)": dataclasses.replace(systems[owner], name=f"{owner} (random order)",
                                                                order=random)}
    for n in names:
        variants[n] = systems[n]
        variants[f"{n} ({label} order)"] = dataclasses.replace(systems[n], name=f"{n} ({label} order)",
                                                                order=own_order)
    old_ref, new_ref = (MT.evaluate_retrieval(data.test(r), labels, data.test(r), labels, exclude_self=True,
                                                return_per_query=True) for r in ("old", "new"))
    r = X.ratios(cfg)
    curves, rows = [], []
    for name, s in variants.items():
        c = BC.backfill_curve(s, labels, labels, ratios=r, exclude_self=True,
                             reference_correct=old_ref["correct_at_1"])
        c.insert(0, "method", name)
        curves.append(c)
        order = label if np.array_equal(s.resolved_order(), own_order) else "random"
        rows.append({"method": name, "order": order, **BC.summarize_curve(c, old_ref, new_ref)})
    return pd.concat(curves, ignore_index=True), pd.DataFrame(rows)
