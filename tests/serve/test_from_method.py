"""serve.from_method (index_from_method, served_method): a registered, trained method served by the index.

On the smoke profile (extended setting, backbones trained 4 epochs; its own artifact cache), the index of a registered method, backfilled in the
method's order to each backfill ratio, returns the ranking of the engine's system
(``experiments.build_system``): the reference is brute force in float64 over the system's
arrays (``backfill.BackfillSystem``: which items are backfilled at ``r`` is
``system.backfilled(r)``), compared as in ``tests/serve/test_index.py`` (``check_topk``).

Tolerance: faiss's float32 distances (``test_serve``'s bound) plus the difference between
the transformed vectors the index computes (``serve_parts.Transform``, the same arithmetic
as in ``search`` / ``add_old``) and the system's (``compat.apply``): with ``a`` the query's
and ``b`` the largest gallery difference, ``| |q'-g'|^2 - |q-g|^2 | <= 2 |q-g| (a + b) +
(a + b)^2`` and ``|q-g| <= |q| + |g|``. Both are usually 0 (the same batched float32
forward).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from backfill_utils import config as C
from backfill_utils.backfill import experiments as X
from backfill_utils.backfill import orders
from backfill_utils.backfill import registry as MM
from backfill_utils.retrieval import metrics as MT
from backfill_utils.serve.from_method import index_arguments, index_from_method, served_method
from backfill_utils.serve.index import OnlineBackfillIndex
from backfill_utils.serve.index_file import Transform
from test_index import check_topk, gamma

pytestmark = pytest.mark.slow  # every test here trains or runs end to end

SETTING = "extended"
METHODS = ["RM", "Ours", "RM+psi", "FCT", "FastFill", "BCT", "BiCT"]


@pytest.fixture(scope="module")
def tiny_cfg(smoke_extended):
    return smoke_extended


def _as_np(t):
    return t.numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def _computed(fn, x, batch_size=4096):
    """What the index computes for ``x`` through transform ``fn`` (or ``x`` itself)."""
    return x if fn is None else Transform(fn, "t", x.shape[1], batch_size)(np.ascontiguousarray(x, np.float32))


@pytest.mark.parametrize("name", METHODS)
def test_from_method_search_is_the_engines_ranking(tiny_cfg, name):
    cfg = tiny_cfg
    system = X.build_system(cfg, SETTING, name, progress=False)
    served = served_method(cfg, SETTING, name, progress=False)
    index = served.index
    assert isinstance(index, OnlineBackfillIndex) and index.two_pass == MM.get(name).two_pass
    n = system.n_gallery
    assert len(index) == index.n_old == n and np.array_equal(index.ids(), np.arange(n))
    np.testing.assert_array_equal(served.order, system.resolved_order())
    trained = X.train_method(cfg, SETTING, name, progress=False) if MM.get(name).trainable else MM.Trained()
    kw = index_arguments(MM.get(name), trained)
    # what the index computes, against the system's arrays
    qo = served.old if served.two_pass else _computed(kw["query_transform"], served.new)
    go = _computed(kw["gallery_transform"], served.old)
    qn = gn = _computed(kw["new_transform"], served.new)
    sys = [_as_np(a).astype(np.float64) for a in (system.query_old, system.gallery_old,
                                                   system.query_new, system.gallery_new)]
    d_old = MT.pairwise_distances(sys[0], sys[1]).numpy()
    d_new = MT.pairwise_distances(sys[2], sys[3]).numpy()
    diff = lambda a, b: np.linalg.norm(a.astype(np.float64) - b, axis=1)  # noqa: E731
    a = np.maximum(diff(qo, sys[0]), diff(qn, sys[2]))
    b = max(diff(go, sys[1]).max(), diff(gn, sys[3]).max())
    qq = np.maximum((sys[0] ** 2).sum(1), (sys[2] ** 2).sum(1))
    gg = max((sys[1] ** 2).sum(1).max(), (sys[3] ** 2).sum(1).max())
    reach = np.sqrt(qq) + np.sqrt(gg)
    dim = max(sys[0].shape[1], sys[2].shape[1])
    tol = 2 * gamma(dim + 3) * 2 * (qq + gg) + 2 * reach * (a + b) + (a + b) ** 2
    compared = total = 0
    for r in (0.0, 0.3, 0.7, 1.0):
        m = orders.backfilled_count(r, n)
        served.backfill_to(m)
        mask = system.backfilled(r)
        assert np.array_equal(np.sort(index.new_ids()), np.flatnonzero(mask)) and index.n_new == m
        d_mix = np.where(mask[None, :], d_new, d_old)
        for k in (1, 5, n + 2):
            D, I = served.search(np.arange(n), k)
            c = check_topk(D, I, d_mix, np.arange(n), k, tol)
            if k == 5:
                compared, total = compared + c, total + n * k
    # ids are compared on most ranks: measured 84-89% with transforms, 56% for RM, whose raw smoke-backbone
    # embeddings lie within a few float32 error bounds of each other
    assert compared >= 0.4 * total, (compared, total)


def test_from_method_is_the_served_index_and_references_are_errors(tiny_cfg):
    index = index_from_method(tiny_cfg, SETTING, "Ours", progress=False, factory="Flat")
    data = X.SettingData(tiny_cfg, SETTING, progress=False)
    assert index.n_old == len(data.test_labels) and index.n_new == 0
    D, I = index.search(data.test("new")[:3], 2)
    assert (I[:, 0] >= 0).all()
    empty = index_from_method(tiny_cfg, SETTING, "FCT", progress=False, fill=False)
    assert len(empty) == 0
    for ref in ("old", "new", "offline"):
        with pytest.raises(ValueError, match=f"{ref!r} is a reference curve.*OnlineBackfillIndex"):
            index_from_method(tiny_cfg, SETTING, ref)
    with pytest.raises(KeyError, match="unknown method 'nope'"):
        index_from_method(tiny_cfg, SETTING, "nope")


def test_backfill_to_moves_forward_only(tiny_cfg):
    served = served_method(tiny_cfg, SETTING, "RM", progress=False)
    assert served.backfill_to(5) == 5 and served.backfill_to(5) == 0
    assert set(served.index.new_ids()) == set(served.order[:5].tolist())
    with pytest.raises(ValueError, match="already backfilled"):
        served.backfill_to(2)
    with pytest.raises(ValueError, match="count must be in"):
        served.backfill_to(len(served.order) + 1)


def test_simulate_all_serves_the_registry_under_load(tiny_cfg):
    """Rank merge at ratio 0 is old/old and at ratio 1 new/new: the offline service's numbers."""
    from backfill_utils.serve import simulate as SIM

    q, lat, plan = SIM.simulate_all(tiny_cfg, SETTING, ["offline", "RM", "Ours"], {"queries_per_tick": 40, "ticks": 4},
                                  backbone_ms={"old": 1.0, "new": 2.0}, progress=False)
    assert plan.throughput == 50 and list(dict.fromkeys(q.method)) == ["offline", "RM", "Ours"]
    by = {m: q[q.method == m].reset_index(drop=True) for m in ("offline", "RM", "Ours")}
    for t in (0, len(by["RM"]) - 1):
        for col in ("top1", "map_at_k"):
            assert by["RM"][col].iloc[t] == by["offline"][col].iloc[t], (t, col)
    fwd = lat.groupby("method")["forward_ms"].agg(["min", "max"])
    assert tuple(fwd.loc["RM"]) == (3.0, 3.0) and tuple(fwd.loc["Ours"]) == (2.0, 2.0)
    assert tuple(fwd.loc["offline"]) == (1.0, 2.0)
    again, _, _ = SIM.simulate_all(tiny_cfg, SETTING, ["Ours"], {"queries_per_tick": 40, "ticks": 4}, progress=False)
    assert again.equals(by["Ours"])


def test_profile_embeddings_exported_for_own_models(tiny_cfg, tmp_path):
    """notebooks/61's default: the profile's cached embeddings as the six .npy files."""
    from backfill_utils.studies import own_models as OM

    paths = OM.export_profile_embeddings(tiny_cfg, SETTING, tmp_path)
    assert sorted(paths) == sorted(OM.FILES) and all(p.parent == tmp_path for p in paths.values())
    emb = OM.load_own_embeddings(paths, normalize=False)
    data = X.SettingData(tiny_cfg, SETTING, progress=False)
    assert np.array_equal(emb.old_train, data.embeddings("old")[0]) and np.array_equal(emb.train_labels, data.labels)
    assert np.array_equal(emb.new_test, data.test("new")) and np.array_equal(emb.test_labels, data.test_labels)
