"""Tests of backfill_utils.backfill.systems: systems, orders, curves, AUC, flips, search."""
from __future__ import annotations

import doctest
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import average_precision_score

from backfill_utils.backfill import curves as BC, orders, systems as BS
from backfill_utils.retrieval import metrics as MT


# ---------------------------------------------------------------- helpers
def int_emb(rng, n, dim):
    return rng.integers(-2, 3, (n, dim)).astype(np.float32)


def sq(a, b):
    return ((a[:, None, :].astype(np.float64) - b[None, :, :]) ** 2).sum(-1)


def f32_error_bound(a, b):
    """Bound on the float32 error of |a|^2 + |b|^2 - 2 a.b (the engine's and faiss' squared
    distance): gamma_(d+3) (|a| + |b|)^2 with gamma_n = n u / (1 - n u), u = 2^-24."""
    n = a.shape[1] + 3
    norms = np.linalg.norm(np.asarray(a, np.float64), axis=1)[:, None] + \
        np.linalg.norm(np.asarray(b, np.float64), axis=1)[None, :]
    return n * 2.0 ** -24 / (1 - n * 2.0 ** -24) * norms ** 2


def assert_ranking_is_robust(d, bound):
    """Every row's order is decided by more than the rounding: two distances closer than their
    error bounds would let the last bits of a CPU's BLAS kernel reorder them, and a test that
    compares rankings exactly would then depend on the CPU."""
    for row, b in zip(d, bound):
        o = np.argsort(row, kind="stable")
        gaps = np.diff(row[o]) - (b[o][1:] + b[o][:-1])
        assert (gaps > 0).all(), f"test data with a near-tie (margin {gaps.min():.2e}); pick other data"


def brute_curve(qo, go, qn, gn, ql, gl, ratios, order, exclude_self):
    """Per ratio: mixed distance rows, sklearn AP and (distance, index) first rank."""
    n = len(go)
    d_old, d_new = sq(qo, go), sq(qn, gn)
    aps = np.full((len(ratios), len(qo)), np.nan)
    ranks = np.full((len(ratios), len(qo)), -1)
    for ri, r in enumerate(ratios):
        m = int(np.floor(r * n + 1e-9))
        new = np.zeros(n, bool)
        new[order[:m]] = True
        d = np.where(new[None], d_new, d_old)
        for i in range(len(qo)):
            keep = np.ones(n, bool)
            if exclude_self:
                keep[i] = False
            rel = (gl == ql[i]) & keep
            if not rel.any():
                continue
            aps[ri, i] = average_precision_score(rel[keep], -d[i][keep])
            ranking = [j for j in sorted(range(n), key=lambda j: (d[i, j], j)) if keep[j]]
            ranks[ri, i] = next(k for k, j in enumerate(ranking) if rel[j])
    return aps, ranks


@pytest.fixture
def float_setup():
    rng = np.random.default_rng(0)
    n = 80
    labels = rng.integers(0, 6, n)
    go = rng.normal(size=(n, 8)).astype(np.float32)
    gn = rng.normal(size=(n, 12)).astype(np.float32)
    return labels, go, gn


# ---------------------------------------------------------------- orders and counts
def test_doctests():
    from backfill_utils.backfill import orders

    results = [doctest.testmod(m) for m in (BS, BC, orders)]
    assert sum(r.attempted for r in results) >= 4 and not any(r.failed for r in results)


def test_backfilled_count_is_robust_to_float_error():
    assert orders.backfilled_count(0.3, 10) == 3
    assert np.linspace(0, 1, 11)[3] * 10 > 3 and orders.backfilled_count(np.linspace(0, 1, 11)[3], 10) == 3
    assert 0.29 * 100 < 29 and orders.backfilled_count(0.29, 100) == 29  # a plain floor gives 28
    assert 0.57 * 100 < 57 and orders.backfilled_count(0.57, 100) == 57
    assert orders.backfilled_count(0.25, 10) == 2
    assert orders.backfilled_count(0.0, 7) == 0 and orders.backfilled_count(1.0, 7) == 7
    assert [orders.backfilled_count(r, 10) for r in np.linspace(0, 1, 11)] == list(range(11))
    assert orders.backfilled_count(0.999, 10) == 9
    for bad in (-0.1, 1.01, np.nan):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            orders.backfilled_count(bad, 10)


