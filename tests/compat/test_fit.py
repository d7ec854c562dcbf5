"""Tests of backfill_utils.compat.fit (and compat_inputs): batches, augmented passes,
training psi/rho, FCT, FastFill and BiCT on small synthetic problems with known answers,
and the error paths."""

import math

import numpy as np
import pytest
import torch
from compat_problems import accuracy, center_classifier, single_thread, synthetic, unit  # noqa: F401

from backfill_utils.compat.fit import fit_bict, fit_fastfill, fit_fct, fit_reverse
from backfill_utils.compat.inputs import class_balanced_batches, draw_passes, gather, random_batches
from backfill_utils.compat.modules import (
    FastFillSideProjection,
    FastFillTransform,
    ForwardTransform,
    LearnableEmbedding,
    ReverseTransform,
    SideProjection,
    apply,
    fastfill_order,
)
from backfill_utils.compat.recipes import (
    BiCTRecipe,
    CMCLPsiRecipe,
    CMCLPsiRhoRecipe,
    FastFillRecipe,
    FCTRecipe,
    RevPsiRecipe,
)

FAST = dict(epochs=25, batch_size=48, lr=3e-3)
#: FCT / FastFill with the small MLP h and a plain schedule (the authors' recipe is tested apart)
SMALL = dict(arch="mlp", hidden=None, depth=1, weight_decay=0.0, warmup_epochs=0, bn_eval_half=False,
             regression="sum")


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
    batches = random_batches(33, 16, np.random.default_rng(0))
    assert [len(b) for b in batches] == [16, 17]  # a lone trailing sample joins
    assert sorted(np.concatenate(batches).tolist()) == list(range(33))


def test_passes_pair_the_two_spaces_from_the_same_pass():
    n_passes, n = 3, 20
    marker = torch.arange(n_passes)[:, None, None] * 1000.0 + torch.arange(n)[None, :, None]
    old_v, new_v = marker.expand(n_passes, n, 2), marker.expand(n_passes, n, 5)
    passes = draw_passes(n_passes, n, np.random.default_rng(0))
    assert set(passes.tolist()) == {0, 1, 2}
    idx = np.array([4, 0, 19, 7])
    o, nw = gather(old_v, passes, idx), gather(new_v, passes, idx)
    assert torch.equal(o[:, 0], nw[:, 0])
    assert torch.equal(o[:, 0] % 1000, torch.tensor(idx, dtype=torch.float32))
    assert torch.equal(o[:, 0] // 1000, torch.tensor(passes[idx], dtype=torch.float32))


@pytest.mark.slow
def test_training_with_augmented_passes(data):
    new, old, y, centers = data
    g = np.random.default_rng(5)
    new_p = unit(new[None] + 0.05 * g.normal(size=(3,) + new.shape))
    old_p = unit(old[None] + 0.05 * g.normal(size=(3,) + old.shape))
    _, _, hist = fit_reverse(CMCLPsiRecipe(**FAST), new_p, old_p, y, disable=True)
    assert hist["loss"].iloc[-1] < hist["loss"].iloc[0]
    _, hist = fit_bict(BiCTRecipe(**FAST), old_p, new_p, y, center_classifier(centers),
                       disable=True)
    assert hist["loss"].iloc[-1] < hist["loss"].iloc[0]
    with pytest.raises(ValueError, match="augmented passes"):
        fit_reverse(CMCLPsiRecipe(**FAST), new_p[:2], old_p, y, disable=True)


# --------------------------------------------------------------------------- #
# psi and rho
# --------------------------------------------------------------------------- #
@pytest.mark.slow
@pytest.mark.parametrize("recipe", [
    RevPsiRecipe(**FAST),
    CMCLPsiRecipe(**FAST),
    CMCLPsiRecipe(variant="single", lambda_rev=0.0, **FAST),
    CMCLPsiRhoRecipe(**FAST),
    CMCLPsiRhoRecipe(variant="separate", hard_negatives=5, **FAST),
    CMCLPsiRhoRecipe(depth=2, hidden=24, rho_depth=2, rho_hidden=20, **FAST),
], ids=["rev", "cmcl", "single_no_rev", "psi_rho", "separate_hard", "depth2"])
def test_fit_reverse_reduces_loss(data, recipe):
    new, old, y, _ = data
    psi, rho, hist = fit_reverse(recipe, new, old, y, disable=True)
    assert list(hist["epoch"]) == list(range(recipe.epochs))
    assert hist["loss"].iloc[-1] < 0.7 * hist["loss"].iloc[0]
    assert not psi.training and psi.config["d_old"] == old.shape[1]
    assert psi.config["depth"] == recipe.depth
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in psi.mlp) == recipe.depth
    assert (rho is not None) == isinstance(recipe, CMCLPsiRhoRecipe)
    if rho is not None:
        assert not rho.training and rho.config["depth"] == recipe.rho_depth
        assert rho.mlp[-1].weight.abs().sum() > 0  # rho moved away from the identity
    assert ("cmcl" in hist) == (not isinstance(recipe, RevPsiRecipe))
    assert hist["lr"].iloc[-1] < 1e-3 * recipe.lr  # cosine schedule reached ~0


