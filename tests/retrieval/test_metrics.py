"""Tests of backfill_utils.retrieval.metrics against sklearn and brute-force loops.

Embeddings with small-integer coordinates make every distance exact in float
arithmetic, so tied distances are real ties and results must agree exactly.
"""
from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from backfill_utils.retrieval import metrics as MT


# ---------------------------------------------------------------- helpers
def int_embeddings(rng, n, dim=3, low=-2, high=3):
    return rng.integers(low, high, (n, dim)).astype(np.float32)


def brute_force(q, ql, g, gl, exclude_self=False):
    """Per query: (sklearn AP or nan, first relevant rank by (distance, index) or -1)."""
    d = ((q[:, None, :].astype(np.float64) - g[None, :, :]) ** 2).sum(-1)
    aps, ranks = [], []
    for i in range(len(q)):
        keep = np.ones(len(g), bool)
        if exclude_self:
            keep[i] = False
        rel = (gl == ql[i]) & keep
        if not rel.any():
            aps.append(np.nan)
            ranks.append(-1)
            continue
        aps.append(average_precision_score(rel[keep], -d[i][keep]))
        ranking = [j for j in sorted(range(len(g)), key=lambda j: (d[i, j], j)) if keep[j]]
        ranks.append(next(r for r, j in enumerate(ranking) if rel[j]))
    return np.array(aps), np.array(ranks)


def has_cross_ties(q, g):
    d = MT.pairwise_distances(q, g).numpy()
    return any(len(np.unique(row)) < len(row) for row in d)


# ---------------------------------------------------------------- distances
def test_pairwise_distances_matches_brute_force_and_is_clamped():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(7, 5)).astype(np.float32)
    g = rng.normal(size=(9, 5)).astype(np.float32)
    d = MT.pairwise_distances(q, g)
    ref = ((q[:, None] - g[None]) ** 2).sum(-1)
    assert d.shape == (7, 9)
    np.testing.assert_allclose(d.numpy(), ref, rtol=1e-5, atol=1e-5)
    # identical rows: the formula can round below zero; the result is clamped
    x = torch.randn(50, 64) * 100
    assert (MT.pairwise_distances(x, x) >= 0).all()
    # ranking by squared distance == ranking by Euclidean distance
    assert (np.argsort(d.numpy(), 1, kind="stable") == np.argsort(np.sqrt(d.numpy()), 1, kind="stable")).all()


def test_pairwise_distances_dimension_mismatch():
    with pytest.raises(ValueError, match=r"dimension 3.*dimension 4"):
        MT.pairwise_distances(np.zeros((2, 3)), np.zeros((5, 4)))


# ---------------------------------------------------------------- dense reference functions
def test_doctests():
    res = doctest.testmod(MT)
    assert res.attempted > 5 and res.failed == 0


def test_dense_average_precision_matches_sklearn_with_ties():
    rng = np.random.default_rng(1)
    d = rng.integers(0, 4, (30, 25)).astype(np.float64)  # many ties
    rel = rng.random((30, 25)) < 0.3
    rel[:, 0] = True
    ap = MT.average_precision(d, rel).numpy()
    ref = [average_precision_score(rel[i], -d[i]) for i in range(30)]
    np.testing.assert_allclose(ap, ref, rtol=0, atol=1e-12)


def test_dense_average_precision_valid_mask_and_empty_rows():
    d = np.array([[0.2, 0.1, 0.3], [0.1, 0.2, 0.3]])
    rel = np.array([[True, False, True], [False, False, False]])
    valid = np.array([[True, False, True], [True, True, True]])
    ap = MT.average_precision(d, rel, valid).numpy()
    assert ap[0] == 1.0  # the excluded closer negative does not count
    assert np.isnan(ap[1])


def test_dense_first_relevant_rank_index_tie_break():
    rng = np.random.default_rng(2)
    d = rng.integers(0, 3, (40, 12)).astype(np.float32)
    rel = rng.random((40, 12)) < 0.25
    rank = MT.first_relevant_rank(d, rel).numpy()
    for i in range(40):
        order = sorted(range(12), key=lambda j: (d[i, j], j))
        exp = next((r for r, j in enumerate(order) if rel[i, j]), -1)
        assert rank[i] == exp


def test_cmc_at_k():
    r = torch.tensor([0, 1, 4, 5, -1])
    assert MT.cmc_at_k(r, 1).tolist() == [True, False, False, False, False]
    assert MT.cmc_at_k(r, 5).tolist() == [True, True, True, False, False]


