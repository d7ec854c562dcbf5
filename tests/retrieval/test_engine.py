"""Tests of the engine's internals: the binning kernel, both CPU paths, chunk sizes, GPU.

The numba kernel and the torch path (``torch.searchsorted`` + ``bincount``) must
give the same integers, and both must equal a direct count with numpy; the
end-to-end brute-force comparisons of test_metrics / test_backfill are repeated
on the torch path (they run on the numba path there).
"""
from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch

from backfill_utils.backfill import curves as BC, systems as BS
from backfill_utils.retrieval import counting, engine, phases
from backfill_utils.retrieval import metrics as MT
from backfill_utils.tools import bench
from test_systems_curves import brute_curve, int_emb
from test_metrics import brute_force, int_embeddings

METHODS = ["numba", "torch"] if counting.numba_available() else ["torch"]


@pytest.fixture(params=METHODS)
def cpu_method(request, monkeypatch):
    monkeypatch.setattr(engine, "CPU_METHOD", request.param)
    return request.param


def direct_histograms(raw, qsq, T, seg, n_seg, excl):
    """numpy reference: distances in raw's dtype, bins by direct comparison."""
    raw, qsq, T = raw.numpy(), qsq.reshape(-1, 1).numpy(), T.numpy()
    d = np.maximum(raw + qsq, raw.dtype.type(0))
    B, N = raw.shape
    nb = T.shape[1] + 1
    out = np.zeros((B, n_seg, nb), dtype=np.int64)
    for i in range(B):
        bins = (T[i][None, :] < d[i][:, None].astype(T.dtype)).sum(1)
        for j in range(N):
            if j != excl[i]:
                out[i, seg[j], bins[j]] += 1
    return out


def check_both(raw, qsq, T, seg, n_seg, excl):
    seg_t, excl_t = torch.as_tensor(seg), torch.as_tensor(excl)
    ref = direct_histograms(raw, qsq, T, np.asarray(seg), n_seg, np.asarray(excl))
    for method in METHODS:
        h = counting.bin_histograms(raw, qsq, T, seg_t, n_seg, excl_t, method=method)
        assert h.dtype == torch.int32 and h.shape == ref.shape
        np.testing.assert_array_equal(h.numpy(), ref, err_msg=method)
    return ref


def thresholds_from(d: torch.Tensor, cols: torch.Tensor, n_pad: int, dtype=None) -> torch.Tensor:
    """Sorted thresholds = some distances of each row (exact ties) + inf pads."""
    t = d.gather(1, cols)
    t = torch.cat([t, torch.full((d.shape[0], n_pad), float("inf"), dtype=d.dtype)], 1)
    return t.sort(1).values.to(dtype or d.dtype).contiguous()


# ---------------------------------------------------------------- the binning kernel
@pytest.mark.parametrize("module", [counting, phases, bench])
def test_doctests(module):
    res = doctest.testmod(module)
    assert res.attempted >= 1 and res.failed == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_matches_direct_count_on_float_data(dtype):
    gen = torch.Generator().manual_seed(0)
    q, g = torch.randn(9, 16, generator=gen, dtype=dtype), torch.randn(700, 16, generator=gen, dtype=dtype)
    raw, qsq = engine.raw_distances(q, g, (g * g).sum(1))
    d = engine.finish(raw, qsq)
    T = thresholds_from(d, torch.randint(0, 700, (9, 40), generator=gen), 5)
    T[:, :3] = torch.nextafter(T[:, :3], torch.tensor(-float("inf"), dtype=dtype))  # predecessors
    T = T.sort(1).values.contiguous()
    seg = torch.randint(0, 4, (700,), generator=gen)
    excl = torch.randint(-1, 700, (9,), generator=gen)
    ref = check_both(raw, qsq, T, seg, 4, excl)
    assert ref.sum() == 9 * 700 - int((excl >= 0).sum())


def test_kernel_float32_distances_compared_in_float64():
    # a float32 side compared with float64 thresholds (a mixed-precision system)
    gen = torch.Generator().manual_seed(1)
    q, g = torch.randn(5, 8, generator=gen), torch.randn(300, 8, generator=gen)
    raw, qsq = engine.raw_distances(q, g, (g * g).sum(1))
    d = engine.finish(raw, qsq)
    T = thresholds_from(d, torch.randint(0, 300, (5, 30), generator=gen), 2, torch.float64)
    check_both(raw, qsq, T, torch.zeros(300, dtype=torch.int64), 1, torch.full((5,), -1))