@pytest.mark.slow
def test_cmcl_calibrates_the_two_systems(data):
    """The property CMCL is for: backward-system positives closer than the negatives
    of both systems, more often than before training and than with L_rev alone."""
    new, old, y, _ = data
    torch.manual_seed(0)
    before = calibration_rate(apply(ReverseTransform(16, 8), new), old, new, y)
    psi_rev, _, _ = fit_reverse(RevPsiRecipe(**FAST), new, old, y, disable=True)
    psi_cmcl, _, _ = fit_reverse(CMCLPsiRecipe(**FAST), new, old, y, disable=True)
    rev_only = calibration_rate(apply(psi_rev, new), old, new, y)
    cmcl = calibration_rate(apply(psi_cmcl, new), old, new, y)
    assert cmcl > before + 0.2
    assert cmcl > rev_only + 0.05


@pytest.mark.slow
def test_training_is_deterministic(data):
    new, old, y, _ = data
    recipe = CMCLPsiRhoRecipe(epochs=3, batch_size=48, seed=7)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a_psi, a_rho, a_hist = fit_reverse(recipe, new, old, y, disable=True)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    torch.manual_seed(999)  # the global RNG must not matter
    b_psi, b_rho, b_hist = fit_reverse(recipe, new, old, y, disable=True)
    for a, b in ((a_psi, b_psi), (a_rho, b_rho)):  # exact: same process, same machine
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a_hist.equals(b_hist)
    c_psi, _, _ = fit_reverse(recipe.replace(seed=8), new, old, y, disable=True)
    assert not torch.equal(c_psi.mlp[0].weight, a_psi.mlp[0].weight)


@pytest.mark.slow
def test_given_modules_are_trained_in_place(data):
    new, old, y, _ = data
    torch.manual_seed(1)
    psi, rho = ReverseTransform(16, 8, hidden=10), LearnableEmbedding(16, hidden=6)
    w0 = psi.mlp[0].weight.clone()
    out, out_rho, _ = fit_reverse(CMCLPsiRhoRecipe(epochs=2, batch_size=48), new, old, y,
                                  psi=psi, rho=rho, disable=True)
    assert out is psi and out_rho is rho and out.config["hidden"] == 10
    assert not torch.equal(w0, psi.mlp[0].weight)


