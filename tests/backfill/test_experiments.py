"""Every registered method end to end on a tiny run (experiments.py): training with recipes
and seeds, cached modules, systems, per-method cached curves, a user's method, the studies."""
import numpy as np
import pytest
import torch

from backfill_utils import tables as TB
from backfill_utils.backfill import curves as BC
from backfill_utils.backfill import experiments as X
from backfill_utils.backfill import registry as MM
from backfill_utils.compat import modules as K
from backfill_utils.compat.recipes import CMCLPsiRhoRecipe
from backfill_utils.retrieval import metrics as MT
from backfill_utils.studies import order_study as OS
from backfill_utils.studies import query_cost as QC
from conftest import tiny_profile


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("BACKFILL_CACHE", str(tmp_path_factory.mktemp("cache")))
    mp.setenv("BACKFILL_THREADS", "1")
    cfg = tiny_profile(train={"epochs": 1, "batch_size": 16}, settings=["extended"],
                       compat={"epochs": 2, "batch_size": 16})
    curves, summary = X.evaluate_setting(cfg, "extended", progress=False)
    systems, refs = X.build_systems(cfg, "extended", progress=False)
    yield cfg, curves, summary, systems, refs
    mp.undo()


@pytest.mark.slow
def test_every_method_has_a_full_curve(tiny_run):
    cfg, curves, summary, systems, refs = tiny_run
    assert list(summary["method"]) == MM.names() and "BiCT" in MM.names()
    for m in MM.names():
        c = curves[curves["method"] == m]
        assert len(c) == cfg["eval"]["num_ratios"], m
        assert c[["mAP", "top1", "top5"]].notna().all().all(), m
    assert summary.set_index("method").loc["RM", "query_passes"] == 2
    assert (summary[summary["method"] != "RM"]["query_passes"] == 1).all()


@pytest.mark.slow
def test_endpoints_are_the_pure_systems(tiny_run):
    cfg, curves, summary, systems, refs = tiny_run
    y = refs["labels"]
    for m, s in systems.items():
        c = curves[curves["method"] == m].sort_values("ratio")
        start = MT.evaluate_retrieval(s.query_old, y, s.gallery_old, y, exclude_self=True)
        end = MT.evaluate_retrieval(s.query_new, y, s.gallery_new, y, exclude_self=True)
        for k in ("mAP", "top1", "top5"):
            assert c[k].iloc[0] == pytest.approx(start[k], abs=1e-9), (m, k)
            assert c[k].iloc[-1] == pytest.approx(end[k], abs=1e-9), (m, k)
    s = summary.set_index("method")
    for m in [m for m in MM.names() if MM.ends_at_new(m)]:
        assert s.loc[m, "final_map"] == pytest.approx(s.loc["new", "final_map"]), m
    rm = curves[curves["method"] == "RM"].sort_values("ratio")
    assert rm["mAP"].iloc[0] == pytest.approx(s.loc["old", "final_map"])


@pytest.mark.slow
def test_systems_use_the_declared_backbones_and_modules(tiny_run):
    cfg, curves, summary, systems, refs = tiny_run
    data = X.SettingData(cfg, "extended", progress=False)
    n, d = refs["old"].shape
    assert np.array_equal(systems["RM"].query_old.numpy(), refs["old"])
    assert systems["Ours"].query_new.shape == (n, d)
    bict = X.train_method(cfg, "extended", "BiCT", progress=False)
    assert np.array_equal(systems["BiCT"].query_new.numpy(), data.test("bct"))
    np.testing.assert_array_equal(systems["BiCT"].gallery_old.numpy(), K.apply(bict.h, data.test("old")))
    assert sorted(np.asarray(systems["FastFill"].order).tolist()) == list(range(n))
    extra = refs["extra_params"]
    assert extra["Ours"] > extra["RM+psi"] > 0 and extra["RM"] == 0 and extra["BiCT"] > 0
    assert (summary.set_index("method").loc[list(extra), "extra_params"] == list(extra.values())).all()