def test_random_order_is_a_seeded_permutation():
    a = orders.random_order(100, seed=3)
    assert sorted(a.tolist()) == list(range(100))
    assert (a == orders.random_order(100, seed=3)).all()
    assert (a != orders.random_order(100, seed=4)).any()
    assert (a == np.random.default_rng(3).permutation(100)).all()


@pytest.mark.parametrize("order, msg", [
    ([0, 1, 2], "permutation of range\\(4\\).*shape \\(3,\\)"),
    ([0, 1, 1, 2], "not a permutation.*missing e.g. \\[3\\]"),
    ([0, 1, 2, 4], "not a permutation.*out of range: 1"),
    ([0.0, 1.5, 2.0, 3.0], "integer"),
])
def test_check_order_errors(order, msg):
    with pytest.raises(ValueError, match=msg):
        orders.check_order(order, 4)


@pytest.mark.parametrize("ratios, msg", [
    ([0.0, 1.2], r"\[0, 1\]"), ([-0.1, 0.5], r"\[0, 1\]"), ([0.0, np.nan], r"\[0, 1\]"),
    ([0.5, 0.2, 1.0], "sorted ascending"), ([], "empty"),
])
def test_check_ratios_errors(ratios, msg):
    with pytest.raises(ValueError, match=msg):
        orders.check_ratios(ratios)


def test_backfill_segments():
    order = np.array([3, 1, 0, 2])
    seg = orders.backfill_segments(order, np.array([0.0, 0.25, 0.5, 1.0]))
    # item 3 is new from ratio 0.25 (index 1), item 1 from 0.5, items 0 and 2 at 1.0
    assert seg.tolist() == [3, 2, 3, 1]
    assert orders.backfill_segments(order, np.array([0.0, 0.5])).tolist() == [2, 1, 2, 1]


# ---------------------------------------------------------------- systems
def test_system_validation_names_shapes(float_setup):
    labels, go, gn = float_setup
    psi_out = np.zeros((80, 16), np.float32)  # reverse transform with the wrong output dim
    with pytest.raises(ValueError, match=r"query_old has shape \(80, 16\).*gallery_old has shape \(80, 8\)"):
        BS.BackfillSystem.merge("rm+psi", psi_out, go, gn, gn)
    with pytest.raises(ValueError, match=r"query_new has shape \(80, 8\).*gallery_new has shape \(80, 12\)"):
        BS.BackfillSystem.merge("x", go, go, go, gn)
    with pytest.raises(ValueError, match=r"query_old has 80 rows.*query_new has 70"):
        BS.BackfillSystem.merge("x", go, go, gn[:70], gn)
    with pytest.raises(ValueError, match=r"gallery_old has 80 rows.*gallery_new has 79"):
        BS.BackfillSystem.merge("x", go, go, gn, gn[:79])
    with pytest.raises(ValueError, match=r"query has|query_old has shape"):
        BS.BackfillSystem.mixed("naive", gn, go, gn)  # the new query cannot search the old gallery
    bad = go.copy()
    bad[5, 0] = np.nan
    with pytest.raises(ValueError, match="gallery_old contains NaN"):
        BS.BackfillSystem.merge("x", go, bad, gn, gn)
    with pytest.raises(ValueError, match="not a permutation"):
        BS.BackfillSystem.merge("x", go, go, gn, gn, order=np.zeros(80, int))
    with pytest.raises(ValueError, match="query_passes"):
        BS.BackfillSystem.merge("x", go, go, gn, gn, query_passes=0)


def test_mixed_is_merge_with_one_query(float_setup):
    labels, go, gn = float_setup
    proj = np.random.default_rng(1).normal(size=(12, 8)).astype(np.float32)
    transformed = gn @ proj  # plays h(phi_old(x)), held by not-yet-backfilled items (FCT)
    s1 = BS.BackfillSystem.mixed("fct", go, transformed, go)
    s2 = BS.BackfillSystem.merge("fct", go, transformed, go, go)
    c1 = BC.backfill_curve(s1, labels, labels, exclude_self=True)
    c2 = BC.backfill_curve(s2, labels, labels, exclude_self=True)
    pd.testing.assert_frame_equal(c1, c2)


