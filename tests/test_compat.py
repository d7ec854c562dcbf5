"""Tests of backfill_utils.compat: modules, checkpoints, training on cached embeddings."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backfill_utils.compat import (
    FastFillTransform,
    ForwardTransform,
    LearnableEmbedding,
    ReverseTransform,
    _draw_passes,
    _gather,
    apply,
    build_module,
    class_balanced_batches,
    fastfill_order,
    load_module,
    random_batches,
    save_module,
    train_fastfill,
    train_fct,
    train_reverse,
)

FAST = dict(epochs=25, batch_size=48, lr=3e-3, disable=True)


def _unit(a):
    return (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(np.float32)


def synthetic(n_per_class=24, n_classes=6, d_new=16, d_old=8, seed=0, noise=0.6):
    """Class clusters in the new space; old = a random rotation of new, truncated to
    d_old dimensions, plus noise (a weaker, incompatible model)."""
    g = np.random.default_rng(seed)
    centers = g.normal(size=(n_classes, d_new))
    y = np.repeat(np.arange(n_classes), n_per_class)
    new = centers[y] + noise * g.normal(size=(len(y), d_new))
    q, _ = np.linalg.qr(g.normal(size=(d_new, d_new)))
    old = (new @ q)[:, :d_old] + noise * g.normal(size=(len(y), d_old))
    return _unit(new), _unit(old), y


@pytest.fixture(scope="module")
def data():
    return synthetic()


def _dist(a, b):
    return np.sqrt(np.maximum(((a[:, None] - b[None]) ** 2).sum(-1), 0))


def calibration_rate(rev, old, new, y):
    """Fraction of backward-system positive pairs (i, p) closer than every negative
    of both systems: d_A(i, p) < min_k min(d_A(i, k), d_B(i, k))."""
    d_a, d_b = _dist(rev, old), _dist(new, new)
    same = y[:, None] == y[None]
    hits = []
    for i in range(len(y)):
        neg_min = min(d_a[i][~same[i]].min(), d_b[i][~same[i]].min())
        hits.extend(d_a[i][same[i]] < neg_min)
    return float(np.mean(hits))


# --------------------------------------------------------------------------- #
# modules
# --------------------------------------------------------------------------- #
def test_rho_is_identity_at_init():
    torch.manual_seed(0)
    rho = LearnableEmbedding(8)
    assert torch.equal(rho.mlp[-1].weight, torch.zeros(8, 16))
    assert torch.equal(rho.mlp[-1].bias, torch.zeros(8))
    z = F.normalize(torch.randn(10, 8), dim=1)
    for mode in (True, False):
        rho.train(mode)
        out = rho(z)
        assert torch.equal(out, F.normalize(F.normalize(z, dim=1), dim=1))
        assert torch.allclose(out, z, atol=1e-6)
    # raw (non-unit) inputs come out normalised
    assert torch.allclose(rho.eval()(3 * z), z, atol=1e-6)


@pytest.mark.parametrize("cls,args,d_in,d_out", [
    (ReverseTransform, (16, 8), 16, 8),
    (ForwardTransform, (8, 16), 8, 16),
    (FastFillTransform, (8, 16), 8, 16),
    (LearnableEmbedding, (12,), 12, 12),
])
def test_module_shapes_and_unit_outputs(cls, args, d_in, d_out):
    torch.manual_seed(0)
    m = cls(*args)
    assert m.config["hidden"] == 2 * d_in
    x = torch.randn(7, d_in)
    out = m.train()(x)
    emb = out[0] if isinstance(out, tuple) else out
    assert emb.shape == (7, d_out)
    assert torch.allclose(emb.norm(dim=1), torch.ones(7), atol=1e-5)
    if cls is FastFillTransform:
        assert out[1].shape == (7,)
    ev = apply(m, x.numpy(), batch_size=3)
    assert ev.dtype == np.float32 and ev.shape == (7, d_out)
    assert np.allclose(np.linalg.norm(ev, axis=1), 1, atol=1e-5)
    assert m.training  # mode restored by apply
    with pytest.raises(ValueError, match=f"expects {d_in}"):
        apply(m, np.zeros((3, d_in + 1)))


def test_config_round_trip_and_checkpoint(tmp_path, data):
    new, old, y = data
    psi, rho, _ = train_reverse(new, old, y, use_cmcl=True, learn_new=True, epochs=2,
                                batch_size=48, disable=True)
    for module, x in ((psi, new), (rho, new)):
        rebuilt = build_module(module.config)
        assert type(rebuilt) is type(module) and rebuilt.config == module.config
        pt, js = save_module(module, tmp_path / type(module).__name__)
        assert pt.exists() and js.exists()
        torch.load(pt, weights_only=True)  # plain tensors only
        loaded = load_module(tmp_path / type(module).__name__)
        assert not loaded.training
        np.testing.assert_array_equal(apply(loaded, x), apply(module, x))
    with pytest.raises(ValueError, match="not one of"):
        build_module({"type": "Nope"})
    with pytest.raises(ValueError, match="bad arguments"):
        build_module({"type": "ReverseTransform", "d_new": 3})


# --------------------------------------------------------------------------- #
# batches and augmented passes
# --------------------------------------------------------------------------- #
def test_class_balanced_batches():
    y = np.array([0] * 10 + [1] * 10 + [2] * 3 + [3] * 1 + [4] * 8)
    rng = np.random.default_rng(0)
    batches = class_balanced_batches(y, batch_size=16, samples_per_class=4, rng=rng)
    assert len(batches) == len(y) // 16
    for b in batches:
        assert len(set(b.tolist())) == len(b)  # no duplicates
        counts = np.bincount(y[b], minlength=5)
        assert (counts <= 4).all() and (counts > 0).sum() == 4
        for c in np.flatnonzero(counts):
            assert counts[c] == min(4, (y == c).sum())
    with pytest.raises(ValueError, match="fewer than 2 classes"):
        class_balanced_batches(y, batch_size=4, samples_per_class=4, rng=rng)


def test_random_batches_cover_once():
    rng = np.random.default_rng(0)
    batches = random_batches(33, 16, rng)
    assert [len(b) for b in batches] == [16, 17]  # a lone trailing sample joins
    assert sorted(np.concatenate(batches).tolist()) == list(range(33))


def test_passes_pair_old_and_new_from_the_same_pass():
    n_passes, n = 3, 20
    marker = torch.arange(n_passes)[:, None, None] * 1000.0 + torch.arange(n)[None, :, None]
    old_v, new_v = marker.expand(n_passes, n, 2), marker.expand(n_passes, n, 5)
    passes = _draw_passes(n_passes, n, np.random.default_rng(0))
    assert set(passes.tolist()) == {0, 1, 2}
    idx = np.array([4, 0, 19, 7])
    o, nw = _gather(old_v, passes, idx), _gather(new_v, passes, idx)
    assert torch.equal(o[:, 0], nw[:, 0])
    assert torch.equal(o[:, 0] % 1000, torch.tensor(idx, dtype=torch.float32))
    assert torch.equal(o[:, 0] // 1000, torch.tensor(passes[idx], dtype=torch.float32))


def test_training_with_augmented_passes(data):
    new, old, y = data
    g = np.random.default_rng(5)
    new_p = _unit(new[None] + 0.05 * g.normal(size=(3,) + new.shape))
    old_p = _unit(old[None] + 0.05 * g.normal(size=(3,) + old.shape))
    psi, _, hist = train_reverse(new_p, old_p, y, use_cmcl=True, **FAST)
    assert hist["loss"].iloc[-1] < hist["loss"].iloc[0]
    h, hist = train_fct(old_p, new_p, **FAST)
    assert hist["loss"].iloc[-1] < hist["loss"].iloc[0]
    with pytest.raises(ValueError, match="augmented passes"):
        train_reverse(new_p[:2], old_p, y, use_cmcl=True, **FAST)


# --------------------------------------------------------------------------- #
# training
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("kw", [
    dict(),
    dict(use_cmcl=True),
    dict(use_cmcl=True, variant="separate", hard_negatives=5),
    dict(use_cmcl=True, variant="single", lambda_rev=0.0),
    dict(use_cmcl=True, learn_new=True),
])
def test_train_reverse_reduces_loss(data, kw):
    new, old, y = data
    psi, rho, hist = train_reverse(new, old, y, **FAST, **kw)
    assert list(hist["epoch"]) == list(range(FAST["epochs"]))
    assert hist["loss"].iloc[-1] < 0.7 * hist["loss"].iloc[0]
    assert not psi.training and psi.config["d_old"] == old.shape[1]
    assert (rho is not None) == kw.get("learn_new", False)
    if rho is not None:
        assert not rho.training
        assert rho.mlp[-1].weight.abs().sum() > 0  # rho moved away from the identity
    assert ("cmcl" in hist) == kw.get("use_cmcl", False)
    assert hist["lr"].iloc[-1] < 1e-3 * FAST["lr"]  # cosine schedule reached ~0


def test_cmcl_calibrates_the_two_systems(data):
    """The property CMCL is for: backward-system positives closer than the negatives
    of both systems, more often than before training and than with L_rev alone."""
    new, old, y = data
    torch.manual_seed(0)
    before = calibration_rate(apply(ReverseTransform(16, 8), new), old, new, y)
    psi_rev, _, _ = train_reverse(new, old, y, **FAST)
    psi_cmcl, _, _ = train_reverse(new, old, y, use_cmcl=True, **FAST)
    rev_only = calibration_rate(apply(psi_rev, new), old, new, y)
    cmcl = calibration_rate(apply(psi_cmcl, new), old, new, y)
    assert cmcl > before + 0.2
    assert cmcl > rev_only + 0.05


def test_training_is_deterministic(data):
    new, old, y = data
    kw = dict(use_cmcl=True, learn_new=True, epochs=3, batch_size=48, disable=True)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a_psi, a_rho, a_hist = train_reverse(new, old, y, seed=7, **kw)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    torch.manual_seed(999)  # the global RNG must not matter
    b_psi, b_rho, b_hist = train_reverse(new, old, y, seed=7, **kw)
    for a, b in ((a_psi, b_psi), (a_rho, b_rho)):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a_hist.equals(b_hist)
    c_psi, _, _ = train_reverse(new, old, y, seed=8, **kw)
    assert not torch.equal(c_psi.mlp[0].weight, a_psi.mlp[0].weight)


def test_train_fct_and_fastfill(data):
    new, old, y = data
    h, hist = train_fct(old, new, **FAST)
    assert hist["loss"].iloc[-1] < 0.7 * hist["loss"].iloc[0]
    assert isinstance(h, ForwardTransform) and not h.training
    err_h = ((apply(h, old) - new) ** 2).sum(1).mean()
    err_mean = ((_unit(new.mean(0, keepdims=True)) - new) ** 2).sum(1).mean()
    assert err_h < 0.7 * err_mean  # better than predicting one direction

    # FastFill: classes 3-5 get extra noise in the new space, so h cannot predict
    # them well; the uncertainty head should learn to rank them first.
    hard = y >= 3
    noisy_new = new.copy()
    noisy_new[hard] = _unit(new[hard] + np.random.default_rng(0).normal(size=new[hard].shape))
    model, hist = train_fastfill(old, noisy_new, **{**FAST, "epochs": 40})
    assert hist["loss"].iloc[-1] < hist["loss"].iloc[0]
    assert {"l2", "log_sigma"} <= set(hist.columns)
    emb, log_sigma = apply(model, old, return_all=True)
    assert emb.shape == new.shape and log_sigma.shape == (len(old),)
    auc = (log_sigma[hard][:, None] > log_sigma[~hard][None]).mean()
    assert auc > 0.75
    order = fastfill_order(model, old)
    assert hard[order[: hard.sum()]].mean() > 0.7


def test_fastfill_order(data):
    new, old, y = data
    torch.manual_seed(0)
    model = FastFillTransform(8, 16)
    order = fastfill_order(model, old)
    assert order.dtype == np.int64 and sorted(order.tolist()) == list(range(len(old)))
    log_sigma = apply(model, old, return_all=True)[1]
    assert np.all(np.diff(log_sigma[order]) <= 0)
    # constant uncertainty: ties keep index order (stable sort)
    with torch.no_grad():
        model.sigma[-1].weight.zero_()
        model.sigma[-1].bias.fill_(0.5)
    assert np.array_equal(fastfill_order(model, old), np.arange(len(old)))
    with pytest.raises(ValueError, match="no uncertainty"):
        fastfill_order(ForwardTransform(8, 16), old)


# --------------------------------------------------------------------------- #
# error paths
# --------------------------------------------------------------------------- #
def test_input_errors(data):
    new, old, y = data
    with pytest.raises(ValueError, match="new_emb and old_emb must hold the same samples"):
        train_reverse(new, old[:-1], y, **FAST)
    with pytest.raises(ValueError, match="labels must be a 1-D array of length"):
        train_reverse(new, old, y[:-1], use_cmcl=True, **FAST)
    bad = new.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="new_emb contains 1 NaN"):
        train_reverse(bad, old, y, **FAST)
    with pytest.raises(ValueError, match="old_emb contains"):
        train_fct(bad[:, :8], new, **FAST)
    with pytest.raises(ValueError, match="emb contains"):
        apply(ReverseTransform(16, 8), bad)
    with pytest.raises(ValueError, match=r"\(N, d\) or \(P, N, d\)"):
        train_fct(old[0], new, **FAST)
    with pytest.raises(ValueError, match="psi maps new embeddings to 4 dimensions but old_emb has 8"):
        train_reverse(new, old, y, psi=ReverseTransform(16, 4), **FAST)
    with pytest.raises(ValueError, match="psi cannot take"):
        train_reverse(new, old, y, psi=ReverseTransform(12, 8), **FAST)
    with pytest.raises(ValueError, match="h maps old embeddings to 12"):
        train_fct(old, new, h=ForwardTransform(8, 12), **FAST)
    with pytest.raises(ValueError, match="learn_new=True needs use_cmcl"):
        train_reverse(new, old, y, learn_new=True, **FAST)
    with pytest.raises(ValueError, match="single"):
        train_reverse(new, old, y, use_cmcl=True, learn_new=True, variant="single", **FAST)
    with pytest.raises(ValueError, match="nothing to train"):
        train_reverse(new, old, y, lambda_rev=0.0, **FAST)
    with pytest.raises(ValueError, match="needs labels"):
        train_reverse(new, old, None, use_cmcl=True, **FAST)
    with pytest.raises(ValueError, match="variant"):
        train_reverse(new, old, y, use_cmcl=True, variant="both", **FAST)
    with pytest.raises(ValueError, match="epochs"):
        train_fastfill(old, new, epochs=0)


def test_given_psi_is_trained_in_place(data):
    new, old, y = data
    torch.manual_seed(1)
    psi = ReverseTransform(16, 8, hidden=10)
    w0 = psi.mlp[0].weight.clone()
    out, _, _ = train_reverse(new, old, y, psi=psi, epochs=2, batch_size=48, disable=True)
    assert out is psi and out.config["hidden"] == 10
    assert not torch.equal(w0, psi.mlp[0].weight)
