"""Backfilling curves of a system: metrics at every ratio, AUC, negative flips, the summary.

:func:`backfill_curve` evaluates any :class:`~backfill_utils.backfill.systems.BackfillSystem`
over the backfill ratios (one exact pass of the engine, no sort per ratio);
:func:`offline_curve` is the offline-backfilling reference; :func:`summarize_curve` gives
the AUCs and relative gains (:data:`GAIN_NOISE`: below it a gain has no meaning).
Metrics and their tie rules are those of :mod:`backfill_utils.retrieval.metrics` (AP:
ties as sklearn; top-k: ties broken by gallery index).
"""
from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from ..retrieval import metrics as MT
from .orders import backfilled_count, check_ratios
from .systems import BackfillSystem

__all__ = ["backfill_curve", "offline_curve", "summarize_curve", "GAIN_NOISE", "gain_not_applicable"]


# ---------------------------------------------------------------------------
# Curves
# ---------------------------------------------------------------------------
def _check_labels(system: BackfillSystem, query_labels: Any, gallery_labels: Any):
    ql = MT.as_label_array(query_labels, "query_labels")
    gl = MT.as_label_array(gallery_labels, "gallery_labels")
    if len(ql) != system.n_queries:
        raise ValueError(
            f"query_labels has {len(ql)} entries but system {system.name!r} has "
            f"{system.n_queries} queries"
        )
    if len(gl) != system.n_gallery:
        raise ValueError(
            f"gallery_labels has {len(gl)} entries but system {system.name!r} has "
            f"{system.n_gallery} gallery items"
        )
    return ql, gl


def _flip_rate(prev: np.ndarray, cur: np.ndarray, evaluated: np.ndarray) -> float:
    n = int(evaluated.sum())
    if n == 0:
        return float("nan")
    return 100.0 * float((prev & ~cur & evaluated).sum()) / n


def backfill_curve(
    system: BackfillSystem,
    query_labels: Any,
    gallery_labels: Any,
    *,
    ratios: Any = None,
    exclude_self: bool = False,
    seed: int = 0,
    reference_correct: Any = None,
    chunk_size: int | None = None,
    device: Any = None,
    return_per_query: bool = False,
    ks: Sequence[int] = (1, 5),
    on_no_relevant: str = "error",
    memory_budget: int | None = None,
    progress: bool = False,
):
    """Retrieval quality of an online backfilling system at every backfill ratio.

    At ratio ``r`` the first ``backfilled_count(r, N)`` items of the order
    (``system.order``, else ``random_order(N, seed)``) hold ``gallery_new`` and
    are searched with ``query_new``; the others hold ``gallery_old`` and are
    searched with ``query_old``; the results are merged by distance.

    Returns a DataFrame with one row per ratio and columns ``ratio``,
    ``n_backfilled``, ``mAP``, ``top1``, ``top5`` (one ``top{k}`` per ``ks``,
    percent), ``negative_flips`` (percent of evaluated queries whose top-1 is
    correct at the previous ratio and wrong at this one; 0 at the first ratio)
    and, if ``reference_correct`` (bool per query, e.g. the old/old
    ``correct_at_1``) is given, ``negative_flips_vs_old`` (percent of evaluated
    queries correct in the reference and wrong at this ratio).

    With ``return_per_query=True`` returns ``(curve, per_query)`` where
    ``per_query`` holds ``ap`` and ``first_rank`` of shape (R, Q),
    ``correct_at_{k}`` (R, Q) bool, ``n_relevant`` and ``evaluated`` (Q,), and
    the ``order`` used.

    ``exclude_self``, ``chunk_size``, ``device``, ``on_no_relevant`` and
    ``memory_budget`` are as in :func:`backfill_utils.retrieval.metrics.evaluate_retrieval`;
    at ratio 0 the curve equals ``evaluate_retrieval(query_old, ..., gallery_old, ...)``
    and at ratio 1 ``evaluate_retrieval(query_new, ..., gallery_new, ...)``.
    """
    if not isinstance(system, BackfillSystem):
        raise TypeError(f"system must be a BackfillSystem, got {type(system).__name__}")
    ks = MT.validate_ks(ks)
    MT.check_on_no_relevant(on_no_relevant)
    r = check_ratios(ratios)
    ql, gl = _check_labels(system, query_labels, gallery_labels)
    _check_sizes(system, exclude_self)
    ref = _check_reference(reference_correct, system.n_queries)
    order = system.resolved_order(seed)
    seg = system.segments(r, seed=seed)
    qc, gc = MT.encode_labels(ql, gl)
    stats = MT.retrieval_statistics(
        system.query_old, system.gallery_old, system.query_new, system.gallery_new, qc, gc,
        segment=seg, n_ratios=len(r), exclude_self=exclude_self, chunk_size=chunk_size,
        device=device, memory_budget=memory_budget, progress=progress, desc=system.name,
    )
    evaluated = stats["n_relevant"] > 0
    if not evaluated.all() and on_no_relevant == "error":
        raise MT.no_relevant_error(stats["n_relevant"])
    summ = MT.summarize_statistics(stats["ap"], stats["first_rank"], evaluated, ks)
    rank = stats["first_rank"]
    curve = _curve_frame(system, r, summ, (rank >= 0) & (rank < 1), evaluated, ref)
    if not return_per_query:
        return curve
    per_query = {"ap": stats["ap"], "first_rank": rank}
    for k in ks:
        per_query[f"correct_at_{k}"] = (rank >= 0) & (rank < k)
    per_query["n_relevant"] = stats["n_relevant"]
    per_query["evaluated"] = evaluated
    per_query["order"] = order
    return curve, per_query