# ---------------------------------------------------------------- curves vs brute force
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("exclude_self", [True, False])
def test_curve_matches_brute_force_with_ties(seed, exclude_self):
    rng = np.random.default_rng(seed)
    n = 36
    gl = rng.integers(0, 4, n)
    go, gn = int_emb(rng, n, 3), int_emb(rng, n, 4)
    if exclude_self:
        qo, qn, ql = go, gn, gl
    else:
        qo, qn, ql = int_emb(rng, 25, 3), int_emb(rng, 25, 4), rng.integers(0, 4, 25)
    ratios = np.linspace(0, 1, 7)
    order = rng.permutation(n) if seed else None
    system = BS.BackfillSystem.merge("rm", qo, go, qn, gn, order=order)
    curve, pq = BC.backfill_curve(system, ql, gl, ratios=ratios, exclude_self=exclude_self,
                                  seed=seed, chunk_size=[None, 1, 5][seed], return_per_query=True,
                                  on_no_relevant="skip")
    used = order if order is not None else orders.random_order(n, seed)
    assert (pq["order"] == used).all()
    aps, ranks = brute_curve(qo, go, qn, gn, ql, gl, ratios, used, exclude_self)
    ok = ~np.isnan(aps[0])
    np.testing.assert_allclose(pq["ap"][:, ok], aps[:, ok], rtol=0, atol=1e-12)
    assert (pq["first_rank"] == ranks).all()
    np.testing.assert_allclose(curve["mAP"], 100 * aps[:, ok].mean(1), atol=1e-10)
    np.testing.assert_allclose(curve["top1"], 100 * (ranks[:, ok] == 0).mean(1))
    np.testing.assert_allclose(curve["top5"], 100 * ((ranks[:, ok] >= 0) & (ranks[:, ok] < 5)).mean(1))
    c1 = ranks == 0
    flips = [0.0] + [100 * (c1[i - 1] & ~c1[i] & ok).sum() / ok.sum() for i in range(1, len(ratios))]
    np.testing.assert_allclose(curve["negative_flips"], flips)
    assert list(curve.columns[:6]) == ["ratio", "n_backfilled", "mAP", "top1", "top5", "negative_flips"]
    assert curve["n_backfilled"].tolist() == [orders.backfilled_count(r, n) for r in ratios]


def test_curve_endpoints_equal_evaluate_retrieval_exactly(float_setup):
    labels, go, gn = float_setup
    rng = np.random.default_rng(2)
    qo = rng.normal(size=(80, 8)).astype(np.float32)  # e.g. psi(phi_new(q))
    system = BS.BackfillSystem.merge("rm+psi", qo, go, gn, gn)
    curve = BC.backfill_curve(system, labels, labels, exclude_self=True)
    assert curve["ratio"].tolist() == pytest.approx(np.linspace(0, 1, 11).tolist())
    old = MT.evaluate_retrieval(qo, labels, go, labels, exclude_self=True)
    new = MT.evaluate_retrieval(gn, labels, gn, labels, exclude_self=True)
    for key in ("mAP", "top1", "top5"):
        assert curve[key].iloc[0] == old[key]
        assert curve[key].iloc[-1] == new[key]
    # also when the two sides differ in precision (each side keeps its own)
    mixed_precision = BS.BackfillSystem.merge("x", qo, go, gn.astype(np.float64), gn.astype(np.float64))
    curve = BC.backfill_curve(mixed_precision, labels, labels, exclude_self=True, ratios=[0, 1])
    assert curve["mAP"].iloc[0] == old["mAP"] and curve["top1"].iloc[0] == old["top1"]


def test_curve_depends_on_the_order(float_setup):
    labels, go, gn = float_setup
    order = orders.random_order(80, 5)
    a = BC.backfill_curve(BS.BackfillSystem.merge("a", go, go, gn, gn, order=order), labels, labels,
                          exclude_self=True, return_per_query=True)[1]
    b = BC.backfill_curve(BS.BackfillSystem.merge("b", go, go, gn, gn, order=order[::-1].copy()),
                          labels, labels, exclude_self=True, return_per_query=True)[1]
    c = BC.backfill_curve(BS.BackfillSystem.merge("c", go, go, gn, gn), labels, labels,
                          exclude_self=True, seed=5, return_per_query=True)[1]
    assert not np.allclose(a["ap"][5], b["ap"][5])
    np.testing.assert_array_equal(a["ap"], c["ap"])  # order=None means random_order(N, seed)