@pytest.mark.slow
def test_trained_modules_are_cached_and_rebuilt(tiny_run):
    cfg = tiny_run[0]
    for name in [n for n in MM.names() if MM.get(n).trainable]:
        a = X.train_method(cfg, "extended", name, progress=False)
        b = X.train_method(cfg, "extended", name, progress=False)
        assert tuple(a.modules()) == MM.get(name).slots, name
        for slot in a.modules():
            sa, sb = a.modules()[slot].state_dict(), b.modules()[slot].state_dict()
            assert all(torch.equal(sa[k], sb[k]) for k in sa), (name, slot)
        assert a.history.equals(b.history) and len(a.history) == MM.get(name).default_recipe(cfg).epochs
    # FastFill and BiCT carry their classification term (profile: fastfill_mu = 1, bict_ce_weight = 1)
    assert "ce" in X.train_method(cfg, "extended", "FastFill").history
    assert "ce" in X.train_method(cfg, "extended", "BiCT").history
    with pytest.raises(ValueError, match="nothing to train"):
        X.train_method(cfg, "extended", "RM")


@pytest.mark.slow
def test_recipe_and_seed_of_a_training_can_be_given(tiny_run):
    cfg = tiny_run[0]
    base = X.train_method(cfg, "extended", "Ours")
    seeded = X.train_method(cfg, "extended", "Ours", seed=1)
    tuned = X.train_method(cfg, "extended", "Ours", recipe=CMCLPsiRhoRecipe(epochs=1, batch_size=16, tau=0.5))
    assert not torch.equal(base.psi.mlp[0].weight, seeded.psi.mlp[0].weight)
    assert len(tuned.history) == 1
    assert X.compat_key(cfg, "extended", "Ours", seed=1) != X.compat_key(cfg, "extended", "Ours")
    again = X.train_method(cfg, "extended", "Ours", seed=1)
    assert torch.equal(again.psi.mlp[0].weight, seeded.psi.mlp[0].weight)
    c, row = X.method_curve(cfg, "extended", "Ours", seed=1, progress=False)
    assert row["method"] == "Ours" and len(c) == cfg["eval"]["num_ratios"]


def _least_squares(data, recipe):
    """A linear reverse transform, fitted in closed form (the tutorial's method)."""
    new, old = data.embeddings("new"), data.embeddings("old")
    W = np.linalg.lstsq(new.reshape(-1, new.shape[-1]), old.reshape(-1, old.shape[-1]), rcond=None)[0]
    psi = _LinearReverse(W.shape[0], W.shape[1])
    with torch.no_grad():
        psi.weight.copy_(torch.from_numpy(W))
    return MM.Trained(psi=psi)


@K.register_module
class _LinearReverse(torch.nn.Module):
    def __init__(self, d_new, d_old):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(d_new, d_old))
        self.config = {"type": "_LinearReverse", "d_new": d_new, "d_old": d_old}

    def forward(self, z):
        return torch.nn.functional.normalize(z @ self.weight, dim=1)


@pytest.mark.slow
def test_a_users_method_needs_one_registration(tiny_run, monkeypatch):
    cfg, curves, summary = tiny_run[:3]
    evaluated = []
    real = BC.backfill_curve
    monkeypatch.setattr(BC, "backfill_curve", lambda s, *a, **k: evaluated.append(s.name) or real(s, *a, **k))
    MM.register(MM.Method("LS psi", dict(color="#000000", ls="-."), "least-squares linear psi", ("main",),
                          slots=("psi",), fit=_least_squares, train_roles=("old", "new")))
    try:
        c2, s2 = X.evaluate_setting(cfg, "extended", progress=False)
        assert evaluated == ["LS psi"]  # every other curve came from the cache
        assert list(s2.method) == MM.names() and s2.method.iloc[-1] == "LS psi"
        assert c2[c2.method != "LS psi"].reset_index(drop=True).equals(curves.reset_index(drop=True))
        t1 = TB.table1(s2.assign(dataset="synthetic", setting="extended"))
        assert "LS psi" in set(t1.method)
        assert MM.query_side("LS psi") == [("new", ["psi"])] and MM.ends_at_new("LS psi")
        assert s2.set_index("method").loc["LS psi", "extra_params"] == cfg["embedding_dim"] ** 2
    finally:
        MM.unregister("LS psi")