def _check_sizes(system: BackfillSystem, exclude_self: bool) -> None:
    Q, N = system.n_queries, system.n_gallery
    if Q == 0 or N == 0:
        raise ValueError(f"system {system.name!r} has no queries or no gallery items")
    if exclude_self and Q != N:
        raise ValueError(
            f"exclude_self=True needs query i to be gallery item i, but system "
            f"{system.name!r} has {Q} queries and {N} gallery items; pass exclude_self=False"
        )


def _check_reference(reference_correct: Any, Q: int) -> np.ndarray | None:
    """``reference_correct`` as a ``(Q,)`` bool array (or ``None``)."""
    if reference_correct is None:
        return None
    ref = np.asarray(
        reference_correct.detach().cpu().numpy() if isinstance(reference_correct, torch.Tensor)
        else reference_correct
    )
    if ref.shape != (Q,) or ref.dtype != bool:
        raise ValueError(
            f"reference_correct must be a boolean array with one entry per query "
            f"(shape ({Q},)), got dtype {ref.dtype} and shape {ref.shape}; e.g. pass "
            "evaluate_retrieval(..., return_per_query=True)['correct_at_1']"
        )
    return ref


def _curve_frame(system: BackfillSystem, r: np.ndarray, summ: dict, correct1: np.ndarray,
                 evaluated: np.ndarray, ref: np.ndarray | None) -> pd.DataFrame:
    """The curve table: ratios, counts, the summarised metrics and the flip rates."""
    n = system.n_gallery
    curve = pd.DataFrame({"ratio": r, "n_backfilled": [backfilled_count(x, n) for x in r]})
    for key, vals in summ.items():
        curve[key] = vals
    curve["negative_flips"] = [0.0] + [_flip_rate(correct1[i - 1], correct1[i], evaluated)
                                       for i in range(1, len(r))]
    if ref is not None:
        curve["negative_flips_vs_old"] = [_flip_rate(ref, correct1[i], evaluated) for i in range(len(r))]
    curve.attrs["system"] = system.name
    curve.attrs["query_passes"] = system.query_passes
    return curve


def offline_curve(old_metrics: dict, new_metrics: dict, ratios: Any = None) -> pd.DataFrame:
    """Offline backfilling: old/old quality until ``r = 1``, then new/new.

    ``old_metrics``/``new_metrics`` are :func:`evaluate_retrieval` results (at
    least ``mAP``, ``top1``, ``top5``). Negative flips are 0 except at the
    switch to ``r = 1``; if both dicts carry per-query ``correct_at_1`` (from
    ``return_per_query=True``), the flips at the switch are computed (percent
    of queries evaluated in both that are correct with old/old and wrong with
    new/new) and a ``negative_flips_vs_old`` column is added; otherwise they
    are reported as 0.
    """
    r = check_ratios(ratios)
    keys = [k for k in old_metrics if (k == "mAP" or (k.startswith("top") and k[3:].isdigit()))
            and k in new_metrics and np.isscalar(old_metrics[k])]
    for k in ("mAP", "top1", "top5"):
        if k not in keys:
            raise ValueError(f"old_metrics and new_metrics must both contain {k!r} (evaluate_retrieval output)")
    is_new = r >= 1.0
    curve = pd.DataFrame({"ratio": r})
    for k in keys:
        curve[k] = np.where(is_new, float(new_metrics[k]), float(old_metrics[k]))
    per_query = "correct_at_1" in old_metrics and "correct_at_1" in new_metrics
    flips = np.zeros(len(r))
    if per_query:
        co = np.asarray(old_metrics["correct_at_1"], bool)
        cn = np.asarray(new_metrics["correct_at_1"], bool)
        if co.shape != cn.shape:
            raise ValueError(f"per-query correct_at_1 of old ({co.shape}) and new ({cn.shape}) differ in length")
        ev = np.asarray(old_metrics.get("evaluated", np.ones_like(co)), bool) & np.asarray(
            new_metrics.get("evaluated", np.ones_like(cn)), bool)
        switch = _flip_rate(co, cn, ev)
        first_new = np.flatnonzero(is_new)
        if len(first_new) and first_new[0] > 0:
            flips[first_new[0]] = switch
        curve["negative_flips"] = flips
        curve["negative_flips_vs_old"] = np.where(is_new, switch, 0.0)
    else:
        curve["negative_flips"] = flips
    curve.attrs["system"] = "offline"
    return curve