# --------------------------------------------------------------------------- #
# FCT, FastFill, BiCT
# --------------------------------------------------------------------------- #
@pytest.mark.slow
def test_fit_fct(data):
    new, old, _, _ = data
    h, hist = fit_fct(FCTRecipe(**FAST, **SMALL), old, new, disable=True)
    assert hist["loss"].iloc[-1] < 0.7 * hist["loss"].iloc[0]
    assert isinstance(h, ForwardTransform) and not h.training
    err_h = ((apply(h, old) - new) ** 2).sum(1).mean()
    err_mean = ((unit(new.mean(0, keepdims=True)) - new) ** 2).sum(1).mean()
    assert err_h < 0.7 * err_mean  # better than predicting one direction


@pytest.mark.slow
def test_fastfill_classification_term_improves_accuracy(data):
    """Through the frozen classifier whose weights are the true class centres, h(old)
    is classified far better than at initialisation and than without the CE term."""
    new, old, y, centers = data
    clf = center_classifier(centers)
    assert accuracy(clf, new, y) == 1.0  # the classifier is the known answer
    torch.manual_seed(0)
    before = accuracy(clf, apply(FastFillTransform(8, 16), old), y)
    model, hist = fit_fastfill(FastFillRecipe(**FAST, **SMALL), old, new, y, clf, disable=True)
    no_ce, _ = fit_fastfill(FastFillRecipe(mu=0.0, **FAST, **SMALL), old, new, disable=True)
    after, without = accuracy(clf, apply(model, old), y), accuracy(clf, apply(no_ce, old), y)
    assert {"l2", "ce", "acc", "log_sigma"} <= set(hist.columns)
    assert hist["loss"].iloc[-1] < 0.5 * hist["loss"].iloc[0]
    assert hist["ce"].iloc[-1] < 0.5 * hist["ce"].iloc[0]
    assert after > before + 0.4 and after > without + 0.1
    assert hist["acc"].iloc[-1] > hist["acc"].iloc[0] + 0.4


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [FastFillRecipe(epochs=60, batch_size=48, lr=1e-2, **SMALL),
                                    FastFillRecipe(mu=0.0, epochs=60, batch_size=48, lr=1e-2, **SMALL)],
                         ids=["default", "no_ce"])
def test_fastfill_uncertainty_ranks_what_old_cannot_tell_apart(recipe):
    """The old model merges classes 3-5 into one cluster: neither the regression nor the
    classification of those samples can be learned, so on held-out samples the
    uncertainty head should rank them first (FastFill's backfill order)."""
    new, old, y, centers = synthetic(n_per_class=48)
    hard = y >= 3
    merged = old.copy()
    merged[hard] = unit(old[hard].mean(0) + 0.05 * np.random.default_rng(0).normal(
        size=old[hard].shape))
    train, test = np.arange(len(y)) % 2 == 0, np.arange(len(y)) % 2 == 1
    model, _ = fit_fastfill(recipe, merged[train], new[train], y[train],
                            center_classifier(centers), disable=True)
    _, log_sigma = apply(model, merged[test], return_all=True)
    h = hard[test]
    assert (log_sigma[h][:, None] > log_sigma[~h][None]).mean() > 0.9  # AUC
    order = fastfill_order(model, merged[test])
    assert h[order[: h.sum()]].mean() > 0.8


@pytest.mark.slow
def test_fit_fct_authors_recipe(data):
    """The authors' recipe: side projection, warm-up then cosine (per step), BatchNorm
    statistics frozen from the middle epoch on, the mean squared error; on_epoch rows join
    the history."""
    new, old, _, _ = data
    recipe = FCTRecipe(epochs=8, batch_size=48, hidden=64, warmup_epochs=2, lr=3e-3)
    assert (recipe.arch, recipe.depth, recipe.bn_eval_half, recipe.regression) == ("side_projection", 2, True,
                                                                                     "mean")
    stats = []

    def on_epoch(epoch, modules):
        assert not modules[0].training
        stats.append(modules[0].mixer[1].running_mean.clone())
        return {"seen": float(epoch)}

    h, hist = fit_fct(recipe, old, new, disable=True, on_epoch=on_epoch)
    assert isinstance(h, SideProjection) and not h.training
    assert hist["seen"].tolist() == list(range(8))
    # BatchNorm statistics move in the first half and are frozen in the second
    assert not torch.equal(stats[0], stats[3])
    assert all(torch.equal(stats[3], s) for s in stats[4:])
    # the learning rate at the end of each epoch (3 steps of 48 out of 144 samples)
    steps, warm, total = 3, 2 * 3, 8 * 3
    expect = [3e-3 * ((t + 1) / warm if t < warm else 0.5 * (1 + math.cos(math.pi * (t - warm) / (total - warm))))
              for t in range(steps, total + 1, steps)]
    assert np.allclose(hist["lr"], expect, rtol=1e-9, atol=0)
    assert hist["loss"].iloc[-1] < 0.7 * hist["loss"].iloc[0]


