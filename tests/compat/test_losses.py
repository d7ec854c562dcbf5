"""Tests of backfill_utils.compat.losses against direct loop implementations of the formulas."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backfill_utils.compat.losses import (
    CMCLLoss,
    bct_influence_loss,
    bict_loss,
    classification_loss,
    cmcl_loss,
    fastfill_loss,
    feature_regression,
    heteroscedastic_loss,
    pairwise_distance,
    reverse_loss,
)

EPS = 1e-8  # the eps inside the Euclidean distance


# --------------------------------------------------------------------------- #
# reference implementation: PAPER.md 2.3, written as plainly as possible
# --------------------------------------------------------------------------- #
def _d(a, b, distance):
    sq = sum((float(x) - float(z)) ** 2 for x, z in zip(a, b))
    return math.sqrt(sq + EPS) if distance == "euclidean" else sq


def ref_cmcl(rq, og, nq, ng, y, tau, variant, m, distance):
    n = len(y)
    s_a = [[-_d(rq[i], og[j], distance) / tau for j in range(n)] for i in range(n)]
    s_b = [[-_d(nq[i], ng[j], distance) / tau for j in range(n)] for i in range(n)]

    def negatives(s, i):
        vals = sorted((s[i][k] for k in range(n) if y[k] != y[i]), reverse=True)
        return vals if m is None else vals[:m]

    def anchor(s_own, s_other, i, positives, joint):
        neg = negatives(s_own, i) + (negatives(s_other, i) if joint else [])
        total = 0.0
        for p in positives:
            num = math.exp(s_own[i][p])
            total += -math.log(num / (num + sum(math.exp(v) for v in neg)))
        return total / len(positives)

    joint = variant == "joint"
    l_a = [anchor(s_a, s_b, i, [j for j in range(n) if y[j] == y[i]], joint) for i in range(n)]
    if variant == "single":
        return sum(l_a) / n
    l_b = []
    for i in range(n):
        pb = [j for j in range(n) if j != i and y[j] == y[i]]
        if pb:  # anchors without a second member of their class are left out
            l_b.append(anchor(s_b, s_a, i, pb, joint))
    return sum(l_a) / n + (sum(l_b) / len(l_b) if l_b else 0.0)


def _batch(seed=0, n=8, d_old=4, d_new=5, labels=(0, 0, 0, 1, 1, 1, 1, 2)):
    g = torch.Generator().manual_seed(seed)
    rq = F.normalize(torch.randn(n, d_old, generator=g, dtype=torch.float64), dim=1)
    og = F.normalize(torch.randn(n, d_old, generator=g, dtype=torch.float64), dim=1)
    nq = F.normalize(torch.randn(n, d_new, generator=g, dtype=torch.float64), dim=1)
    ng = F.normalize(torch.randn(n, d_new, generator=g, dtype=torch.float64), dim=1)
    return rq, og, nq, ng, torch.tensor(labels)


@pytest.mark.parametrize("variant", ["joint", "separate", "single"])
@pytest.mark.parametrize("distance", ["euclidean", "squared"])
@pytest.mark.parametrize("m", [None, 2])
@pytest.mark.parametrize("shared_new", [False, True])
def test_cmcl_matches_loop(variant, distance, m, shared_new):
    rq, og, nq, ng, y = _batch(seed=3)
    if shared_new:
        ng = nq  # the usual case: new query and gallery are the same embeddings
    tau = 0.1 if distance == "euclidean" else 0.5
    got = cmcl_loss(rq, og, nq, ng, y, tau=tau, variant=variant, hard_negatives=m, distance=distance)
    want = ref_cmcl(rq.tolist(), og.tolist(), nq.tolist(), ng.tolist(), y.tolist(),
                    tau, variant, m, distance)
    assert got.ndim == 0
    assert got.item() == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_cmcl_variants_differ_and_hard_negatives_matter():
    rq, og, nq, ng, y = _batch(seed=1)
    vals = {v: cmcl_loss(rq, og, nq, ng, y, variant=v).item() for v in ["joint", "separate", "single"]}
    assert len(set(vals.values())) == 3
    # joint denominators hold more negatives than separate ones
    assert vals["joint"] > vals["separate"]
    full = cmcl_loss(rq, og, nq, ng, y).item()
    hard = cmcl_loss(rq, og, nq, ng, y, hard_negatives=1).item()
    assert hard < full
    assert cmcl_loss(rq, og, nq, ng, y, hard_negatives=100).item() == pytest.approx(full)


def test_cmcl_module_wrapper():
    rq, og, nq, ng, y = _batch(seed=2)
    crit = CMCLLoss(tau=0.2, variant="separate", hard_negatives=3)
    assert crit(rq, og, nq, ng, y).item() == pytest.approx(
        cmcl_loss(rq, og, nq, ng, y, tau=0.2, variant="separate", hard_negatives=3).item())


@pytest.mark.parametrize("distance", ["euclidean", "squared"])
@pytest.mark.parametrize("variant,m", [("joint", None), ("separate", None), ("joint", 2)])
def test_cmcl_gradcheck(distance, variant, m):
    rq, og, nq, ng, y = _batch(seed=4, n=6, d_old=3, d_new=3, labels=(0, 0, 1, 1, 1, 2))
    inputs = tuple(t.clone().requires_grad_(True) for t in (rq, og, nq, ng))
    assert torch.autograd.gradcheck(
        lambda a, b, c, d: cmcl_loss(a, b, c, d, y, tau=0.5, variant=variant,
                                     hard_negatives=m, distance=distance),
        inputs, eps=1e-6, atol=1e-5,
    )


def test_cmcl_gradient_finite_with_shared_tensor_and_single_class():
    # diagonal of the new system has distance 0; a single-class batch has no negatives
    z = F.normalize(torch.randn(4, 3), dim=1).requires_grad_(True)
    r = F.normalize(torch.randn(4, 3), dim=1).requires_grad_(True)
    loss = cmcl_loss(r, r, z, z, torch.zeros(4, dtype=torch.long))
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(z.grad).all() and torch.isfinite(r.grad).all()
    z.grad = None
    y = torch.tensor([0, 0, 1, 2])
    cmcl_loss(r, r.detach(), z, z, y).backward()
    assert torch.isfinite(z.grad).all()


def test_cmcl_all_singletons_leaves_out_system_b():
    rq, og, nq, ng, _ = _batch(n=4)
    y = torch.arange(4)
    joint = cmcl_loss(rq, og, nq, ng, y).item()
    assert joint == pytest.approx(ref_cmcl(rq.tolist(), og.tolist(), nq.tolist(), ng.tolist(),
                                           y.tolist(), 0.1, "joint", None, "euclidean"))


def test_cmcl_errors():
    rq, og, nq, ng, y = _batch()
    with pytest.raises(ValueError, match="variant"):
        cmcl_loss(rq, og, nq, ng, y, variant="both")
    with pytest.raises(ValueError, match="tau"):
        cmcl_loss(rq, og, nq, ng, y, tau=0)
    with pytest.raises(ValueError, match="hard_negatives"):
        cmcl_loss(rq, og, nq, ng, y, hard_negatives=0)
    with pytest.raises(ValueError, match="distance"):
        cmcl_loss(rq, og, nq, ng, y, distance="cosine")
    with pytest.raises(ValueError, match="rev_q and old_g"):
        cmcl_loss(rq[:5], og, nq, ng, y)
    with pytest.raises(ValueError, match="rev_q and old_g"):
        cmcl_loss(rq, og[:, :3], nq, ng, y)
    with pytest.raises(ValueError, match="new_q and new_g"):
        cmcl_loss(rq, og, nq, ng[:, :2], y)
    with pytest.raises(ValueError, match="needs new_q"):
        cmcl_loss(rq, og, None, None, y)
    # single needs only system A
    assert torch.isfinite(cmcl_loss(rq, og, None, None, y, variant="single"))


def test_pairwise_distance_matches_cdist():
    a, b = torch.randn(5, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    ref = torch.cdist(a, b)
    # float64: the expansion |a|^2 + |b|^2 - 2ab loses ~1e-16 * (|a| + |b|)^2 < 1e-14 here
    assert torch.allclose(pairwise_distance(a, b, "squared"), ref**2, atol=1e-12)
    assert torch.allclose(pairwise_distance(a, b), torch.sqrt(ref**2 + EPS), atol=1e-12)


def test_reverse_loss_matches_loop():
    g = np.random.default_rng(0)
    rev, old = g.normal(size=(5, 3)), g.normal(size=(5, 3))
    want = sum(sum((rev[i, k] - old[i, k]) ** 2 for k in range(3)) for i in range(5)) / 5
    assert reverse_loss(torch.tensor(rev), torch.tensor(old)).item() == pytest.approx(want)
    with pytest.raises(ValueError, match="same"):
        reverse_loss(torch.zeros(5, 3), torch.zeros(5, 4))


def test_bct_influence_loss_matches_cross_entropy():
    torch.manual_seed(0)
    clf = torch.nn.Linear(4, 3).requires_grad_(False)
    emb = torch.randn(6, 4, requires_grad=True)
    y = torch.tensor([0, 4, 2, 3, 1, 5])
    keep = y < 3
    want = F.cross_entropy(clf(emb[keep]), y[keep])
    got = bct_influence_loss(emb, y, clf, 3)
    assert got.item() == pytest.approx(want.item())
    got.backward()
    assert emb.grad[~keep].abs().sum() == 0 and emb.grad[keep].abs().sum() > 0
    # a weight tensor works too, and gives the same number
    w = clf.weight.clone().requires_grad_(True)
    clf_nobias = torch.nn.Linear(4, 3, bias=False)
    clf_nobias.weight.data.copy_(w.data)
    assert bct_influence_loss(emb, y, w, 3).item() == pytest.approx(
        F.cross_entropy(clf_nobias(emb[keep]), y[keep]).item())


def test_bct_influence_loss_without_old_samples_is_zero_with_grad():
    clf = torch.nn.Linear(4, 3).requires_grad_(False)
    emb = torch.randn(3, 4, requires_grad=True)
    loss = bct_influence_loss(emb, torch.tensor([3, 4, 5]), clf, 3)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(emb.grad, torch.zeros_like(emb))
    with pytest.raises(ValueError, match="num_old_classes"):
        bct_influence_loss(emb, torch.tensor([0, 1, 2]), torch.nn.Linear(4, 5), 3)


def test_heteroscedastic_loss_matches_formula():
    g = np.random.default_rng(1)
    loss, s = g.uniform(0, 3, size=7), g.normal(size=7)
    want = np.mean(0.5 * np.exp(-s) * loss + 0.5 * s)
    got = heteroscedastic_loss(torch.tensor(loss), torch.tensor(s).reshape(7, 1))
    assert got.item() == pytest.approx(want)
    with pytest.raises(ValueError, match="one log_sigma per sample"):
        heteroscedastic_loss(torch.zeros(3), torch.zeros(4))


def test_heteroscedastic_loss_weight_of_the_log_variance():
    g = np.random.default_rng(2)
    loss, s = g.uniform(0, 3, size=5), g.normal(size=5)
    want = np.mean(0.5 * np.exp(-s) * loss + 0.3 * s)
    got = heteroscedastic_loss(torch.tensor(loss), torch.tensor(s), mu_uncertainty=0.3)
    assert got.item() == pytest.approx(want, rel=1e-12)


# --------------------------------------------------------------------------- #
# FastFill and BiCT, against loops over samples, classes and dimensions
# --------------------------------------------------------------------------- #
def _ref_regression(pred, target, reduction):
    out = []
    for p, t in zip(pred, target):
        sq = sum((a - b) ** 2 for a, b in zip(p, t))
        out.append(sq if reduction == "sum" else sq / len(p))
    return out


def _ref_ce(logits, labels, eps):
    """(1 - eps) * (-log p_y) + eps * mean_k (-log p_k), one value per sample."""
    out = []
    for row, y in zip(logits, labels):
        log_z = math.log(sum(math.exp(v) for v in row))
        nll = [log_z - v for v in row]
        out.append((1 - eps) * nll[y] + eps * sum(nll) / len(row))
    return out


def _ff_batch(seed=0, n=7, d=5, c=4):
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    target = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    log_sigma = torch.randn(n, generator=g, dtype=torch.float64)
    w = torch.randn(c, d, generator=g, dtype=torch.float64)
    labels = torch.randint(0, c, (n,), generator=g)
    return emb, target, log_sigma, w, labels


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_feature_regression_matches_loop(reduction):
    emb, target, *_ = _ff_batch()
    got = feature_regression(emb, target, reduction)
    want = _ref_regression(emb.tolist(), target.tolist(), reduction)
    assert got.shape == (7,)
    assert got.tolist() == pytest.approx(want, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_classification_loss_matches_loop(eps):
    emb, _, _, w, labels = _ff_batch(seed=1)
    logits = 3 * emb @ w.T
    got = classification_loss(logits, labels, eps)
    want = _ref_ce(logits.tolist(), labels.tolist(), eps)
    assert got.tolist() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("mu,eps,mu_unc,reduction", [
    (1.0, 0.1, 0.5, "sum"),   # the defaults (the authors' weights)
    (1.0, 0.1, 0.5, "mean"),  # the authors' reduction over dimensions
    (0.7, 0.0, 0.25, "sum"),
    (0.0, 0.1, 0.5, "sum"),   # COMPAT_VERSION 1: no classification term
])
def test_fastfill_loss_matches_loop(mu, eps, mu_unc, reduction):
    emb, target, s, w, labels = _ff_batch(seed=2)
    logits = 4 * emb @ w.T
    got = fastfill_loss(emb, target, s, logits, labels, mu=mu, label_smoothing=eps,
                        mu_uncertainty=mu_unc, regression=reduction)
    reg = _ref_regression(emb.tolist(), target.tolist(), reduction)
    ce = _ref_ce(logits.tolist(), labels.tolist(), eps)
    want = sum(0.5 * math.exp(-si) * (r + mu * c) + mu_unc * si
               for r, c, si in zip(reg, ce, s.tolist())) / len(reg)
    assert got.item() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("ce_w,feat_w,eps", [(1.0, 1.0, 0.0), (0.5, 2.0, 0.1), (1.0, 0.0, 0.0)])
def test_bict_loss_matches_loop(ce_w, feat_w, eps):
    emb, target, _, w, labels = _ff_batch(seed=3)
    logits = 4 * emb @ w.T
    got = bict_loss(emb, target, logits, labels, ce_weight=ce_w, feature_weight=feat_w,
                    label_smoothing=eps)
    reg = _ref_regression(emb.tolist(), target.tolist(), "sum")
    ce = _ref_ce(logits.tolist(), labels.tolist(), eps)
    want = feat_w * sum(reg) / len(reg) + ce_w * sum(ce) / len(ce)
    assert got.item() == pytest.approx(want, rel=1e-12)


def test_fastfill_and_bict_gradcheck():
    emb, target, s, w, labels = _ff_batch(seed=4, n=5, d=3, c=3)
    inputs = (emb.clone().requires_grad_(True), s.clone().requires_grad_(True),
              w.clone().requires_grad_(True))

    def ff(e, log_sigma, weight):
        return fastfill_loss(e, target, log_sigma, 4 * F.normalize(e, dim=1) @ weight.T, labels,
                             mu=0.8, label_smoothing=0.1, mu_uncertainty=0.5)

    def bi(e, log_sigma, weight):
        return bict_loss(e, target, 4 * e @ weight.T, labels, ce_weight=0.6,
                         feature_weight=1.3, label_smoothing=0.1) + 0 * log_sigma.sum()

    for fn in (ff, bi):
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


def test_fastfill_and_bict_errors():
    emb, target, s, w, labels = _ff_batch()
    logits = emb @ w.T
    with pytest.raises(ValueError, match="needs logits and labels"):
        fastfill_loss(emb, target, s, mu=1.0)
    with pytest.raises(ValueError, match="needs logits and labels"):
        bict_loss(emb, target, logits, None)
    with pytest.raises(ValueError, match="same \\(n, d\\) shape"):
        fastfill_loss(emb, target[:, :3], s, logits, labels)
    with pytest.raises(ValueError, match="one log_sigma per sample"):
        fastfill_loss(emb, target, s[:3], logits, labels)
    with pytest.raises(ValueError, match="\\(n, C\\) logits and \\(n,\\) labels"):
        fastfill_loss(emb, target, s, logits, labels[:3])
    with pytest.raises(ValueError, match="labels must lie in \\[0, 4\\)"):
        bict_loss(emb, target, logits, labels + 4)
    with pytest.raises(ValueError, match="reduction='median'"):
        feature_regression(emb, target, "median")
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        classification_loss(logits, labels, 1.0)
    # no classification term: logits and labels are not needed
    assert torch.isfinite(fastfill_loss(emb, target, s, mu=0.0))
    assert torch.isfinite(bict_loss(emb, target, ce_weight=0.0))
