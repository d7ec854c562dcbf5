"""Helpers of the figures (illustrate.py): top-k lists consistent with the engine, the queries
the figures pick, pair distances and the calibration summary."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from backfill_utils.backfill import curves as BC, orders, systems as BS
from backfill_utils.figures import illustrate as IL
from backfill_utils.retrieval import distances as DS


def _setup(kind: str, seed: int = 0, n: int = 60, n_cls: int = 6):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_cls, n)
    if kind == "int":  # small integers: many exact distance ties
        go = rng.integers(-2, 3, (n, 4)).astype(np.float32)
        gn = rng.integers(-2, 3, (n, 6)).astype(np.float32)
        qo = rng.integers(-2, 3, (n, 4)).astype(np.float32)
    else:
        go = rng.normal(size=(n, 8)).astype(np.float32)
        gn = rng.normal(size=(n, 12)).astype(np.float32)
        qo = rng.normal(size=(n, 8)).astype(np.float32)
    return labels, qo, go, gn


U32 = 2.0 ** -24  # unit roundoff of float32


def _exact(q, g):
    """Squared distances in float64 from the float32 inputs, and a bound on the float32 error of
    the engine's |q|^2 + |g|^2 - 2 q.g: each term is a float32 sum of d products, so the error
    is at most gamma_(d+3) (|q|^2 + |g|^2 + 2 |q||g|) = gamma_(d+3) (|q| + |g|)^2,
    gamma_n = n u / (1 - n u) (Higham, Accuracy and Stability of Numerical Algorithms, 3.1)."""
    q, g = np.asarray(q, np.float64), np.asarray(g, np.float64)
    d = ((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)
    n = q.shape[1] + 3
    norms = np.linalg.norm(q, axis=1)[:, None] + np.linalg.norm(g, axis=1)[None, :]
    return d, n * U32 / (1 - n * U32) * norms ** 2


def _brute(system, ratio, k, queries, exclude_self, part, seed=0):
    n = system.n_gallery
    order = system.order if system.order is not None else orders.random_order(n, seed)
    new = set(order[:orders.backfilled_count(ratio, n)].tolist())
    d_old, b_old = _exact(system.query_old, system.gallery_old)
    d_new, b_new = _exact(system.query_new, system.gallery_new)
    D = np.full((len(queries), k), np.inf)
    I = np.full((len(queries), k), -1)
    bound = np.zeros((len(queries), k))
    gap = np.inf  # the smallest distance between consecutive candidates, beyond the rounding
    for a, q in enumerate(queries):
        items = []
        for j in range(n):
            if exclude_self and j == q:
                continue
            if part == "old" and j in new or part == "new" and j not in new:
                continue
            src = (d_new, b_new) if j in new else (d_old, b_old)
            items.append((src[0][q, j], j, src[1][q, j]))
        items.sort()
        for b, (d, j, e) in enumerate(items[:k]):
            D[a, b], I[a, b], bound[a, b] = d, j, e
        for (d1, _, e1), (d2, _, e2) in zip(items[:k], items[1:k + 1]):
            if d2 > d1:  # exact ties are ordered by index in both
                gap = min(gap, (d2 - d1) - (e1 + e2))
    return D, I, bound, gap


@pytest.mark.parametrize("kind", ["float", "int"])
@pytest.mark.parametrize("part", ["merged", "old", "new"])
@pytest.mark.parametrize("exclude_self", [True, False])
def test_retrieve_topk_matches_brute_force(kind, part, exclude_self):
    labels, qo, go, gn = _setup(kind)
    system = BS.BackfillSystem.merge("rm", qo, go, gn, gn, order=orders.random_order(len(labels), 3))
    queries = np.array([0, 5, 17, 59, 5])
    for ratio in (0.0, 0.25, 0.5, 0.97, 1.0):
        D, I = IL.retrieve_topk(system, ratio, 7, queries=queries, exclude_self=exclude_self, part=part,
                                chunk_size=2)
        Db, Ib, bound, gap = _brute(system, ratio, 7, queries, exclude_self, part)
        # the order does not hinge on rounding: consecutive candidates are further apart than the
        # error bound (integer data: exact), so the indices must agree exactly on any CPU
        assert gap > 0
        np.testing.assert_array_equal(I, Ib)
        # distances: the float32 matrix product's error depends on the kernel and the batch shape
        # (a self-distance can come out as 0 or 2e-6); bounded, not bit-exact
        finite = np.isfinite(Db)
        np.testing.assert_array_equal(np.isfinite(D), finite)
        assert (np.abs(D[finite] - Db[finite]) <= bound[finite]).all(), np.abs(D - Db)[finite].max()
        if kind == "int":  # small integers: every step is exact in float32
            np.testing.assert_array_equal(D, Db)


def test_retrieve_topk_pads_when_few_items():
    labels, qo, go, gn = _setup("float", n=10)
    system = BS.BackfillSystem.merge("rm", qo, go, gn, gn)
    D, I = IL.retrieve_topk(system, 0.3, 5, part="new", exclude_self=True)
    assert I.shape == (10, 5)
    assert ((I >= 0).sum(1) <= 3).all() and (I[:, 3:] == -1).all() and np.isinf(D[:, 3:]).all()
    with pytest.raises(ValueError, match="part must be"):
        IL.retrieve_topk(system, 0.3, 5, part="both")


@pytest.mark.parametrize("kind", ["float", "int"])
def test_top1_agrees_with_the_engine(kind):
    labels, qo, go, gn = _setup(kind, seed=1, n=80)
    for system in (BS.BackfillSystem.merge("rm", qo, go, gn, gn),
                   BS.BackfillSystem.mixed("naive", gn[:, :go.shape[1]], go, gn[:, :go.shape[1]],
                                           order=orders.random_order(80, 7))):
        ratios = np.linspace(0, 1, 11)
        curve, pq = BC.backfill_curve(system, labels, labels, ratios=ratios, exclude_self=True,
                                      return_per_query=True)
        res = IL.retrieve_topk_over_ratios(system, ratios, 5, exclude_self=True)
        correct = labels[res["indices"]] == labels[None, :, None]
        np.testing.assert_array_equal(correct[:, :, 0], pq["correct_at_1"])
        np.testing.assert_array_equal(correct.any(2), pq["correct_at_5"])
        # from_new flags the items that hold their new embedding
        for i, r in enumerate(ratios):
            mask = system.backfilled(r)
            assert mask.sum() == orders.backfilled_count(r, 80)
            np.testing.assert_array_equal(res["from_new"][i], mask[res["indices"][i]])


def test_changing_and_mixed_source_queries():
    labels, qo, go, gn = _setup("float", seed=2)
    system = BS.BackfillSystem.merge("rm", qo, go, gn, gn)
    q = IL.changing_queries(system, labels, n=3, k=5)
    assert q.shape == (3,) and len(set(q.tolist())) == 3
    i = IL.mixed_source_query(system, labels, ratio=0.5, k=5)
    _, I = IL.retrieve_topk(system, 0.5, 5, queries=[i], exclude_self=True)
    src = system.backfilled(0.5)[I[0]]
    assert src.any() and (~src).any()


def test_pair_distances_counts_and_values():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), [3, 5, 2, 6])
    q = rng.normal(size=(16, 5))
    g = rng.normal(size=(16, 5))
    df = IL.pair_distances(q, g, labels, exclude_self=True, max_pairs=None)
    n_pos = sum(c * (c - 1) for c in (3, 5, 2, 6))
    assert (df.pair == "positive").sum() == n_pos == (df.pair == "negative").sum()
    pos, neg = df[df.pair == "positive"], df[df.pair == "negative"]
    assert (labels[pos["query"]] == labels[pos["gallery"]]).all() and (pos["query"] != pos["gallery"]).all()
    assert (labels[neg["query"]] != labels[neg["gallery"]]).all()
    np.testing.assert_allclose(df["distance"], np.linalg.norm(q[df["query"]] - g[df["gallery"]], axis=1))
    # squared distances of the engine, square-rooted
    d = DS.squared_euclidean(q, g).numpy()
    np.testing.assert_allclose(df["distance"] ** 2, d[df["query"], df["gallery"]], atol=1e-9)
    capped = IL.pair_distances(q, g, labels, max_pairs=10, seed=1)
    assert (capped.pair == "positive").sum() == 10 == (capped.pair == "negative").sum()
    again = IL.pair_distances(q, g, labels, max_pairs=10, seed=1)
    pd.testing.assert_frame_equal(capped, again)


def test_system_pair_distances_and_calibration():
    labels, qo, go, gn = _setup("float", seed=3)
    systems = {"RM": BS.BackfillSystem.merge("RM", qo, go, gn, gn),
               "same": BS.BackfillSystem.merge("same", go, go, go, go)}
    pairs = IL.system_pair_distances(systems, labels, max_pairs=500)
    assert set(pairs.method) == {"RM", "same"} and set(pairs.system) == {"backward", "new"}
    cal = IL.calibration_summary(pairs)
    assert list(cal.method) == ["RM", "same"]
    for col in ("backward_auc", "new_auc", "cross_auc", "pooled_auc"):
        assert cal[col].between(0, 1).all()
    # identical systems: the pooled AUC equals each system's AUC
    same = cal.set_index("method").loc["same"]
    assert same["backward_auc"] == pytest.approx(same["pooled_auc"])