def test_kernel_many_ties_and_crowded_buckets():
    rng = np.random.default_rng(2)
    g = torch.from_numpy(int_embeddings(rng, 400))
    q = torch.from_numpy(int_embeddings(rng, 6))
    raw, qsq = engine.raw_distances(q, g, (g * g).sum(1))
    d = engine.finish(raw, qsq)  # small integers: every value is tied many times
    T = thresholds_from(d, torch.from_numpy(rng.integers(0, 400, (6, 60))), 7)
    seg = torch.from_numpy(rng.integers(0, 3, 400))
    check_both(raw, qsq, T, seg, 3, torch.arange(6))


def test_kernel_thresholds_clustered_in_one_bucket():
    # 50 thresholds within a few ulps of 1.0 and one far outlier: with linear
    # buckets over [lo, hi] all but one share bucket 0 (binary search there)
    one = torch.tensor(1.0)
    near = [one]
    for _ in range(49):
        near.append(torch.nextafter(near[-1], torch.tensor(2.0)))
    T = torch.stack(near + [torch.tensor(1e6)]).unsqueeze(0)
    vals = torch.cat([torch.stack(near), torch.stack(near[::3]), torch.tensor([0.5, 1e6, 2e6, 3.0])])
    raw = vals.unsqueeze(0)
    check_both(raw, torch.zeros(1), T, torch.zeros(raw.shape[1], dtype=torch.int64), 1, torch.tensor([-1]))


def test_kernel_many_thresholds_beyond_the_bucket_cap():
    # 40,000 thresholds: more than MAX_BUCKETS / 8, so buckets are capped and crowded
    rng = np.random.default_rng(14)
    T = np.sort(np.round(rng.random(40000) * 5000).astype(np.float32) / 5000)[None, :]  # many ties
    d = np.concatenate([rng.random(30000).astype(np.float32), T[0, ::4]])[None, :]
    ref = np.bincount(np.searchsorted(T[0], d[0], side="left"), minlength=T.shape[1] + 1)
    for method in METHODS:
        h = counting.bin_histograms(torch.from_numpy(d), torch.zeros(1), torch.from_numpy(T),
                                    torch.zeros(d.shape[1], dtype=torch.int64), 1, method=method)
        np.testing.assert_array_equal(h[0, 0].numpy(), ref, err_msg=method)


def test_kernel_degenerate_thresholds():
    raw = torch.tensor([[0.0, 1.0, 1.0, 2.0, 1.0, 0.5],
                        [0.0, 1.0, 1.0, 2.0, 1.0, 0.5],
                        [-1.0, 1.0, 3.0, 2.0, 1.0, 0.5]])
    inf = float("inf")
    T = torch.tensor([[1.0, 1.0, 1.0, inf],   # all equal: zero span
                      [inf, inf, inf, inf],   # no finite threshold (a query with no relevant item)
                      [0.0, 0.0, 1e-45, 3.0e38]])  # subnormal step and a huge value
    seg = torch.tensor([0, 1, 0, 1, 0, 1])
    ref = check_both(raw, torch.zeros(3), T, seg, 2, torch.tensor([-1, 2, 5]))
    assert ref[0, :, 0].sum() == 5 and ref[0, :, 3].sum() == 1  # d <= 1 | d > 1
    assert ref[1, :, 0].sum() == 5  # no finite threshold: every item (but the excluded) in bin 0


def test_kernel_negative_raw_is_clamped_like_torch():
    # |g|^2 - 2 q.g + |q|^2 can round below 0: such distances count as exactly 0,
    # above the predecessor of 0 and not below 0 itself
    raw = torch.tensor([[-3.0, -1e-7, 0.5, 2.0, -0.0, 1e-9]])
    qsq = torch.tensor([1e-8])
    zero = torch.tensor(0.0)
    T = torch.stack([torch.nextafter(zero, torch.tensor(-1.0)), zero, torch.tensor(0.5)]).unsqueeze(0)
    ref = check_both(raw, qsq, T, torch.zeros(6, dtype=torch.int64), 1, torch.tensor([-1]))
    # clamped: 2 items at 0 (bin 1); 1e-8, 1.1e-8 and 0.5 (+1e-8 rounds away) in bin 2; 2 in bin 3
    assert ref[0, 0].tolist() == [0, 2, 3, 1]