# ---------------------------------------------------------------- evaluate_retrieval
@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_evaluate_retrieval_matches_sklearn_and_brute_force(seed, exclude_self):
    rng = np.random.default_rng(seed)
    n = 45
    g = int_embeddings(rng, n)
    gl = rng.integers(0, 4, n)
    if exclude_self:
        q, ql = g, gl
    else:
        q, ql = int_embeddings(rng, 30), rng.integers(0, 4, 30)
    assert has_cross_ties(q, g)  # the tie rules are exercised
    ap, rank = brute_force(q, ql, g, gl, exclude_self)
    for chunk in (None, 1, 7):
        out = MT.evaluate_retrieval(q, ql, g, gl, exclude_self=exclude_self, chunk_size=chunk,
                                    return_per_query=True, on_no_relevant="skip")
        ok = ~np.isnan(ap)
        np.testing.assert_allclose(out["ap"][ok], ap[ok], rtol=0, atol=1e-12)
        assert np.isnan(out["ap"][~ok]).all()
        assert (out["first_rank"] == rank).all()
        assert (out["evaluated"] == ok).all()
        assert out["mAP"] == pytest.approx(100 * ap[ok].mean(), abs=1e-10)
        assert out["top1"] == pytest.approx(100 * (rank[ok] == 0).mean())
        assert out["top5"] == pytest.approx(100 * ((rank[ok] >= 0) & (rank[ok] < 5)).mean())
        assert (out["correct_at_1"] == (rank == 0)).all()


def test_evaluate_retrieval_float_data_and_torch_input():
    rng = np.random.default_rng(5)
    g = rng.normal(size=(60, 8)).astype(np.float32)
    gl = rng.integers(0, 5, 60)
    ap, rank = brute_force(g, gl, g, gl, exclude_self=True)
    a = MT.evaluate_retrieval(g, gl, g, gl, exclude_self=True)
    b = MT.evaluate_retrieval(torch.from_numpy(g), torch.from_numpy(gl), torch.from_numpy(g),
                              torch.from_numpy(gl), exclude_self=True, device="cpu", chunk_size=13)
    assert a["mAP"] == pytest.approx(100 * ap.mean(), abs=1e-9)
    assert a["top1"] == pytest.approx(100 * (rank == 0).mean())
    assert a == b


