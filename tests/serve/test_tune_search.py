"""Per-side search parameters and ``OnlineBackfillIndex.tune_search`` on a small clustered gallery."""
import json

import numpy as np
import pytest

from backfill_utils.serve.index import OnlineBackfillIndex

# the target sits about 0.01 from the recall of every pair that decides the tests here (8/8: 0.947,
# 8/16 and 16/8: 0.970, 16/16: 0.993 on this data), so a slightly different k-means on another CPU
# does not move a pair across it
D, N, NLIST, K, TARGET = 16, 4000, 32, 10, 0.96


def gallery(seed=0):
    """Clustered latent points; old embeddings = rotated + noisy, new = latent + small noise; psi undoes R."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(64, D)).astype("float32")
    z = centres[rng.integers(0, 64, N)] + 0.9 * rng.normal(size=(N, D))
    rot = np.linalg.qr(rng.normal(size=(D, D)))[0].astype("float32")
    old = (z @ rot + 0.3 * rng.normal(size=(N, D))).astype("float32")
    new = (z + 0.1 * rng.normal(size=(N, D))).astype("float32")
    queries = (centres[rng.integers(0, 64, 300)] + 0.9 * rng.normal(size=(300, D))).astype("float32")
    backfilled = np.sort(rng.permutation(N)[: N // 2])  # ratio 0.5
    return old, new, queries, rot, backfilled


def build(factory=f"IVF{NLIST},Flat", **kw):
    old, new, queries, rot, backfilled = gallery()
    psi = lambda x: (x @ rot).astype("float32")  # noqa: E731
    index = OnlineBackfillIndex(D, D, query_transform=psi, factory=factory, **kw)
    if factory != "Flat":
        index.train(old=old, new=new)
    index.add_old(np.arange(N), old)
    index.backfill(backfilled, new[backfilled])
    return index, old, new, queries, psi, backfilled


def numpy_topk(old, new, queries, psi, backfilled, k=K):
    """Exact merged top-k by numpy: psi(q) against the old side's stored vectors, q against the new side's."""
    on_new = np.zeros(N, bool)
    on_new[backfilled] = True
    old_ids, new_ids = np.flatnonzero(~on_new), np.flatnonzero(on_new)
    d_old = ((psi(queries)[:, None, :].astype(np.float64) - old[old_ids][None]) ** 2).sum(-1)
    d_new = ((queries[:, None, :].astype(np.float64) - new[new_ids][None]) ** 2).sum(-1)
    dist, ids = np.concatenate([d_old, d_new], 1), np.concatenate([old_ids, new_ids])
    return ids[np.argsort(dist, axis=1, kind="stable")[:, :k]]


def recall(found, ref):
    return float(np.mean([len(set(f.tolist()) & set(r.tolist())) / len(r) for f, r in zip(found, ref)]))


@pytest.fixture(scope="module")
def tuned():
    index, old, new, queries, psi, backfilled = build()
    result = index.tune_search(queries, TARGET, K)
    return index, result, numpy_topk(old, new, queries, psi, backfilled), queries


def test_tuned_params_reach_target_and_recall_matches_numpy(tuned):
    index, result, ref, queries = tuned
    assert result["recall"] >= TARGET
    assert index.search_params == result["params"]
    assert set(result["params"]) == {"old", "new"} and all("nprobe" in p for p in result["params"].values())
    _, found = index.search(queries, K)
    assert recall(found, ref) == pytest.approx(result["recall"], abs=1e-9)
    # the table holds the chosen row, and every row within the grid values <= nlist
    chosen = [r for r in result["table"] if (r["old"], r["new"]) ==
              (result["params"]["old"]["nprobe"], result["params"]["new"]["nprobe"])]
    assert len(chosen) == 1 and chosen[0]["cost"] == result["cost"]
    assert max(max(r["old"], r["new"]) for r in result["table"]) == NLIST
    assert len(result["table"]) == 6 * 6  # 1..32: six values per side


def test_per_side_cost_beats_equal_nprobe(tuned):
    _, result, ref, queries = tuned
    index = build()[0]  # a second index: the tuned one keeps its parameters
    equal_cost = None
    for p in (1, 2, 4, 8, 16, 32):
        index.set_search_params(nprobe=p)
        if recall(index.search(queries, K)[1], ref) >= TARGET:
            equal_cost = p / NLIST * len(index)
            break
    assert equal_cost is not None
    assert result["cost"] <= equal_cost
    # on this data per-side tuning is strictly cheaper (1500 vs 2000 vectors per query; grid steps
    # are a factor 2 apart, so the margin does not hang on the last bits of the recall)
    assert result["cost"] <= 0.8 * equal_cost


def test_unreachable_target_names_best_recall_and_changes_nothing():
    index, *_, queries, _psi, _bf = build(search_params={"nprobe": 3})
    with pytest.raises(ValueError, match=r"the best is 0\.\d+ \(old 2, new 2\)"):
        index.tune_search(queries, 0.999, K, grid=(1, 2))
    assert index.search_params == {"old": {"nprobe": 3}, "new": {"nprobe": 3}}


@pytest.mark.parametrize("call, match", [
    (lambda i, q: i.tune_search(q, 0), "target"),
    (lambda i, q: i.tune_search(q, 1.5), "target"),
    (lambda i, q: i.tune_search(q, grid=()), "grid"),
    (lambda i, q: i.tune_search(q[:0]), "at least one"),
    (lambda i, q: i.set_search_params(old={"nprobe": 0}), "positive integer"),
    (lambda i, q: i.set_search_params(new={"nprobe": 2.5}), "positive integer"),
    (lambda i, q: i.set_search_params(new={"nprobe": "8"}), "positive integer"),
    (lambda i, q: i.set_search_params(old={"nprobe": True}), "positive integer"),
    (lambda i, q: i.set_search_params(old={"efSearch": 4}), "applies to HNSW"),
    (lambda i, q: i.set_search_params(new={"ef": 4}), "unknown search parameter 'ef'"),
    (lambda i, q: i.set_search_params(old=4), "must be a dict"),
    (lambda i, q: OnlineBackfillIndex(D, D, factory="IVF4,Flat", search_params={"old": {"nprob": 1}}),
     "unknown search parameter 'nprob'"),
    (lambda i, q: OnlineBackfillIndex(D, D, factory="IVF4,Flat", search_params=[("nprobe", 1)]), "dict"),
])
def test_bad_arguments(call, match):
    index, *_, queries, _psi, _bf = build(search_params={"nprobe": 3})
    with pytest.raises(ValueError, match=match):
        call(index, queries)
    assert index.search_params == {"old": {"nprobe": 3}, "new": {"nprobe": 3}}  # nothing half-set


def test_factories_without_an_exact_reference_are_refused():
    for factory in ("Flat", "HNSW8"):
        index = OnlineBackfillIndex(D, D, factory=factory)
        index.add_old([1, 2], np.ones((2, D), np.float32))
        with pytest.raises(ValueError, match=r"IVF<nlist>,Flat"):
            index.tune_search(np.ones((1, D), np.float32))


def test_per_side_params_constructor_setter_and_save_load(tmp_path):
    index, *_, queries, _psi, _bf = build(search_params={"old": {"nprobe": 2}, "new": {"nprobe": 8}})
    assert index.search_params == {"old": {"nprobe": 2}, "new": {"nprobe": 8}}
    index.set_search_params(new={"nprobe": 4})  # the other side keeps its value
    assert index.search_params == {"old": {"nprobe": 2}, "new": {"nprobe": 4}}
    index.set_search_params(nprobe=16, old={"nprobe": 1})  # flat for both, old= overrides
    assert index.search_params == {"old": {"nprobe": 1}, "new": {"nprobe": 16}}
    path = index.save(tmp_path / "per_side.npz", skip_transforms=True)
    loaded = OnlineBackfillIndex.load(path, query_transform=_psi)
    assert loaded.search_params == {"old": {"nprobe": 1}, "new": {"nprobe": 16}}
    np.testing.assert_array_equal(loaded.search(queries, K)[1], index.search(queries, K)[1])
    # equal parameters are written as one dict, the form of files written before per-side parameters
    index.set_search_params(nprobe=5)
    path = index.save(tmp_path / "flat.npz", skip_transforms=True)
    with np.load(path) as z:
        assert json.loads(bytes(z["meta"]).decode())["search_params"] == {"nprobe": 5}
    assert OnlineBackfillIndex.load(path, query_transform=_psi).search_params == {
        "old": {"nprobe": 5}, "new": {"nprobe": 5}}