def test_curve_gallery_permutation_invariance(float_setup):
    """Relabelling the gallery (items, labels, order alike) changes nothing (no ties)."""
    labels, go, gn = float_setup
    rng = np.random.default_rng(3)
    qo, qn = rng.normal(size=(30, 8)).astype(np.float32), rng.normal(size=(30, 12)).astype(np.float32)
    ql = rng.integers(0, 6, 30)
    order = orders.random_order(80, 1)
    perm = rng.permutation(80)
    inv = np.argsort(perm)
    # a permutation changes where a row sits in the matrix product (its last bits); exact
    # comparisons below hold on any CPU because no two distances are within the rounding
    for q, g in ((qo, go), (qn, gn)):
        assert_ranking_is_robust(sq(q, g), f32_error_bound(q, g))
    a = BC.backfill_curve(BS.BackfillSystem.merge("a", qo, go, qn, gn, order=order), ql, labels)
    b = BC.backfill_curve(BS.BackfillSystem.merge("b", qo, go[perm], qn, gn[perm], order=inv[order]),
                          ql, labels[perm])
    for key in ("top1", "top5", "negative_flips"):
        np.testing.assert_array_equal(a[key], b[key])
    np.testing.assert_allclose(a["mAP"], b["mAP"], rtol=0, atol=1e-10)


def test_identical_systems_are_flat_without_flips(float_setup):
    labels, go, _ = float_setup
    curve = BC.backfill_curve(BS.BackfillSystem.merge("same", go, go, go, go), labels, labels,
                              exclude_self=True)
    assert curve["mAP"].nunique() == 1 and (curve["negative_flips"] == 0).all()


def test_reference_correct_and_flips_vs_old(float_setup):
    labels, go, gn = float_setup
    old = MT.evaluate_retrieval(go, labels, go, labels, exclude_self=True, return_per_query=True)
    system = BS.BackfillSystem.mixed("naive", gn[:, :8], go, gn[:, :8])
    curve, pq = BC.backfill_curve(system, labels, labels, exclude_self=True,
                                  reference_correct=old["correct_at_1"], return_per_query=True)
    exp = 100 * (old["correct_at_1"][None] & ~pq["correct_at_1"]).mean(1)
    np.testing.assert_allclose(curve["negative_flips_vs_old"], exp)
    assert curve["negative_flips_vs_old"].iloc[-1] > 0  # an incompatible upgrade flips some
    with pytest.raises(ValueError, match="reference_correct must be a boolean array"):
        BC.backfill_curve(system, labels, labels, reference_correct=np.ones(79, bool))
    with pytest.raises(ValueError, match="reference_correct must be a boolean array"):
        BC.backfill_curve(system, labels, labels, reference_correct=np.ones(80))


def test_curve_validation_errors(float_setup):
    labels, go, gn = float_setup
    system = BS.BackfillSystem.merge("rm", go, go, gn, gn)
    with pytest.raises(ValueError, match="query_labels has 79 entries"):
        BC.backfill_curve(system, labels[:79], labels)
    with pytest.raises(ValueError, match="gallery_labels has 79 entries"):
        BC.backfill_curve(system, labels, labels[:79])
    with pytest.raises(ValueError, match="sorted ascending"):
        BC.backfill_curve(system, labels, labels, ratios=[0, 0.5, 0.2])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        BC.backfill_curve(system, labels, labels, ratios=[0, 1.5])
    small = BS.BackfillSystem.merge("q", go[:10], go, gn[:10], gn)
    with pytest.raises(ValueError, match="exclude_self=True.*10 queries and 80 gallery"):
        BC.backfill_curve(small, labels[:10], labels, exclude_self=True)
    with pytest.raises(TypeError, match="BackfillSystem"):
        BC.backfill_curve((go, go, gn, gn), labels, labels)


def test_curve_no_relevant_item(float_setup):
    _, go, gn = float_setup
    labels = np.arange(80) % 20
    labels[7] = 99  # a single-member class
    system = BS.BackfillSystem.merge("rm", go, go, gn, gn)
    with pytest.raises(ValueError, match=r"1 query\(s\) have no relevant item.*\[7\]"):
        BC.backfill_curve(system, labels, labels, exclude_self=True)
    curve, pq = BC.backfill_curve(system, labels, labels, exclude_self=True, on_no_relevant="skip",
                                  return_per_query=True)
    assert not pq["evaluated"][7] and np.isnan(pq["ap"][:, 7]).all()
    keep = np.arange(80) != 7
    np.testing.assert_allclose(curve["mAP"], 100 * pq["ap"][:, keep].mean(1))