def test_hand_computed_example():
    # 1-D embeddings; query at 0; gallery at 1 (pos), 2 (neg), 2 (pos), 3 (neg)
    q = np.array([[0.0]])
    g = np.array([[1.0], [2.0], [2.0], [3.0]])
    out = MT.evaluate_retrieval(q, [1], g, [1, 0, 1, 0], return_per_query=True)
    # AP = (1/1 + 2/3) / 2 (items 1 and 2 tie at d=4: one threshold)
    assert out["ap"][0] == pytest.approx((1 + 2 / 3) / 2)
    assert out["mAP"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert out["top1"] == 100.0 and out["first_rank"][0] == 0


def test_top_k_tie_break_by_gallery_index():
    q = np.array([[0.0, 0.0]])
    g = np.array([[1.0, 0.0], [0.0, 1.0]])  # equal distances
    wrong_first = MT.evaluate_retrieval(q, [1], g, [0, 1])  # the negative has the lower index
    right_first = MT.evaluate_retrieval(q, [1], g, [1, 0])
    assert wrong_first["top1"] == 0.0 and right_first["top1"] == 100.0
    assert wrong_first["mAP"] == right_first["mAP"] == 50.0  # AP: one threshold, 1 of 2


def test_gallery_permutation_invariance():
    rng = np.random.default_rng(6)
    # integer data (ties): AP does not depend on the order of the gallery
    g = int_embeddings(rng, 50)
    gl = rng.integers(0, 3, 50)
    q, ql = int_embeddings(rng, 20), rng.integers(0, 3, 20)
    perm = rng.permutation(50)
    a = MT.evaluate_retrieval(q, ql, g, gl, return_per_query=True)
    b = MT.evaluate_retrieval(q, ql, g[perm], gl[perm], return_per_query=True)
    np.testing.assert_allclose(a["ap"], b["ap"], rtol=0, atol=1e-12)
    # float data without ties: top-k does not depend on it either
    gf = rng.normal(size=(50, 6)).astype(np.float32)
    qf = rng.normal(size=(20, 6)).astype(np.float32)
    a = MT.evaluate_retrieval(qf, ql, gf, gl)
    b = MT.evaluate_retrieval(qf, ql, gf[perm], gl[perm])
    assert a["top1"] == b["top1"] and a["top5"] == b["top5"]
    assert a["mAP"] == pytest.approx(b["mAP"], abs=1e-10)
    # permuting the queries permutes the per-query results
    qp = rng.permutation(20)
    a = MT.evaluate_retrieval(q, ql, g, gl, return_per_query=True)
    c = MT.evaluate_retrieval(q[qp], ql[qp], g, gl, return_per_query=True)
    np.testing.assert_array_equal(a["first_rank"][qp], c["first_rank"])


def test_custom_ks_and_string_labels():
    rng = np.random.default_rng(7)
    g = int_embeddings(rng, 30)
    gl = rng.integers(0, 3, 30)
    names = np.array(["cat", "dog", "eel"])
    _, rank = brute_force(g, gl, g, gl, exclude_self=True)
    out = MT.evaluate_retrieval(g, names[gl], g, names[gl], exclude_self=True, ks=(2, 10))
    assert out["top2"] == pytest.approx(100 * (rank < 2).mean())
    assert out["top10"] == pytest.approx(100 * (rank < 10).mean())


# ---------------------------------------------------------------- no relevant item
def test_single_member_class_with_exclude_self():
    rng = np.random.default_rng(8)
    g = int_embeddings(rng, 20)
    gl = np.array([0] * 10 + [1] * 9 + [2])  # class 2 has one member
    with pytest.raises(ValueError, match=r"no relevant item.*on_no_relevant='skip'"):
        MT.evaluate_retrieval(g, gl, g, gl, exclude_self=True)
    out = MT.evaluate_retrieval(g, gl, g, gl, exclude_self=True, on_no_relevant="skip",
                                return_per_query=True)
    ap, rank = brute_force(g, gl, g, gl, exclude_self=True)
    assert out["n_evaluated"] == 19 and not out["evaluated"][19]
    assert np.isnan(out["ap"][19]) and out["first_rank"][19] == -1
    assert out["mAP"] == pytest.approx(100 * ap[:19].mean(), abs=1e-10)
    assert out["top1"] == pytest.approx(100 * (rank[:19] == 0).mean())
    # without exclude_self the query finds itself: every query is evaluated
    assert MT.evaluate_retrieval(g, gl, g, gl)["n_evaluated"] == 20


def test_query_label_missing_from_gallery():
    g = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="no relevant item"):
        MT.evaluate_retrieval(g[:2], [0, 7], g, [0, 1, 2])


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_embeddings(bad):
    g = np.ones((4, 2), dtype=np.float32)
    g[2, 1] = bad
    with pytest.raises(ValueError, match=r"gallery_embeddings contains NaN or inf.*\[2\]"):
        MT.evaluate_retrieval(np.ones((1, 2)), [0], g, [0, 0, 1, 1])
    with pytest.raises(ValueError, match="query_embeddings contains NaN or inf"):
        MT.evaluate_retrieval(g, [0, 0, 1, 1], np.ones((4, 2)), [0, 0, 1, 1])


def test_validation_errors():
    g = np.eye(4, dtype=np.float32)
    lab = [0, 0, 1, 1]
    with pytest.raises(ValueError, match="gallery_labels has 3 entries.*4 rows"):
        MT.evaluate_retrieval(g, lab, g, lab[:3])
    with pytest.raises(ValueError, match="query_labels has 3 entries"):
        MT.evaluate_retrieval(g, lab[:3], g, lab)
    with pytest.raises(ValueError, match=r"shape \(4, 4\).*shape \(4, 3\)"):
        MT.evaluate_retrieval(g, lab, g[:, :3], lab)
    with pytest.raises(ValueError, match="exclude_self=True.*3 queries and 4 gallery"):
        MT.evaluate_retrieval(g[:3], lab[:3], g, lab, exclude_self=True)
    with pytest.raises(ValueError, match="2-D"):
        MT.evaluate_retrieval(g[0], [0], g, lab)
    with pytest.raises(ValueError, match="ks"):
        MT.evaluate_retrieval(g, lab, g, lab, ks=(0,))
    with pytest.raises(TypeError, match="ks must be an integer, got 2.5"):  # not truncated to 2
        MT.evaluate_retrieval(g, lab, g, lab, ks=(1, 2.5))
    with pytest.raises(TypeError, match="ks must be an integer, got the bool"):
        MT.evaluate_retrieval(g, lab, g, lab, ks=(True,))
    with pytest.raises(TypeError, match="ks must be a non-empty list"):
        MT.evaluate_retrieval(g, lab, g, lab, ks=5)
    with pytest.raises(ValueError, match="on_no_relevant"):
        MT.evaluate_retrieval(g, lab, g, lab, on_no_relevant="ignore")
    with pytest.raises(ValueError, match="chunk_size"):
        MT.evaluate_retrieval(g, lab, g, lab, chunk_size=0)