@pytest.mark.parametrize("two", [True, False])
def test_ap_from_histograms_paths_agree(two):
    gen = torch.Generator().manual_seed(12)
    B, R, P, K = 7, 5 if two else 1, 9, 30
    S = R + 1 if two else 1
    T = torch.cat([torch.rand(B, K - 4, generator=gen).sort(1).values, torch.full((B, 4), float("inf"))], 1)
    hists = [torch.randint(0, 6, (B, S, K + 1), generator=gen, dtype=torch.int32) for _ in range(1 + two)]
    pick = lambda: T.gather(1, torch.randint(0, K - 4, (B, P), generator=gen))  # noqa: E731
    vals = [pick() for _ in range(1 + two)]
    pos_seg = torch.randint(0, S, (B, P), generator=gen)
    valid = torch.rand(B, P, generator=gen) < 0.8
    valid[0] = False  # a query without relevant items: nan
    t_best = pick()[:, :R].contiguous()
    prev_best = torch.nextafter(t_best, torch.tensor(-float("inf")))
    out = {m: counting.ap_from_histograms(hists, T, vals, pos_seg, valid, t_best, prev_best, m)
           for m in METHODS}
    ref = out[METHODS[-1]]
    for ap, n_lt, n_eq in out.values():
        assert ap.shape == (B, R) and torch.isnan(ap[0]).all()
        np.testing.assert_allclose(ap.numpy(), ref[0].numpy(), rtol=0, atol=1e-13)
        assert torch.equal(n_lt, ref[1]) and torch.equal(n_eq, ref[2])


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.float32, torch.float64),
                                    (torch.float64, torch.float64)])
@pytest.mark.parametrize("two", [True, False])
def test_chunk_counts_paths_agree(dtypes, two):
    gen = torch.Generator().manual_seed(13)
    B, N, R = 6, 200, 4 if two else 1
    sides = []
    for dt in dtypes[: 1 + two]:
        q, g = torch.randn(B, 5, generator=gen, dtype=dt), torch.randn(N, 5, generator=gen, dtype=dt)
        sides.append(engine.raw_distances(q, g, (g * g).sum(1)))
    dtype = dtypes[1] if two else dtypes[0]
    labels = torch.randint(0, 5, (N,), generator=gen)
    pos = engine._Positives(labels.numpy(), 5)
    pos_idx, pos_valid = pos.gather(labels[:B], torch.arange(B))
    pos_valid[1] = False  # no relevant item
    segment = torch.randint(0, R + 1 if two else 1, (N,), generator=gen)
    excl = torch.arange(B)
    out = {m: counting.chunk_counts(sides, dtype, pos_idx, pos_valid, segment, R, excl, m) for m in METHODS}
    ref = out["torch"]
    for res in out.values():
        np.testing.assert_allclose(res[0].numpy(), ref[0].numpy(), rtol=0, atol=1e-13)  # ap (nan row 1)
        for a, b in zip(res[1:], ref[1:]):  # n_lt, n_eq, t_best, p_best: identical
            assert a.dtype == b.dtype and torch.equal(a, b)


def test_bin_histograms_errors():
    raw = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="method"):
        counting.bin_histograms(raw, torch.zeros(1), torch.ones(1, 1), torch.zeros(3, dtype=torch.long), 1,
                               method="fast")


def test_threaded_searchsorted_matches_torch():
    gen = torch.Generator().manual_seed(0)
    T = torch.rand(64, 40, generator=gen).sort(1).values
    T[:, -5:] = float("inf")
    d = torch.rand(64, 20000, generator=gen)
    d[:, :40] = T[:, :40]  # exact ties with thresholds
    assert d.numel() >= 1 << 20  # large enough for the threaded path
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert torch.equal(counting.searchsorted_rows(T, d), torch.searchsorted(T, d).int())
    finally:
        torch.set_num_threads(before)


def test_missing_numba_falls_back_to_torch_with_a_warning(monkeypatch):
    rng = np.random.default_rng(4)
    g = int_embeddings(rng, 30)
    gl = rng.integers(0, 3, 30)
    ref = MT.evaluate_retrieval(g, gl, g, gl, exclude_self=True, return_per_query=True)
    monkeypatch.setattr(counting, "numba_available", lambda: False)
    monkeypatch.setattr(counting, "_NUMBA_MISSING_WARNED", False)
    with pytest.warns(RuntimeWarning, match="numba is not installed"):
        alt = MT.evaluate_retrieval(g, gl, g, gl, exclude_self=True, return_per_query=True)
    np.testing.assert_allclose(alt["ap"], ref["ap"], rtol=0, atol=1e-13)  # summation order only
    np.testing.assert_array_equal(alt["first_rank"], ref["first_rank"])