def test_side_projection_shape_and_parameters():
    """Parameters as the authors' 1x1-conv blocks count them (no bias before BatchNorm)."""
    def count(d_old, d_new, inner, depth):
        branch = d_old * 2 * d_old + 2 * 2 * d_old + 2 * d_old * 2 * d_new + 2 * 2 * d_new
        mixer, width = 0, 4 * d_new
        for _ in range(depth):
            mixer += width * inner + 2 * inner
            width = inner
        return 2 * branch + mixer + inner * d_new + d_new
    for args in ((128, 128, 2048, 2), (8, 16, 32, 1), (16, 8, 24, 3)):
        m = SideProjection(*args[:3], depth=args[3])
        assert sum(p.numel() for p in m.parameters()) == count(*args)
        out = m.eval()(torch.randn(5, args[0]))
        assert out.shape == (5, args[1]) and torch.allclose(out.norm(dim=1), torch.ones(5), atol=1e-5)
    ff = FastFillSideProjection(8, 16, 32).eval()
    emb, log_sigma = ff(torch.randn(4, 8))
    assert emb.shape == (4, 16) and log_sigma.shape == (4,)


def test_recipe_warmup_must_leave_epochs():
    with pytest.raises(ValueError, match="warmup_epochs must be smaller than epochs"):
        FCTRecipe(epochs=5, warmup_epochs=5)
    with pytest.raises(ValueError, match="arch must be one of"):
        FCTRecipe(arch="conv")


@pytest.mark.slow
def test_fit_bict(data):
    """BiCT's h maps old embeddings into the BCT space: closer to the BCT embeddings and
    better classified by the frozen BCT classifier than at initialisation."""
    bct, old, y, centers = data
    clf = center_classifier(centers)
    torch.manual_seed(0)
    init = apply(ForwardTransform(8, 16), old)
    h, hist = fit_bict(BiCTRecipe(**FAST), old, bct, y, clf, disable=True)
    assert isinstance(h, ForwardTransform) and not h.training
    assert list(hist.columns) == ["epoch", "loss", "l2", "ce", "acc", "lr"]
    assert hist["loss"].iloc[-1] < 0.5 * hist["loss"].iloc[0]
    out = apply(h, old)
    assert ((out - bct) ** 2).sum(1).mean() < 0.7 * ((init - bct) ** 2).sum(1).mean()
    assert accuracy(clf, out, y) > accuracy(clf, init, y) + 0.4
    # the regression-only reading needs neither labels nor a classifier
    h2, hist2 = fit_bict(BiCTRecipe(ce_weight=0.0, **FAST), old, bct, disable=True)
    assert "ce" not in hist2 and hist2["loss"].iloc[-1] < hist2["loss"].iloc[0]


@pytest.mark.slow
def test_classifier_stays_frozen_and_untouched(data):
    new, old, y, centers = data
    clf = center_classifier(centers).requires_grad_(True).train()
    w0 = clf.weight.detach().clone()
    fit_fastfill(FastFillRecipe(epochs=2, batch_size=48, **SMALL), old, new, y, clf, disable=True)
    fit_bict(BiCTRecipe(epochs=2, batch_size=48), old, new, y, clf, disable=True)
    assert torch.equal(clf.weight.detach(), w0) and clf.weight.grad is None
    assert clf.weight.requires_grad and clf.training  # caller's state restored