@pytest.mark.slow
def test_a_fit_is_held_to_its_declaration(tiny_run):
    cfg = tiny_run[0]
    cases = [(lambda data, r: data.embeddings("bct") and MM.Trained(), ("psi",), "not among the backbones"),
             (lambda data, r: MM.Trained(h=torch.nn.Linear(2, 2)), ("psi",), "returned modules for slots"),
             (lambda data, r: MM.Trained(psi=torch.nn.Linear(2, 2)), ("psi",), "cannot be rebuilt from its config"),
             (lambda data, r: None, ("psi",), "must return a methods.Trained")]
    for fit, slots, msg in cases:
        MM.register(MM.Method("bad", {}, "bad", slots=slots, fit=fit, train_roles=("old", "new")))
        try:
            with pytest.raises((ValueError, TypeError), match=msg):
                X.train_method(cfg, "extended", "bad", progress=False)
        finally:
            MM.unregister("bad")


@pytest.mark.slow
def test_order_study_and_query_cost(tiny_run):
    cfg, curves, summary = tiny_run[:3]
    oc, osum = OS.order_comparison(cfg, "extended", ["RM"])
    assert list(osum.method) == ["FastFill", "FastFill (random order)", "RM", "RM (sigma order)"]
    assert list(osum.order) == ["sigma", "random", "random", "sigma"]
    for a, b in (("FastFill", "FastFill (random order)"), ("RM", "RM (sigma order)")):
        ca, cb = (oc[oc.method == m].sort_values("ratio") for m in (a, b))
        assert ca["mAP"].iloc[0] == cb["mAP"].iloc[0] and ca["mAP"].iloc[-1] == cb["mAP"].iloc[-1]
    main = curves[curves.method == "FastFill"].reset_index(drop=True)
    assert np.array_equal(oc[oc.method == "FastFill"]["mAP"].to_numpy(), main["mAP"].to_numpy())
    cost = QC.query_cost(cfg, "extended", ["RM", "Ours", "BiCT"], batch_size=8, repeats=1, warmup=1)
    c = cost.set_index("method")
    assert c.loc["RM", "query_side"] == "phi_old ; phi_new" and c.loc["Ours", "query_side"] == "phi_new + psi + rho"
    assert c.loc["BiCT", "query_side"] == "phi_bct" and (cost["ms_per_query"] > 0).all()
    s = summary.set_index("method")
    assert (c["extra_params"] == s.loc[c.index, "extra_params"]).all()


def test_time_query_forward_is_positive():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 6))
    head = torch.nn.Linear(6, 4)
    x = torch.randn(8, 3, 2, 2)
    t = QC.time_query_forward([(net, [head]), (net, [])], x, repeats=3, warmup=1)
    assert isinstance(t, float) and t > 0
    assert net.training  # modes restored
    with pytest.raises(ValueError, match="empty"):
        QC.time_query_forward([(net, [])], x[:0])


@pytest.mark.slow
def test_profile_data_and_own_embeddings_share_one_evaluation_loop(tiny_run, tmp_path):
    """SettingData and OwnData are both EmbeddingSources; the profile's embeddings exported as
    own files give, through evaluate_own, the very curves and summary numbers of evaluate_setting."""
    from backfill_utils.backfill import evaluate as EV
    from backfill_utils.studies import own_models as OM

    cfg, curves, summary, systems, refs = tiny_run
    data = X.SettingData(cfg, "extended", progress=False)
    paths = OM.export_profile_embeddings(cfg, "extended", tmp_path)
    emb = OM.load_own_embeddings(paths, normalize=False)
    own = OM.OwnData(emb)
    assert isinstance(data, EV.EmbeddingSource) and isinstance(own, EV.EmbeddingSource)
    assert isinstance(data.restricted(("old",)), EV.EmbeddingSource) and isinstance(own.restricted(("old",)), EV.EmbeddingSource)
    with pytest.raises(ValueError, match="not among the backbones this method declared"):
        own.restricted(("old",)).embeddings("new")
    names = ["old", "new", "offline", "RM", "naive"]
    c_own, s_own, _, skipped = OM.evaluate_own(emb, cfg, names, progress=False)
    assert not skipped and list(s_own["method"]) == names
    for n in names:
        a = curves[curves.method == n].reset_index(drop=True)
        b = c_own[c_own.method == n].reset_index(drop=True)
        assert list(a.columns) == list(b.columns), n
        for col in a.columns.drop("method"):
            assert np.array_equal(a[col].to_numpy(float), b[col].to_numpy(float), equal_nan=True), (n, col)
    s = summary.set_index("method").loc[names].reset_index()
    for col in s_own.columns.drop("method"):
        assert np.array_equal(s[col].to_numpy(float), s_own[col].to_numpy(float), equal_nan=True), col