# ---------------------------------------------------------------- both paths end to end
@pytest.mark.parametrize("exclude_self", [False, True])
def test_evaluate_retrieval_brute_force_on_each_path(cpu_method, exclude_self):
    rng = np.random.default_rng(5)
    g = int_embeddings(rng, 45)
    gl = rng.integers(0, 4, 45)
    q, ql = (g, gl) if exclude_self else (int_embeddings(rng, 30), rng.integers(0, 4, 30))
    ap, rank = brute_force(q, ql, g, gl, exclude_self)
    for chunk in (None, 7):
        out = MT.evaluate_retrieval(q, ql, g, gl, exclude_self=exclude_self, chunk_size=chunk,
                                    return_per_query=True, on_no_relevant="skip")
        ok = ~np.isnan(ap)
        np.testing.assert_allclose(out["ap"][ok], ap[ok], rtol=0, atol=1e-12)
        assert (out["first_rank"] == rank).all()


@pytest.mark.parametrize("exclude_self", [False, True])
def test_backfill_curve_brute_force_on_each_path(cpu_method, exclude_self):
    rng = np.random.default_rng(6)
    n = 36
    gl = rng.integers(0, 4, n)
    go, gn = int_emb(rng, n, 3), int_emb(rng, n, 4)
    qo, qn, ql = (go, gn, gl) if exclude_self else (int_emb(rng, 20, 3), int_emb(rng, 20, 4),
                                                    rng.integers(0, 4, 20))
    ratios = np.linspace(0, 1, 6)
    order = rng.permutation(n)
    system = BS.BackfillSystem.merge("rm", qo, go, qn, gn, order=order)
    _, pq = BC.backfill_curve(system, ql, gl, ratios=ratios, exclude_self=exclude_self, chunk_size=5,
                              return_per_query=True, on_no_relevant="skip")
    aps, ranks = brute_curve(qo, go, qn, gn, ql, gl, ratios, order, exclude_self)
    ok = ~np.isnan(aps[0])
    np.testing.assert_allclose(pq["ap"][:, ok], aps[:, ok], rtol=0, atol=1e-12)
    assert (pq["first_rank"] == ranks).all()


def test_paths_agree_on_float_data(monkeypatch):
    data = np.random.default_rng(7)
    go = data.normal(size=(300, 16)).astype(np.float32)
    gn = data.normal(size=(300, 24))  # float64 side: mixed precision
    gl = data.integers(0, 10, 300)
    system = BS.BackfillSystem.merge("rm", go, go, gn, gn)
    res = {}
    for method in METHODS:
        monkeypatch.setattr(engine, "CPU_METHOD", method)
        res[method] = BC.backfill_curve(system, gl, gl, exclude_self=True, chunk_size=64,
                                        return_per_query=True)[1]
    for method in METHODS[1:]:
        # the counts are identical; AP sums its P terms in another order (|error| < P * 2**-53)
        np.testing.assert_allclose(res[method]["ap"], res[METHODS[0]]["ap"], rtol=0, atol=1e-13)
        np.testing.assert_array_equal(res[method]["first_rank"], res[METHODS[0]]["first_rank"])


def test_scatter_fallback_and_float64_give_the_same_numbers(monkeypatch):
    rng = np.random.default_rng(9)
    g = int_embeddings(rng, 40)
    gl = rng.integers(0, 4, 40)
    ap, rank = brute_force(g, gl, g, gl, exclude_self=True)
    ref = MT.evaluate_retrieval(g, gl, g, gl, exclude_self=True, return_per_query=True)
    monkeypatch.setattr(engine, "CPU_METHOD", "torch")
    monkeypatch.setattr(counting, "_FLAT_LIMIT", 0)  # histogram via scatter_add with int64 slots
    alt = MT.evaluate_retrieval(g.astype(np.float64), gl, g.astype(np.float64), gl,
                                exclude_self=True, return_per_query=True)
    np.testing.assert_array_equal(alt["first_rank"], rank)
    np.testing.assert_allclose(alt["ap"], ap, rtol=0, atol=1e-12)
    assert alt["mAP"] == ref["mAP"] and alt["top1"] == ref["top1"]