# --------------------------------------------------------------------------- #
# error paths
# --------------------------------------------------------------------------- #
@pytest.mark.slow
def test_input_errors(data):
    new, old, y, centers = data
    clf = center_classifier(centers)
    r = CMCLPsiRecipe(epochs=1, batch_size=48)
    with pytest.raises(ValueError, match="new_emb and old_emb must hold the same samples"):
        fit_reverse(r, new, old[:-1], y)
    with pytest.raises(ValueError, match="labels must be a 1-D array of length 144"):
        fit_reverse(r, new, old, y[:-1])
    with pytest.raises(ValueError, match="needs labels"):
        fit_reverse(r, new, old, None)
    bad = new.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="new_emb contains 1 NaN"):
        fit_reverse(r, bad, old, y)
    with pytest.raises(ValueError, match="old_emb contains"):
        fit_fct(FCTRecipe(epochs=1, **SMALL), bad[:, :8], new)
    with pytest.raises(ValueError, match="emb contains"):
        apply(ReverseTransform(16, 8), bad)
    with pytest.raises(ValueError, match=r"\(N, d\) or \(P, N, d\)"):
        fit_fct(FCTRecipe(epochs=1, **SMALL), old[0], new)
    with pytest.raises(ValueError, match="psi maps 16-dimensional inputs to 4 dimensions but 8"):
        fit_reverse(r, new, old, y, psi=ReverseTransform(16, 4))
    with pytest.raises(ValueError, match="psi cannot take"):
        fit_reverse(r, new, old, y, psi=ReverseTransform(12, 8))
    with pytest.raises(ValueError, match="FCT h maps 8-dimensional inputs to 12"):
        fit_fct(FCTRecipe(epochs=1, **SMALL), old, new, h=ForwardTransform(8, 12))
    with pytest.raises(ValueError, match="rho module was given"):
        fit_reverse(r, new, old, y, rho=LearnableEmbedding(16))
    with pytest.raises(TypeError, match="fit_fct takes a recipe of type FCTRecipe"):
        fit_fct(FastFillRecipe(), old, new)


def test_classifier_errors(data):
    new, old, y, centers = data
    ff, bict = FastFillRecipe(epochs=1, batch_size=48, **SMALL), BiCTRecipe(epochs=1, batch_size=48)
    clf = center_classifier(centers)
    for fit, recipe in ((fit_fastfill, ff), (fit_bict, bict)):
        with pytest.raises(ValueError, match="needs labels and the frozen classifier"):
            fit(recipe, old, new, y, None)
        with pytest.raises(ValueError, match="needs labels and the frozen classifier"):
            fit(recipe, old, new, None, clf)
        with pytest.raises(ValueError, match="labels must be a 1-D array of length 144"):
            fit(recipe, old, new, y[:-2], clf)
        with pytest.raises(ValueError, match=r"classifier cannot take \(16\)-dimensional"):
            fit(recipe, old, new, y, center_classifier(np.ones((6, 12))))
        with pytest.raises(ValueError, match="classifier has 4 classes"):
            fit(recipe, old, new, y, center_classifier(centers[:4]))
        with pytest.raises(ValueError, match="classifier must map"):
            fit(recipe, old, new, y, lambda z: z.sum(1))
        with pytest.raises(ValueError, match="new_emb and old_emb|old_emb and (new|bct)_emb"):
            fit(recipe, old, new[:-1], y, clf)
        bad = old.copy()
        bad[0, 0] = np.inf
        with pytest.raises(ValueError, match="old_emb contains 1 NaN or infinite"):
            fit(recipe, bad, new, y, clf)