# ---------------------------------------------------------------- offline and summary
def test_offline_curve():
    old = {"mAP": 10.0, "top1": 30.0, "top5": 60.0}
    new = {"mAP": 20.0, "top1": 50.0, "top5": 80.0}
    c = BC.offline_curve(old, new)
    assert c["mAP"].tolist() == [10.0] * 10 + [20.0]
    assert (c["negative_flips"] == 0).all()
    old_pq = dict(old, correct_at_1=np.array([True, True, False, True]))
    new_pq = dict(new, correct_at_1=np.array([True, False, True, False]))
    c = BC.offline_curve(old_pq, new_pq, ratios=[0, 0.5, 1])
    assert c["negative_flips"].tolist() == [0, 0, 50.0]
    assert c["negative_flips_vs_old"].tolist() == [0, 0, 50.0]
    with pytest.raises(ValueError, match="top5"):
        BC.offline_curve({"mAP": 1, "top1": 1}, new)


def test_summarize_curve():
    r = np.linspace(0, 1, 11)
    curve = pd.DataFrame({"ratio": r, "mAP": 10 + 10 * r, "top1": 30 + 20 * r ** 2,
                          "top5": np.full(11, 70.0), "negative_flips": np.r_[0, np.full(10, 0.5)]})
    old = {"mAP": 10.0, "top1": 30.0, "top5": 70.0}
    new = {"mAP": 20.0, "top1": 50.0, "top5": 80.0}
    s = BC.summarize_curve(curve, old, new)
    assert s["auc_map"] == pytest.approx(15.0)
    assert s["auc_top1"] == pytest.approx(30 + 20 * (1 / 3 + 1 / 600))  # trapezoid of r^2 at 11 points
    assert s["mean_map"] == pytest.approx(15.0) and s["final_top1"] == 50.0
    assert s["rel_gain_map"] == pytest.approx(0.5)
    assert s["rel_gain_top5"] == pytest.approx(0.0)
    assert s["negative_flips_total"] == pytest.approx(5.0)
    with pytest.warns(RuntimeWarning, match="undefined"):
        s = BC.summarize_curve(curve, old, dict(new, top5=70.0))
    assert np.isnan(s["rel_gain_top5"])
    with pytest.raises(ValueError, match="start at 0 and end at 1"):
        BC.summarize_curve(curve.iloc[:-1], old, new)


def test_summary_of_real_curve_endpoints(float_setup):
    labels, go, gn = float_setup
    system = BS.BackfillSystem.merge("rm", go, go, gn, gn)
    curve = BC.backfill_curve(system, labels, labels, exclude_self=True)
    old = MT.evaluate_retrieval(go, labels, go, labels, exclude_self=True)
    new = MT.evaluate_retrieval(gn, labels, gn, labels, exclude_self=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = BC.summarize_curve(curve, old, new)
    assert s["final_map"] == new["mAP"]
    assert s["auc_map"] == pytest.approx(np.trapezoid(curve["mAP"], curve["ratio"]))


# ---------------------------------------------------------------- the backfilled rule
def test_backfilled_and_segments_are_one_rule():
    """backfilled(r) at every ratio is the mask that segments() encodes, and it counts
    backfilled_count(r, N) items, first in the order."""
    n = 37
    order = orders.random_order(n, 5)
    system = BS.BackfillSystem.mixed("s", np.eye(n), np.eye(n), np.eye(n), order=order)
    ratios = np.array([0.0, 0.1, 0.29, 0.5, 0.999, 1.0])
    seg = system.segments(ratios)
    for i, r in enumerate(ratios):
        mask = system.backfilled(r)
        assert mask.sum() == orders.backfilled_count(r, n)
        assert mask[order[:orders.backfilled_count(r, n)]].all()
        assert (mask == (seg <= i)).all()
    # without an order: the seeded random order, as backfill_curve uses it
    free = BS.BackfillSystem.mixed("free", np.eye(n), np.eye(n), np.eye(n))
    assert (free.resolved_order(3) == orders.random_order(n, 3)).all()
    assert (free.backfilled(0.5, seed=3) == BS.BackfillSystem.mixed(
        "x", np.eye(n), np.eye(n), np.eye(n), order=orders.random_order(n, 3)).backfilled(0.5)).all()
    with pytest.raises(ValueError, match="ratio must be in"):
        system.backfilled(1.5)
