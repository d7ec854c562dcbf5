"""One evaluation loop for the registered methods, whatever the embeddings come from.

:class:`EmbeddingSource` is the interface of "where a setting's embeddings and labels
come from": the profile's cached embeddings of a setting
(:class:`backfill_utils.backfill.experiments.SettingData`) or someone's own two models
(:class:`backfill_utils.studies.own_models.OwnData`). On such a source:

* :func:`make_system` / :func:`system_of` build a method's
  :class:`~backfill_utils.backfill.systems.BackfillSystem` from its trained modules, backfilled
  in :func:`~backfill_utils.backfill.orders.method_order`;
* :class:`References` computes old/old and new/new (leave-one-out) once, and
  :func:`reference_curve` draws the three references from them;
* :func:`curve_and_row` evaluates one method: its curve and its summary row;
* :func:`evaluate_methods` runs it over a list of methods and assembles the long curve
  table and the summary.

Training and caching stay with the caller: the profile's curves are cached under keys
built from the profile (:func:`backfill_utils.backfill.experiments.method_curve`), modules trained
on own embeddings under the content of the files
(:func:`backfill_utils.studies.own_models.train_own`).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Protocol, runtime_checkable

import numpy as np
import pandas as pd

from ..compat import modules as K
from ..retrieval import metrics as MT
from . import curves as BC, orders, systems as BS
from . import registry as MM

__all__ = ["EmbeddingSource", "References", "reference_curve", "make_system", "system_of", "curve_and_row",
           "evaluate_methods"]


@runtime_checkable
class EmbeddingSource(Protocol):
    """Where a setting's embeddings and labels come from (the members the training and the
    evaluation of a method read).

    Evaluation: ``split`` (the name of the evaluation split), ``test(role)`` the ``(N, d)``
    embeddings of backbone ``role`` (``"old"``, ``"new"``, ``"bct"``) of the evaluation
    split, which is gallery and queries (leave-one-out), and ``test_labels`` ``(N,)``.

    Training (a method's ``fit(data, recipe)``): ``embeddings(role)`` the train-split
    embeddings, ``(P, N, d)`` for ``P`` augmented passes or ``(N, d)``; ``labels`` their
    class labels ``(N,)``; ``classifier(role)`` the frozen classifier of a backbone (a
    source without one raises); ``restricted(roles, seed)`` the same data limited to the
    backbones a method declared (``train_roles``); ``progress`` (show progress bars).
    """

    split: str
    progress: bool

    def test(self, role: str) -> np.ndarray: ...

    @property
    def test_labels(self) -> np.ndarray: ...

    def embeddings(self, role: str) -> np.ndarray: ...

    @property
    def labels(self) -> np.ndarray: ...

    def classifier(self, role: str) -> Any: ...

    def restricted(self, roles, seed: int | None = None) -> "EmbeddingSource": ...


class References:
    """old/old and new/new on the evaluation split of ``data`` (leave-one-out), computed on
    first use: ``get()`` returns their per-query metrics."""

    def __init__(self, data: EmbeddingSource) -> None:
        self.data, self._refs = data, None

    def get(self) -> tuple[dict, dict]:
        if self._refs is None:
            y = self.data.test_labels
            self._refs = tuple(MT.evaluate_retrieval(self.data.test(r), y, self.data.test(r), y,
                                                     exclude_self=True, return_per_query=True)
                               for r in ("old", "new"))
        return self._refs


def reference_curve(kind: str, refs: References, r: np.ndarray) -> pd.DataFrame:
    """The curve of a reference (``old``, ``new`` or ``offline``) at ratios ``r``; ``refs.get()``
    gives the per-query metrics of old/old and new/new."""
    old_ref, new_ref = refs.get()
    if kind == "offline":
        return BC.offline_curve(old_ref, new_ref, r)
    ref = old_ref if kind == "old" else new_ref
    return pd.DataFrame({"ratio": r, "mAP": ref["mAP"], "top1": ref["top1"], "top5": ref["top5"],
                         "negative_flips": 0.0})


def make_system(method: MM.Method, old: Any, new: Any, trained: MM.Trained,
                order: np.ndarray | None) -> BS.BackfillSystem:
    """The generic system of a method from test embeddings and its trained modules.

    ``old``: phi_old of the gallery (and of the queries); ``new``: the gallery and
    queries embedded by the method's ``backbone``; ``order``: the backfill order
    (:func:`~backfill_utils.backfill.orders.method_order`). The new side holds ``rho(new)`` (or ``new``);
    not-yet-backfilled items hold ``h(old)`` (or ``old``) and are searched with
    ``old`` (rank merge), ``psi(new)``, or the new side's query.
    """
    new_side = K.apply(trained.rho, new) if trained.rho is not None else new
    if method.two_pass:
        query_old = old
    else:
        query_old = K.apply(trained.psi, new) if trained.psi is not None else new_side
    gallery_old = K.apply(trained.h, old) if trained.h is not None else old
    return BS.BackfillSystem(method.name, query_old, gallery_old, new_side, new_side, order,
                            method.query_passes)


def system_of(method: MM.Method, data: EmbeddingSource, trained: MM.Trained, order_seed: int) -> BS.BackfillSystem:
    """The system of ``method`` (its ``system`` or :func:`make_system`) on the evaluation
    split of ``data``, with its ``trained`` modules, backfilled in its order
    (:func:`~backfill_utils.backfill.orders.method_order` with the random order's ``order_seed``)."""
    old = data.test("old")
    order = orders.method_order(method, trained, old, order_seed)
    return (method.system or make_system)(method, old, data.test(method.backbone), trained, order)


def curve_and_row(method: MM.Method, data: EmbeddingSource, refs: References, r: np.ndarray,
                  trained: MM.Trained, order_seed: int) -> tuple[pd.DataFrame, dict]:
    """The backfilling curve of one method at ratios ``r`` on the evaluation split of
    ``data`` (leave-one-out) and its summary row: ``method, query_passes, extra_params``
    (the parameters of ``trained``) and :func:`~backfill_utils.backfill.curves.summarize_curve`'s
    numbers against ``refs``. A reference method's curve is :func:`reference_curve`."""
    if method.reference is not None:
        curve = reference_curve(method.reference, refs, r)
    else:
        system = system_of(method, data, trained, order_seed)
        curve = BC.backfill_curve(system, data.test_labels, data.test_labels, ratios=r, exclude_self=True,
                                 reference_correct=refs.get()[0]["correct_at_1"])
    row = {"method": method.name, "query_passes": method.query_passes,
           "extra_params": trained.n_params if method.trainable else 0, **BC.summarize_curve(curve, *refs.get())}
    return curve, row


def evaluate_methods(names: Iterable[str],
                     curve_of: Callable[[str], tuple[pd.DataFrame, dict] | None]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Curves (long table, column ``method`` first) and summary (one row per method,
    ``query_passes`` and ``extra_params`` int64) of the methods ``names``;
    ``curve_of(name)`` gives one method's ``(curve, row)`` (:func:`curve_and_row`, or a
    cached copy of it), or ``None`` for a method the source cannot evaluate (left out)."""
    curves, rows = [], []
    for n in names:
        got = curve_of(n)
        if got is None:
            continue
        c, row = got
        c = c.copy()
        c.insert(0, "method", n)
        curves.append(c)
        rows.append(row)
    summary = pd.DataFrame(rows)
    summary["query_passes"] = summary["query_passes"].astype(np.int64)
    summary["extra_params"] = summary["extra_params"].astype(np.int64)
    return pd.concat(curves, ignore_index=True), summary