#: The noise of a retrieval metric (mAP, CMC top-k, in percent as
#: :func:`~backfill_utils.retrieval.metrics.evaluate_retrieval` gives them) below which two models
#: are not told apart: half a percentage point. A relative gain needs
#: ``M_new - M_old`` above it (:func:`gain_not_applicable`).
GAIN_NOISE = 0.5


def gain_not_applicable(m_old: float, m_new: float) -> str:
    """Why the relative gain ``(AUC - M_old) / (M_new - M_old)`` has no meaning, or ``""``
    when it has one (``M_new - M_old > GAIN_NOISE``); metrics in percent.

    >>> gain_not_applicable(43.44, 30.72)
    'M_new (30.72) is below M_old (43.44): the upgrade has no gain to share'
    >>> gain_not_applicable(40.0, 40.3)
    'M_new (40.30) exceeds M_old (40.00) by no more than the noise of the metric (0.5 points)'
    >>> gain_not_applicable(20.0, 40.0)
    ''
    """
    if not (np.isfinite(m_old) and np.isfinite(m_new)):
        return f"M_old ({m_old}) or M_new ({m_new}) is not a number"
    if m_new == m_old:
        return f"M_new equals M_old ({m_old:.2f}): the ratio is undefined"
    if m_new < m_old:
        return f"M_new ({m_new:.2f}) is below M_old ({m_old:.2f}): the upgrade has no gain to share"
    if m_new - m_old <= GAIN_NOISE:
        return (f"M_new ({m_new:.2f}) exceeds M_old ({m_old:.2f}) by no more than the noise of the "
                f"metric ({GAIN_NOISE:g} points)")
    return ""


def summarize_curve(curve: pd.DataFrame, old_ref: dict, new_ref: dict) -> dict[str, float]:
    """AUCs, means, final values, relative gains and flip totals of a curve.

    * ``auc_map``, ``auc_top1``, ``auc_top5``: trapezoid rule over the ratios,
      which must start at 0 and end at 1 (the area over [0, 1]);
    * ``mean_map``, ``mean_top1``, ``mean_top5``: plain mean of the points (as
      FastFill reports);
    * ``final_map``, ``final_top1``, ``final_top5``: the value at the last ratio;
    * ``rel_gain_map``, ``rel_gain_top1``, ``rel_gain_top5``:
      ``(AUC - M_old) / (M_new - M_old)`` with ``M_old``/``M_new`` from
      ``old_ref``/``new_ref`` (old/old and new/new metrics). Only where the upgrade
      has a gain to deliver: if ``M_new - M_old <= GAIN_NOISE`` (the new model is
      worse, equal, or better by no more than the noise of the metric) the ratio
      would be meaningless or flip its sign, so the value is ``nan`` and a
      ``RuntimeWarning`` gives the reason (:func:`gain_not_applicable`);
    * ``negative_flips_total``: sum of the per-step ``negative_flips``;
      ``negative_flips_vs_old_max`` if that column exists.
    """
    if "ratio" not in curve:
        raise ValueError("curve must have a 'ratio' column (backfill_curve output)")
    r = check_ratios(curve["ratio"].to_numpy())
    if len(r) < 2 or r[0] != 0.0 or r[-1] != 1.0:
        raise ValueError(
            f"the AUC is the area over [0, 1]: the curve's ratios must start at 0 and end at 1, "
            f"got {r[0]} .. {r[-1]} ({len(r)} points)"
        )
    out: dict[str, float] = {}
    for col, short in (("mAP", "map"), ("top1", "top1"), ("top5", "top5")):
        if col not in curve:
            raise ValueError(f"curve has no {col!r} column")
        y = curve[col].to_numpy(dtype=np.float64)
        auc = float(np.trapezoid(y, r))
        out[f"auc_{short}"] = auc
        out[f"mean_{short}"] = float(y.mean())
        out[f"final_{short}"] = float(y[-1])
        if col not in old_ref or col not in new_ref:
            raise ValueError(f"old_ref and new_ref must contain {col!r} (evaluate_retrieval output)")
        m_old, m_new = float(old_ref[col]), float(new_ref[col])
        why = gain_not_applicable(m_old, m_new)
        if why:
            warnings.warn(f"relative gain of {col} is not applicable: {why}; reporting nan",
                          RuntimeWarning, stacklevel=2)
            out[f"rel_gain_{short}"] = float("nan")
        else:
            out[f"rel_gain_{short}"] = (auc - m_old) / (m_new - m_old)
    out["negative_flips_total"] = float(curve["negative_flips"].sum()) if "negative_flips" in curve else float("nan")
    if "negative_flips_vs_old" in curve:
        out["negative_flips_vs_old_max"] = float(curve["negative_flips_vs_old"].max())
    return out