def test_relevant_items_all_at_one_distance(cpu_method):
    # every relevant item at the same distance as some negatives: one threshold
    q = np.zeros((1, 2), dtype=np.float32)
    g = np.array([[1, 0], [0, 1], [-1, 0], [0, -1], [2, 0], [0, 0.5]], dtype=np.float32)
    gl = np.array([0, 1, 0, 0, 1, 1])
    out = MT.evaluate_retrieval(q, [0], g, gl, return_per_query=True)
    ap, rank = brute_force(q, np.array([0]), g, gl)
    assert out["ap"][0] == pytest.approx(ap[0], abs=1e-12) and out["first_rank"][0] == rank[0] == 1


# ---------------------------------------------------------------- magnitudes
def test_huge_but_safe_embeddings_are_exact(cpu_method):
    rng = np.random.default_rng(10)
    g = int_embeddings(rng, 40) * np.float32(2.0 ** 40)  # exact: a power of two, distances ~2^84
    gl = rng.integers(0, 4, 40)
    ap, rank = brute_force(g, gl, g, gl, exclude_self=True)
    out = MT.evaluate_retrieval(g, gl, g, gl, exclude_self=True, return_per_query=True)
    np.testing.assert_allclose(out["ap"], ap, rtol=0, atol=1e-12)
    assert (out["first_rank"] == rank).all()


def test_overflowing_distances_are_an_error():
    g = np.ones((4, 3), dtype=np.float32) * np.float32(1e19)
    with pytest.raises(ValueError, match=r"query_embeddings and gallery_embeddings.*overflow.*float64"):
        MT.evaluate_retrieval(g, [0, 0, 1, 1], g, [0, 0, 1, 1])
    # the same values in float64 are fine
    MT.evaluate_retrieval(g.astype(np.float64), [0, 0, 1, 1], g.astype(np.float64), [0, 0, 1, 1])
    system = BS.BackfillSystem.merge("rm", g[:, :2] * 0, g[:, :2] * 0, g, g)
    with pytest.raises(ValueError, match="query_new and gallery_new"):
        BC.backfill_curve(system, [0, 0, 1, 1], [0, 0, 1, 1])


# ---------------------------------------------------------------- chunk sizes, GPU budget
def test_auto_chunk_size_respects_budget():
    c = MT.auto_chunk_size(50000, 50000, 500, 11, memory_budget=1 << 30)
    assert 1 <= c < 50000
    per_row = engine._row_bytes(50000, 1000, 12, 11, 500, engine._dense_bytes_per_item(torch.device("cpu")))
    assert c * per_row <= 1 << 30
    assert MT.auto_chunk_size(10, 10, 2) == 10
    with pytest.raises(ValueError, match="memory_budget"):
        MT.auto_chunk_size(10, 10, 2, memory_budget=0)


def test_cuda_budget_from_free_memory(monkeypatch):
    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (10 * gib + 12345, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda dev=None: 3 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev=None: 1 * gib)
    # usable = 10 + 3 - 1 GiB; half of it = 6 GiB (+ a little) -> the power of two below: 4 GiB
    assert engine.memory_budget_for("cuda") == 4 * gib
    assert engine.memory_budget_for("cuda", 123) == 123  # an explicit budget wins
    assert engine.memory_budget_for("cpu") == engine.DEFAULT_MEMORY_BUDGET
    cpu = engine.auto_chunk_size(50000, 50000, 500, 11, device="cpu")
    gpu = engine.auto_chunk_size(50000, 50000, 500, 11, device="cuda")
    per_row = engine._row_bytes(50000, 1000, 12, 11, 500, 40)
    assert gpu == 4 * gib // per_row and gpu > cpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_engine_equals_cpu_on_exact_distances():
    rng = np.random.default_rng(11)
    go, gn = int_emb(rng, 500, 8), int_emb(rng, 500, 12)  # integer distances: exact on every device
    gl = rng.integers(0, 7, 500)
    system = BS.BackfillSystem.merge("rm", go, go, gn, gn)
    cpu = BC.backfill_curve(system, gl, gl, exclude_self=True, return_per_query=True)[1]
    gpu = BC.backfill_curve(system, gl, gl, exclude_self=True, device="cuda", return_per_query=True)[1]
    np.testing.assert_array_equal(cpu["ap"], gpu["ap"])
    np.testing.assert_array_equal(cpu["first_rank"], gpu["first_rank"])
